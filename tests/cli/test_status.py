"""ragmesh status against the real telemetry service: the host and the mesh, once, as a
stream for scripts, and as a live view until Ctrl-C."""

import asyncio
import json
import os
import signal

SERVICES = {"embed", "ingest", "llm", "sessions"}


async def test_status_shows_the_host_and_every_service(cli):
    run = await cli("status")
    assert run.code == 0, run.err
    for part in ("CPU", "memory", "DISK", "GPUs", "SERVICE"):
        assert part in run.out
    rows = {line.split()[0]: line for line in run.out.splitlines() if line.strip()}
    for name in SERVICES:
        assert "SERVING" in rows[name]

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
