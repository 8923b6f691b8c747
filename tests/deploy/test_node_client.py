"""The Node.js example client against a real telemetry service started as a process."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "clients" / "node" / "telemetry.js"
NODE = shutil.which("node")
API_KEY = "node-client-test-key"

pytestmark = [
    pytest.mark.skipif(NODE is None, reason="node is not installed"),
    pytest.mark.skipif(
        not (ROOT / "node_modules" / "@grpc" / "proto-loader").is_dir(),
        reason="node_modules missing (make setup runs npm install)",
    ),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


@pytest.fixture(scope="module")
def telemetry(tmp_path_factory):
    """A telemetry service with an API key whose mesh is itself and one dead target."""
    port, dead_port = free_port(), free_port()
    target = f"127.0.0.1:{port}"
    env = {
        **os.environ,
        "RAGMESH_TELEMETRY_PORT": str(port),
        "RAGMESH_TELEMETRY_API_KEYS": json.dumps({API_KEY: "node:acme"}),
        "RAGMESH_TELEMETRY_DATA_DIR": str(tmp_path_factory.mktemp("telemetry")),
        "RAGMESH_TELEMETRY_MESH_TARGETS": json.dumps(
            {"telemetry": target, "ingest": f"127.0.0.1:{dead_port}"}
        ),
        "RAGMESH_TELEMETRY_MESH_PROBE_TIMEOUT_SECONDS": "1",
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


def run_client(target: str, api_key: str | None) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "RAGMESH_API_KEY"}
    if api_key is not None:
        env["RAGMESH_API_KEY"] = api_key
    return subprocess.run(
        [NODE, str(CLIENT), target],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_prints_system_status_and_mesh(telemetry):
    result = run_client(telemetry, API_KEY)
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


def test_without_the_api_key_fails_with_the_grpc_status(telemetry):
    result = run_client(telemetry, None)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("telemetry.js: UNAUTHENTICATED: ")


def test_unreachable_service_fails_with_unavailable():
    result = run_client(f"127.0.0.1:{free_port()}", API_KEY)
    assert result.returncode == 1
    assert result.stderr.startswith("telemetry.js: UNAVAILABLE: ")
