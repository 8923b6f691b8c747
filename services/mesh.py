"""Starts the whole mesh on the embedded default, one process per service, and shows it
working: python -m services.mesh [--no-demo]. Ctrl-C (or SIGTERM) stops every service."""

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path

from services import demo
from services.common.clients import wait_until_serving

# Start order: a service comes after what it calls.
SERVICES = {
    "embed": 50052,
    "ingest": 50051,
    "llm": 50053,
    "sessions": 50054,
    "telemetry": 50055,
}
READY_TIMEOUT_SECONDS = {"embed": 180, "ingest": 60, "llm": 600, "sessions": 60, "telemetry": 30}


def _port(name: str) -> int:
    return int(os.environ.get(f"RAGMESH_{name.upper()}_PORT", SERVICES[name]))


async def _wait_serving(name: str, process: asyncio.subprocess.Process) -> None:
    try:
        await wait_until_serving(
            f"127.0.0.1:{_port(name)}",
            READY_TIMEOUT_SECONDS[name],
            still_running=lambda: process.returncode is None,
        )
    except (RuntimeError, TimeoutError) as exc:
        raise RuntimeError(f"{name}: {exc}; see {_log(name)}") from exc


def _log(name: str) -> Path:
    return Path(os.environ.get("RAGMESH_LOG_DIR", "var/log")) / f"{name}.log"


async def run(show_demo: bool) -> None:
    processes: dict[str, asyncio.subprocess.Process] = {}
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        for name in SERVICES:
            log = _log(name)
            log.parent.mkdir(parents=True, exist_ok=True)
            print(f"starting {name} on port {_port(name)} (log: {log})", flush=True)
            with log.open("ab") as out:
                processes[name] = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", f"services.{name}", stdout=out, stderr=out
                )
            await _wait_serving(name, processes[name])
            print(f"  {name} is SERVING", flush=True)
        if show_demo:
            await demo.run({name: f"127.0.0.1:{_port(name)}" for name in SERVICES})
        print(
            "\nthe mesh is up; try:\n"
            f"  grpcurl -plaintext localhost:{_port('telemetry')} list\n"
            "press Ctrl-C to stop",
            flush=True,
        )
        await stop.wait()
    finally:
        for name, process in reversed(processes.items()):
            if process.returncode is None:
                print(f"stopping {name}", flush=True)
                process.terminate()
        for process in processes.values():
            try:
                await asyncio.wait_for(process.wait(), 30)
            except TimeoutError:
                process.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--no-demo", action="store_true", help="start the services only")
    args = parser.parse_args()
    try:
        asyncio.run(run(show_demo=not args.no_demo))
    except RuntimeError as exc:
        sys.exit(str(exc))


if __name__ == "__main__":
    main()
