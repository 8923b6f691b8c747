"""The telemetry service as it is deployed, a process of its own: SIGTERM stops it cleanly.
(grpcurl against it, and against every other service: tests/clients/test_grpcurl.py.)"""

import asyncio
import json
import os
import socket
import sys

from services.common.clients import wait_until_serving


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def test_sigterm_stops_the_service_cleanly(tmp_path):
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.telemetry",
        env={
            **os.environ,
            "RAGMESH_TELEMETRY_PORT": str(port),
            "RAGMESH_TELEMETRY_DATA_DIRECTORIES": json.dumps([str(tmp_path)]),
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        await wait_until_serving(
            f"127.0.0.1:{port}", 30, still_running=lambda: process.returncode is None
        )
        process.terminate()
        assert await asyncio.wait_for(process.wait(), 15) == 0
        assert b"shutting down" in await process.stdout.read()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
