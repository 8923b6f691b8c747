"""Jobs survive restarts and crashes: work queued while the embed service is down, work a
killed process was doing, and deletes cut short are finished by the next start; a worker
that lost its job's lease stops and leaves the job to its new owner."""

import asyncio
import datetime as dt
import socket

import grpc
import pytest
from sqlalchemy import func, select, update

from ragmesh.ingest.v1 import ingest_pb2
from services.common.database import create_engine, sessionmaker, utcnow, writing
from services.ingest import storage
from services.ingest.app import start

READY = ingest_pb2.DocumentStatus.Value("DOCUMENT_STATUS_READY")
FAILED = ingest_pb2.DocumentStatus.Value("DOCUMENT_STATUS_FAILED")
# Long enough to never pass in a test, short enough to be a lease.
HELD = dt.timedelta(seconds=600)
# A killed process's jobs are free again this soon, while a live worker's renewals (every
# third of it) still make it on a loaded 2-core machine: 1 s did not, its lease ran out
# before the worker reached embed.
SHORT_LEASE = 5.0


@pytest.fixture
def dead_target():
    """An address nothing listens on (connections are refused): the embed service is down."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"127.0.0.1:{port}"


async def _job(app, document_id: str) -> storage.JobRow | None:
    async with app.documents._sessions() as session:
        return await session.get(storage.JobRow, document_id)


async def _set_job(app, document_id: str, **values) -> None:
    async with writing(app.documents._sessions) as session:
        await session.execute(
            update(storage.JobRow).where(storage.JobRow.document_id == document_id).values(**values)
        )


async def _leased_jobs(settings) -> int:
    engine = create_engine(settings.resolved_database_url)
    try:
        async with sessionmaker(engine)() as session:
            return await session.scalar(
                select(func.count())
                .select_from(storage.JobRow)
                .where(storage.JobRow.lease_owner != "")
            )
    finally:
        await engine.dispose()


async def _held(proxy) -> None:
    """Waits until a worker is inside a document's Embed call, holding the job's lease."""
    async with asyncio.timeout(60):
        await proxy.held.wait()


async def test_work_queued_while_embed_is_down_is_finished_after_a_restart(
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

            async def waiting_to_retry() -> bool:
                rows = [await _job(app, i) for i in ids]
                return all(
                    row is not None and row.attempts >= 1 and not row.lease_owner for row in rows
                )

            # The embed service is down: every job is retried later, none is lost or FAILED.
            await eventually(waiting_to_retry)
            for document_id in ids:
                document = (await client.call("GetDocument", document_id=document_id)).document
                assert document.status != FAILED
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


async def test_work_of_a_killed_service_is_finished_once_its_leases_expire(
    make_settings, tmp_path, embed_proxy, embed_server, new_client, ingest_process
):
    settings = make_settings(
        tmp_path, embed_target=embed_proxy.target, job_lease_seconds=SHORT_LEASE
    )
    process = ingest_process(settings, tmp_path / "killed.log")
    async with grpc.aio.insecure_channel(await process.start()) as channel:
        client = new_client(channel)
        embed_proxy.gate.clear()
        ids = [
            (await client.upload(f"{n}.txt", f"text a crash interrupts {n}".encode())).document.id
            for n in range(3)
        ]
        await _held(embed_proxy)
    await process.kill()
    # Killed mid-document: its leases were not handed back, only time frees the jobs.
    assert await _leased_jobs(settings) >= 1

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


async def test_a_file_that_kills_the_service_fails_once_its_attempts_are_used_up(
    make_settings, tmp_path, embed_proxy, embed_server, new_client, ingest_process
):
    settings = make_settings(
        tmp_path, embed_target=embed_proxy.target, job_lease_seconds=SHORT_LEASE, job_max_attempts=1
    )
    process = ingest_process(settings, tmp_path / "killed.log")
    async with grpc.aio.insecure_channel(await process.start()) as channel:
        client = new_client(channel)
        embed_proxy.gate.clear()
        document_id = (await client.upload("deadly.txt", b"this file kills")).document.id
        await _held(embed_proxy)
    # The process dies on this file (as a parser crash or the OOM killer would kill it).
    await process.kill()

    restarted = await start(settings.model_copy(update={"embed_target": embed_server}))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{restarted.server.port}") as channel:
            client.stub = type(client.stub)(channel)
            final = (await client.watch(document_id))[-1]
        assert final.status == FAILED
        assert "1 attempt" in final.error and "stopped before it finished" in final.error
        assert await _job(restarted, document_id) is None
    finally:
        await restarted.server.stop(0)
        await restarted.close()


async def test_a_graceful_restart_does_not_use_up_a_documents_attempts(
    make_settings, tmp_path, embed_proxy, embed_server, new_client
):
    settings = make_settings(tmp_path, embed_target=embed_proxy.target, job_max_attempts=1)
    app = await start(settings)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.server.port}") as channel:
            client = new_client(channel)
            embed_proxy.gate.clear()
            document_id = (await client.upload("steady.txt", b"a rolling update")).document.id
            await _held(embed_proxy)
    finally:
        await app.server.stop(0)
        await app.close()

    restarted = await start(settings.model_copy(update={"embed_target": embed_server}))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{restarted.server.port}") as channel:
            client.stub = type(client.stub)(channel)
            final = (await client.watch(document_id))[-1]
        assert final.status == READY, final.error
    finally:
        await restarted.server.stop(0)
        await restarted.close()


async def test_a_worker_that_loses_its_lease_stops_and_leaves_the_job_to_its_new_owner(
    make_settings, tmp_path, embed_proxy, new_client
):
    settings = make_settings(
        tmp_path, embed_target=embed_proxy.target, workers=1, job_lease_seconds=SHORT_LEASE
    )
    app = await start(settings)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.server.port}") as channel:
            client = new_client(channel)
            embed_proxy.gate.clear()
            document_id = (await client.upload("taken.txt", b"taken over midway")).document.id
            await _held(embed_proxy)
            # Another replica holds the job now, as its claim leaves it once a lease ran out.
            await _set_job(app, document_id, lease_owner="replica-b", lease_until=utcnow() + HELD)
            # The worker notices at its next renewal and stops: its Embed call is cancelled.
            async with asyncio.timeout(30):
                await embed_proxy.cancelled.wait()
            embed_proxy.gate.set()
            # Its only worker is free again and takes other work.
            assert (await client.ingest("next.txt", b"the next document")).status == READY
            job = await _job(app, document_id)
            assert job is not None and job.lease_owner == "replica-b"
            document = (await client.call("GetDocument", document_id=document_id)).document
            assert document.status == ingest_pb2.DOCUMENT_STATUS_EMBEDDING
            assert not (await client.call("ListChunks", document_id=document_id)).chunks
    finally:
        await app.server.stop(0)
        await app.close()


async def test_a_worker_whose_lease_ran_out_never_undoes_the_new_owners_work(
    make_settings, tmp_path, embed_proxy, embed_server, new_client
):
    # A lease renewed only every 200 s: the stalled worker's renewal (every 20 s with the
    # default 60 s) would give it back the lease the test ended, and the second replica,
    # were it slower to claim the job than that, would never get it.
    settings = make_settings(
        tmp_path,
        embed_target=embed_proxy.target,
        workers=1,
        index_sync_seconds=3600,
        job_lease_seconds=HELD.total_seconds(),
    )
    stalled = await start(settings)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{stalled.server.port}") as channel:
            client = new_client(channel)
            embed_proxy.gate.clear()
            upload = await client.upload("contested.txt", b"lighthouse keepers and their lamps")
            document_id = upload.document.id
            await _held(embed_proxy)
            # The worker stalls past its lease (a long pause, a partition from the database)
            # and a second replica takes the job over and finishes the document.
            await _set_job(stalled, document_id, lease_until=utcnow() - HELD)
            second = await start(
                settings.model_copy(
                    update={
                        "embed_target": embed_server,
                        # Its own folder (an Edge shard is one process's), the same
                        # database and uploads.
                        "data_dir": tmp_path / "second",
                        "database_url": settings.resolved_database_url,
                        "blob_dir": settings.resolved_blob_dir,
                    }
                )
            )
            try:
                async with grpc.aio.insecure_channel(
                    f"127.0.0.1:{second.server.port}"
                ) as second_channel:
                    other = new_client(second_channel)
                    other.metadata = client.metadata
                    finished = (await other.watch(document_id))[-1]
                    assert finished.status == READY, finished.error
            finally:
                await second.server.stop(0)
                await second.close()
            await stalled.retrieval.sync()

            # The stalled worker wakes up with its own, now stale, results.
            embed_proxy.gate.set()
            assert (await client.ingest("next.txt", b"the next document")).status == READY
            document = (await client.call("GetDocument", document_id=document_id)).document
            assert document.status == READY
            assert document.chunk_count == finished.chunk_count
            hits = await client.call(
                "Search", query="lighthouse keepers", mode=ingest_pb2.SEARCH_MODE_KEYWORD
            )
            assert [hit.document_id for hit in hits.hits] == [document_id]
            assert await stalled.vectors.count_document(document_id) == document.chunk_count
            assert await _job(stalled, document_id) is None
    finally:
        await stalled.server.stop(0)
        await stalled.close()


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
        async with writing(app.documents._sessions) as session:
            await storage.set_status(session, document.id, storage.DELETING)
            await storage.put_job(session, document.id, storage.JOB_DELETE)
        assert await app.vectors.count_document(document.id) > 0
    finally:
        await app.server.stop(0)
        await app.close()

    restarted = await start(settings)
    try:

        async def gone() -> bool:
            async with restarted.documents._sessions() as session:
                return await session.get(storage.DocumentRow, document.id) is None

        await eventually(gone)
        assert await restarted.vectors.count_document(document.id) == 0
        assert not restarted.documents._blobs.path(document.id).exists()
        async with restarted.documents._sessions() as session:
            assert await storage.count_jobs(session) == 0
    finally:
        await restarted.server.stop(0)
        await restarted.close()
