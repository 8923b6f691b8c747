"""Jobs survive restarts: work queued while the embed service is down, and deletes cut
short, are finished by the next start of the service."""

import socket

import grpc
import pytest

from ragmesh.ingest.v1 import ingest_pb2
from services.ingest import storage
from services.ingest.app import start

READY = ingest_pb2.DocumentStatus.Value("DOCUMENT_STATUS_READY")


@pytest.fixture
def dead_target():
    """An address nothing listens on (connections are refused): the embed service is down."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"127.0.0.1:{port}"


async def test_unfinished_jobs_resume_after_a_restart(
    make_settings, tmp_path, dead_target, embed_server, new_client, eventually
):
    settings = make_settings(tmp_path, embed_target=dead_target)
    app = await start(settings)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.server.port}") as channel:
            client = new_client(channel)
            ids = [
                (await client.upload(f"{n}.txt", f"resumable text {n}".encode())).document.id
                for n in range(3)
            ]

            async def stuck() -> bool:
                async with app.documents._sessions() as session:
                    rows = [await session.get(storage.JobRow, i) for i in ids]
                return all(row is not None and row.attempts >= 1 for row in rows)

            # The embed service is down: every job is retried later, none is lost or FAILED.
            await eventually(stuck)
            for document_id in ids:
                document = (await client.call("GetDocument", document_id=document_id)).document
                assert document.status != ingest_pb2.DocumentStatus.Value("DOCUMENT_STATUS_FAILED")
    finally:
        await app.server.stop(0)
        await app.close()

    restarted = await start(settings.model_copy(update={"embed_target": embed_server}))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{restarted.server.port}") as channel:
            client.stub = type(client.stub)(channel)
            for document_id in ids:
                history = await client.watch(document_id)
                assert history[-1].status == READY, history[-1].error
    finally:
        await restarted.server.stop(0)
        await restarted.close()


async def test_an_interrupted_delete_is_finished_at_restart(
    make_settings, tmp_path, new_client, eventually
):
    settings = make_settings(tmp_path)
    app = await start(settings)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.server.port}") as channel:
            client = new_client(channel)
            document = await client.ingest("half-deleted.txt", b"delete me halfway")
            assert document.status == READY
        # The process dies right after DeleteDocument committed its intent, before it
        # touched the index: its workers are gone, the vectors and rows are still there.
        await app.workers.close()
        async with app.documents._sessions() as session, session.begin():
            await storage.set_status(session, document.id, storage.DELETING)
            await storage.put_job(session, document.id, storage.JOB_DELETE)
        assert await app.index.count_document(document.id) > 0
    finally:
        await app.server.stop(0)
        await app.close()

    restarted = await start(settings)
    try:

        async def gone() -> bool:
            async with restarted.documents._sessions() as session:
                return await session.get(storage.DocumentRow, document.id) is None

        await eventually(gone)
        assert await restarted.index.count_document(document.id) == 0
        assert not restarted.documents._blobs.path(document.id).exists()
        async with restarted.documents._sessions() as session:
            assert await storage.count_jobs(session) == 0
    finally:
        await restarted.server.stop(0)
        await restarted.close()
