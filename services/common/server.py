"""Builds and runs a service's gRPC server: health, reflection, metrics, interceptors,
shutdown."""

import asyncio
import logging
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.sdk.trace import TracerProvider

from ragmesh.telemetry.v1 import metrics_pb2_grpc
from services.common.auth import Authenticator
from services.common.interceptors import CallerLimit, CallInterceptor
from services.common.metrics import SERVICE_NAME as METRICS_SERVICE
from services.common.metrics import MetricsServicer, ServerMetrics
from services.common.settings import ServiceSettings
from services.common.tracing import configure_tracing

_LOGGER = logging.getLogger(__name__)

# Health name that answers SERVING while the process is up and not draining, whatever
# the service's readiness: liveness probes use it, readiness probes use "".
LIVENESS = "liveness"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class ServiceSpec:
    """One gRPC service to mount: its full name, servicer and generated add function."""

    full_name: str
    servicer: object
    add_to_server: Callable[[object, grpc.aio.Server], None]


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: health.HealthServicer
    service_names: list[str]
    settings: ServiceSettings
    metrics: ServerMetrics
    tracer_provider: TracerProvider | None = None
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)

    async def set_serving(self, serving: bool) -> None:
        """Reports every mounted service (and the overall "") as SERVING or not."""
        status = SERVING if serving else NOT_SERVING
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    async def stop(self, grace: float | None = None) -> None:
        """Drains: health NOT_SERVING, new calls refused, in-flight calls get `grace` s."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        await self.health.enter_graceful_shutdown()
        grace = self.settings.shutdown_grace_seconds if grace is None else grace
        _LOGGER.info("shutting down, in-flight calls get %.1f s", grace)
        await self.server.stop(grace)
        if self.tracer_provider is not None:
            self.tracer_provider.force_flush()
        # The OTLP exporter's last export blocks: keep it off the event loop.
        await asyncio.to_thread(self.metrics.shutdown)


async def create_server(
    settings: ServiceSettings,
    services: Sequence[ServiceSpec],
    *,
    tracer_provider: TracerProvider | None = None,
    serving: bool = True,
) -> RunningServer:
    """Starts a server on settings.host:settings.port (0 picks a free port).

    Without an explicit tracer_provider, the server traces through the process's provider
    when the settings name an OTLP endpoint.
    """
    settings.check_exposure()
    if tracer_provider is None:
        tracer_provider = configure_tracing(settings.service_name(), settings.otlp_endpoint)
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if tracer_provider is not None:
        from opentelemetry.instrumentation.grpc import aio_server_interceptor

        interceptors.append(aio_server_interceptor(tracer_provider=tracer_provider))
    metrics = ServerMetrics(settings.service_name(), settings.otlp_endpoint)
    caller_limit = CallerLimit(
        settings.max_calls_per_caller, settings.env_name("max_calls_per_caller")
    )
    interceptors.append(CallInterceptor(Authenticator(settings), metrics, caller_limit))
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.aio.server(interceptors=interceptors, options=options)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    metrics_pb2_grpc.add_MetricsServiceServicer_to_server(MetricsServicer(metrics), server)
    for spec in services:
        spec.add_to_server(spec.servicer, server)
    names = [spec.full_name for spec in services]
    reflection.enable_server_reflection(
        [
            *names,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            METRICS_SERVICE,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    port = server.add_insecure_port(f"{host}:{settings.port}")
    if port == 0:
        raise RuntimeError(f"could not bind {host}:{settings.port}")
    await server.start()
    running = RunningServer(
        server, port, health_servicer, names, settings, metrics, tracer_provider
    )
    await health_servicer.set(LIVENESS, SERVING)
    await running.set_serving(serving)
    _LOGGER.info("listening on %s:%d (%s)", settings.host, port, ", ".join(names))
    return running


async def run_until_signalled(running: RunningServer, on_stop: Callable | None = None) -> None:
    """Serves until SIGTERM or SIGINT, then drains and runs on_stop (an async callable)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    waiter = asyncio.create_task(running.server.wait_for_termination())
    signalled = asyncio.create_task(stop.wait())
    await asyncio.wait({waiter, signalled}, return_when=asyncio.FIRST_COMPLETED)
    await running.stop()
    if on_stop is not None:
        await on_stop()
    waiter.cancel()
    signalled.cancel()
