"""Vectors in Qdrant (QDRANT_URL set). No Qdrant server runs here: qdrant-client's local
mode (`location=":memory:"`), which speaks the same client API, stands in for a server,
and an address on 127.0.0.1 whose port is closed stands in for a server that is down."""

import socket

import grpc
import pytest
from qdrant_client import AsyncQdrantClient

from ragmesh.ingest.v1 import ingest_pb2
from services.common.vectors import QdrantServerStore
from services.ingest import storage
from services.ingest.app import start

# What the stand-ins say about themselves: local mode has no payload indexes and searches
# exactly whatever is asked, and a closed port tells no server version.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Payload indexes have no effect in the local Qdrant"),
    pytest.mark.filterwarnings("ignore:Failed to obtain server version"),
    pytest.mark.filterwarnings("ignore:Local mode performs exact"),
]
KEYWORD, SEMANTIC, HYBRID = (
    ingest_pb2.SEARCH_MODE_KEYWORD,
    ingest_pb2.SEARCH_MODE_SEMANTIC,
    ingest_pb2.SEARCH_MODE_HYBRID,
)
LONG_TEXT = "\n\n".join(
    f"Paragraph {n} describes step {n} of assembling a bicycle wheel, spoke by spoke, "
    "with enough words that the chunker has to split the text."
    for n in range(12)
)


@pytest.fixture
async def local_qdrant():
    """Qdrant's local mode in memory: the client API of a server, with no server."""
    return QdrantServerStore(client=AsyncQdrantClient(location=":memory:"))


@pytest.fixture
def closed_qdrant_url():
    """A Qdrant URL nothing listens on (connections are refused): the server is down."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


async def test_semantic_search_before_anything_is_indexed_finds_nothing(
    make_settings, tmp_path, new_client, local_qdrant
):
    """In local mode, as on a server, no collection exists until a first chunk is stored."""
    app = await start(make_settings(tmp_path), vector_store=local_qdrant)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.server.port}") as channel:
            client = new_client(channel)
            for mode in (SEMANTIC, HYBRID):
                reply = await client.call("Search", query="bicycle wheels", mode=mode)
                assert list(reply.hits) == []
    finally:
        await app.server.stop(0)
        await app.close()


async def test_documents_are_searched_filtered_and_deleted_in_qdrant(
    make_settings, tmp_path, new_client, local_qdrant
):
    app = await start(make_settings(tmp_path), vector_store=local_qdrant)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.server.port}") as channel:
            client, other = new_client(channel), new_client(channel)
            wheel = await client.ingest("wheel.txt", LONG_TEXT.encode(), tags=["bikes"])
            bread = await client.ingest("bread.md", b"# Bread\n\nKnead the dough, then bake it.")
            assert await app.vectors.count_document(wheel.id) == wheel.chunk_count

            async def documents(who, **search_filter) -> list[str]:
                reply = await who.call(
                    "Search",
                    query="truing a bicycle wheel",
                    mode=SEMANTIC,
                    filter=ingest_pb2.SearchFilter(**search_filter),
                )
                return list(dict.fromkeys(hit.document_id for hit in reply.hits))

            assert (await documents(client))[0] == wheel.id
            assert await documents(client, tags=["bikes"]) == [wheel.id]
            assert await documents(client, mime_types=["text/markdown"]) == [bread.id]
            assert await documents(client, document_ids=[bread.id]) == [bread.id]
            assert await documents(other) == []

            await client.call("DeleteDocument", document_id=wheel.id)
            assert await app.vectors.count_document(wheel.id) == 0
            assert await documents(client) == [bread.id]
    finally:
        await app.server.stop(0)
        await app.close()


async def test_a_failed_document_keeps_no_vectors_in_qdrant(
    make_settings, tmp_path, new_client, local_qdrant, embed_proxy
):
    """The first batch of chunks is embedded and stored in (local-mode) Qdrant, then the
    embed service refuses the second: the document FAILS and its stored points go."""
    settings = make_settings(
        tmp_path, embed_target=embed_proxy.target, embed_batch_size=2, embed_concurrency=1
    )
    embed_proxy.fail_after = 1
    app = await start(settings, vector_store=local_qdrant)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.server.port}") as channel:
            client = new_client(channel)
            document = await client.ingest("wheel.txt", LONG_TEXT.encode())
        assert document.status == ingest_pb2.DOCUMENT_STATUS_FAILED
        assert "refused by the test" in document.error
        assert embed_proxy.answered == 1
        assert await app.vectors.count_document(document.id) == 0
    finally:
        await app.server.stop(0)
        await app.close()


async def test_a_qdrant_outage_answers_unavailable_and_keeps_uploads(
    make_settings, tmp_path, new_client, closed_qdrant_url, reason_of, eventually
):
    app = await start(make_settings(tmp_path, qdrant_url=closed_qdrant_url))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.server.port}") as channel:
            client = new_client(channel)
            for mode in (SEMANTIC, HYBRID):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await client.call("Search", query="bicycle wheels", mode=mode)
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
                assert reason_of(caught.value) == "VECTOR_STORE_UNAVAILABLE"
                assert "Qdrant" in caught.value.details()
            assert list((await client.call("Search", query="bicycle", mode=KEYWORD)).hits) == []

            upload = await client.upload("wheel.txt", LONG_TEXT.encode())

            async def waiting_to_retry() -> bool:
                async with app.documents._sessions() as session:
                    job = await session.get(storage.JobRow, upload.document.id)
                return job is not None and job.attempts >= 1 and not job.lease_owner

            # The upload is kept and retried later, never FAILED for the outage.
            await eventually(waiting_to_retry)
            document = (await client.call("GetDocument", document_id=upload.document.id)).document
            assert document.status != ingest_pb2.DOCUMENT_STATUS_FAILED

            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await client.call("DeleteDocument", document_id=upload.document.id)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            # The delete is recorded and finished by its job once Qdrant is back.
            document = (await client.call("GetDocument", document_id=upload.document.id)).document
            assert document.status == ingest_pb2.DOCUMENT_STATUS_DELETING
    finally:
        await app.server.stop(0)
        await app.close()
