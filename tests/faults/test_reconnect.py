"""An upstream that went away for a while and came back: the mesh's channels
(services.common.clients.open_channel) find it again within about a second, instead of
gRPC's default reconnect backoff, which grows towards 2 minutes (after a 16 s outage the
next attempt may come 10 s after the upstream is back)."""

import asyncio
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from bench.load import free_port
from services.common.clients import open_channel

OUTAGE_SECONDS = 16


async def test_a_channel_finds_an_upstream_again_soon_after_a_long_outage():
    port = free_port()
    channel = open_channel(f"127.0.0.1:{port}", forward_caller=False)
    stub = health_pb2_grpc.HealthStub(channel)
    server = None
    try:
        down_until = time.monotonic() + OUTAGE_SECONDS
        while time.monotonic() < down_until:
            try:
                await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
                raise AssertionError("an answer with nothing listening")
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
            await asyncio.sleep(0.5)

        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        give_up = time.monotonic() + 3
        while True:
            try:
                await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
                break
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                assert time.monotonic() < give_up, "the upstream is back, the channel not"
                await asyncio.sleep(0.1)
    finally:
        await channel.close()
        if server is not None:
            await server.stop(0)
