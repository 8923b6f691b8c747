"""Tenant isolation as a matrix generated from the descriptors: every request field that
names a resource (found by name: `id`, `*_id`, `*_ids`, `tenant`, at any depth) is
classified below, and each classification is checked with tenant alpha's real ids sent
by tenant beta. A new RPC or field taking an id fails test_every_id_field_is_classified
until it is added here.

Then every RPC of every service is called by beta as an ordinary caller would, and no
answer may carry alpha's ids or the phrase only alpha's data holds."""

import json
import uuid

import grpc
import pytest
from google.protobuf import json_format
from hostile_support import (
    ALPHA_SECRET,
    ALPHA_TEXT,
    CALL_SECONDS,
    message_class,
    method_path,
    ragmesh_methods,
    raw_call,
)

from ragmesh.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from ragmesh.llm.v1 import llm_pb2, llm_pb2_grpc
from ragmesh.sessions.v1 import sessions_pb2, sessions_pb2_grpc

METHODS = {method_path(m): m for m in ragmesh_methods()}
INGEST = "/ragmesh.ingest.v1.IngestService/"
LLM = "/ragmesh.llm.v1.LlmService/"
SESSIONS = "/ragmesh.sessions.v1.SessionsService/"
QUESTION = f"What is the code word of the Fresnel lens at Skerry Rock? {uuid.uuid4().hex}"
SHORT = {"overrides": {"max_new_tokens": 4, "temperature": 0}}

# Another tenant's id of a stored resource: beta must get NOT_FOUND, as for an id that
# does not exist (never PERMISSION_DENIED, which would say it exists). The value holds the
# rest of a request that is otherwise valid for beta.
OWNED = {
    (INGEST + "GetDocument", "document_id"): {},
    (INGEST + "DeleteDocument", "document_id"): {},
    (INGEST + "WatchDocument", "document_id"): {},
    (INGEST + "GetDocumentText", "document_id"): {},
    (INGEST + "ListChunks", "document_id"): {},
    (SESSIONS + "CreateSession", "document_ids"): {"name": "borrowed documents"},
    (SESSIONS + "GetSession", "session_id"): {},
    (SESSIONS + "UpdateSession", "session.id"): {
        "session": {"name": "renamed by beta"},
        "update_mask": "name",
    },
    (SESSIONS + "UpdateSession", "session.document_ids"): {"update_mask": "documentIds"},
    (SESSIONS + "DeleteSession", "session_id"): {},
    (SESSIONS + "SendMessage", "session_id"): {"content": QUESTION, **SHORT},
    (SESSIONS + "SendMessage", "document_ids"): {"content": QUESTION, **SHORT},
    (SESSIONS + "ListMessages", "session_id"): {},
    (SESSIONS + "SearchMemory", "session_id"): {"query": QUESTION},
}
# A filter naming another tenant's documents: beta's answer holds none of them.
FILTERS = {(INGEST + "Search", "filter.document_ids")}
# Ids the caller chooses; each caller has its own space of them (test_request_ids_*).
CALLER_CHOSEN = {
    (LLM + "Generate", "request_id"),
    (LLM + "Chat", "request_id"),
    (LLM + "Cancel", "request_id"),
    (SESSIONS + "SendMessage", "client_request_id"),
}
# Labels the caller gives its own data, never looked up: the passages a Chat may cite.
LABELS = {(LLM + "Chat", "context.id")}
# Written by the server: a caller cannot move its session to another tenant.
SERVER_SET = {(SESSIONS + "UpdateSession", "session.tenant")}


def _names_a_resource(name: str) -> bool:
    return name in ("id", "tenant") or name.endswith(("_id", "_ids"))


def _id_fields(descriptor, prefix="", seen=()):
    for field in descriptor.fields:
        path = prefix + field.name
        if _names_a_resource(field.name):
            yield path, field
        nested = field.message_type
        if nested is not None and not nested.full_name.startswith("google.protobuf."):
            if nested.full_name not in seen:
                yield from _id_fields(nested, path + ".", (*seen, descriptor.full_name))


def id_fields() -> set[tuple[str, str]]:
    """(method, field path) of every request field naming a resource."""
    return {
        (path, field_path)
        for path, method in METHODS.items()
        for field_path, _ in _id_fields(method.input_type)
    }


def test_every_id_field_is_classified():
    classified = set(OWNED) | FILTERS | CALLER_CHOSEN | LABELS | SERVER_SET
    found = id_fields()
    assert found - classified == set(), "classify these id fields in test_isolation.py"
    assert classified - found == set(), "these classified fields no longer exist"


def _kind(field_path: str) -> str:
    """Which of a tenant's lists an id field takes: `document_ids` and `session.id`
    name documents and sessions."""
    parts = field_path.split(".")
    name = parts[-1] if parts[-1] != "id" else parts[-2]
    return name.removesuffix("_ids").removesuffix("_id") + "s"


def _set(values: dict, field_path: str, value) -> None:
    *parents, name = field_path.split(".")
    for parent in parents:
        values = values.setdefault(parent, {})
    values[name] = value


def _request(method, tested: str, owner, caller) -> bytes:
    """The request with the tested field set to owner's id and every other resource
    field to the caller's own."""
    path = method_path(method)
    values: dict = json.loads(json.dumps(OWNED[(path, tested)]))
    for field_path, field in _id_fields(method.input_type):
        if (path, field_path) in OWNED:
            tenant = owner if field_path == tested else caller
            value = getattr(tenant, _kind(field_path))[0]
            _set(values, field_path, [value] if field.is_repeated else value)
    message = json_format.ParseDict(values, message_class(method.input_type)())
    return message.SerializeToString()


def _leaks(outcome, alpha) -> list[str]:
    """Alpha's ids and secret phrase found in the answers (an error message may repeat
    the id the caller sent)."""
    text = " ".join(json_format.MessageToJson(reply) for reply in outcome.responses)
    return [secret for secret in [ALPHA_SECRET, *alpha.ids()] if secret in text]


class _Stranger:
    """Ids of no one: what beta gets for them is what beta must get for alpha's."""

    def __init__(self) -> None:
        self.id = str(uuid.uuid4())

    def __getattr__(self, kind: str) -> list[str]:
        return [self.id]


@pytest.mark.parametrize("entry", sorted(OWNED), ids="{0[0]}:{0[1]}".format)
def test_another_tenants_id_is_not_found(mesh, alpha, beta, entry):
    """NOT_FOUND, with the message an id of no one gets: nothing says it exists."""
    path, field_path = entry
    method = METHODS[path]
    channel = mesh.channels[path.split(".")[1]]
    outcome = raw_call(
        channel, method, _request(method, field_path, alpha, beta), beta.metadata, CALL_SECONDS
    )
    stranger = _Stranger()
    unknown = raw_call(
        channel, method, _request(method, field_path, stranger, beta), beta.metadata, CALL_SECONDS
    )
    assert unknown.code == grpc.StatusCode.NOT_FOUND, (unknown.code, unknown.details)
    assert outcome.code == grpc.StatusCode.NOT_FOUND, (outcome.code, outcome.details)
    alphas = getattr(alpha, _kind(field_path))[0]
    assert outcome.details.replace(alphas, "<id>") == unknown.details.replace(stranger.id, "<id>")
    assert _leaks(outcome, alpha) == []


def test_searches_of_another_tenant_find_nothing_of_alphas(mesh, alpha, beta):
    """Beta searching for what alpha's document and exchange say, in every mode."""
    ingest = ingest_pb2_grpc.IngestServiceStub(mesh.channels["ingest"])
    sessions = sessions_pb2_grpc.SessionsServiceStub(mesh.channels["sessions"])
    query = "Fresnel lens code word lighthouse Skerry Rock keeper"
    answers = [
        ingest.Search(
            ingest_pb2.SearchRequest(query=query, mode=mode, top_k=100),
            metadata=beta.metadata,
            timeout=CALL_SECONDS,
        )
        for mode in ingest_pb2.SearchMode.values()
    ]
    answers.append(
        sessions.SearchMemory(
            sessions_pb2.SearchMemoryRequest(query=query, top_k=100),
            metadata=beta.metadata,
            timeout=CALL_SECONDS,
        )
    )
    answers.append(
        sessions.SearchSessions(
            sessions_pb2.SearchSessionsRequest(query=query, top_k=100),
            metadata=beta.metadata,
            timeout=CALL_SECONDS,
        )
    )
    assert [len(answer.ListFields()) for answer in answers[:4]] != [0, 0, 0, 0]
    found = " ".join(json_format.MessageToJson(answer) for answer in answers)
    assert [secret for secret in [ALPHA_SECRET, *alpha.ids()] if secret in found] == []


def test_a_filter_on_another_tenants_documents_finds_nothing(mesh, alpha, beta):
    stub = ingest_pb2_grpc.IngestServiceStub(mesh.channels["ingest"])
    for mode in ingest_pb2.SearchMode.values():
        reply = stub.Search(
            ingest_pb2.SearchRequest(
                query="Fresnel lens lighthouse keeper",
                mode=mode,
                filter=ingest_pb2.SearchFilter(document_ids=alpha.documents),
            ),
            metadata=beta.metadata,
            timeout=CALL_SECONDS,
        )
        assert list(reply.hits) == [], ingest_pb2.SearchMode.Name(mode)


def test_request_ids_belong_to_their_caller(mesh, alpha, beta):
    """Beta can neither cancel alpha's running generation by its id nor collide with
    it: the same id is free for beta's own requests."""
    stub = llm_pb2_grpc.LlmServiceStub(mesh.channels["llm"])
    shared = f"shared-{uuid.uuid4().hex}"
    running = stub.Generate(
        llm_pb2.GenerateRequest(
            prompt="Once upon a time, in a lighthouse on a rock,",
            overrides=llm_pb2.GenerationOverrides(max_new_tokens=48, temperature=0),
            request_id=shared,
        ),
        metadata=alpha.metadata,
        timeout=120,
    )
    first = next(running)
    assert first.request_id == shared
    with pytest.raises(grpc.RpcError) as cancelled:
        stub.Cancel(llm_pb2.CancelRequest(request_id=shared), metadata=beta.metadata)
    assert cancelled.value.code() == grpc.StatusCode.NOT_FOUND, cancelled.value.details()
    short = llm_pb2.GenerationOverrides(max_new_tokens=2, temperature=0)
    own = list(
        stub.Generate(
            llm_pb2.GenerateRequest(prompt="Hello", overrides=short, request_id=shared),
            metadata=beta.metadata,
            timeout=CALL_SECONDS,
        )
    )
    chat = list(
        stub.Chat(
            llm_pb2.ChatRequest(
                messages=[llm_pb2.ChatMessage(role=llm_pb2.ROLE_USER, content="Hello")],
                overrides=short,
                request_id=shared,
            ),
            metadata=beta.metadata,
            timeout=CALL_SECONDS,
        )
    )
    for replies in (own, chat):
        assert replies[-1].WhichOneof("event") == "completion"
    rest = list(running)
    finish = rest[-1].completion.finish_reason
    assert finish != llm_pb2.FINISH_REASON_CANCELLED, llm_pb2.FinishReason.Name(finish)


def test_a_retry_id_of_another_tenant_starts_a_new_exchange(mesh, alpha, beta):
    stub = sessions_pb2_grpc.SessionsServiceStub(mesh.channels["sessions"])
    events = list(
        stub.SendMessage(
            sessions_pb2.SendMessageRequest(
                session_id=beta.sessions[0],
                content="And the pears?",
                client_request_id=alpha.client_request_ids[0],
                overrides=llm_pb2.GenerationOverrides(max_new_tokens=4, temperature=0),
            ),
            metadata=beta.metadata,
            timeout=120,
        )
    )
    stored = [e.user_message for e in events if e.WhichOneof("event") == "user_message"]
    assert stored[0].content == "And the pears?"
    assert stored[0].id not in alpha.messages
    assert not any(secret in str(events) for secret in [ALPHA_SECRET, *alpha.ids()])


def test_a_session_cannot_be_moved_to_another_tenant(mesh, alpha, beta):
    stub = sessions_pb2_grpc.SessionsServiceStub(mesh.channels["sessions"])
    with pytest.raises(grpc.RpcError) as refused:
        stub.UpdateSession(
            sessions_pb2.UpdateSessionRequest(
                session=sessions_pb2.Session(id=beta.sessions[0], tenant="alpha"),
                update_mask={"paths": ["tenant"]},
            ),
            metadata=beta.metadata,
            timeout=CALL_SECONDS,
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
    alphas = sessions_pb2_grpc.SessionsServiceStub(mesh.channels["sessions"]).ListSessions(
        sessions_pb2.ListSessionsRequest(), metadata=alpha.metadata, timeout=CALL_SECONDS
    )
    assert beta.sessions[0] not in [s.id for s in alphas.sessions]


def test_uploading_another_tenants_bytes_is_no_duplicate(mesh, alpha, beta):
    stub = ingest_pb2_grpc.IngestServiceStub(mesh.channels["ingest"])
    requests = [
        ingest_pb2.UploadDocumentRequest(metadata=ingest_pb2.DocumentMetadata(filename="x.md")),
        ingest_pb2.UploadDocumentRequest(data=ALPHA_TEXT.encode()),
    ]
    reply = stub.UploadDocument(iter(requests), metadata=beta.metadata, timeout=CALL_SECONDS)
    assert not reply.duplicate
    assert reply.document.id not in alpha.documents
    stub.DeleteDocument(
        ingest_pb2.DeleteDocumentRequest(document_id=reply.document.id),
        metadata=beta.metadata,
        timeout=CALL_SECONDS,
    )


def _ordinary_request(method, beta) -> bytes:
    """What beta would send: its own ids (a fresh one for a delete, so its data stays),
    alpha's subject as every query, prompt and message, and a few tokens of answer."""
    values: dict = {}
    for field in method.input_type.fields:
        if field.name in ("query", "content", "prompt"):
            values[field.name] = QUESTION
        elif field.name == "messages" and field.message_type.name == "ChatMessage":
            values["messages"] = [{"role": "ROLE_USER", "content": QUESTION}]
        elif field.name == "memory_scope":
            values["memory_scope"] = "MEMORY_SCOPE_TENANT"
        elif field.name == "overrides":
            values.update(SHORT)
        elif _names_a_resource(field.name) and (method_path(method), field.name) in OWNED:
            own = str(uuid.uuid4()) if method.name.startswith("Delete") else None
            value = own or getattr(beta, _kind(field.name))[0]
            values[field.name] = [value] if field.is_repeated else value
    message = json_format.ParseDict(values, message_class(method.input_type)())
    return message.SerializeToString()


@pytest.mark.parametrize("path", sorted(METHODS))
def test_no_answer_to_another_tenant_holds_alphas_data(mesh, alpha, beta, path):
    method = METHODS[path]
    servers = [name for name in mesh.channels if f".{name}." in path] or list(mesh.channels)
    for server in servers:
        payload = _ordinary_request(method, beta)
        payload = [payload] if method.client_streaming else payload
        outcome = raw_call(mesh.channels[server], method, payload, beta.metadata, CALL_SECONDS)
        assert outcome.defined, (outcome.code, outcome.details)
        assert _leaks(outcome, alpha) == [], (server, outcome.code)


def test_alphas_data_is_intact(mesh, alpha):
    """After everything beta tried, alpha still has its document, session and name."""
    ingest = ingest_pb2_grpc.IngestServiceStub(mesh.channels["ingest"])
    document = ingest.GetDocument(
        ingest_pb2.GetDocumentRequest(document_id=alpha.documents[0]),
        metadata=alpha.metadata,
        timeout=CALL_SECONDS,
    ).document
    assert document.status == ingest_pb2.DOCUMENT_STATUS_READY
    sessions = sessions_pb2_grpc.SessionsServiceStub(mesh.channels["sessions"])
    session = sessions.GetSession(
        sessions_pb2.GetSessionRequest(session_id=alpha.sessions[0]),
        metadata=alpha.metadata,
        timeout=CALL_SECONDS,
    ).session
    assert session.name == alpha.session_names[0]
    assert list(session.document_ids) == alpha.documents
    messages = sessions.ListMessages(
        sessions_pb2.ListMessagesRequest(session_id=alpha.sessions[0]),
        metadata=alpha.metadata,
        timeout=CALL_SECONDS,
    ).messages
    assert [m.id for m in messages] == alpha.messages
