"""Fixtures for the hostile-caller tests: the five services on loopback ports, started as
tests/live_mesh.py starts them (here with ingest and sessions on PostgreSQL and the llm's
context capped), served from an event loop of their own in a background thread, so tests
call them with blocking stubs the way Hypothesis runs examples; and three tenants' data:
alpha's (the victim), beta's (the other tenant) and fuzz's (the fuzzing caller, an
admin)."""

import asyncio
import contextlib
import threading
import time
from dataclasses import dataclass, field

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hostile_support import (
    ALPHA,
    ALPHA_SECRET,
    ALPHA_TEXT,
    API_KEYS,
    BETA,
    BETA_TEXT,
    CALL_SECONDS,
    FUZZ,
    FUZZ_LOG,
    LLM_CONTEXT_TOKENS,
    MAX_NEW_TOKENS,
)
from live_mesh import serving

from ragmesh.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from ragmesh.llm.v1 import llm_pb2, llm_pb2_grpc
from ragmesh.sessions.v1 import sessions_pb2, sessions_pb2_grpc
from services.llm.settings import LlmSettings


class Mesh:
    """The five services, started in a thread running their event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.stack = contextlib.AsyncExitStack()
        self.targets: dict[str, str] = {}
        self.channels: dict[str, grpc.Channel] = {}

    def run(self, coroutine, timeout: float = 900):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def start(self, data, database_url) -> None:
        self.thread.start()
        self.targets = self.run(
            self.stack.enter_async_context(
                serving(
                    data,
                    API_KEYS,
                    ingest={
                        "database_url": database_url(),
                        "edge_catch_up": True,
                        "max_upload_bytes": 2 * 1024 * 1024,
                    },
                    # Caps what one prompt costs: a long prompt holds the running
                    # streams until it is in, and thousands of tokens take a minute here.
                    llm={"max_context_tokens": LLM_CONTEXT_TOKENS},
                    sessions={"database_url": database_url()},
                )
            )
        )
        options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        self.channels = {
            name: grpc.insecure_channel(target, options=options)
            for name, target in self.targets.items()
        }

    def close(self) -> None:
        for channel in self.channels.values():
            channel.close()
        self.run(self.stack.aclose(), timeout=120)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)

    def alive(self) -> dict[str, str]:
        """Each service's liveness answer: SERVING while its process is up."""
        answers = {}
        for name, channel in self.channels.items():
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                reply = stub.Check(
                    health_pb2.HealthCheckRequest(service="liveness"), timeout=CALL_SECONDS
                )
                answers[name] = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as exc:
                answers[name] = f"{exc.code().name}: {exc.details()}"
        return answers

    def llm(self) -> llm_pb2_grpc.LlmServiceStub:
        return llm_pb2_grpc.LlmServiceStub(self.channels["llm"])

    def settle_llm(self) -> None:
        """Waits out a load in flight and brings the default model back if a fuzzed
        LoadModel or UnloadModel left another or none serving."""
        default = LlmSettings.model_fields["default_model"].default
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            status = (
                self.llm()
                .GetModelStatus(
                    llm_pb2.GetModelStatusRequest(), metadata=FUZZ, timeout=CALL_SECONDS
                )
                .status
            )
            busy = (llm_pb2.MODEL_STATE_LOADING, llm_pb2.MODEL_STATE_UNLOADING)
            if status.state in busy or status.state == llm_pb2.MODEL_STATE_RESTARTING:
                time.sleep(0.2)
                continue
            if status.state == llm_pb2.MODEL_STATE_READY and status.serving_model == default:
                return
            self.llm().LoadModel(
                llm_pb2.LoadModelRequest(options=llm_pb2.LoadOptions(model=default)),
                metadata=FUZZ,
                timeout=CALL_SECONDS,
            )
        raise AssertionError(f"the llm never served {default} again: {status}")


@dataclass
class Tenant:
    """What one tenant owns, by kind: documents, chunks, sessions, messages."""

    metadata: tuple
    documents: list[str] = field(default_factory=list)
    chunks: list[str] = field(default_factory=list)
    sessions: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    session_names: list[str] = field(default_factory=list)
    client_request_ids: list[str] = field(default_factory=list)

    def ids(self) -> list[str]:
        return [*self.documents, *self.chunks, *self.sessions, *self.messages]


def upload(mesh: Mesh, tenant: Tenant, filename: str, text: str) -> str:
    stub = ingest_pb2_grpc.IngestServiceStub(mesh.channels["ingest"])
    requests = [
        ingest_pb2.UploadDocumentRequest(metadata=ingest_pb2.DocumentMetadata(filename=filename)),
        ingest_pb2.UploadDocumentRequest(data=text.encode()),
    ]
    uploaded = stub.UploadDocument(iter(requests), metadata=tenant.metadata, timeout=CALL_SECONDS)
    watch = stub.WatchDocument(
        ingest_pb2.WatchDocumentRequest(document_id=uploaded.document.id),
        metadata=tenant.metadata,
        timeout=300,
    )
    last = [reply.document for reply in watch][-1]
    assert last.status == ingest_pb2.DOCUMENT_STATUS_READY, last.error
    chunks = stub.ListChunks(
        ingest_pb2.ListChunksRequest(document_id=last.id),
        metadata=tenant.metadata,
        timeout=CALL_SECONDS,
    )
    tenant.documents.append(last.id)
    tenant.chunks.extend(chunk.id for chunk in chunks.chunks)
    return last.id


def converse(mesh: Mesh, tenant: Tenant, name: str, documents: list[str], question: str) -> str:
    """A session with one exchange (sent with a client request id); its id."""
    stub = sessions_pb2_grpc.SessionsServiceStub(mesh.channels["sessions"])
    session = stub.CreateSession(
        sessions_pb2.CreateSessionRequest(name=name, document_ids=documents),
        metadata=tenant.metadata,
        timeout=CALL_SECONDS,
    ).session
    events = stub.SendMessage(
        sessions_pb2.SendMessageRequest(
            session_id=session.id,
            content=question,
            client_request_id=f"{name} first",
            overrides=llm_pb2.GenerationOverrides(max_new_tokens=MAX_NEW_TOKENS, temperature=0),
        ),
        metadata=tenant.metadata,
        timeout=300,
    )
    for event in events:
        kind = event.WhichOneof("event")
        if kind in ("user_message", "assistant_message"):
            tenant.messages.append(getattr(event, kind).id)
    tenant.sessions.append(session.id)
    tenant.session_names.append(name)
    tenant.client_request_ids.append(f"{name} first")
    return session.id


def recalled(mesh: Mesh, tenant: Tenant, query: str) -> None:
    """Waits until the tenant's last exchange is in its memory (indexed after the
    answer, in the background)."""
    stub = sessions_pb2_grpc.SessionsServiceStub(mesh.channels["sessions"])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        hits = stub.SearchMemory(
            sessions_pb2.SearchMemoryRequest(query=query, top_k=5),
            metadata=tenant.metadata,
            timeout=CALL_SECONDS,
        ).hits
        if any(hit.session_id == tenant.sessions[-1] for hit in hits):
            return
        time.sleep(0.2)
    raise AssertionError("the exchange never reached the memory store")


@pytest.fixture(scope="session")
def mesh(tmp_path_factory, postgres):
    running = Mesh()
    running.start(tmp_path_factory.mktemp("hostile"), postgres)
    running.settle_llm()
    running.llm().UpdateGenerationConfig(
        llm_pb2.UpdateGenerationConfigRequest(
            config=llm_pb2.GenerationConfig(max_new_tokens=MAX_NEW_TOKENS),
            update_mask={"paths": ["max_new_tokens"]},
        ),
        metadata=FUZZ,
        timeout=CALL_SECONDS,
    )
    yield running
    running.close()


@pytest.fixture(scope="session")
def alpha(mesh) -> Tenant:
    """The victim: a document, its chunks, a session about it with one exchange that is
    in the memory store."""
    tenant = Tenant(ALPHA)
    document = upload(mesh, tenant, "skerry-light.md", ALPHA_TEXT)
    question = f"What is the code word {ALPHA_SECRET} of the Fresnel lens at Skerry Rock?"
    converse(mesh, tenant, f"alpha {ALPHA_SECRET} lighthouse", [document], question)
    recalled(mesh, tenant, "Fresnel lens code word")
    return tenant


@pytest.fixture(scope="session")
def beta(mesh) -> Tenant:
    """The other tenant, with data of its own (so its lists and searches have something
    to return)."""
    tenant = Tenant(BETA)
    document = upload(mesh, tenant, "orchard.md", BETA_TEXT)
    converse(mesh, tenant, "beta orchard", [document], "When is the cider press running?")
    recalled(mesh, tenant, "cider press")
    return tenant


@pytest.fixture(scope="session")
def fuzzer(mesh) -> Tenant:
    """The fuzzing caller's own data: two documents and two sessions, so every list has
    a second page and its page tokens can be replayed and forged."""
    tenant = Tenant(FUZZ)
    first = upload(mesh, tenant, "fuzz-a.md", ALPHA_TEXT.replace(ALPHA_SECRET, "fuzz"))
    upload(mesh, tenant, "fuzz-b.md", BETA_TEXT)
    converse(mesh, tenant, "fuzz one", [first], "Where is the lighthouse?")
    converse(mesh, tenant, "fuzz two", [], "Hello")
    return tenant


def pytest_terminal_summary(terminalreporter):
    if not FUZZ_LOG.outcomes:
        return
    terminalreporter.section("fuzz examples per RPC")
    for method, counts in sorted(FUZZ_LOG.outcomes.items()):
        listed = ", ".join(f"{code} {n}" for code, n in counts.most_common())
        terminalreporter.write_line(f"{method}: {sum(counts.values())} ({listed})")
