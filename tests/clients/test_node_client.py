"""The Node.js clients (clients/node/, stubs built from protos/ at run time) as a person runs
them: chat.js drives the whole flow against the real mesh, telemetry.js reads a telemetry
service started as a process."""

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from live_mesh import API_KEY, CREDENTIALS

from ragmesh.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from ragmesh.sessions.v1 import sessions_pb2, sessions_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
CLIENTS = ROOT / "clients" / "node"
NODE = shutil.which("node")
# A guard against a hung client, never a measure: every run ends long before.
HANG_SECONDS = 300

pytestmark = [
    pytest.mark.skipif(NODE is None, reason="node is not installed"),
    pytest.mark.skipif(
        not (ROOT / "node_modules" / "@grpc" / "proto-loader").is_dir(),
        reason="node_modules missing (make setup runs npm install)",
    ),
]

GLACIER = """# Notes from the Vatna glacier hut

The hut stands at 1,140 metres on the eastern moraine of the Vatna glacier. The warden,
Sigrun Hale, opens it on the first of June and closes it when the first snow stays,
usually in late September.

Crevasses open along the icefall every July, so guided crossings leave at four in the
morning, before the sun softens the snow bridges. Each rope team carries two ice screws
per person and a pulley kit for crevasse rescue.

Water comes from a meltwater stream behind the hut and must be boiled for three minutes.
"""
QUESTION = "When do the guided crossings leave, and why?"


@dataclass
class Run:
    code: int
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        return self.out.splitlines()


def node_env(api_key: str | None) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "RAGMESH_API_KEY"}
    if api_key is not None:
        env["RAGMESH_API_KEY"] = api_key
    return env


async def chat(*args: str, api_key: str | None = API_KEY) -> Run:
    """`node clients/node/chat.js ARGS` run as a process while the mesh serves in this one."""
    process = await asyncio.create_subprocess_exec(
        NODE,
        str(CLIENTS / "chat.js"),
        *args,
        cwd=ROOT,
        env=node_env(api_key),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), HANG_SECONDS)
    return Run(process.returncode, out.decode(), err.decode())


def targets(mesh: dict[str, str], **changes: str) -> list[str]:
    chosen = {"ingest": mesh["ingest"], "sessions": mesh["sessions"], **changes}
    return [f"--{name}={target}" for name, target in chosen.items()]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_chat_uploads_waits_searches_and_streams_a_cited_answer(mesh, tmp_path):
    path = tmp_path / "vatna-hut.md"
    path.write_text(GLACIER)
    run = await chat(str(path), QUESTION, "--max-tokens=32", *targets(mesh))
    assert run.code == 0, run.err
    lines = run.lines

    uploaded = re.fullmatch(r"uploaded vatna-hut\.md \((\d+) bytes\) as document (\S+)", lines[0])
    assert uploaded, lines[0]
    assert int(uploaded[1]) == len(GLACIER.encode())
    document_id = uploaded[2]

    states = [line.split()[2].rstrip(",") for line in lines if line.startswith("document ")]
    order = ["PENDING", "PARSING", "CHUNKING", "EMBEDDING", "READY"]
    assert states[-1] == "READY"
    assert states == sorted(states, key=order.index), states
    async with grpc.aio.insecure_channel(mesh["ingest"]) as channel:
        chunks = (
            await ingest_pb2_grpc.IngestServiceStub(channel).ListChunks(
                ingest_pb2.ListChunksRequest(document_id=document_id), metadata=CREDENTIALS
            )
        ).chunks
    assert f"document {document_id} READY, {len(chunks)} chunks" in lines

    search = next(line for line in lines if line.startswith("search "))
    hits = [line for line in lines if line.startswith("  hit ")]
    assert search == f"search {json.dumps(QUESTION)}: {len(hits)} hits"
    assert hits, run.out
    assert all(" vatna-hut.md chunk " in hit and f" document {document_id} " in hit for hit in hits)
    # The best hit is the passage that answers the question.
    top = int(hits[0].split(" chunk ")[1].split()[0])
    assert "guided crossings leave at four" in chunks[top].text, run.out

    session = next(line for line in lines if line.startswith("session "))
    session_id = re.fullmatch(rf"session (\S+) over document {document_id}", session)[1]
    assert lines[lines.index(session) + 1].startswith("question stored as message ")
    retrieval = next(line for line in lines if line.startswith("retrieval "))
    assert re.match(r"retrieval [1-9]\d* passages, \d+ memories", retrieval), retrieval

    answer_text = run.out.split("\nanswer\n", 1)[1].split("\nfinish ", 1)[0]
    assert answer_text.strip()
    finish = next(line for line in lines if line.startswith("finish "))
    assert re.match(r"finish (LENGTH|STOP|EOS) by \S+: \d+ prompt tokens, [1-9]\d* ", finish)
    citations = [line for line in lines if line.startswith("citation ")]
    assert citations, run.out
    assert citations[0].startswith(f"citation [D1] vatna-hut.md document {document_id} chunk ")

    # What the mesh stored is what the Node program printed.
    async with grpc.aio.insecure_channel(mesh["sessions"]) as channel:
        stored = await sessions_pb2_grpc.SessionsServiceStub(channel).ListMessages(
            sessions_pb2.ListMessagesRequest(session_id=session_id), metadata=CREDENTIALS
        )
    question, answer = stored.messages
    assert question.content == QUESTION
    assert answer.content == answer_text
    assert [c.document_id for c in answer.citations] == [document_id] * len(citations)


async def test_chat_without_the_api_key_fails_with_the_grpc_status(mesh, tmp_path):
    path = tmp_path / "vatna-hut.md"
    path.write_text(GLACIER)
    run = await chat(str(path), QUESTION, *targets(mesh), api_key=None)
    assert (run.code, run.out) == (1, "")
    assert run.err.startswith("chat.js: UNAUTHENTICATED: ")


async def test_chat_reports_a_document_that_fails_processing(mesh, tmp_path):
    path = tmp_path / "broken.pdf"
    path.write_bytes(b"%PDF-1.7\n" + os.urandom(2048))
    run = await chat(str(path), QUESTION, *targets(mesh))
    assert run.code == 1
    document_id = re.match(r"uploaded broken\.pdf \(2057 bytes\) as document (\S+)", run.out)[1]
    assert run.lines[-1] == f"document {document_id} FAILED"
    assert re.fullmatch(rf"chat\.js: document {document_id} is FAILED: .+\n", run.err), run.err
    assert "search " not in run.out


async def test_chat_refuses_an_empty_file_with_the_services_message(mesh, tmp_path):
    path = tmp_path / "empty.md"
    path.write_bytes(b"")
    run = await chat(str(path), QUESTION, *targets(mesh))
    assert (run.code, run.out) == (1, "")
    assert run.err.startswith("chat.js: INVALID_ARGUMENT: ")


async def test_chat_names_the_service_that_is_down(mesh, tmp_path):
    path = tmp_path / "vatna-hut.md"
    path.write_text(GLACIER)
    run = await chat(str(path), QUESTION, *targets(mesh, sessions=f"127.0.0.1:{free_port()}"))
    assert run.code == 1
    assert "\nsearch " in run.out and "session " not in run.out
    assert run.err.startswith("chat.js: UNAVAILABLE: ")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "expected FILE and QUESTION"),
        (["/no/such/file.md", QUESTION], "cannot read /no/such/file.md: ENOENT"),
        (["README.md", QUESTION, "--max-tokens=0"], "--max-tokens 0 is not a positive whole"),
        (["README.md", QUESTION, "--colour"], "Unknown option '--colour'"),
    ],
)
async def test_chat_usage_mistakes_exit_2(args, message):
    run = await chat(*args)
    assert (run.code, run.out) == (2, "")
    assert run.err.startswith(f"chat.js: {message}"), run.err
    assert "usage: node clients/node/chat.js FILE QUESTION" in run.err


def wait_serving(target: str, process: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(f"telemetry exited early:\n{process.stdout.read()}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    pytest.fail("telemetry did not report SERVING in time")


TELEMETRY_KEY = "node-client-test-key"


@pytest.fixture(scope="module")
def telemetry(tmp_path_factory):
    """A telemetry service with an API key whose mesh is itself and one dead target."""
    port, dead_port = free_port(), free_port()
    target = f"127.0.0.1:{port}"
    env = {
        **os.environ,
        "RAGMESH_TELEMETRY_PORT": str(port),
        "RAGMESH_TELEMETRY_API_KEYS": json.dumps({TELEMETRY_KEY: "node:acme"}),
        "RAGMESH_TELEMETRY_DATA_DIR": str(tmp_path_factory.mktemp("telemetry")),
        "RAGMESH_TELEMETRY_MESH_TARGETS": json.dumps(
            {"telemetry": target, "ingest": f"127.0.0.1:{dead_port}"}
        ),
        # The service probes itself and must be found SERVING; the dead port is refused at once.
        "RAGMESH_TELEMETRY_MESH_PROBE_TIMEOUT_SECONDS": "5",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "services.telemetry"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_serving(target, process)
        yield target
    finally:
        process.terminate()
        process.wait(15)


def run_telemetry(target: str, api_key: str | None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [NODE, str(CLIENTS / "telemetry.js"), target],
        cwd=ROOT,
        env=node_env(api_key),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_telemetry_prints_system_status_and_mesh(telemetry):
    result = run_telemetry(telemetry, TELEMETRY_KEY)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"host {socket.gethostname()}, up ")
    cpu = next(line for line in lines if line.startswith("cpu "))
    assert f" of {os.cpu_count()} cores, load " in cpu
    assert any(line.startswith("memory ") and " GiB of " in line for line in lines)
    assert any(line.startswith(("gpus none: ", "gpu 0 ")) for line in lines)
    mesh = lines[lines.index("mesh") + 1 :]
    by_name = {line.split()[0]: line.split() for line in mesh}
    assert by_name["telemetry"][1:3] == ["SERVING", telemetry]
    assert by_name["telemetry"][-1] == "ms"
    assert by_name["ingest"][1] == "UNREACHABLE"


def test_telemetry_without_the_api_key_fails_with_the_grpc_status(telemetry):
    result = run_telemetry(telemetry, None)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("telemetry.js: UNAUTHENTICATED: ")


def test_telemetry_unreachable_service_fails_with_unavailable():
    result = run_telemetry(f"127.0.0.1:{free_port()}", TELEMETRY_KEY)
    assert result.returncode == 1
    assert result.stderr.startswith("telemetry.js: UNAVAILABLE: ")
