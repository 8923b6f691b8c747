"""Unary latency through the full interceptor stack vs a bare grpc.aio server, on loopback."""

import asyncio
import statistics
import time

import grpc
from opentelemetry.sdk.trace import TracerProvider

from ragmesh.telemetry.v1 import telemetry_pb2, telemetry_pb2_grpc
from services.common.server import ServiceSpec, create_server
from services.common.settings import ServiceSettings

SERVICE = telemetry_pb2.DESCRIPTOR.services_by_name["TelemetryService"].full_name
CALLS = 3000
ROUNDS = 3


class ConstantServicer(telemetry_pb2_grpc.TelemetryServiceServicer):
    async def GetSystemStatus(self, request, context):
        return telemetry_pb2.GetSystemStatusResponse(
            status=telemetry_pb2.SystemStatus(hostname="bench")
        )


async def _bare_server() -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    telemetry_pb2_grpc.add_TelemetryServiceServicer_to_server(ConstantServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


async def _latencies(port: int, metadata=()) -> list[float]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = telemetry_pb2_grpc.TelemetryServiceStub(channel)
        request = telemetry_pb2.GetSystemStatusRequest()
        for _ in range(200):
            await stub.GetSystemStatus(request, metadata=metadata)
        samples = []
        for _ in range(CALLS):
            started = time.perf_counter()
            await stub.GetSystemStatus(request, metadata=metadata)
            samples.append(time.perf_counter() - started)
        return samples


def _summary(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered) * 1e6, ordered[int(len(ordered) * 0.99)] * 1e6


async def _run() -> None:
    bare, bare_port = await _bare_server()
    spec = ServiceSpec(
        SERVICE, ConstantServicer(), telemetry_pb2_grpc.add_TelemetryServiceServicer_to_server
    )
    full = await create_server(ServiceSettings(), [spec])
    authed = await create_server(ServiceSettings(api_keys={"bench-key": "bench:t"}), [spec])
    traced = await create_server(ServiceSettings(), [spec], tracer_provider=TracerProvider())
    results: dict[str, list[float]] = {"bare": [], "full": [], "auth": [], "traced": []}
    # Interleave rounds so drift on a shared machine hits every variant alike.
    for _ in range(ROUNDS):
        results["bare"] += await _latencies(bare_port)
        results["full"] += await _latencies(full.port)
        results["auth"] += await _latencies(
            authed.port, metadata=(("authorization", "Bearer bench-key"),)
        )
        results["traced"] += await _latencies(traced.port)
    for running in (full, authed, traced):
        await running.stop(0)
    await bare.stop(0)
    base_p50, base_p99 = _summary(results["bare"])
    print(f"runtime: unary GetSystemStatus on loopback, {CALLS * ROUNDS} calls each")
    labels = {
        "bare": "bare grpc.aio server",
        "full": "full stack (request id, logging, errors)",
        "auth": "full stack + API-key auth",
        "traced": "full stack + OpenTelemetry tracing",
    }
    for name, samples in results.items():
        p50, p99 = _summary(samples)
        print(
            f"  {labels[name]:<42} p50 {p50:7.1f} µs ({p50 / base_p50 - 1:+6.1%})"
            f"  p99 {p99:7.1f} µs ({p99 / base_p99 - 1:+6.1%})"
        )


def main() -> None:
    asyncio.run(_run())


if __name__ == "__main__":
    main()
