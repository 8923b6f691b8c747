"""Starts the embed service: server first (health NOT_SERVING), then the model, then SERVING."""

import asyncio
import logging
from dataclasses import dataclass

from ragmesh.embed.v1 import embed_pb2, embed_pb2_grpc
from services.common.server import RunningServer, ServiceSpec, create_server
from services.embed.model import Embedder, Limits, load_model
from services.embed.servicer import EmbedServicer
from services.embed.settings import EmbedSettings

_LOGGER = logging.getLogger(__name__)

SERVICE_NAME = embed_pb2.DESCRIPTOR.services_by_name["EmbedService"].full_name


@dataclass
class EmbedApp:
    server: RunningServer
    embedder: Embedder

    async def close(self) -> None:
        await self.embedder.close()


async def start(settings: EmbedSettings, model=None) -> EmbedApp:
    """Serves health at once and the model when loaded; `model` skips loading (tests)."""
    servicer = EmbedServicer()
    running = await create_server(
        settings,
        [ServiceSpec(SERVICE_NAME, servicer, embed_pb2_grpc.add_EmbedServiceServicer_to_server)],
        serving=False,
    )
    try:
        if model is None:
            model = await asyncio.to_thread(load_model, settings.model, settings.device)
        embedder = Embedder(
            model,
            name=settings.model,
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms,
            max_queued_texts=settings.max_queued_texts,
            linger_ms=settings.linger_ms,
            compute_threads=settings.compute_threads,
            limits=Limits(settings.max_texts_per_request, settings.max_chars_per_text),
        )
        await embedder.start()
    except BaseException:
        await running.stop(0)
        raise
    servicer.embedder = embedder
    await running.set_serving(True)
    _LOGGER.info(
        "model %s ready: dimension %d, max %d tokens, on %s",
        embedder.info.name,
        embedder.info.dimension,
        embedder.info.max_tokens,
        embedder.info.device,
    )
    return EmbedApp(running, embedder)
