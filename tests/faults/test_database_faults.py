"""The database going away under running services: PostgreSQL stopped under ingest and
sessions. Every call that needs it gets UNAVAILABLE with a message that names the
database, and the services serve again as soon as it is back, without a restart."""

import grpc
import pytest
from harness import (
    FINISHED,
    ingest_stub,
    postgres_server,
    sessions_stub,
    upload,
    wait_until_finished,
)

from ragmesh.ingest.v1 import ingest_pb2
from ragmesh.sessions.v1 import sessions_pb2


@pytest.fixture
def database():
    with postgres_server() as server:
        yield server


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

        # Back: the same services answer, and new work goes through.
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
