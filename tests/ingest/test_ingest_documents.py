"""Documents end to end through real servers: upload, watch, text, chunks, list, delete."""

import asyncio

import grpc
import pytest
from sqlalchemy import func, select

from ragmesh.ingest.v1 import ingest_pb2
from services.ingest.app import start
from services.ingest.storage import ChunkRow, DocumentRow, JobRow

STATUS = ingest_pb2.DocumentStatus
ORDER = [
    STATUS.Value(f"DOCUMENT_STATUS_{name}")
    for name in ("PENDING", "PARSING", "CHUNKING", "EMBEDDING", "READY")
]

MARKDOWN = (
    """# Setup

ragmesh is a retrieval-augmented server. It stores documents and answers questions.

## Install

Install the package with pip. Then start every service with make run. The services talk
over gRPC and keep their data under the var folder.

"""
    + "\n\n".join(
        f"Paragraph {n} explains detail number {n} of the installation in plain words, "
        "so that the chunker has enough tokens to split."
        for n in range(12)
    )
    + """

# Usage

Upload a document, watch it, then read its chunks back by ID.
"""
)


async def _chunks(client, document_id):
    chunks, token = [], ""
    while True:
        reply = await client.call(
            "ListChunks", document_id=document_id, page_size=3, page_token=token
        )
        chunks.extend(reply.chunks)
        token = reply.next_page_token
        if not token:
            return chunks


async def test_markdown_goes_through_every_stage_to_ready(client, ingest_app):
    upload = await client.upload(
        "guide.md", MARKDOWN.encode(), tags=["guide", "v1"], attributes={"team": "docs"}
    )
    assert not upload.duplicate
    assert upload.document.status == STATUS.Value("DOCUMENT_STATUS_PENDING")
    history = await client.watch(upload.document.id)
    statuses = [document.status for document in history]
    assert statuses[-1] == STATUS.Value("DOCUMENT_STATUS_READY")
    assert statuses == sorted(statuses, key=ORDER.index)  # streamed in pipeline order

    document = history[-1]
    assert document.id == upload.document.id
    assert document.tenant == client.tenant
    assert document.mime_type == "text/markdown"
    assert document.size_bytes == len(MARKDOWN.encode())
    assert len(document.sha256) == 64
    assert list(document.tags) == ["guide", "v1"]
    assert dict(document.attributes) == {"team": "docs"}
    assert document.chunk_count > 2
    assert document.error == ""

    text = (await client.call("GetDocumentText", document_id=document.id)).text
    chunks = await _chunks(client, document.id)
    assert [chunk.index for chunk in chunks] == list(range(document.chunk_count))
    for chunk in chunks:
        assert chunk.text == text[chunk.start_char : chunk.end_char]
        assert 0 < chunk.token_count <= 64
    assert chunks[0].start_char == 0
    assert chunks[-1].end_char == len(text)
    assert chunks[0].heading == "Setup"
    assert any(chunk.heading == "Setup > Install" for chunk in chunks)
    usage = [chunk for chunk in chunks if chunk.heading == "Usage"]
    # A heading starts a new chunk, with no overlap into the section before.
    assert usage and usage[0].text.startswith("Usage")

    assert await ingest_app.vectors.count_document(document.id) == document.chunk_count
    async with ingest_app.documents._sessions() as session:
        rows = await session.scalar(
            select(func.count()).select_from(ChunkRow).where(ChunkRow.document_id == document.id)
        )
        jobs = await session.scalar(
            select(func.count()).select_from(JobRow).where(JobRow.document_id == document.id)
        )
    assert rows == document.chunk_count
    assert jobs == 0


async def test_pdf_keeps_pages(client, samples):
    data = samples.pdf(["First page about apples.", "Second page about pears."])
    document = await client.ingest("fruit.pdf", data)
    assert document.status == STATUS.Value("DOCUMENT_STATUS_READY"), document.error
    assert document.mime_type == "application/pdf"
    assert document.page_count == 2
    chunks = await _chunks(client, document.id)
    text = (await client.call("GetDocumentText", document_id=document.id)).text
    assert "apples" in text and "pears" in text
    assert chunks[0].page == 1


async def test_pdf_with_an_empty_user_password_is_opened(client, samples):
    data = samples.pdf(["Owner-locked but readable."], user_password="")
    document = await client.ingest("locked.pdf", data)
    assert document.status == STATUS.Value("DOCUMENT_STATUS_READY"), document.error


async def test_docx_paragraphs_headings_tables_and_header(client, samples):
    document = await client.ingest("manual.docx", samples.docx())
    assert document.status == STATUS.Value("DOCUMENT_STATUS_READY"), document.error
    assert document.mime_type.endswith("wordprocessingml.document")
    text = (await client.call("GetDocumentText", document_id=document.id)).text
    for expected in (
        "Confidential header line",
        "Installation",
        "Setting | Default",
        "port | 50051",
    ):
        assert expected in text
    chunks = await _chunks(client, document.id)
    assert chunks[0].heading in ("", "Installation")


async def test_html_drops_scripts_and_navigation(client):
    html = b"""<!DOCTYPE html><html><head><title>t</title><style>.x{}</style></head><body>
    <nav>Home | About</nav><script>var secret = 1;</script>
    <h1>Prices</h1><p>Our plans are simple.</p>
    <table><tr><th>Plan</th><th>Price</th></tr><tr><td>Basic</td><td>10</td></tr></table>
    </body></html>"""
    document = await client.ingest("page.txt", html)
    assert document.status == STATUS.Value("DOCUMENT_STATUS_READY"), document.error
    assert document.mime_type == "text/html"  # sniffed, whatever the name says
    text = (await client.call("GetDocumentText", document_id=document.id)).text
    assert "Prices" in text and "Plan | Price" in text and "Basic | 10" in text
    assert "secret" not in text and "Home" not in text


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ("Grüße aus Köln, ça va?".encode("utf-16"), "Grüße aus Köln, ça va?"),
        ("Café crème brûlée, déjà vu, naïve.".encode("latin-1"), "Café crème brûlée"),
    ],
    ids=["utf-16-bom", "latin-1-not-utf-8"],
)
async def test_text_encodings_are_detected(client, data, expected):
    document = await client.ingest("note.txt", data)
    assert document.status == STATUS.Value("DOCUMENT_STATUS_READY"), document.error
    text = (await client.call("GetDocumentText", document_id=document.id)).text
    assert expected in text


async def test_same_bytes_again_return_the_existing_document(client, new_client, ingest_channel):
    first = await client.upload("a.txt", b"identical content for dedup")
    again = await client.upload("b.txt", b"identical content for dedup")
    assert again.duplicate
    assert again.document.id == first.document.id
    other_tenant = await new_client(ingest_channel).upload("a.txt", b"identical content for dedup")
    assert not other_tenant.duplicate


async def test_other_tenants_cannot_see_a_document(client, new_client, ingest_channel, reason_of):
    document = await client.ingest("private.txt", b"tenant private words")
    stranger = new_client(ingest_channel)
    for method in ("GetDocument", "GetDocumentText", "ListChunks", "DeleteDocument"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stranger.call(method, document_id=document.id)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert reason_of(caught.value) == "DOCUMENT_NOT_FOUND"
    assert not (await stranger.call("ListDocuments")).documents


async def test_list_pages_newest_first_and_filters(client, reason_of):
    ids = []
    for n in range(5):
        reply = await client.upload(
            f"{n}.txt", f"list document {n}".encode(), tags=["even"] if n % 2 == 0 else []
        )
        ids.append(reply.document.id)
    for document_id in ids:
        await client.watch(document_id)
    seen, token = [], ""
    while True:
        page = await client.call("ListDocuments", page_size=2, page_token=token)
        assert len(page.documents) <= 2
        seen += [document.id for document in page.documents]
        token = page.next_page_token
        if not token:
            break
    assert seen == list(reversed(ids))
    tagged = await client.call("ListDocuments", tag="even")
    assert [d.id for d in tagged.documents] == [ids[4], ids[2], ids[0]]
    ready = await client.call("ListDocuments", status=STATUS.Value("DOCUMENT_STATUS_READY"))
    assert len(ready.documents) == 5
    failed = await client.call("ListDocuments", status=STATUS.Value("DOCUMENT_STATUS_FAILED"))
    assert not failed.documents
    for bad in ({"page_token": "not-a-token"}, {"page_size": -1}):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.call("ListDocuments", **bad)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_text_ranges(client):
    document = await client.ingest("range.txt", b"0123456789 abcdefghij")
    whole = await client.call("GetDocumentText", document_id=document.id)
    assert whole.total_chars == len(whole.text) == 21
    part = await client.call("GetDocumentText", document_id=document.id, start=11, end=14)
    assert (part.text, part.start, part.end) == ("abc", 11, 14)
    tail = await client.call("GetDocumentText", document_id=document.id, start=18)
    assert tail.text == "hij"
    for bad in ({"start": 5, "end": 2}, {"start": 30}, {"end": 99}):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.call("GetDocumentText", document_id=document.id, **bad)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_unknown_ids_are_not_found(client, reason_of):
    for document_id in ("", "nope", "00000000-0000-0000-0000-000000000000"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.call("GetDocument", document_id=document_id)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert reason_of(caught.value) == "DOCUMENT_NOT_FOUND"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.watch("00000000-0000-0000-0000-000000000000")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_delete_removes_rows_chunks_vectors_and_bytes(client, ingest_app, reason_of):
    document = await client.ingest("gone.md", MARKDOWN.encode() + b"\n\nDelete me.")
    assert await ingest_app.vectors.count_document(document.id) > 0
    blob = ingest_app.documents._blobs.path(document.id)
    assert blob.exists()
    await client.call("DeleteDocument", document_id=document.id)
    assert await ingest_app.vectors.count_document(document.id) == 0
    assert not blob.exists()
    async with ingest_app.documents._sessions() as session:
        for model, column in (
            (DocumentRow, DocumentRow.id),
            (ChunkRow, ChunkRow.document_id),
            (JobRow, JobRow.document_id),
        ):
            count = await session.scalar(
                select(func.count()).select_from(model).where(column == document.id)
            )
            assert count == 0, model
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.call("DeleteDocument", document_id=document.id)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    # The same bytes can be uploaded again as a new document.
    again = await client.upload("gone.md", MARKDOWN.encode() + b"\n\nDelete me.")
    assert not again.duplicate and again.document.id != document.id


async def test_delete_during_processing_leaves_no_vectors(
    make_settings, tmp_path, embed_proxy, new_client
):
    app = await start(make_settings(tmp_path, embed_target=embed_proxy.target))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.server.port}") as channel:
            client = new_client(channel)
            big = "\n\n".join(f"Sentence {n} about the pipeline being deleted." for n in range(300))
            embed_proxy.gate.clear()
            upload = await client.upload("busy.txt", big.encode())
            # A worker is inside the document's first Embed call, holding its job.
            async with asyncio.timeout(60):
                await embed_proxy.held.wait()
            busy = (await client.call("GetDocument", document_id=upload.document.id)).document
            assert busy.status == STATUS.Value("DOCUMENT_STATUS_EMBEDDING")
            await client.call("DeleteDocument", document_id=upload.document.id)
            embed_proxy.gate.set()
            # Whatever the worker was doing, nothing of the document may remain or come back.
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await client.call("GetDocument", document_id=upload.document.id)
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
            assert await app.vectors.count_document(upload.document.id) == 0
            healthy = await client.ingest("after.txt", b"still working after a delete")
            assert healthy.status == STATUS.Value("DOCUMENT_STATUS_READY")
            assert await app.vectors.count_document(upload.document.id) == 0
            async with app.documents._sessions() as session:
                assert await session.get(JobRow, upload.document.id) is None
    finally:
        await app.server.stop(0)
        await app.close()
