"""ragmesh status against the real telemetry service: the host and the mesh, once, as a
stream for scripts, and as a live view until Ctrl-C; every node of a mesh of telemetry
peers."""

import asyncio
import json
import os
import signal
import socket

import pytest
from live_mesh import API_KEYS

from services.telemetry.app import start as start_telemetry
from services.telemetry.settings import TelemetrySettings

SERVICES = {"embed", "ingest", "llm", "sessions"}


async def test_status_shows_the_host_and_every_service(cli):
    run = await cli("status")
    assert run.code == 0, run.err
    for part in ("CPU", "memory", "DISK", "GPUs", "NODE", "SERVICE"):
        assert part in run.out
    rows = {line.split()[0]: line for line in run.out.splitlines() if line.strip()}
    for name in SERVICES:
        assert "SERVING" in rows[name]
    assert "REACHABLE" in rows[socket.gethostname()]

    snapshot = (await cli("status", "--json")).json()
    assert snapshot["system"]["cpu"]["logicalCores"] == os.cpu_count()
    assert {s["name"]: s["state"] for s in snapshot["mesh"]["services"]} == dict.fromkeys(
        SERVICES, "STATE_SERVING"
    )


async def test_status_watch_json_is_a_line_per_snapshot_until_interrupted(cli):
    process = await asyncio.create_subprocess_exec(
        *cli.argv(["status", "--watch", "--interval", "0.5", "--json"]),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=cli.env,
    )
    async with asyncio.timeout(cli.patience):
        lines = [json.loads(await process.stdout.readline()) for _ in range(3)]
        process.send_signal(signal.SIGINT)
        assert await process.wait() == 0
    times = [line["system"]["time"] for line in lines]
    assert times == sorted(times) and len(set(times)) == 3
    assert {s["name"] for s in lines[-1]["mesh"]["services"]} == SERVICES
    assert await process.stderr.read() == b""


async def test_status_watch_redraws_in_place_until_ctrl_c(cli):
    terminal = await cli.terminal("status", "--watch", "--interval", "0.5")
    for _ in range(2):  # the view, then the view again
        await terminal.expect(r"sessions\s+127\.0\.0\.1:\d+\s+SERVING")
    terminal.type("\x03")
    assert await terminal.exit_code() == 0
    assert "error" not in terminal.screen


@pytest.fixture
async def telemetry_nodes(tmp_path):
    """Two real telemetry services as two nodes: node-a names node-b and a port where
    nothing listens as its peers; node-a's target."""
    apps = []

    async def start(**settings) -> int:
        app = await start_telemetry(
            TelemetrySettings(
                port=0,
                data_directories=[tmp_path],
                api_keys=API_KEYS,
                mesh_targets={},
                mesh_probe_timeout_seconds=5,
                **settings,
            )
        )
        apps.append(app)
        return app.port

    node_b = await start(node_name="node-b")
    node_a = await start(node_name="node-a", peers=[f"127.0.0.1:{node_b}", "127.0.0.1:1"])
    yield f"127.0.0.1:{node_a}"
    for app in apps:
        await app.server.stop(0)
        await app.close()


async def test_status_lists_every_node_and_the_unreachable_one(cli, telemetry_nodes):
    targets = {"telemetry": telemetry_nodes}
    run = await cli("status", targets=targets)
    assert run.code == 0, run.err
    rows = {line.split()[0]: line.split() for line in run.out.splitlines() if line.strip()}
    for name in ("node-a", "node-b"):
        assert rows[name][1] == "REACHABLE"
        assert f"{os.cpu_count()} cores" in " ".join(rows[name])
    assert rows["127.0.0.1:1"][1:3] == ["UNREACHABLE", "UNAVAILABLE:"]

    nodes = (await cli("status", "--json", targets=targets)).json()["mesh"]["nodes"]
    assert [(n["name"], n["state"]) for n in nodes] == [
        ("node-a", "STATE_REACHABLE"),
        ("node-b", "STATE_REACHABLE"),
        ("127.0.0.1:1", "STATE_UNREACHABLE"),
    ]
    assert nodes[1]["system"]["nodeName"] == "node-b"
    assert nodes[1]["system"]["cpu"]["logicalCores"] == os.cpu_count()
    assert nodes[2]["error"].startswith("UNAVAILABLE") and "system" not in nodes[2]
