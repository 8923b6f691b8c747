"""Metrics a person can read: every server counts its calls by method and status code
with their latencies, embed reports its batcher's queue, the telemetry service gathers
the figures in its mesh view and `ragmesh status` (the installed console script) shows
them."""

import asyncio
import json
import os
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2

from ragmesh.embed.v1 import embed_pb2, embed_pb2_grpc
from ragmesh.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from ragmesh.telemetry.v1 import metrics_pb2, metrics_pb2_grpc, telemetry_pb2, telemetry_pb2_grpc
from services.embed.app import start as start_embed
from services.embed.model import load_model
from services.embed.settings import EmbedSettings
from services.ingest.app import start as start_ingest
from services.ingest.settings import IngestSettings
from services.telemetry.app import start as start_telemetry
from services.telemetry.settings import TelemetrySettings

RAGMESH = Path(sys.executable).with_name("ragmesh")
API_KEYS = {"ops-key": "ops:acme"}
OPS = (("authorization", "Bearer ops-key"),)
WATCH = "/ragmesh.telemetry.v1.TelemetryService/WatchSystemStatus"


@pytest.fixture
async def telemetry(tmp_path):
    app = await start_telemetry(
        TelemetrySettings(port=0, data_directories=[tmp_path], api_keys=API_KEYS, mesh_targets={})
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    yield channel
    await channel.close()
    await app.server.stop(0)
    await app.close()


async def test_calls_are_counted_by_method_and_status_with_their_latency(telemetry):
    stub = telemetry_pb2_grpc.TelemetryServiceStub(telemetry)
    for _ in range(3):
        await stub.GetSystemStatus(telemetry_pb2.GetSystemStatusRequest(), metadata=OPS)
    negative = duration_pb2.Duration(seconds=-1)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        async for _ in stub.WatchSystemStatus(
            telemetry_pb2.WatchSystemStatusRequest(interval=negative), metadata=OPS
        ):
            pass
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as wrong_key:
        await stub.GetMeshStatus(
            telemetry_pb2.GetMeshStatusRequest(),
            metadata=(("authorization", "Bearer nobody"),),
        )
    assert wrong_key.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # A watcher that goes away: the server sees its call cancelled.
    watch = stub.WatchSystemStatus(telemetry_pb2.WatchSystemStatusRequest(), metadata=OPS)
    await watch.read()
    watch.cancel()

    metrics = metrics_pb2_grpc.MetricsServiceStub(telemetry)

    async def figures() -> dict[str, metrics_pb2.RpcMetrics]:
        # No credentials: the metrics are open, like health.
        answer = await metrics.GetServiceMetrics(metrics_pb2.GetServiceMetricsRequest())
        assert answer.metrics.service_name == "ragmesh-telemetry"
        assert answer.metrics.start_time.ToNanoseconds() < answer.metrics.time.ToNanoseconds()
        return {rpc.method: rpc for rpc in answer.metrics.rpcs}

    by_method = await figures()
    async with asyncio.timeout(30):
        while by_method.get(WATCH) is None or by_method[WATCH].calls < 2:
            await asyncio.sleep(0.05)  # the cancelled stream ends on the server after us
            by_method = await figures()
    snapshot = by_method["/ragmesh.telemetry.v1.TelemetryService/GetSystemStatus"]
    assert (snapshot.calls, snapshot.errors, dict(snapshot.errors_by_code)) == (3, 0, {})
    # Each snapshot samples the CPU for cpu_sample_seconds (0.1 s).
    assert 100 <= snapshot.p50_ms <= snapshot.p95_ms <= snapshot.max_ms
    assert snapshot.mean_ms <= snapshot.max_ms
    assert dict(by_method[WATCH].errors_by_code) == {"INVALID_ARGUMENT": 1, "CANCELLED": 1}
    mesh = by_method["/ragmesh.telemetry.v1.TelemetryService/GetMeshStatus"]
    assert (mesh.calls, dict(mesh.errors_by_code)) == (1, {"UNAUTHENTICATED": 1})
    # Probes and metrics reads are not counted.
    assert all("Health" not in m and "Metrics" not in m for m in by_method)


@pytest.fixture
async def mesh(tmp_path):
    """embed, ingest and telemetry in this process; name -> target."""
    embed = await start_embed(
        EmbedSettings(port=0, data_dir=tmp_path / "embed", max_wait_ms=5),
        model=load_model("all-MiniLM-L6-v2", "cpu"),
    )
    ingest = await start_ingest(
        IngestSettings(
            port=0,
            data_dir=tmp_path / "ingest",
            embed_target=f"127.0.0.1:{embed.server.port}",
            api_keys=API_KEYS,
            job_poll_seconds=0.2,
        )
    )
    targets = {"embed": embed.server.port, "ingest": ingest.server.port}
    targets = {name: f"127.0.0.1:{port}" for name, port in targets.items()}
    telemetry = await start_telemetry(
        TelemetrySettings(
            port=0, data_directories=[tmp_path], api_keys=API_KEYS, mesh_targets=targets
        )
    )
    yield {**targets, "telemetry": f"127.0.0.1:{telemetry.port}"}
    for app in (telemetry, ingest, embed):
        await app.server.stop(0)
        await app.close()


async def ragmesh(telemetry: str, *args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAGMESH_")}
    process = await asyncio.create_subprocess_exec(
        str(RAGMESH),
        f"--target=telemetry={telemetry}",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**env, "RAGMESH_API_KEY": "ops-key", "COLUMNS": "200"},
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    return process.returncode, out.decode(), err.decode()


async def test_ragmesh_status_shows_each_services_calls_errors_and_embed_queue(mesh):
    async with grpc.aio.insecure_channel(mesh["ingest"]) as channel:
        ingest = ingest_pb2_grpc.IngestServiceStub(channel)
        for query in ("lighthouse", "tides"):
            await ingest.Search(ingest_pb2.SearchRequest(query=query), metadata=OPS)
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await ingest.GetDocument(
                ingest_pb2.GetDocumentRequest(document_id="no-such-document"), metadata=OPS
            )
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    async with grpc.aio.insecure_channel(mesh["embed"]) as channel:
        embed = embed_pb2_grpc.EmbedServiceStub(channel)
        texts = ["The keeper climbs the tower.", "The lens turns at dusk."]
        await embed.Embed(embed_pb2.EmbedRequest(texts=texts))
        with pytest.raises(grpc.aio.AioRpcError) as empty:
            await embed.Embed(embed_pb2.EmbedRequest(texts=[]))
        assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    code, out, err = await ragmesh(mesh["telemetry"], "status", "--json")
    assert code == 0, err
    services = {s["name"]: s for s in json.loads(out)["mesh"]["services"]}
    ingest_rpcs = {r["method"].rsplit("/", 1)[1]: r for r in services["ingest"]["metrics"]["rpcs"]}
    assert ingest_rpcs["Search"]["calls"] == "2" and ingest_rpcs["Search"]["errors"] == "0"
    assert ingest_rpcs["GetDocument"]["errorsByCode"] == {"NOT_FOUND": "1"}
    embed_figures = services["embed"]["metrics"]
    embed_rpcs = {r["method"].rsplit("/", 1)[1]: r for r in embed_figures["rpcs"]}
    # Search embeds its query through embed: those calls are counted there too.
    assert int(embed_rpcs["Embed"]["calls"]) == 2 + 2
    assert embed_rpcs["Embed"]["errorsByCode"] == {"INVALID_ARGUMENT": "1"}
    (queue,) = embed_figures["queues"]
    assert queue["name"] == "batcher" and queue["depth"] == "0"
    assert int(queue["batchedItems"]) >= 2 + 2 and int(queue["maxBatchSize"]) >= 2
    assert 1 <= int(queue["batches"]) <= int(queue["batchedItems"])

    code, out, err = await ragmesh(mesh["telemetry"], "status")
    assert code == 0, err
    rows = [line.split() for line in out.splitlines()]
    assert ["ingest/Search", "2", "0"] in [row[:3] for row in rows]
    assert ["ingest/GetDocument", "1", "1", "NOT_FOUND"] in [row[:4] for row in rows]
    assert ["embed/batcher", "0"] in [row[:2] for row in rows]
