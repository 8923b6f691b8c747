"""Starts the embed service: server first (health NOT_SERVING), then the model, then SERVING."""

import asyncio
import logging
from dataclasses import dataclass

from ragmesh.embed.v1 import embed_pb2, embed_pb2_grpc
from services.common.metrics import QueueFigures
from services.common.server import RunningServer, ServiceSpec, create_server
from services.embed.model import Backend, Embedder, Limits, compute_shards, load_model
from services.embed.onnx_backend import OnnxBackend
from services.embed.provision import UnsupportedModel, provision_in_child
from services.embed.servicer import EmbedServicer
from services.embed.settings import EmbedSettings
from services.embed.torch_backend import TorchBackend

_LOGGER = logging.getLogger(__name__)

SERVICE_NAME = embed_pb2.DESCRIPTOR.services_by_name["EmbedService"].full_name


@dataclass
class EmbedApp:
    server: RunningServer
    embedder: Embedder

    async def close(self) -> None:
        await self.embedder.close()


async def load_backend(settings: EmbedSettings) -> Backend:
    """The configured model on onnxruntime (exported first if need be) or on torch."""
    choice = settings.backend
    if choice == "auto":
        choice = "onnx" if settings.device == "cpu" else "torch"
    if choice == "onnx":
        try:
            folder = await provision_in_child(settings.model, settings.resolved_models_dir)
        except UnsupportedModel as exc:
            if settings.backend == "onnx":
                raise ValueError(
                    f"{exc}; set RAGMESH_EMBED_BACKEND=torch to serve this model"
                ) from exc
            _LOGGER.warning("serving %s on torch: %s", settings.model, exc)
        else:
            # One onnxruntime thread per shard when a batch is split across cores, else
            # one pass on onnxruntime's default threads (one per core).
            shards = compute_shards("cpu", settings.compute_threads, OnnxBackend.splits_by_default)
            threads = 1 if shards > 1 else 0
            return await asyncio.to_thread(OnnxBackend, folder, settings.onnx_precision, threads)
    model = await asyncio.to_thread(load_model, settings.model, settings.device)
    return TorchBackend(model)


async def start(settings: EmbedSettings, model=None, backend: Backend | None = None) -> EmbedApp:
    """Serves health at once and the model when loaded.

    `model` (a loaded SentenceTransformer, served on torch) or `backend` skips loading.
    """
    servicer = EmbedServicer()
    running = await create_server(
        settings,
        [ServiceSpec(SERVICE_NAME, servicer, embed_pb2_grpc.add_EmbedServiceServicer_to_server)],
        serving=False,
    )
    try:
        if backend is None:
            backend = TorchBackend(model) if model is not None else await load_backend(settings)
        embedder = Embedder(
            backend,
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
    running.metrics.watch_queue(
        "batcher",
        lambda: QueueFigures(
            depth=embedder.queued_texts,
            batches=embedder.stats.batches,
            batched_items=embedder.stats.texts,
            max_batch_size=embedder.stats.max_batch_size,
        ),
    )
    await running.set_serving(True)
    _LOGGER.info(
        "model %s ready: dimension %d, max %d tokens, on %s (%s)",
        embedder.info.name,
        embedder.info.dimension,
        embedder.info.max_tokens,
        embedder.info.device,
        type(backend).__name__,
    )
    return EmbedApp(running, embedder)
