"""The database going away under running services: PostgreSQL stopped under ingest and
sessions. Every call that needs it gets UNAVAILABLE with a message that names the
database, and the services serve again as soon as it is back, without a restart."""

import asyncio

import grpc
import pytest
import throwaway_postgres
from harness import (
    FINISHED,
    ingest_stub,
    postgres_server,
    sessions_stub,
    upload,
    wait_until_finished,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy import text

from ragmesh.ingest.v1 import ingest_pb2
from ragmesh.sessions.v1 import sessions_pb2
from services.common.database import create_engine, unreachable


@pytest.fixture
def database():
    with postgres_server() as server:
        yield server


async def wait_for_log(mesh, name: str, text: str) -> None:
    for _ in range(300):
        if text in mesh.log(name).read_text(errors="replace"):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{name} never logged {text!r}")


async def unavailable(call) -> str:
    """The details of the UNAVAILABLE status call ends with."""
    try:
        reply = await call
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == grpc.StatusCode.UNAVAILABLE, (exc.code(), exc.details())
        return exc.details()
    raise AssertionError(f"answered without its database: {reply}")


async def streamed_unavailable(call) -> str:
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == grpc.StatusCode.UNAVAILABLE, (exc.code(), exc.details())
        return exc.details()
    raise AssertionError("the stream ended without its database")


async def test_postgresql_stopped_gives_unavailable_and_the_services_recover(mesh, database):
    executor, create_database = database
    mesh.extra_env["ingest"].update(DATABASE_URL=create_database("ingest"), EDGE_CATCH_UP="true")
    mesh.extra_env["sessions"] = {"DATABASE_URL": create_database("sessions")}
    ingest_log = mesh.log("ingest")
    logged_before = ingest_log.stat().st_size if ingest_log.exists() else 0
    await mesh.start("ingest", "sessions")
    async with ingest_stub(mesh) as ingest, sessions_stub(mesh) as sessions:
        before = await upload(ingest, "before.txt", b"The keeper logs the tides at six.")
        await wait_until_finished(ingest, [before])
        session = (
            await sessions.CreateSession(sessions_pb2.CreateSessionRequest(), timeout=30)
        ).session

        with executor.stopped():
            details = [
                await unavailable(ingest.ListDocuments(ingest_pb2.ListDocumentsRequest())),
                await unavailable(
                    ingest.GetDocument(ingest_pb2.GetDocumentRequest(document_id=before))
                ),
                await unavailable(
                    ingest.Search(ingest_pb2.SearchRequest(query="tides"), timeout=30)
                ),
                await unavailable(sessions.ListSessions(sessions_pb2.ListSessionsRequest())),
                await unavailable(sessions.CreateSession(sessions_pb2.CreateSessionRequest())),
                await streamed_unavailable(
                    sessions.SendMessage(
                        sessions_pb2.SendMessageRequest(session_id=session.id, content="Hello?")
                    )
                ),
                await unavailable(upload(ingest, "during.txt", b"Sent while it is down.")),
            ]
            assert all("database" in text for text in details), details
            # The workers keep polling for jobs; the outage is logged once, not per poll.
            await wait_for_log(mesh, "ingest", "the workers wait for the database")

        # Back (once it accepts connections; until then calls are UNAVAILABLE): the same
        # services answer, and new work goes through.
        throwaway_postgres.wait_until_accepting(executor.port)
        listed = await ingest.ListDocuments(ingest_pb2.ListDocumentsRequest(), timeout=30)
        assert before in {d.id for d in listed.documents}
        after = await upload(ingest, "after.txt", b"The lens was ground in Paris in 1871.")
        finished = await wait_until_finished(ingest, [after])
        assert finished[after].status in FINISHED
        assert finished[after].status == ingest_pb2.DOCUMENT_STATUS_READY, finished[after].error
        stored = None
        async for event in sessions.SendMessage(
            sessions_pb2.SendMessageRequest(
                session_id=session.id,
                content="Where was the lens made?",
                overrides={"max_new_tokens": 16},
            ),
            timeout=300,
        ):
            if event.HasField("assistant_message"):
                stored = event.assistant_message
        assert stored is not None and stored.content
    log = ingest_log.read_bytes()[logged_before:].decode(errors="replace")
    assert log.count("the workers wait for the database") == 1, log[-3000:]
    assert "the database is reachable again" in log
    assert "could not take a job" not in log


async def test_a_server_refusing_connections_for_now_is_unavailable_not_internal(postgres):
    """asyncpg raises "too many connections" (SQLSTATE 53300) and "the database system is
    starting up" (57P03) as its own error types, which SQLAlchemy wraps as a plain
    DBAPIError: they are UNAVAILABLE, where a broken query stays an internal error."""
    url = postgres()
    admin = create_engine(url)
    async with admin.begin() as connection:
        await connection.execute(text("CREATE ROLE crowded LOGIN CONNECTION LIMIT 0"))
    crowded = create_engine(url.replace("postgres@", "crowded@"))
    try:
        with pytest.raises(sa_exc.DBAPIError) as refused:
            async with crowded.connect() as connection:
                await connection.execute(text("SELECT 1"))
        assert not isinstance(refused.value, sa_exc.OperationalError)
        down = unreachable(refused.value)
        assert down is not None and down.reason == "DATABASE_UNAVAILABLE"
        assert "too many connections" in down.message
        with pytest.raises(sa_exc.DBAPIError) as broken:
            async with admin.connect() as connection:
                await connection.execute(text("SELEC 1"))
        assert unreachable(broken.value) is None
    finally:
        await crowded.dispose()
        await admin.dispose()
