"""Health while the ingest service starts: alive at once, so a liveness probe never
restarts it, and ready only once its search index is loaded."""

import asyncio
import socket
import threading

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ragmesh.ingest.v1 import ingest_pb2
from services.common.server import LIVENESS
from services.common.text import Analyzer
from services.ingest.app import SERVICE_NAME, start
from services.ingest.search_index import SearchIndex

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class SlowToLoad(SearchIndex):
    """The real index, whose loading waits until the test lets it go on: a stand-in for a
    corpus large enough that loading takes minutes."""

    def __init__(self, gate: threading.Event) -> None:
        super().__init__(Analyzer())
        self._gate = gate

    def add(self, chunks) -> None:
        self._gate.wait()
        super().add(chunks)


async def test_the_service_is_alive_while_loading_its_index_and_ready_once_loaded(
    make_settings, tmp_path, new_client, eventually
):
    settings = make_settings(tmp_path)
    first = await start(settings)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{first.server.port}") as channel:
            document = await new_client(channel).ingest("kept.txt", b"a chunk to load again")
            assert document.status == ingest_pb2.DOCUMENT_STATUS_READY
    finally:
        await first.server.stop(0)
        await first.close()

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    gate = threading.Event()
    starting = asyncio.create_task(
        start(settings.model_copy(update={"port": port}), search_index=SlowToLoad(gate))
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)

            async def status(name: str):
                try:
                    reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
                except grpc.aio.AioRpcError:
                    return None
                return reply.status

            async def alive() -> bool:
                return await status(LIVENESS) == SERVING

            await eventually(alive)
            assert await status("") == NOT_SERVING
            assert await status(SERVICE_NAME) == NOT_SERVING
            gate.set()
            await starting
            assert await status("") == SERVING
            assert await status(SERVICE_NAME) == SERVING
            assert await status(LIVENESS) == SERVING
    finally:
        gate.set()
        app = await starting
        await app.server.stop(0)
        await app.close()
