"""Probes each configured ragmesh service with grpc.health.v1 and times the answer."""

import asyncio
import time
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.clients import open_channel

SERVING, NOT_SERVING, UNREACHABLE = 1, 2, 3  # the proto's ServiceHealth.State values


@dataclass
class ServiceProbe:
    name: str
    target: str
    state: int
    latency_seconds: float | None
    error: str


class MeshProber:
    """Keeps one channel per service and checks them all concurrently."""

    def __init__(self, targets: dict[str, str], timeout_seconds: float) -> None:
        self._timeout = timeout_seconds
        self._channels = {name: open_channel(target) for name, target in targets.items()}
        self._stubs = {
            name: (target, health_pb2_grpc.HealthStub(self._channels[name]))
            for name, target in sorted(targets.items())
        }

    async def probe_all(self) -> list[ServiceProbe]:
        return list(
            await asyncio.gather(
                *(self._probe(name, target, stub) for name, (target, stub) in self._stubs.items())
            )
        )

    async def _probe(self, name: str, target: str, stub) -> ServiceProbe:
        started = time.perf_counter()
        try:
            # The service name "" asks for the server's overall health.
            response = await stub.Check(health_pb2.HealthCheckRequest(), timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            return ServiceProbe(
                name, target, UNREACHABLE, None, f"{exc.code().name}: {exc.details()}"
            )
        latency = time.perf_counter() - started
        state = (
            SERVING if response.status == health_pb2.HealthCheckResponse.SERVING else NOT_SERVING
        )
        return ServiceProbe(name, target, state, latency, "")

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
