"""The per-caller limit on calls in flight, through a real telemetry server on loopback:
exact under concurrency, streams counted while open, places freed however a call ends,
RESOURCE_EXHAUSTED naming the setting; health, reflection, metrics and the mesh's own
calls left alone."""

import asyncio

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from pydantic import ValidationError

from ragmesh.telemetry.v1 import metrics_pb2, metrics_pb2_grpc, telemetry_pb2, telemetry_pb2_grpc
from services.common.clients import open_channel
from services.common.context import background
from services.common.interceptors import MESH_CALL_KEY
from services.telemetry import app as telemetry_app
from services.telemetry.settings import TelemetrySettings

SETTING = "RAGMESH_TELEMETRY_MAX_CALLS_PER_CALLER"
API_KEYS = {
    "alice-key": "alice:acme",
    "bob-key": "bob:acme",
    "alice-elsewhere-key": "alice:other",
    "ingest-key": "ingest:system:service",
}


def _auth(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


ALICE = _auth("alice-key")


@pytest.fixture
async def telemetry(tmp_path):
    apps, channels = [], []

    async def start(**overrides):
        settings = TelemetrySettings(
            **{"port": 0, "data_directories": [tmp_path], "mesh_targets": {}, **overrides}
        )
        app = await telemetry_app.start(settings)
        apps.append(app)
        target = f"127.0.0.1:{app.port}"
        channel = grpc.aio.insecure_channel(target)
        channels.append(channel)
        return target, channel

    yield start
    for channel in channels:
        await channel.close()
    for app in apps:
        await app.server.stop(0)
        await app.close()


async def _open_watch(stub, metadata=(), **kwargs):
    """A WatchSystemStatus stream that has answered once, so it holds its place."""
    call = stub.WatchSystemStatus(
        telemetry_pb2.WatchSystemStatusRequest(
            interval=duration_pb2.Duration(seconds=60), skip_gpu_processes=True
        ),
        metadata=metadata,
        **kwargs,
    )
    await call.read()
    return call


async def _status(stub, metadata=()):
    return await stub.GetSystemStatus(
        telemetry_pb2.GetSystemStatusRequest(skip_gpu_processes=True), metadata=metadata
    )


def _refusal(exc: grpc.aio.AioRpcError) -> dict[str, str]:
    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc.details()
    (detail,) = rpc_status.from_call(exc).details
    info = error_details_pb2.ErrorInfo()
    assert detail.Unpack(info)
    return {"reason": info.reason, **info.metadata}


async def _refused(call) -> dict[str, str]:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call
    return _refusal(refused.value)


async def _eventually_answered(stub, metadata=()):
    """The caller's next call once the server has seen its earlier call end (a cancel
    reaches the server a moment after the client gave up); no timing is asserted."""
    async with asyncio.timeout(30):
        while True:
            try:
                return await _status(stub, metadata)
            except grpc.aio.AioRpcError as exc:
                _refusal(exc)
                await asyncio.sleep(0.05)


async def test_calls_past_the_limit_are_refused_naming_it_and_others_are_not(telemetry):
    _, channel = await telemetry(api_keys=API_KEYS, max_calls_per_caller=2)
    stub = telemetry_pb2_grpc.TelemetryServiceStub(channel)
    streams = [await _open_watch(stub, ALICE) for _ in range(2)]

    refused = await _refused(_status(stub, ALICE))
    assert refused == {
        "reason": "CALLER_CALL_LIMIT",
        "setting": SETTING,
        "limit": "2",
        "request_id": refused["request_id"],
    }
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await _status(stub, ALICE)
    assert f"{SETTING}=2" in exc.value.details()
    assert "'alice' (tenant 'acme') already has 2 calls" in exc.value.details()
    # A third stream is refused the same way, at its start.
    assert (await _refused(_open_watch(stub, ALICE)))["reason"] == "CALLER_CALL_LIMIT"

    # The limit is per caller: another subject of the tenant, the same subject in
    # another tenant, and the service's own key are answered.
    for key in ("bob-key", "alice-elsewhere-key", "ingest-key"):
        assert (await _status(stub, _auth(key))).status.hostname
    # Health, reflection and metrics are never limited.
    health = health_pb2_grpc.HealthStub(channel)
    answer = await health.Check(health_pb2.HealthCheckRequest(), metadata=ALICE)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), metadata=ALICE
    )
    assert [r async for r in reflection]
    metrics = metrics_pb2_grpc.MetricsServiceStub(channel)
    await metrics.GetServiceMetrics(metrics_pb2.GetServiceMetricsRequest(), metadata=ALICE)

    # A cancelled stream frees its place.
    streams[0].cancel()
    assert (await _eventually_answered(stub, ALICE)).status.hostname
    # The place is taken again by one more stream, and then none is left.
    streams[0] = await _open_watch(stub, ALICE)
    await _refused(_status(stub, ALICE))
    for stream in streams:
        stream.cancel()


async def test_a_limit_of_one_with_two_concurrent_streams_opens_exactly_one(telemetry):
    _, channel = await telemetry(api_keys=API_KEYS, max_calls_per_caller=1)
    stub = telemetry_pb2_grpc.TelemetryServiceStub(channel)
    results = await asyncio.gather(
        _open_watch(stub, ALICE), _open_watch(stub, ALICE), return_exceptions=True
    )
    opened = [r for r in results if isinstance(r, grpc.aio.Call)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(opened) == 1 and len(refused) == 1, results
    assert _refusal(refused[0])["limit"] == "1"
    opened[0].cancel()


async def test_the_limit_is_exact_under_concurrency(telemetry):
    _, channel = await telemetry(api_keys=API_KEYS, max_calls_per_caller=5)
    stub = telemetry_pb2_grpc.TelemetryServiceStub(channel)
    results = await asyncio.gather(
        *(_open_watch(stub, ALICE) for _ in range(12)), return_exceptions=True
    )
    opened = [r for r in results if isinstance(r, grpc.aio.Call)]
    assert len(opened) == 5, results
    for exc in results:
        if not isinstance(exc, grpc.aio.Call):
            assert _refusal(exc)["reason"] == "CALLER_CALL_LIMIT"
    for call in opened:
        call.cancel()


async def test_a_place_is_freed_by_a_deadline_an_error_and_a_refusal(telemetry):
    _, channel = await telemetry(api_keys=API_KEYS, max_calls_per_caller=1)
    stub = telemetry_pb2_grpc.TelemetryServiceStub(channel)

    stream = await _open_watch(stub, ALICE, timeout=2)
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await stream.read()
    assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await _eventually_answered(stub, ALICE)

    # A stream that fails (a negative interval) gives its place back before its status
    # reaches the caller, and so does a refused call.
    bad = stub.WatchSystemStatus(
        telemetry_pb2.WatchSystemStatusRequest(interval=duration_pb2.Duration(seconds=-1)),
        metadata=ALICE,
    )
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await bad.read()
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    held = await _open_watch(stub, ALICE)
    await _refused(_status(stub, ALICE))
    held.cancel()
    await _eventually_answered(stub, ALICE)
    # Calls with bad credentials take no place.
    with pytest.raises(grpc.aio.AioRpcError) as bad_key:
        await _status(stub, _auth("wrong-key"))
    assert bad_key.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert (await _status(stub, ALICE)).status.hostname


async def test_with_auth_off_the_anonymous_caller_is_limited_but_not_the_meshs_own_calls(
    telemetry,
):
    target, channel = await telemetry(max_calls_per_caller=1)
    stub = telemetry_pb2_grpc.TelemetryServiceStub(channel)
    held = await _open_watch(stub)
    refused = await _refused(_status(stub))
    assert refused["reason"] == "CALLER_CALL_LIMIT"

    # What a service sends as itself: through a channel that never forwards its caller
    # (ingest to embed), or in background work (sessions' memory indexing).
    own = open_channel(target, forward_caller=False)
    forwarding = open_channel(target)
    try:
        assert (await _status(telemetry_pb2_grpc.TelemetryServiceStub(own))).status.hostname
        with background():
            answer = await _status(telemetry_pb2_grpc.TelemetryServiceStub(forwarding))
        assert answer.status.hostname
        # A call made for the (anonymous) caller counts as the caller's.
        await _refused(_status(telemetry_pb2_grpc.TelemetryServiceStub(forwarding)))
    finally:
        await own.close()
        await forwarding.close()
    held.cancel()


async def test_with_auth_on_the_mesh_mark_is_ignored(telemetry):
    _, channel = await telemetry(api_keys=API_KEYS, max_calls_per_caller=1)
    stub = telemetry_pb2_grpc.TelemetryServiceStub(channel)
    held = await _open_watch(stub, ALICE)
    await _refused(_status(stub, (*ALICE, (MESH_CALL_KEY, "1"))))
    held.cancel()


async def test_the_default_limit_is_64_and_zero_is_none(telemetry):
    for limit, opened_count in ((None, 64), (0, 65)):
        overrides = {} if limit is None else {"max_calls_per_caller": limit}
        _, channel = await telemetry(api_keys=API_KEYS, **overrides)
        stub = telemetry_pb2_grpc.TelemetryServiceStub(channel)
        results = await asyncio.gather(
            *(_open_watch(stub, ALICE) for _ in range(65)), return_exceptions=True
        )
        opened = [r for r in results if isinstance(r, grpc.aio.Call)]
        assert len(opened) == opened_count
        for call in opened:
            call.cancel()


def test_a_negative_limit_stops_the_service_naming_the_setting():
    with pytest.raises(ValidationError, match="max_calls_per_caller"):
        TelemetrySettings(max_calls_per_caller=-1)
