"""Upload limits per tenant: documents and bytes, refused with RESOURCE_EXHAUSTED naming
the setting, the limit and the usage; nothing of a refused upload is kept, deleting frees
room, a duplicate counts nothing, and concurrent uploads cannot pass the limit together."""

import asyncio

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from pydantic import ValidationError

from services.ingest.app import start
from services.ingest.settings import IngestSettings

MAX_DOCUMENTS = 3
MAX_BYTES = 4000


@pytest.fixture
async def quota_app(make_settings, tmp_path):
    app = await start(
        make_settings(
            tmp_path, max_documents_per_tenant=MAX_DOCUMENTS, max_bytes_per_tenant=MAX_BYTES
        )
    )
    yield app
    await app.server.stop(0)
    await app.close()


@pytest.fixture
async def quota_channel(quota_app):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{quota_app.server.port}") as channel:
        yield channel


def _text(n: int, size: int = 100) -> bytes:
    return f"note {n} ".encode().ljust(size, b".")


async def _document_ids(client) -> set[str]:
    reply = await client.call("ListDocuments", page_size=100)
    return {document.id for document in reply.documents}


def _kept_blobs(app) -> set[str]:
    """The originals on disk, and whatever a refused upload left in the temporary folder."""
    root = app.server.settings.resolved_blob_dir
    return {path.name for path in root.rglob("*") if path.is_file()}


def _refusal(exc: grpc.aio.AioRpcError) -> dict[str, str]:
    """The ErrorInfo of a RESOURCE_EXHAUSTED answer: its reason and metadata."""
    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc.details()
    (detail,) = rpc_status.from_call(exc).details
    info = error_details_pb2.ErrorInfo()
    assert detail.Unpack(info)
    return {"reason": info.reason, **info.metadata}


async def test_documents_up_to_the_limit_then_refused_until_one_is_deleted(
    quota_app, quota_channel, new_client
):
    client = new_client(quota_channel)
    accepted = [(await client.upload(f"{n}.txt", _text(n))).document for n in range(3)]
    # Exactly at the limit: the third was accepted.
    assert len(await _document_ids(client)) == MAX_DOCUMENTS

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await client.upload("3.txt", _text(3))
    refusal = _refusal(refused.value)
    assert refusal["reason"] == "TENANT_DOCUMENT_LIMIT"
    assert refusal["setting"] == "RAGMESH_INGEST_MAX_DOCUMENTS_PER_TENANT"
    assert refusal["limit"] == "3"
    assert refusal["usage"] == "3"
    assert "RAGMESH_INGEST_MAX_DOCUMENTS_PER_TENANT=3" in refused.value.details()
    # Nothing of the refused upload is kept: no row, no original, no temporary file.
    assert await _document_ids(client) == {d.id for d in accepted}
    assert _kept_blobs(quota_app) == {d.id for d in accepted}

    # The same bytes again are the same document, which counts nothing.
    again = await client.upload("copy.txt", _text(0))
    assert again.duplicate and again.document.id == accepted[0].id

    # Another tenant has its own room.
    other = new_client(quota_channel)
    assert not (await other.upload("3.txt", _text(3))).duplicate

    await client.call("DeleteDocument", document_id=accepted[0].id)
    fourth = await client.upload("3.txt", _text(3))
    assert not fourth.duplicate
    assert len(await _document_ids(client)) == MAX_DOCUMENTS


async def test_bytes_up_to_the_limit_then_refused_until_one_is_deleted(
    quota_app, quota_channel, new_client
):
    client = new_client(quota_channel)
    first = (await client.upload("a.txt", _text(1, 1500))).document
    # 1500 + 2500 is exactly the limit.
    await client.upload("b.txt", _text(2, 2500))

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await client.upload("c.txt", b"x")
    refusal = _refusal(refused.value)
    assert refusal == {
        "reason": "TENANT_BYTES_LIMIT",
        "setting": "RAGMESH_INGEST_MAX_BYTES_PER_TENANT",
        "limit": str(MAX_BYTES),
        "usage": str(MAX_BYTES),
        "upload_bytes": "1",
        "request_id": refusal["request_id"],
    }
    assert len(await _document_ids(client)) == 2
    assert len(_kept_blobs(quota_app)) == 2

    await client.call("DeleteDocument", document_id=first.id)
    assert not (await client.upload("c.txt", b"x")).duplicate


async def test_concurrent_uploads_cannot_pass_the_limit_together(
    quota_app, quota_channel, new_client
):
    client = new_client(quota_channel)
    results = await asyncio.gather(
        *(client.upload(f"{n}.txt", _text(n)) for n in range(8)), return_exceptions=True
    )
    accepted = [r.document.id for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(accepted) == MAX_DOCUMENTS
    assert len(refused) == 8 - MAX_DOCUMENTS
    for exc in refused:
        assert _refusal(exc)["reason"] == "TENANT_DOCUMENT_LIMIT"
    assert await _document_ids(client) == set(accepted)
    assert _kept_blobs(quota_app) == set(accepted)


async def test_concurrent_duplicates_at_the_limit_are_one_document(
    quota_app, quota_channel, new_client
):
    client = new_client(quota_channel)
    for n in range(MAX_DOCUMENTS - 1):
        await client.upload(f"{n}.txt", _text(n))
    # One place is left; the same new bytes six times over take it once, and all succeed.
    replies = await asyncio.gather(*(client.upload("same.txt", _text(99)) for _ in range(6)))
    assert len({reply.document.id for reply in replies}) == 1
    assert sorted(reply.duplicate for reply in replies) == [False] + [True] * 5
    assert len(await _document_ids(client)) == MAX_DOCUMENTS
    assert len(_kept_blobs(quota_app)) == MAX_DOCUMENTS


@pytest.mark.parametrize("name", ["max_documents_per_tenant", "max_bytes_per_tenant"])
def test_a_negative_limit_stops_the_service_naming_the_setting(name):
    with pytest.raises(ValidationError, match=name):
        IngestSettings(**{name: -1})
