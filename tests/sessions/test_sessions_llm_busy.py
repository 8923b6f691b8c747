"""An llm too busy to take a question: sessions keeps the question, answers
RESOURCE_EXHAUSTED with what the llm said (its reason, its limit), stores no answer,
and the same question sent again with its client_request_id is answered once the llm
has room, stored once."""

import asyncio

import grpc
import pytest
from conftest import ALICE, serving_llm
from rpc_errors import error_info

from ragmesh.llm.v1 import llm_pb2, llm_pb2_grpc
from ragmesh.sessions.v1 import sessions_pb2

# Greedy counting goes on for as long as it is let; the filler is cancelled, never ends.
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"


@pytest.fixture(scope="module")
async def one_slot_llm(tmp_path_factory):
    """An llm with one decode slot and no queue; its target."""
    data = tmp_path_factory.mktemp("one-slot-llm")
    async with serving_llm(data, max_batch_size=1, max_queue=0) as target:
        yield target


async def test_a_question_the_busy_llm_refuses_is_kept_and_answered_once_when_sent_again(
    make_sessions, one_slot_llm
):
    sessions = await make_sessions(llm_target=one_slot_llm)
    created = await sessions.stub.CreateSession(sessions_pb2.CreateSessionRequest(), metadata=ALICE)
    session_id = created.session.id
    question = dict(content="What is a lighthouse for?", client_request_id="ask-1")

    async with grpc.aio.insecure_channel(one_slot_llm) as channel:
        filler = llm_pb2_grpc.LlmServiceStub(channel).Generate(
            llm_pb2.GenerateRequest(
                prompt=COUNTING,
                overrides=llm_pb2.GenerationOverrides(max_new_tokens=4000, temperature=0),
            ),
            metadata=ALICE,
        )
        # Its first delta: the filler holds the only slot.
        assert (await filler.read()).WhichOneof("event") == "delta"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await sessions.send(session_id, **question)
        filler.cancel()

    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value.details()
    assert "queue is full" in caught.value.details()
    info = error_info(caught.value)
    assert info.reason == "UPSTREAM_ERROR"
    assert info.metadata["request_id"]
    assert {key: value for key, value in info.metadata.items() if key != "request_id"} == {
        "upstream": "llm",
        "upstream_code": "RESOURCE_EXHAUSTED",
        "upstream_reason": "QUEUE_FULL",
        "limit": "0",
    }
    stored = await sessions.stub.ListMessages(
        sessions_pb2.ListMessagesRequest(session_id=session_id), metadata=ALICE
    )
    assert [(m.role, m.content) for m in stored.messages] == [
        (sessions_pb2.MESSAGE_ROLE_USER, question["content"])
    ]

    # Sent again, as a client backing off does, until the cancelled filler has left the slot.
    async with asyncio.timeout(120):
        while True:
            try:
                events = await sessions.send(session_id, **question)
                break
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc.details()
                await asyncio.sleep(0.2)
    answer = events[-1].assistant_message
    assert answer.finish_reason != sessions_pb2.FINISH_REASON_ERROR, answer.error
    stored = await sessions.stub.ListMessages(
        sessions_pb2.ListMessagesRequest(session_id=session_id), metadata=ALICE
    )
    assert [(m.role, m.content) for m in stored.messages] == [
        (sessions_pb2.MESSAGE_ROLE_USER, question["content"]),
        (sessions_pb2.MESSAGE_ROLE_ASSISTANT, answer.content),
    ]
