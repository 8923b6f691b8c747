"""A person's view: the real grpcurl binary against a started telemetry service, no protos."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")


@pytest.fixture(scope="module")
def telemetry_process(tmp_path_factory):
    port = 50555 + os.getpid() % 1000
    env = {
        **os.environ,
        "RAGMESH_TELEMETRY_PORT": str(port),
        "RAGMESH_TELEMETRY_DATA_DIRECTORIES": json.dumps([str(tmp_path_factory.mktemp("d"))]),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "services.telemetry"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    target = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        probe = subprocess.run([GRPCURL, "-plaintext", target, "list"], capture_output=True)
        if probe.returncode == 0:
            break
        time.sleep(0.2)
    yield target, process
    process.terminate()
    process.wait(10)


def grpcurl(*args: str) -> str:
    result = subprocess.run(
        [GRPCURL, "-plaintext", *args], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.skipif(GRPCURL is None, reason="grpcurl not installed (make setup installs it)")
def test_grpcurl_lists_describes_and_calls(telemetry_process):
    target, _ = telemetry_process
    listed = grpcurl(target, "list").split()
    assert "ragmesh.telemetry.v1.TelemetryService" in listed
    assert "grpc.health.v1.Health" in listed
    described = grpcurl(target, "describe", "ragmesh.telemetry.v1.TelemetryService")
    assert "rpc GetSystemStatus" in described and "rpc WatchSystemStatus" in described
    status = json.loads(grpcurl(target, "ragmesh.telemetry.v1.TelemetryService/GetSystemStatus"))
    assert status["status"]["cpu"]["logical_cores"] > 0
    assert int(status["status"]["memory"]["total_bytes"]) > 0


@pytest.mark.skipif(GRPCURL is None, reason="grpcurl not installed (make setup installs it)")
def test_sigterm_stops_the_service_cleanly(telemetry_process):
    _, process = telemetry_process
    process.terminate()
    assert process.wait(15) == 0
    assert "shutting down" in process.stdout.read()
