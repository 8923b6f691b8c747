"""Who owns the vectors: an Edge shard is one process's, so replicas sharing PostgreSQL
use a Qdrant server, or each its own shard that catches up from the database."""

import grpc
import pytest
from pydantic import ValidationError

from ragmesh.ingest.v1 import ingest_pb2
from services.common.vectors import open_vector_store
from services.ingest.app import start
from services.ingest.settings import IngestSettings

READY = ingest_pb2.DOCUMENT_STATUS_READY
SEMANTIC = ingest_pb2.SEARCH_MODE_SEMANTIC
POSTGRES = "postgresql+asyncpg://ingest:secret@db:5432/ragmesh"


def test_postgresql_without_a_qdrant_server_needs_edge_catch_up(tmp_path):
    with pytest.raises(ValidationError) as caught:
        IngestSettings(data_dir=tmp_path, database_url=POSTGRES)
    message = str(caught.value)
    assert "RAGMESH_INGEST_QDRANT_URL" in message and "EDGE_CATCH_UP" in message
    IngestSettings(data_dir=tmp_path, database_url=POSTGRES, qdrant_url="http://qdrant:6333")
    IngestSettings(data_dir=tmp_path, database_url=POSTGRES, edge_catch_up=True)
    IngestSettings(data_dir=tmp_path)  # SQLite: one process's file, its own shard


async def test_a_second_process_on_the_same_folder_is_refused(make_settings, tmp_path):
    settings = make_settings(tmp_path)
    app = await start(settings)
    try:
        with pytest.raises(ValueError, match="in use"):
            await start(settings)
    finally:
        await app.server.stop(0)
        await app.close()


async def test_sessions_and_ingest_share_a_data_folder(make_settings, tmp_path):
    """`make run` gives every service the same DATA_DIR; sessions keeps its memory in an
    Edge shard under <data_dir>/vectors, which ingest must leave to it."""
    settings = make_settings(tmp_path)
    sessions_store = await open_vector_store(folder=tmp_path / "vectors")
    try:
        app = await start(settings)
        await app.server.stop(0)
        await app.close()
    finally:
        await sessions_store.close()


async def test_a_replica_that_was_down_catches_up_its_shard_at_start(
    make_settings, tmp_path, new_client, backend
):
    if backend == "sqlite":
        pytest.skip("replicas share a database server; SQLite is one process's file")
    settings = make_settings(tmp_path, index_sync_seconds=3600)
    replica = settings.model_copy(update={"data_dir": tmp_path / "replica"})
    first = await start(settings)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{first.server.port}") as channel:
            client = new_client(channel)
            old = await client.ingest("old.txt", b"Lighthouse keepers trimmed the lamp wicks.")
            assert old.status == READY
            second = await start(replica)
            assert await second.vectors.count_document(old.id) == old.chunk_count
            await second.server.stop(0)
            await second.close()

            # While the replica is down, one document goes and another comes.
            await client.call("DeleteDocument", document_id=old.id)
            new = await client.ingest("new.txt", b"Glaciers carve valleys as they retreat.")
            assert new.status == READY
    finally:
        await first.server.stop(0)
        await first.close()

    second = await start(replica)
    try:
        assert await second.vectors.count_document(old.id) == 0
        assert await second.vectors.count_document(new.id) == new.chunk_count
        async with grpc.aio.insecure_channel(f"127.0.0.1:{second.server.port}") as channel:
            client.stub = type(client.stub)(channel)
            reply = await client.call("Search", query="ice shaping valleys", mode=SEMANTIC)
            assert [hit.document_id for hit in reply.hits] == [new.id]
    finally:
        await second.server.stop(0)
        await second.close()
