"""Probes each configured ragmesh service with grpc.health.v1, times the answer and reads
the service's figures from its MetricsService (see services/common/metrics.py)."""

import asyncio
import time
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ragmesh.telemetry.v1 import metrics_pb2, metrics_pb2_grpc
from services.common.clients import open_channel

SERVING, NOT_SERVING, UNREACHABLE = 1, 2, 3  # the proto's ServiceHealth.State values


@dataclass
class ServiceProbe:
    name: str
    target: str
    state: int
    latency_seconds: float | None
    error: str
    # None when the service did not answer GetServiceMetrics.
    metrics: metrics_pb2.ServiceMetrics | None = None


class MeshProber:
    """Keeps one channel per service and checks them all concurrently. A service that
    did not answer gets a fresh channel for the next check: the old one would wait out
    gRPC's reconnect backoff (up to 2 minutes) before it tried a service that is back."""

    def __init__(self, targets: dict[str, str], timeout_seconds: float) -> None:
        self._timeout = timeout_seconds
        self._targets = dict(sorted(targets.items()))
        self._channels = {name: open_channel(target) for name, target in self._targets.items()}

    async def probe_all(self) -> list[ServiceProbe]:
        return list(await asyncio.gather(*(self._probe(name) for name in self._targets)))

    async def _probe(self, name: str) -> ServiceProbe:
        target, channel = self._targets[name], self._channels[name]
        health = health_pb2_grpc.HealthStub(channel)
        figures = asyncio.create_task(self._metrics(metrics_pb2_grpc.MetricsServiceStub(channel)))
        started = time.perf_counter()
        try:
            # The service name "" asks for the server's overall health.
            response = await health.Check(health_pb2.HealthCheckRequest(), timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            figures.cancel()
            if self._channels[name] is channel:
                self._channels[name] = open_channel(target)
                await channel.close()
            return ServiceProbe(
                name, target, UNREACHABLE, None, f"{exc.code().name}: {exc.details()}"
            )
        latency = time.perf_counter() - started
        state = (
            SERVING if response.status == health_pb2.HealthCheckResponse.SERVING else NOT_SERVING
        )
        return ServiceProbe(name, target, state, latency, "", await figures)

    async def _metrics(self, stub) -> metrics_pb2.ServiceMetrics | None:
        """The service's figures, or None from a service without a MetricsService."""
        try:
            response = await stub.GetServiceMetrics(
                metrics_pb2.GetServiceMetricsRequest(), timeout=self._timeout
            )
        except grpc.aio.AioRpcError:
            return None
        return response.metrics

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
