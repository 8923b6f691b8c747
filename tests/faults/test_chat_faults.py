"""kill -9 of llm and of sessions in the middle of an answer (at its first streamed token),
then a restart: what was said is kept, nothing is half-written, the conversation goes on."""

import asyncio
import sqlite3
import time

import grpc
from harness import sessions_stub

from ragmesh.sessions.v1 import sessions_pb2

LONG_ANSWER = {"max_new_tokens": 200}
STORY = "Tell me a long story about a lighthouse keeper and a storm."
FINISHED = {
    sessions_pb2.FINISH_REASON_EOS,
    sessions_pb2.FINISH_REASON_LENGTH,
    sessions_pb2.FINISH_REASON_STOP,
}


async def create_session(stub) -> str:
    reply = await stub.CreateSession(sessions_pb2.CreateSessionRequest(name="faults"), timeout=30)
    return reply.session.id


def send(stub, session_id: str, content: str, **overrides):
    return stub.SendMessage(
        sessions_pb2.SendMessageRequest(
            session_id=session_id, content=content, overrides=overrides or {"max_new_tokens": 24}
        ),
        timeout=300,
    )


async def messages(stub, session_id: str) -> list[sessions_pb2.Message]:
    reply = await stub.ListMessages(
        sessions_pb2.ListMessagesRequest(session_id=session_id, page_size=100), timeout=30
    )
    return list(reply.messages)


async def answered(stub, session_id: str, content: str) -> sessions_pb2.Message:
    """The stored answer of a message that must go through."""
    stored = None
    async for event in send(stub, session_id, content):
        if event.WhichOneof("event") == "assistant_message":
            stored = event.assistant_message
    assert stored is not None and stored.finish_reason in FINISHED, stored
    assert stored.content.strip()
    return stored


async def answered_once_back(stub, session_id: str, content: str) -> sessions_pb2.Message:
    """The answer to content sent the moment an upstream is back, as a client sends it:
    retried on UNAVAILABLE with the same client_request_id (so the question is stored
    once). sessions finds the upstream again within a second or so; five seconds of
    retries (the answer itself may take as long as it takes) are far below gRPC's default
    reconnect backoff, which grows to 2 minutes."""
    request = sessions_pb2.SendMessageRequest(
        session_id=session_id,
        content=content,
        overrides={"max_new_tokens": 24},
        client_request_id=f"once-back-{session_id}",
    )
    give_up = time.monotonic() + 5
    while True:
        stored = None
        try:
            async for event in stub.SendMessage(request, timeout=300):
                if event.HasField("assistant_message"):
                    stored = event.assistant_message
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
            assert time.monotonic() < give_up, f"still unavailable with the llm back: {exc}"
            await asyncio.sleep(0.2)
            continue
        assert stored is not None and stored.finish_reason in FINISHED, stored
        return stored


async def test_llm_killed_mid_stream_keeps_the_question_and_the_partial_answer(mesh, models):
    await mesh.start("sessions")
    async with sessions_stub(mesh) as stub:
        session_id = await create_session(stub)
        events = []
        call = send(stub, session_id, STORY, **LONG_ANSWER)
        try:
            async for event in call:
                events.append(event)
                if event.WhichOneof("event") == "delta" and "llm" in models.processes:
                    await models.kill("llm")
            raise AssertionError("the stream ended without an error")
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
            assert "llm" in exc.details()
        relayed = "".join(e.delta for e in events if e.WhichOneof("event") == "delta")
        stored = [e.assistant_message for e in events if e.HasField("assistant_message")]
        assert len(stored) == 1 and stored[0].finish_reason == sessions_pb2.FINISH_REASON_ERROR
        assert stored[0].content == relayed and relayed
        assert stored[0].error

        # llm down for a while (a pod rescheduled): a client asking again and again (the
        # same client_request_id) gets UNAVAILABLE each time; the question is kept once
        # and no answer is made up.
        asking = sessions_pb2.SendMessageRequest(
            session_id=session_id, content="Are you there?", client_request_id="while-down"
        )
        down_until = time.monotonic() + 6
        while time.monotonic() < down_until:
            try:
                async for _ in stub.SendMessage(asking, timeout=60):
                    pass
                raise AssertionError("an answer came with the llm down")
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
            await asyncio.sleep(0.5)

        await models.start("llm")
        await answered_once_back(stub, session_id, "What is a lighthouse for?")
        kept = await messages(stub, session_id)
        assert [(m.role, m.finish_reason) for m in kept] == [
            (sessions_pb2.MESSAGE_ROLE_USER, sessions_pb2.FINISH_REASON_UNSPECIFIED),
            (sessions_pb2.MESSAGE_ROLE_ASSISTANT, sessions_pb2.FINISH_REASON_ERROR),
            (sessions_pb2.MESSAGE_ROLE_USER, sessions_pb2.FINISH_REASON_UNSPECIFIED),
            (sessions_pb2.MESSAGE_ROLE_USER, sessions_pb2.FINISH_REASON_UNSPECIFIED),
            (sessions_pb2.MESSAGE_ROLE_ASSISTANT, kept[-1].finish_reason),
        ]
        assert [m.content for m in kept[:4]] == [
            STORY,
            relayed,
            "Are you there?",
            "What is a lighthouse for?",
        ]
        assert kept[-1].finish_reason in FINISHED


def check_database(path) -> None:
    """The SQLite file is whole, and every row is complete: each session counts the
    messages it has, numbered without gaps; each answer replies to a stored question."""
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        for session_id, count in db.execute("SELECT id, message_count FROM sessions"):
            rows = db.execute(
                "SELECT seq, role, id, reply_to FROM messages WHERE session_id = ? ORDER BY seq",
                (session_id,),
            ).fetchall()
            assert len(rows) == count
            assert [row[0] for row in rows] == list(range(rows[0][0], rows[0][0] + count))
            users = {row[2] for row in rows if row[1] == "user"}
            assert all(row[3] in users for row in rows if row[1] == "assistant")


async def test_sessions_killed_mid_answer_leaves_whole_rows_and_the_conversation_goes_on(mesh):
    await mesh.start("sessions")
    async with sessions_stub(mesh) as stub:
        session_id = await create_session(stub)
        first = await answered(stub, session_id, "What is a lighthouse for?")
        try:
            async for event in send(stub, session_id, STORY, **LONG_ANSWER):
                if event.WhichOneof("event") == "delta":
                    await mesh.kill("sessions")
                    break
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
    check_database(mesh.root / "sessions" / "sessions.db")

    await mesh.start("sessions")
    async with sessions_stub(mesh) as stub:
        kept = await messages(stub, session_id)
        # The question was stored before the answer began; the answer never was.
        assert [m.content for m in kept] == ["What is a lighthouse for?", first.content, STORY]
        session = (
            await stub.GetSession(sessions_pb2.GetSessionRequest(session_id=session_id))
        ).session
        assert session.message_count == 3
        await answered(stub, session_id, "Who keeps it?")
        assert len(await messages(stub, session_id)) == 5
    await mesh.stop("sessions")
    check_database(mesh.root / "sessions" / "sessions.db")
