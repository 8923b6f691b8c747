"""The database under concurrency, on SQLite and PostgreSQL: readers beside a writer,
replicas migrating at the same moment."""

import asyncio

from sqlalchemy import inspect, text, update

from ragmesh.ingest.v1 import ingest_pb2
from services.common.database import create_engine
from services.ingest import storage

KEYWORD = ingest_pb2.SEARCH_MODE_KEYWORD


async def test_reads_answer_while_another_connection_holds_a_write_transaction(client, ingest_app):
    document = await client.ingest("committed.txt", b"words about lighthouses and harbours")
    assert document.status == ingest_pb2.DOCUMENT_STATUS_READY
    url = ingest_app.engine.url.render_as_string(hide_password=False)
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            # Another replica (or a worker) is in the middle of a write and has not committed.
            transaction = await connection.begin()
            await connection.execute(
                update(storage.DocumentRow)
                .where(storage.DocumentRow.id == document.id)
                .values(filename="uncommitted.txt")
            )
            try:
                got = await client.call("GetDocument", document_id=document.id)
                assert got.document.filename == "committed.txt"
                listed = await client.call("ListDocuments")
                assert [d.id for d in listed.documents] == [document.id]
                text = await client.call("GetDocumentText", document_id=document.id)
                assert "lighthouses" in text.text
                chunks = await client.call("ListChunks", document_id=document.id)
                assert chunks.chunks
                hits = await client.call("Search", query="lighthouses", mode=KEYWORD)
                assert [h.filename for h in hits.hits] == ["committed.txt"]
            finally:
                await transaction.rollback()
    finally:
        await engine.dispose()


async def test_replicas_starting_together_all_migrate_to_one_schema(make_settings, tmp_path):
    url = make_settings(tmp_path).resolved_database_url  # a fresh, empty database
    engines = [create_engine(url) for _ in range(4)]
    try:
        await asyncio.gather(*(storage.migrate(engine) for engine in engines))
        async with engines[0].connect() as connection:
            versions = await connection.execute(text("SELECT version_num FROM alembic_version"))
            tables = await connection.run_sync(lambda sync: inspect(sync).get_table_names())
        assert len(versions.all()) == 1
        assert set(storage.Base.metadata.tables) <= set(tables)
    finally:
        for engine in engines:
            await engine.dispose()
