"""Hostile and broken uploads: each gets a clear status or a FAILED document with a reason,
and the service keeps serving everyone else."""

import asyncio
import io
import os

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ragmesh.ingest.v1 import ingest_pb2

STATUS = ingest_pb2.DocumentStatus
READY = STATUS.Value("DOCUMENT_STATUS_READY")
FAILED = STATUS.Value("DOCUMENT_STATUS_FAILED")

ENTITY_BOMB = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<lolz>&lol9;</lolz>"""


def _failed_cases(samples):
    good_pdf = samples.pdf(["A perfectly fine page of text."])
    docx = samples.docx()
    document_xml = (
        ENTITY_BOMB.replace(b"<lolz>&lol9;</lolz>", b"")
        + b'<w:document xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main">'
        b"<w:body><w:p><w:r><w:t>&lol9;</w:t></w:r></w:p></w:body></w:document>"
    )
    return {
        "corrupt-pdf": ("file.pdf", b"%PDF-1.7\n" + os.urandom(2000), "PDF"),
        "truncated-pdf": ("file.pdf", good_pdf[: len(good_pdf) // 3], "PDF"),
        "password-pdf": (
            "file.pdf",
            samples.pdf(["secret"], user_password="hunter2"),
            "password required",
        ),
        "truncated-docx": ("file.docx", docx[: len(docx) // 2], "not a valid DOCX"),
        "docx-zip-bomb": ("file.docx", samples.zip_bomb(docx, 8 * 1024 * 1024), "zip bomb"),
        "docx-entity-bomb": (
            "file.docx",
            samples.docx_with_part("word/document.xml", document_xml, base=docx),
            "DTD",
        ),
        "html-only-scripts": (
            "file.html",
            b"<html><body><script>alert(1)</script><style>p{}</style></body></html>",
            "no text",
        ),
        "whitespace-only": ("file.txt", b"   \n\n\t  \r\n ", "no text"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "corrupt-pdf",
        "truncated-pdf",
        "password-pdf",
        "truncated-docx",
        "docx-zip-bomb",
        "docx-entity-bomb",
        "html-only-scripts",
        "whitespace-only",
    ],
)
async def test_unparseable_files_fail_with_a_reason(client, samples, case):
    filename, data, reason = _failed_cases(samples)[case]
    document = await client.ingest(filename, data)
    assert document.status == FAILED
    assert reason in document.error
    # A failed document has no text to read, and says so.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.call("GetDocumentText", document_id=document.id)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_entity_bomb_as_a_plain_file_is_never_expanded(client):
    document = await client.ingest("bomb.xml", ENTITY_BOMB)
    assert document.status == READY
    text = (await client.call("GetDocumentText", document_id=document.id)).text
    assert "&lol9;" in text and len(text) < 2000


async def test_deeply_nested_html_is_parsed_without_recursion(client):
    html = b"<html><body>" + b"<div>" * 100_000 + b"deep text" + b"</div>" * 100_000
    html += b"<p>after the nesting</p></body></html>"
    document = await client.ingest("deep.html", html)
    assert document.status == READY, document.error
    text = (await client.call("GetDocumentText", document_id=document.id)).text
    assert "deep text" in text and "after the nesting" in text


@pytest.mark.parametrize(
    ("filename", "data"),
    [
        ("not-a-zip.docx", b"\x00\x01\x02binary junk\x00" * 50),
        ("image.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 200),
        ("archive.docx", None),  # a zip that is not a DOCX
    ],
    ids=["docx-not-a-zip", "png", "plain-zip"],
)
async def test_unknown_types_are_refused_at_upload(client, reason_of, filename, data):
    if data is None:
        import zipfile

        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            archive.writestr("readme.txt", "hello")
        data = buffer.getvalue()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.upload(filename, data)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason_of(caught.value) == "UNSUPPORTED_MEDIA_TYPE"
    assert filename in caught.value.details()
    assert not (await client.call("ListDocuments")).documents


async def test_empty_upload_is_invalid(client):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.upload_call("empty.txt", [])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no bytes" in caught.value.details()


async def test_metadata_rules(client):
    def stream(*requests):
        return client.stub.UploadDocument(iter(requests), metadata=client.metadata)

    meta = ingest_pb2.UploadDocumentRequest(metadata=ingest_pb2.DocumentMetadata(filename="a"))
    data = ingest_pb2.UploadDocumentRequest(data=b"hello")
    cases = [
        stream(data),
        stream(meta, data, meta),
        stream(ingest_pb2.UploadDocumentRequest(metadata=ingest_pb2.DocumentMetadata()), data),
        client.upload_call("x" * 300, [b"hello"]),
        client.upload_call("a.txt", [b"hello"], tags=["t"] * 33),
        client.upload_call("a.txt", [b"hello"], attributes={"k": "v" * 2000}),
    ]
    for call in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_oversize_upload_is_refused_and_leaves_nothing(client, ingest_app, reason_of):
    pieces = [b"a" * (512 * 1024)] * 6  # 3 MiB against a 2 MiB limit
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.upload_call("big.txt", pieces)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert reason_of(caught.value) == "UPLOAD_TOO_LARGE"
    assert str(2 * 1024 * 1024) in caught.value.details()
    assert not ingest_app.documents._blobs.pending_uploads()
    assert not (await client.call("ListDocuments")).documents


async def test_cancelled_upload_leaves_nothing(client, ingest_app, eventually):
    sent = asyncio.Event()

    async def requests():
        yield ingest_pb2.UploadDocumentRequest(
            metadata=ingest_pb2.DocumentMetadata(filename="cut.txt")
        )
        yield ingest_pb2.UploadDocumentRequest(data=b"half of a file " * 1000)
        sent.set()
        await asyncio.Event().wait()  # the rest never comes

    call = client.stub.UploadDocument(requests(), metadata=client.metadata)
    await sent.wait()
    await eventually(lambda: _has_pending(ingest_app))
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await eventually(lambda: _has_no_pending(ingest_app))
    assert not (await client.call("ListDocuments")).documents


async def _has_pending(app) -> bool:
    return bool(app.documents._blobs.pending_uploads())


async def _has_no_pending(app) -> bool:
    return not app.documents._blobs.pending_uploads()


async def test_service_stays_up_and_serves_others(client, ingest_channel):
    health = await health_pb2_grpc.HealthStub(ingest_channel).Check(
        health_pb2.HealthCheckRequest(service="ragmesh.ingest.v1.IngestService")
    )
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    document = await client.ingest("fine.txt", b"An ordinary document after the hostile ones.")
    assert document.status == READY
