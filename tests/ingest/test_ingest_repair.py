"""`python -m services.ingest.repair`: points lost from the vector store or left in it are
found by comparing it with the database, and repaired from the vectors the chunk rows keep."""

import asyncio
import sys
import uuid

import grpc
import numpy as np
from sqlalchemy import update

from ragmesh.ingest.v1 import ingest_pb2
from services.common.database import create_engine, sessionmaker, writing
from services.common.vectors import VectorPoint, open_vector_store, where
from services.ingest import storage
from services.ingest.app import start
from services.ingest.index import COLLECTIONS
from services.ingest.repair import reconcile
from tests.ingest.conftest import REPO_ROOT, environment

READY = ingest_pb2.DOCUMENT_STATUS_READY
SEMANTIC = ingest_pb2.SEARCH_MODE_SEMANTIC
TENNIS = (
    "Tennis players serve, volley and rally across the net. A match at Wimbledon is played "
    "on grass courts in London each summer."
)
VOLCANO = (
    "Volcanoes erupt when magma rises through the crust. Mount Etna in Sicily is among the "
    "most active volcanoes."
)


async def repair(settings, *args: str) -> tuple[int, str]:
    """Runs the command as an operator would, with the service's settings in its env."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.ingest.repair",
        *args,
        cwd=REPO_ROOT,
        env=environment(settings),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await process.communicate()
    return process.returncode, out.decode()


async def semantic_documents(client, query: str) -> list[str]:
    reply = await client.call("Search", query=query, mode=SEMANTIC, top_k=3)
    return [hit.document_id for hit in reply.hits]


async def test_repair_writes_lost_points_again_and_deletes_strays(
    make_settings, tmp_path, new_client
):
    settings = make_settings(tmp_path)
    app = await start(settings)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.server.port}") as channel:
            client = new_client(channel)
            tennis = await client.ingest("tennis.txt", TENNIS.encode())
            volcano = await client.ingest("volcano.txt", VOLCANO.encode())
            assert tennis.status == volcano.status == READY
    finally:
        await app.server.stop(0)
        await app.close()

    # With the service stopped, the shard loses the tennis points and gains one nobody wrote,
    # and the volcano document names no collection, as documents from before collections
    # were recorded do (the command then asks the embed service for its model).
    engine = create_engine(settings.resolved_database_url)
    async with writing(sessionmaker(engine)) as session:
        await session.execute(
            update(storage.DocumentRow)
            .where(storage.DocumentRow.id == volcano.id)
            .values(vector_collection="")
        )
    await engine.dispose()
    store = await open_vector_store(folder=settings.vector_folder)
    try:
        (collection,) = await store.collections(COLLECTIONS.value)
        await store.delete(collection, where(document_id=tennis.id))
        stray = VectorPoint(
            str(uuid.uuid4()),
            np.full(384, 1 / np.sqrt(384), dtype=np.float32),
            {"tenant": client.tenant, "document_id": str(uuid.uuid4())},
        )
        await store.upsert(collection, [stray])
    finally:
        await store.close()
    found = f"{tennis.chunk_count} chunks without a point, 1 points without a chunk"

    status, out = await repair(settings, "--dry-run")
    assert (status, found in out) == (3, True), out
    assert "1 documents named no collection: to be given the current one" in out
    status, out = await repair(settings)
    assert status == 0 and found in out and "repaired" in out, out
    assert "1 documents named no collection: given the current one" in out
    status, out = await repair(settings, "--dry-run")
    assert status == 0 and "the vector store matches the database" in out, out

    restarted = await start(settings)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{restarted.server.port}") as channel:
            client.stub = type(client.stub)(channel)
            assert (await semantic_documents(client, "Wimbledon grass courts"))[0] == tennis.id
            assert (await semantic_documents(client, "a volcano erupting"))[0] == volcano.id
        assert await restarted.vectors.count_document(tennis.id) == tennis.chunk_count
        total = tennis.chunk_count + volcano.chunk_count
        assert await restarted.vectors.store.count(collection) == total
    finally:
        await restarted.server.stop(0)
        await restarted.close()


async def test_repair_refuses_an_edge_folder_the_service_holds(make_settings, tmp_path, new_client):
    settings = make_settings(tmp_path)
    app = await start(settings)
    try:
        status, out = await repair(settings, "--dry-run")
        assert status == 1, out
        assert "cannot check the vector store" in out and "in use" in out
        assert "Traceback" not in out
    finally:
        await app.server.stop(0)
        await app.close()


async def test_documents_from_before_collections_were_recorded_are_given_one(
    make_settings, tmp_path, new_client
):
    """Documents made READY before rows named their collection (vectors in the chunk rows
    only, as the embedded default kept them): repair gives them the current model's
    collection and writes their vectors there, on a live service (the store in process)."""
    app = await start(make_settings(tmp_path))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.server.port}") as channel:
            client = new_client(channel)
            tennis = await client.ingest("tennis.txt", TENNIS.encode())
            (collection,) = await app.vectors.store.collections(COLLECTIONS.value)
            sessions = app.documents._sessions
            async with writing(sessions) as session:
                await session.execute(
                    update(storage.DocumentRow)
                    .where(storage.DocumentRow.id == tennis.id)
                    .values(vector_collection="")
                )
            await app.vectors.delete_document(tennis.id)
            assert await semantic_documents(client, "Wimbledon grass courts") == []

            dry = await reconcile(
                sessions, app.vectors.store, fix=False, current_collection=collection
            )
            assert (dry.assigned, dry.collections[0].missing, dry.consistent) == (
                1,
                tennis.chunk_count,
                False,
            )
            fixed = await reconcile(
                sessions, app.vectors.store, fix=True, current_collection=collection
            )
            assert fixed.assigned == 1 and fixed.consistent
            assert await semantic_documents(client, "Wimbledon grass courts") == [tennis.id]
            async with sessions() as session:
                row = await session.get(storage.DocumentRow, tennis.id)
            assert row.vector_collection == collection
            # Without the model's collection they are reported, not guessed, and their
            # points are left alone.
            async with writing(sessions) as session:
                await session.execute(
                    update(storage.DocumentRow)
                    .where(storage.DocumentRow.id == tennis.id)
                    .values(vector_collection="")
                )
            blind = await reconcile(sessions, app.vectors.store, fix=True)
            assert blind.unassigned == 1 and not blind.consistent
            assert await app.vectors.count_document(tennis.id) == tennis.chunk_count
    finally:
        await app.server.stop(0)
        await app.close()
