"""The shared runtime through real servers: health, reflection, errors, auth, shutdown,
deadline and cancellation propagation, tracing."""

import asyncio
import time

import grpc
import jwt
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pydantic import ValidationError

from ragmesh.telemetry.v1 import telemetry_pb2, telemetry_pb2_grpc
from services.common.auth import require_scope
from services.common.clients import Upstream, wait_until_serving
from services.common.context import ADMIN_SCOPE, background, current_principal, time_remaining
from services.common.errors import InvalidArgument, NotFound
from services.common.server import ServiceSpec, create_server
from services.common.settings import ServiceSettings

SERVICE = telemetry_pb2.DESCRIPTOR.services_by_name["TelemetryService"].full_name
STATUS = telemetry_pb2.GetSystemStatusResponse
# The most a downstream may see left of a caller's 2 s deadline. gRPC sends a deadline
# as a timeout rounded up (to 10 ms between 1 s and 10 s) and reckoned on a cached clock,
# so a hop can see a little more than its caller had left (2.009 s on a loaded machine);
# the upstream client's own default is 30 s.
SEEN_OF_TWO_SECONDS = 2.5


class ProbeServicer(telemetry_pb2_grpc.TelemetryServiceServicer):
    """A servicer on the telemetry contract whose behaviour each test chooses."""

    def __init__(self) -> None:
        self.unary_error: Exception | None = None
        self.stream_error_after: tuple[int, Exception] | None = None
        self.stream_count = 5
        self.stream_delay = 0.0
        self.stream_started = asyncio.Event()
        self.stream_cancelled = asyncio.Event()
        self.seen_remaining: list[float | None] = []
        self.seen_principals: list = []
        self.downstream: Upstream | None = None
        # Replaces GetSystemStatus's answer when a test sets it: async (request, context).
        self.unary_behaviour = None

    async def GetSystemStatus(self, request, context):
        self.seen_remaining.append(time_remaining())
        self.seen_principals.append(current_principal())
        if self.unary_error:
            raise self.unary_error
        if self.unary_behaviour is not None:
            return await self.unary_behaviour(request, context)
        if self.downstream is not None:
            try:
                return await self.downstream.stub.GetSystemStatus(request)
            except grpc.aio.AioRpcError as exc:
                raise self.downstream.error(exc) from exc
        return STATUS(status=telemetry_pb2.SystemStatus(hostname="probe"))

    async def WatchSystemStatus(self, request, context):
        self.seen_remaining.append(time_remaining())
        self.seen_principals.append(current_principal())
        if self.downstream is not None:
            async for item in self.downstream.stub.WatchSystemStatus(request):
                yield item
            return
        self.stream_started.set()
        try:
            for i in range(self.stream_count):
                if self.stream_error_after and i == self.stream_error_after[0]:
                    raise self.stream_error_after[1]
                yield telemetry_pb2.WatchSystemStatusResponse(
                    status=telemetry_pb2.SystemStatus(hostname=f"item-{i}")
                )
                await asyncio.sleep(self.stream_delay)
        except asyncio.CancelledError:
            self.stream_cancelled.set()
            raise


@pytest.fixture
async def probe_server():
    servers = []

    async def start(**settings):
        servicer = ProbeServicer()
        provider = settings.pop("tracer_provider", None)
        running = await create_server(
            ServiceSettings(**settings),
            [
                ServiceSpec(
                    SERVICE, servicer, telemetry_pb2_grpc.add_TelemetryServiceServicer_to_server
                )
            ],
            tracer_provider=provider,
        )
        servers.append(running)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
        return running, servicer, channel, telemetry_pb2_grpc.TelemetryServiceStub(channel)

    yield start
    for running in servers:
        await running.stop(0)


def error_details(exc: grpc.aio.AioRpcError):
    status = rpc_status.from_call(exc)
    found = {}
    for detail in status.details:
        for kind in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest):
            if detail.Is(kind.DESCRIPTOR):
                message = kind()
                detail.Unpack(message)
                found[kind.__name__] = message
    return found


async def test_health_serving_and_reflection_lists_services(probe_server):
    _, _, channel, _ = await probe_server()
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", SERVICE):
        answer = await health.Check(health_pb2.HealthCheckRequest(service=name))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    listed = [s.name async for r in responses for s in r.list_services_response.service]
    assert SERVICE in listed and "grpc.health.v1.Health" in listed


async def test_liveness_is_separate_from_readiness():
    running = await create_server(ServiceSettings(), [], serving=False)
    try:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
        health = health_pb2_grpc.HealthStub(channel)
        ready = await health.Check(health_pb2.HealthCheckRequest())
        alive = await health.Check(health_pb2.HealthCheckRequest(service="liveness"))
        assert ready.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert alive.status == health_pb2.HealthCheckResponse.SERVING
        await channel.close()
    finally:
        await running.stop(0)


async def test_wait_until_serving_waits_for_readiness_and_notices_a_dead_process():
    running = await create_server(ServiceSettings(), [], serving=False)
    target = f"127.0.0.1:{running.port}"
    try:
        with pytest.raises(TimeoutError):
            await wait_until_serving(target, 0.5)
        with pytest.raises(RuntimeError, match="exited"):
            await wait_until_serving(target, 5, still_running=lambda: False)
        await running.set_serving(True)
        await wait_until_serving(target, 5)
    finally:
        await running.stop(0)


async def test_unary_domain_error_maps_to_status_with_details(probe_server):
    _, servicer, _, stub = await probe_server()
    servicer.unary_error = InvalidArgument("top_k must be 1-100", field="top_k")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetSystemStatus(telemetry_pb2.GetSystemStatusRequest())
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == "top_k must be 1-100"
    details = error_details(caught.value)
    assert details["ErrorInfo"].reason == "INVALID_ARGUMENT"
    assert details["ErrorInfo"].domain == "ragmesh"
    assert details["ErrorInfo"].metadata["request_id"]
    assert details["BadRequest"].field_violations[0].field == "top_k"


async def test_unexpected_error_is_internal_without_leaking(probe_server):
    _, servicer, _, stub = await probe_server()
    servicer.unary_error = RuntimeError("password=hunter2 in /secret/path")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetSystemStatus(
            telemetry_pb2.GetSystemStatusRequest(), metadata=(("x-request-id", "req-42"),)
        )
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "hunter2" not in caught.value.details()
    assert "req-42" in caught.value.details()


async def test_rpc_not_implemented_is_unimplemented(probe_server):
    _, _, _, stub = await probe_server()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetMeshStatus(telemetry_pb2.GetMeshStatusRequest())
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "GetMeshStatus" in caught.value.details()


async def test_streaming_error_after_items_keeps_items_and_maps_status(probe_server):
    _, servicer, _, stub = await probe_server()
    servicer.stream_error_after = (
        2,
        NotFound("document d1 not found", reason="DOCUMENT_NOT_FOUND"),
    )
    call = stub.WatchSystemStatus(telemetry_pb2.WatchSystemStatusRequest())
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for item in call:
            received.append(item.status.hostname)
    assert received == ["item-0", "item-1"]
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_details(caught.value)["ErrorInfo"].reason == "DOCUMENT_NOT_FOUND"


@pytest.mark.parametrize(
    ("metadata", "code", "reason"),
    [
        ((), grpc.StatusCode.UNAUTHENTICATED, "CREDENTIALS_MISSING"),
        (
            (("authorization", "Bearer wrong"),),
            grpc.StatusCode.UNAUTHENTICATED,
            "CREDENTIALS_INVALID",
        ),
        (
            (("authorization", "Basic abc"),),
            grpc.StatusCode.UNAUTHENTICATED,
            "CREDENTIALS_MALFORMED",
        ),
    ],
)
async def test_auth_rejects_missing_wrong_and_malformed_credentials(
    probe_server, metadata, code, reason
):
    _, servicer, _, stub = await probe_server(api_keys={"k1": "alice:acme"})
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetSystemStatus(telemetry_pb2.GetSystemStatusRequest(), metadata=metadata)
    assert caught.value.code() == code
    assert error_details(caught.value)["ErrorInfo"].reason == reason
    assert servicer.seen_principals == []


async def test_auth_accepts_api_key_and_jwt_and_resolves_tenant(probe_server):
    _, servicer, channel, stub = await probe_server(api_keys={"k1": "alice:acme"}, jwt_key="s" * 32)
    await stub.GetSystemStatus(
        telemetry_pb2.GetSystemStatusRequest(), metadata=(("authorization", "Bearer k1"),)
    )
    token = jwt.encode(
        {"sub": "bob", "tenant": "globex", "exp": int(time.time()) + 60}, "s" * 32, "HS256"
    )
    await stub.GetSystemStatus(
        telemetry_pb2.GetSystemStatusRequest(), metadata=(("authorization", f"Bearer {token}"),)
    )
    assert [(p.subject, p.tenant) for p in servicer.seen_principals] == [
        ("alice", "acme"),
        ("bob", "globex"),
    ]
    expired = jwt.encode({"sub": "bob", "exp": int(time.time()) - 10}, "s" * 32, "HS256")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetSystemStatus(
            telemetry_pb2.GetSystemStatusRequest(),
            metadata=(("authorization", f"Bearer {expired}"),),
        )
    assert error_details(caught.value)["ErrorInfo"].reason == "TOKEN_EXPIRED"
    # Health stays open to probes without credentials.
    answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


async def test_refuses_to_listen_beyond_loopback_without_credentials():
    with pytest.raises(ValueError, match="without credentials"):
        await create_server(ServiceSettings(host="0.0.0.0"), [])
    running = await create_server(ServiceSettings(host="0.0.0.0", auth_disabled=True), [])
    await running.stop(0)


async def test_graceful_shutdown_drains_in_flight_stream(probe_server):
    running, servicer, channel, stub = await probe_server(shutdown_grace_seconds=5)
    servicer.stream_count, servicer.stream_delay = 4, 0.2
    watch = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(service=SERVICE)
    )
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
    call = stub.WatchSystemStatus(telemetry_pb2.WatchSystemStatusRequest())
    await servicer.stream_started.wait()
    stopping = asyncio.create_task(running.stop())
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await grpc.aio.insecure_channel(f"127.0.0.1:{running.port}").unary_unary(
            f"/{SERVICE}/GetSystemStatus"
        )(b"", timeout=1)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    received = [item.status.hostname async for item in call]
    assert received == ["item-0", "item-1", "item-2", "item-3"]
    assert await call.code() == grpc.StatusCode.OK
    await stopping


async def test_shutdown_grace_period_ends_a_stream_that_runs_too_long(probe_server):
    running, servicer, _, stub = await probe_server(shutdown_grace_seconds=0.3)
    servicer.stream_count, servicer.stream_delay = 100, 0.1
    call = stub.WatchSystemStatus(telemetry_pb2.WatchSystemStatusRequest())
    await servicer.stream_started.wait()
    await running.stop()
    with pytest.raises(grpc.aio.AioRpcError):
        async for _ in call:
            pass
    await asyncio.wait_for(servicer.stream_cancelled.wait(), 5)


async def test_deadline_and_auth_propagate_to_downstream(probe_server):
    down_running, downstream, _, _ = await probe_server(api_keys={"k1": "alice:acme"})
    _, front, _, front_stub = await probe_server(api_keys={"k1": "alice:acme"})
    front.downstream = Upstream(
        "probe",
        f"127.0.0.1:{down_running.port}",
        telemetry_pb2_grpc.TelemetryServiceStub,
        default_timeout=30,
    )
    answer = await front_stub.GetSystemStatus(
        telemetry_pb2.GetSystemStatusRequest(),
        metadata=(("authorization", "Bearer k1"),),
        timeout=2,
    )
    await front.downstream.close()
    assert answer.status.hostname == "probe"
    # The downstream saw the caller's 2 s deadline, not the client's 30 s default,
    # and the caller's credentials.
    assert downstream.seen_remaining[0] is not None
    assert downstream.seen_remaining[0] <= SEEN_OF_TWO_SECONDS
    assert downstream.seen_principals[0].tenant == "acme"


async def test_deadline_and_auth_propagate_to_downstream_streams(probe_server):
    down_running, downstream, _, _ = await probe_server(api_keys={"k1": "alice:acme"})
    downstream.stream_count = 2
    _, front, _, front_stub = await probe_server(api_keys={"k1": "alice:acme"})
    front.downstream = Upstream(
        "probe", f"127.0.0.1:{down_running.port}", telemetry_pb2_grpc.TelemetryServiceStub
    )
    call = front_stub.WatchSystemStatus(
        telemetry_pb2.WatchSystemStatusRequest(),
        metadata=(("authorization", "Bearer k1"),),
        timeout=2,
    )
    assert [item.status.hostname async for item in call] == ["item-0", "item-1"]
    await front.downstream.close()
    assert downstream.seen_remaining[0] is not None
    assert downstream.seen_remaining[0] <= SEEN_OF_TWO_SECONDS
    assert downstream.seen_principals[0].tenant == "acme"


async def test_cancelling_the_caller_cancels_the_downstream_stream(probe_server):
    down_running, downstream, _, _ = await probe_server()
    downstream.stream_count, downstream.stream_delay = 1000, 0.05
    _, front, _, front_stub = await probe_server()
    front.downstream = Upstream(
        "probe", f"127.0.0.1:{down_running.port}", telemetry_pb2_grpc.TelemetryServiceStub
    )
    call = front_stub.WatchSystemStatus(telemetry_pb2.WatchSystemStatusRequest())
    first = await call.read()
    assert first.status.hostname == "item-0"
    call.cancel()
    await asyncio.wait_for(downstream.stream_cancelled.wait(), 5)
    await front.downstream.close()


async def test_trace_context_reaches_the_downstream_service(probe_server):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    down_running, _, _, _ = await probe_server(tracer_provider=provider)
    _, front, _, front_stub = await probe_server(tracer_provider=provider)
    front.downstream = Upstream(
        "probe",
        f"127.0.0.1:{down_running.port}",
        telemetry_pb2_grpc.TelemetryServiceStub,
        tracer_provider=provider,
    )
    await front_stub.GetSystemStatus(telemetry_pb2.GetSystemStatusRequest())
    await front.downstream.close()
    spans = exporter.get_finished_spans()
    server_spans = [s for s in spans if s.kind.name == "SERVER"]
    client_spans = [s for s in spans if s.kind.name == "CLIENT"]
    assert len(server_spans) == 2 and len(client_spans) == 1
    # One trace: the front's server span parents its client span, which parents the
    # downstream's server span.
    assert len({s.context.trace_id for s in spans}) == 1
    front_span = next(s for s in server_spans if s.parent is None)
    downstream_span = next(s for s in server_spans if s.parent is not None)
    assert client_spans[0].parent.span_id == front_span.context.span_id
    assert downstream_span.parent.span_id == client_spans[0].context.span_id


async def test_configured_keys_are_enforced_even_with_auth_disabled(probe_server):
    _, servicer, _, stub = await probe_server(api_keys={"k1": "alice:acme"}, auth_disabled=True)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetSystemStatus(telemetry_pb2.GetSystemStatusRequest())
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    await stub.GetSystemStatus(
        telemetry_pb2.GetSystemStatusRequest(), metadata=(("authorization", "Bearer k1"),)
    )
    assert [p.tenant for p in servicer.seen_principals] == ["acme"]


@pytest.mark.parametrize("value", ["alice", "alice:", ":acme", "alice:acme:admin:extra"])
def test_api_key_without_subject_and_tenant_is_refused_at_start(value):
    with pytest.raises(ValidationError, match="subject>:<tenant>"):
        ServiceSettings(api_keys={"k1": value})


async def test_token_without_tenant_claim_is_refused(probe_server):
    _, servicer, _, stub = await probe_server(jwt_key="s" * 32)
    token = jwt.encode({"sub": "bob", "exp": int(time.time()) + 60}, "s" * 32, "HS256")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetSystemStatus(
            telemetry_pb2.GetSystemStatusRequest(),
            metadata=(("authorization", f"Bearer {token}"),),
        )
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_details(caught.value)["ErrorInfo"].reason == "TENANT_MISSING"
    assert servicer.seen_principals == []


async def test_principals_carry_scopes_from_api_keys_and_tokens(probe_server):
    _, servicer, _, stub = await probe_server(
        api_keys={"k1": "alice:acme:admin,reader", "k2": "carol:acme"}, jwt_key="s" * 32
    )
    claims = {"sub": "bob", "tenant": "globex", "exp": int(time.time()) + 60}
    tokens = [
        jwt.encode({**claims, "scope": "admin write"}, "s" * 32, "HS256"),
        jwt.encode({**claims, "scopes": ["reader"]}, "s" * 32, "HS256"),
    ]
    for credential in ["k1", "k2", *tokens]:
        await stub.GetSystemStatus(
            telemetry_pb2.GetSystemStatusRequest(),
            metadata=(("authorization", f"Bearer {credential}"),),
        )
    assert [(p.subject, p.scopes) for p in servicer.seen_principals] == [
        ("alice", {"admin", "reader"}),
        ("carol", set()),
        ("bob", {"admin", "write"}),
        ("bob", {"reader"}),
    ]


async def test_require_scope_refuses_a_caller_without_it(probe_server):
    _, servicer, _, stub = await probe_server(api_keys={"k1": "alice:acme:admin", "k2": "bob:acme"})

    async def admin_only(request, context):
        require_scope(ADMIN_SCOPE)
        return STATUS(status=telemetry_pb2.SystemStatus(hostname="changed"))

    servicer.unary_behaviour = admin_only
    answer = await stub.GetSystemStatus(
        telemetry_pb2.GetSystemStatusRequest(), metadata=(("authorization", "Bearer k1"),)
    )
    assert answer.status.hostname == "changed"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetSystemStatus(
            telemetry_pb2.GetSystemStatusRequest(), metadata=(("authorization", "Bearer k2"),)
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    info = error_details(caught.value)["ErrorInfo"]
    assert (info.reason, info.metadata["scope"]) == ("SCOPE_REQUIRED", "admin")


async def test_background_work_calls_upstreams_with_the_services_own_key(probe_server):
    down_running, downstream, _, _ = await probe_server(
        api_keys={"user-key": "alice:acme", "service-key": "ingest:system"}
    )
    _, front, _, front_stub = await probe_server(api_keys={"user-key": "alice:acme"})
    target = f"127.0.0.1:{down_running.port}"
    acting_for_caller = Upstream(
        "probe", target, telemetry_pb2_grpc.TelemetryServiceStub, api_key="service-key"
    )
    as_itself = Upstream(
        "probe",
        target,
        telemetry_pb2_grpc.TelemetryServiceStub,
        api_key="service-key",
        forward_caller=False,
    )
    background_calls: list[asyncio.Task] = []

    async def front_behaviour(request, context):
        await acting_for_caller.stub.GetSystemStatus(request)
        await as_itself.stub.GetSystemStatus(request)

        async def later():
            with background():
                await acting_for_caller.stub.GetSystemStatus(request)

        # A task made inside a call inherits the call's context, credentials included.
        background_calls.append(asyncio.create_task(later()))
        return STATUS()

    front.unary_behaviour = front_behaviour
    await front_stub.GetSystemStatus(
        telemetry_pb2.GetSystemStatusRequest(), metadata=(("authorization", "Bearer user-key"),)
    )
    await asyncio.gather(*background_calls)
    with background():
        await as_itself.stub.GetSystemStatus(telemetry_pb2.GetSystemStatusRequest())
    await acting_for_caller.close()
    await as_itself.close()
    assert [p.subject for p in downstream.seen_principals] == [
        "alice",
        "ingest",
        "ingest",
        "ingest",
    ]
