"""Sessions as records, on SQLite and PostgreSQL: create, read, list (order, pages,
filters), update by mask, delete, and every bad input answered with its status."""

import datetime as dt

import grpc
import pytest
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from ragmesh.llm.v1 import llm_pb2
from ragmesh.sessions.v1 import sessions_pb2
from services.common.vectors import Match
from tests.sessions.conftest import ALICE, upload


def details(exc: grpc.aio.AioRpcError):
    found = {}
    for detail in rpc_status.from_call(exc).details:
        for kind in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest):
            if detail.Is(kind.DESCRIPTOR):
                message = kind()
                detail.Unpack(message)
                found[kind.__name__] = message
    return found


async def refused(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


def stamp(value: dt.datetime) -> timestamp_pb2.Timestamp:
    result = timestamp_pb2.Timestamp()
    result.FromDatetime(value)
    return result


async def test_create_get_update_and_delete_a_session(make_sessions, ingest_target):
    sessions = await make_sessions()
    document = await upload(ingest_target, "notes.txt", "Notes about the session store.")
    created = (
        await sessions.stub.CreateSession(
            sessions_pb2.CreateSessionRequest(
                name="Planning",
                document_ids=[document],
                tags=["work"],
                system_prompt="Answer in one sentence.",
                generation=llm_pb2.GenerationOverrides(temperature=0.2, max_new_tokens=64),
            ),
            metadata=ALICE,
        )
    ).session
    assert (created.name, list(created.document_ids), list(created.tags)) == (
        "Planning",
        [document],
        ["work"],
    )
    assert created.tenant == "acme" and created.message_count == 0
    assert not created.HasField("last_exchange_time")
    assert created.generation.temperature == pytest.approx(0.2)
    got = (
        await sessions.stub.GetSession(
            sessions_pb2.GetSessionRequest(session_id=created.id), metadata=ALICE
        )
    ).session
    assert got == created
    updated = (
        await sessions.stub.UpdateSession(
            sessions_pb2.UpdateSessionRequest(
                session=sessions_pb2.Session(
                    id=created.id, name="Plans", tags=["work", "q3"], system_prompt="Be brief."
                ),
                update_mask={"paths": ["name", "tags", "system_prompt"]},
            ),
            metadata=ALICE,
        )
    ).session
    assert (updated.name, list(updated.tags), updated.system_prompt) == (
        "Plans",
        ["work", "q3"],
        "Be brief.",
    )
    # Fields outside the mask keep their values.
    assert list(updated.document_ids) == [document]
    assert updated.generation.max_new_tokens == 64
    await sessions.stub.DeleteSession(
        sessions_pb2.DeleteSessionRequest(session_id=created.id), metadata=ALICE
    )
    gone = await refused(
        sessions.stub.GetSession(
            sessions_pb2.GetSessionRequest(session_id=created.id), metadata=ALICE
        )
    )
    assert gone.code() == grpc.StatusCode.NOT_FOUND
    assert details(gone)["ErrorInfo"].reason == "SESSION_NOT_FOUND"


async def test_deleting_a_session_removes_its_messages_and_memories(make_sessions):
    sessions = await make_sessions()
    created = (
        await sessions.stub.CreateSession(sessions_pb2.CreateSessionRequest(), metadata=ALICE)
    ).session
    await sessions.send(created.id, "My bicycle is a green Gazelle from 1987.")
    await sessions.memory_settled()
    remembered = await sessions.stub.SearchMemory(
        sessions_pb2.SearchMemoryRequest(query="bicycle"), metadata=ALICE
    )
    assert remembered.hits
    await sessions.stub.DeleteSession(
        sessions_pb2.DeleteSessionRequest(session_id=created.id), metadata=ALICE
    )
    after = await sessions.stub.SearchMemory(
        sessions_pb2.SearchMemoryRequest(query="bicycle"), metadata=ALICE
    )
    assert list(after.hits) == []
    collection = await sessions.app.memory.collection()
    assert await sessions.app.store.count(collection, [Match("session_id", created.id)]) == 0
    messages = await refused(
        sessions.stub.ListMessages(
            sessions_pb2.ListMessagesRequest(session_id=created.id), metadata=ALICE
        )
    )
    assert messages.code() == grpc.StatusCode.NOT_FOUND


async def test_list_orders_by_last_exchange_pages_and_filters(make_sessions):
    sessions = await make_sessions()
    ids = []
    for n in range(5):
        created = await sessions.stub.CreateSession(
            sessions_pb2.CreateSessionRequest(name=f"s{n}", tags=["even"] if n % 2 == 0 else []),
            metadata=ALICE,
        )
        ids.append(created.session.id)
    before = dt.datetime.now(dt.UTC)
    await sessions.send(ids[1], "Hello", memory_top_k=0)
    await sessions.send(ids[3], "Hello again", memory_top_k=0)
    listed, token = [], ""
    while True:
        page = await sessions.stub.ListSessions(
            sessions_pb2.ListSessionsRequest(page_size=2, page_token=token), metadata=ALICE
        )
        listed.extend(s.id for s in page.sessions)
        token = page.next_page_token
        if not token:
            break
    # Most recent exchange first, then sessions without one, newest first.
    assert listed == [ids[3], ids[1], ids[4], ids[2], ids[0]]
    tagged = await sessions.stub.ListSessions(
        sessions_pb2.ListSessionsRequest(tag="even"), metadata=ALICE
    )
    assert [s.id for s in tagged.sessions] == [ids[4], ids[2], ids[0]]
    recent = await sessions.stub.ListSessions(
        sessions_pb2.ListSessionsRequest(last_exchange_after=stamp(before)), metadata=ALICE
    )
    assert [s.id for s in recent.sessions] == [ids[3], ids[1]]
    old = await sessions.stub.ListSessions(
        sessions_pb2.ListSessionsRequest(last_exchange_before=stamp(before)), metadata=ALICE
    )
    assert list(old.sessions) == []
    by_model = await sessions.stub.ListSessions(
        sessions_pb2.ListSessionsRequest(model="SmolLM2-135M-Instruct"), metadata=ALICE
    )
    assert list(by_model.sessions) == []


async def test_messages_list_oldest_first_in_pages(make_sessions):
    sessions = await make_sessions()
    created = (
        await sessions.stub.CreateSession(sessions_pb2.CreateSessionRequest(), metadata=ALICE)
    ).session
    for n in range(3):
        await sessions.send(created.id, f"Question {n}", memory_top_k=0)
    contents, token = [], ""
    while True:
        page = await sessions.stub.ListMessages(
            sessions_pb2.ListMessagesRequest(session_id=created.id, page_size=4, page_token=token),
            metadata=ALICE,
        )
        contents.extend((m.role, m.content) for m in page.messages)
        token = page.next_page_token
        if not token:
            break
    assert [c for r, c in contents if r == sessions_pb2.MESSAGE_ROLE_USER] == [
        "Question 0",
        "Question 1",
        "Question 2",
    ]
    assert [r for r, _ in contents] == [
        sessions_pb2.MESSAGE_ROLE_USER,
        sessions_pb2.MESSAGE_ROLE_ASSISTANT,
    ] * 3


async def test_a_model_no_llm_deployment_serves_is_refused_naming_those_served(make_sessions):
    sessions = await make_sessions()
    error = await refused(
        sessions.stub.CreateSession(
            sessions_pb2.CreateSessionRequest(model="llama-70b"), metadata=ALICE
        )
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert details(error)["ErrorInfo"].reason == "MODEL_NOT_SERVED"
    assert "SmolLM2-135M-Instruct" in error.details()
    served = await sessions.stub.CreateSession(
        sessions_pb2.CreateSessionRequest(model="SmolLM2-135M-Instruct"), metadata=ALICE
    )
    assert served.session.model == "SmolLM2-135M-Instruct"


async def test_documents_outside_the_tenant_are_refused_by_id(make_sessions, ingest_target):
    sessions = await make_sessions()
    real = await upload(ingest_target, "mine.txt", "A document of Alice's.")
    error = await refused(
        sessions.stub.CreateSession(
            sessions_pb2.CreateSessionRequest(document_ids=[real, "no-such-document"]),
            metadata=ALICE,
        )
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    found = details(error)
    assert found["ErrorInfo"].reason == "DOCUMENTS_NOT_FOUND"
    assert [v.description for v in found["BadRequest"].field_violations] == [
        "no document no-such-document"
    ]


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"name": "x" * 201}, "name"),
        ({"document_ids": [f"d{n}" for n in range(101)]}, "document_ids"),
        ({"tags": ["x" * 65]}, "tags"),
        ({"system_prompt": "x" * 16_001}, "system_prompt"),
        ({"generation": llm_pb2.GenerationOverrides(temperature=3)}, "generation.temperature"),
    ],
)
async def test_bad_session_fields_are_invalid_arguments_naming_the_field(
    make_sessions, request_fields, field
):
    sessions = await make_sessions()
    error = await refused(
        sessions.stub.CreateSession(
            sessions_pb2.CreateSessionRequest(**request_fields), metadata=ALICE
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in [v.field for v in details(error)["BadRequest"].field_violations]


async def test_bad_requests_are_invalid_arguments(make_sessions):
    sessions = await make_sessions()
    sid = (
        await sessions.stub.CreateSession(sessions_pb2.CreateSessionRequest(), metadata=ALICE)
    ).session.id
    calls = {
        "content": sessions.send(sid, "  "),
        "document_top_k": sessions.send(sid, "hi", document_top_k=51),
        "client_request_id": sessions.send(sid, "hi", client_request_id="x" * 129),
        "overrides.top_p": sessions.send(sid, "hi", overrides=llm_pb2.GenerationOverrides(top_p=0)),
        "page_token": sessions.stub.ListSessions(
            sessions_pb2.ListSessionsRequest(page_token="not-a-token"), metadata=ALICE
        ),
        "page_size": sessions.stub.ListMessages(
            sessions_pb2.ListMessagesRequest(session_id=sid, page_size=-1), metadata=ALICE
        ),
        "update_mask": sessions.stub.UpdateSession(
            sessions_pb2.UpdateSessionRequest(
                session=sessions_pb2.Session(id=sid, tenant="globex"),
                update_mask={"paths": ["tenant"]},
            ),
            metadata=ALICE,
        ),
        "query": sessions.stub.SearchSessions(
            sessions_pb2.SearchSessionsRequest(query=""), metadata=ALICE
        ),
        "top_k": sessions.stub.SearchMemory(
            sessions_pb2.SearchMemoryRequest(query="x", top_k=101), metadata=ALICE
        ),
        "last_exchange_before": sessions.stub.ListSessions(
            sessions_pb2.ListSessionsRequest(
                last_exchange_after=stamp(dt.datetime(2026, 1, 2, tzinfo=dt.UTC)),
                last_exchange_before=stamp(dt.datetime(2026, 1, 1, tzinfo=dt.UTC)),
            ),
            metadata=ALICE,
        ),
    }
    for field, call in calls.items():
        error = await refused(call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert field in [v.field for v in details(error)["BadRequest"].field_violations], field
    # Nothing was stored by the refused messages.
    stored = await sessions.stub.ListMessages(
        sessions_pb2.ListMessagesRequest(session_id=sid), metadata=ALICE
    )
    assert list(stored.messages) == []
