"""Chatting with one's documents through the real mesh: grounded answers with citations,
memory across turns, tags and session search, tenants kept apart, and what happens when
a client cancels or a service fails."""

import asyncio

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from ragmesh.llm.v1 import llm_pb2, llm_pb2_grpc
from ragmesh.sessions.v1 import sessions_pb2
from tests.sessions.conftest import ALICE, BOB, upload

FACT = (
    "Maintenance log of the Varnholt observatory. The observatory's main telescope mirror "
    "was re-silvered on 14 March 2019 by the technician Ilse Brandauer, using 38 grams of "
    "silver nitrate. The dome motor was replaced in 2021."
)
FILLER = (
    "Visitor information. The observatory is open on Saturdays from April to October. "
    "Parking is available at the foot of the hill, and the path takes twenty minutes."
)


def by_kind(events):
    kinds: dict[str, list] = {}
    for event in events:
        kinds.setdefault(event.WhichOneof("event"), []).append(event)
    return kinds


def reason(exc: grpc.aio.AioRpcError) -> str:
    for detail in rpc_status.from_call(exc).details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    return ""


@pytest.fixture(scope="module")
async def documents(ingest_target):
    fact = await upload(ingest_target, "observatory-log.txt", FACT)
    filler = await upload(ingest_target, "visitors.txt", FILLER)
    return fact, filler


async def test_answer_is_grounded_in_the_sessions_documents_with_citations(
    make_sessions, documents, llm_proxy
):
    sessions = await make_sessions(llm_target=llm_proxy.target)
    fact_id, filler_id = documents
    created = await sessions.stub.CreateSession(
        sessions_pb2.CreateSessionRequest(document_ids=[fact_id, filler_id]), metadata=ALICE
    )
    events = by_kind(
        await sessions.send(created.session.id, "Who re-silvered the telescope mirror?")
    )
    assert [e.user_message.content for e in events["user_message"]] == [
        "Who re-silvered the telescope mirror?"
    ]
    hits = events["retrieval"][0].retrieval.hits
    documents_hit = [h for h in hits if h.source == sessions_pb2.RetrievalHit.SOURCE_DOCUMENT]
    assert documents_hit[0].citation.document_id == fact_id
    assert "Ilse Brandauer" in documents_hit[0].text
    assert events["delta"], "the answer streams"
    answer = events["assistant_message"][0].assistant_message
    assert answer.content == "".join(e.delta for e in events["delta"])
    assert fact_id in [c.document_id for c in answer.citations]
    assert answer.model == "SmolLM2-135M-Instruct"
    assert answer.finish_reason in (
        sessions_pb2.FINISH_REASON_STOP,
        sessions_pb2.FINISH_REASON_EOS,
        sessions_pb2.FINISH_REASON_LENGTH,
    )
    assert answer.completion_tokens > 0 and answer.total_seconds > 0
    # The passage reached the model's prompt, labelled for citing.
    assert "[D1]" in llm_proxy.chats[-1].system_prompt
    assert "Ilse Brandauer" in llm_proxy.chats[-1].system_prompt
    stored = await sessions.stub.ListMessages(
        sessions_pb2.ListMessagesRequest(session_id=created.session.id), metadata=ALICE
    )
    assert [m.role for m in stored.messages] == [
        sessions_pb2.MESSAGE_ROLE_USER,
        sessions_pb2.MESSAGE_ROLE_ASSISTANT,
    ]
    assert stored.messages[1].citations == answer.citations
    session = (
        await sessions.stub.GetSession(
            sessions_pb2.GetSessionRequest(session_id=created.session.id), metadata=ALICE
        )
    ).session
    assert session.message_count == 2 and session.HasField("last_exchange_time")
    assert session.name == "Who re-silvered the telescope mirror?"


async def test_a_fact_told_in_turn_one_is_recalled_into_the_prompt_in_turn_four(
    make_sessions, llm_proxy
):
    sessions = await make_sessions(llm_target=llm_proxy.target)
    created = await sessions.stub.CreateSession(
        sessions_pb2.CreateSessionRequest(name="chat"), metadata=ALICE
    )
    sid = created.session.id
    turns = [
        "Please remember that my locker combination is 4-1-7-9.",
        "What is a good recipe for pancakes?",
        "How far away is the Moon from the Earth?",
    ]
    for content in turns:
        await sessions.send(sid, content)
        await sessions.memory_settled()
    events = by_kind(await sessions.send(sid, "What was my locker combination again?"))
    memories = [
        h
        for h in events["retrieval"][0].retrieval.hits
        if h.source == sessions_pb2.RetrievalHit.SOURCE_MEMORY
    ]
    assert "4-1-7-9" in memories[0].text
    assert "4-1-7-9" in llm_proxy.chats[-1].system_prompt
    found = await sessions.stub.SearchMemory(
        sessions_pb2.SearchMemoryRequest(query="locker code", session_id=sid), metadata=ALICE
    )
    assert "4-1-7-9" in found.hits[0].text


async def test_sessions_get_topic_tags_and_are_found_by_meaning(make_sessions):
    sessions = await make_sessions()
    created = await sessions.stub.CreateSession(
        sessions_pb2.CreateSessionRequest(name="Thursday"), metadata=ALICE
    )
    sid = created.session.id
    await sessions.send(sid, "My tomato plants have yellow leaves and brown spots.")
    await sessions.send(sid, "Should I water the tomatoes less or add fertiliser?")
    await sessions.memory_settled()
    other = await sessions.stub.CreateSession(
        sessions_pb2.CreateSessionRequest(name="Taxes"), metadata=ALICE
    )
    await sessions.send(other.session.id, "When is the deadline for filing my tax return?")
    await sessions.memory_settled()
    session = (
        await sessions.stub.GetSession(
            sessions_pb2.GetSessionRequest(session_id=sid), metadata=ALICE
        )
    ).session
    assert any("tomato" in tag for tag in session.auto_tags), session.auto_tags
    # Shares no word with the session's name.
    found = await sessions.stub.SearchSessions(
        sessions_pb2.SearchSessionsRequest(query="vegetable garden disease"), metadata=ALICE
    )
    assert found.matches[0].session.id == sid
    assert "content" in found.matches[0].matched_fields and found.matches[0].snippet
    by_tag = await sessions.stub.ListSessions(
        sessions_pb2.ListSessionsRequest(tag=session.auto_tags[0]), metadata=ALICE
    )
    assert [s.id for s in by_tag.sessions] == [sid]


async def test_another_tenant_can_reach_none_of_a_tenants_sessions(make_sessions, documents):
    sessions = await make_sessions()
    fact_id, _ = documents
    created = await sessions.stub.CreateSession(
        sessions_pb2.CreateSessionRequest(name="observatory", document_ids=[fact_id]),
        metadata=ALICE,
    )
    sid = created.session.id
    await sessions.send(sid, "When was the mirror re-silvered?")
    await sessions.memory_settled()
    calls = [
        sessions.stub.GetSession(sessions_pb2.GetSessionRequest(session_id=sid), metadata=BOB),
        sessions.stub.ListMessages(sessions_pb2.ListMessagesRequest(session_id=sid), metadata=BOB),
        sessions.stub.DeleteSession(
            sessions_pb2.DeleteSessionRequest(session_id=sid), metadata=BOB
        ),
        sessions.stub.UpdateSession(
            sessions_pb2.UpdateSessionRequest(
                session=sessions_pb2.Session(id=sid, name="mine"),
                update_mask={"paths": ["name"]},
            ),
            metadata=BOB,
        ),
        sessions.stub.SearchMemory(
            sessions_pb2.SearchMemoryRequest(query="mirror", session_id=sid), metadata=BOB
        ),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await sessions.send(sid, "tell me", metadata=BOB)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    listed = await sessions.stub.ListSessions(sessions_pb2.ListSessionsRequest(), metadata=BOB)
    assert list(listed.sessions) == []
    searched = await sessions.stub.SearchSessions(
        sessions_pb2.SearchSessionsRequest(query="observatory mirror"), metadata=BOB
    )
    assert list(searched.matches) == []
    memory = await sessions.stub.SearchMemory(
        sessions_pb2.SearchMemoryRequest(query="mirror re-silvered"), metadata=BOB
    )
    assert list(memory.hits) == []
    # Nor can Bob build a session over Alice's document.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await sessions.stub.CreateSession(
            sessions_pb2.CreateSessionRequest(document_ids=[fact_id]), metadata=BOB
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert reason(caught.value) == "DOCUMENTS_NOT_FOUND"


async def test_cancelling_the_stream_stops_the_llm_and_stores_the_partial_answer(
    make_sessions, llm_proxy
):
    llm_proxy.delta_delay = 0.05
    sessions = await make_sessions(llm_target=llm_proxy.target)
    created = await sessions.stub.CreateSession(sessions_pb2.CreateSessionRequest(), metadata=ALICE)
    call = sessions.stub.SendMessage(
        sessions_pb2.SendMessageRequest(
            session_id=created.session.id,
            content="Write a long story about a lighthouse.",
            overrides=llm_pb2.GenerationOverrides(max_new_tokens=200),
        ),
        metadata=ALICE,
    )
    async for event in call:
        if event.WhichOneof("event") == "delta":
            break
    call.cancel()
    for _ in range(200):
        stored = await sessions.stub.ListMessages(
            sessions_pb2.ListMessagesRequest(session_id=created.session.id), metadata=ALICE
        )
        if len(stored.messages) == 2:
            break
        await asyncio.sleep(0.05)
    user, answer = stored.messages
    assert user.content == "Write a long story about a lighthouse."
    assert answer.finish_reason == sessions_pb2.FINISH_REASON_CANCELLED
    assert answer.content and answer.completion_tokens < 200
    # The decode slot was released by request id too.
    assert llm_proxy.cancels == [llm_proxy.chats[-1].request_id]


async def test_llm_unreachable_keeps_the_question_and_stores_no_answer(make_sessions):
    sessions = await make_sessions(llm_target="127.0.0.1:1")
    created = await sessions.stub.CreateSession(sessions_pb2.CreateSessionRequest(), metadata=ALICE)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await sessions.send(created.session.id, "Is anyone there?")
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    stored = await sessions.stub.ListMessages(
        sessions_pb2.ListMessagesRequest(session_id=created.session.id), metadata=ALICE
    )
    assert [(m.role, m.content) for m in stored.messages] == [
        (sessions_pb2.MESSAGE_ROLE_USER, "Is anyone there?")
    ]


async def test_llm_failing_mid_answer_stores_the_partial_answer_with_the_error(
    make_sessions, llm_proxy
):
    llm_proxy.fail_after_deltas = 3
    sessions = await make_sessions(llm_target=llm_proxy.target)
    created = await sessions.stub.CreateSession(sessions_pb2.CreateSessionRequest(), metadata=ALICE)
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        call = sessions.stub.SendMessage(
            sessions_pb2.SendMessageRequest(
                session_id=created.session.id, content="Tell me about the sea."
            ),
            metadata=ALICE,
        )
        async for event in call:
            received.append(event)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    answer = by_kind(received)["assistant_message"][0].assistant_message
    assert answer.finish_reason == sessions_pb2.FINISH_REASON_ERROR
    assert "went away" in answer.error
    assert answer.content == "".join(e.delta for e in by_kind(received)["delta"])
    stored = await sessions.stub.ListMessages(
        sessions_pb2.ListMessagesRequest(session_id=created.session.id), metadata=ALICE
    )
    assert stored.messages[-1].finish_reason == sessions_pb2.FINISH_REASON_ERROR


async def test_answer_still_comes_when_ingest_and_embed_are_down_and_says_why(make_sessions):
    sessions = await make_sessions(ingest_target="127.0.0.1:1", embed_target="127.0.0.1:1")
    created = await sessions.stub.CreateSession(sessions_pb2.CreateSessionRequest(), metadata=ALICE)
    events = by_kind(
        await sessions.send(created.session.id, "Hello there", document_ids=["some-document"])
    )
    skipped = {(s.source, s.reason) for s in events["retrieval"][0].retrieval.skipped}
    assert skipped == {
        (sessions_pb2.RetrievalHit.SOURCE_DOCUMENT, "INGEST_UNAVAILABLE"),
        (sessions_pb2.RetrievalHit.SOURCE_MEMORY, "EMBED_UNAVAILABLE"),
    }
    assert events["assistant_message"][0].assistant_message.content


async def test_a_retry_with_the_same_client_request_id_returns_the_stored_exchange(
    make_sessions, llm_proxy
):
    sessions = await make_sessions(llm_target=llm_proxy.target)
    created = await sessions.stub.CreateSession(sessions_pb2.CreateSessionRequest(), metadata=ALICE)
    first = by_kind(
        await sessions.send(created.session.id, "Say hello", client_request_id="retry-1")
    )
    again = by_kind(
        await sessions.send(created.session.id, "Say hello", client_request_id="retry-1")
    )
    assert again["user_message"][0].user_message.id == first["user_message"][0].user_message.id
    assert (
        again["assistant_message"][0].assistant_message
        == first["assistant_message"][0].assistant_message
    )
    assert len(llm_proxy.chats) == 1
    stored = await sessions.stub.ListMessages(
        sessions_pb2.ListMessagesRequest(session_id=created.session.id), metadata=ALICE
    )
    assert len(stored.messages) == 2


async def test_the_callers_deadline_reaches_the_llm_call(make_sessions, llm_proxy):
    sessions = await make_sessions(llm_target=llm_proxy.target)
    created = await sessions.stub.CreateSession(sessions_pb2.CreateSessionRequest(), metadata=ALICE)
    call = sessions.stub.SendMessage(
        sessions_pb2.SendMessageRequest(
            session_id=created.session.id,
            content="Hi",
            overrides=llm_pb2.GenerationOverrides(max_new_tokens=4),
        ),
        metadata=ALICE,
        timeout=20,
    )
    [event async for event in call]
    # The caller's 20 s (give or take the wire's rounding), not the 600 s stream default.
    assert llm_proxy.deadlines[-1] is not None and llm_proxy.deadlines[-1] < 21


async def test_history_sent_to_the_model_is_whole_newest_messages_within_the_context(
    make_sessions, llm_proxy, llm_target
):
    async with grpc.aio.insecure_channel(llm_target) as channel:
        status = await llm_pb2_grpc.LlmServiceStub(channel).GetModelStatus(
            llm_pb2.GetModelStatusRequest(), metadata=ALICE
        )
    # Leaves about 600 tokens for the prompt: room for a few of the turns below.
    reserve = status.status.context_length - 600
    sessions = await make_sessions(llm_target=llm_proxy.target, answer_reserve_tokens=reserve)
    created = await sessions.stub.CreateSession(sessions_pb2.CreateSessionRequest(), metadata=ALICE)
    # No max_new_tokens of its own, so the setting's reserve applies; short all the same.
    short = llm_pb2.GenerationOverrides(temperature=0, stop_sequences=["."])
    background = "Here is some background about my project and its history. " * 12
    for n in range(6):
        await sessions.send(created.session.id, f"{background} Part {n}.", memory_top_k=0)
    await sessions.send(created.session.id, "Summarise the parts.", memory_top_k=0, overrides=short)
    stored = await sessions.stub.ListMessages(
        sessions_pb2.ListMessagesRequest(session_id=created.session.id), metadata=ALICE
    )
    history = [m.content for m in stored.messages[:-2]]
    sent = [m.content for m in llm_proxy.chats[-1].messages]
    assert sent[-1] == "Summarise the parts."
    kept = sent[:-1]
    # Whole messages, the newest ones, and not all of them.
    assert 0 < len(kept) < len(history)
    assert kept == history[len(history) - len(kept) :]
