"""Starts the ingest service: database and migrations, blobs, Qdrant, server, search index
and workers."""

import asyncio
import logging
from dataclasses import dataclass

from qdrant_client import AsyncQdrantClient
from sqlalchemy.ext.asyncio import AsyncEngine

from ragmesh.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from services.common.database import create_engine, sessionmaker
from services.common.server import RunningServer, ServiceSpec, create_server
from services.common.text import Analyzer
from services.ingest import storage
from services.ingest.blobs import BlobStore
from services.ingest.documents import Documents, JobSignals
from services.ingest.embed_client import EmbedClient
from services.ingest.index import LocalVectorIndex, QdrantVectorIndex, VectorIndex
from services.ingest.search import Retrieval
from services.ingest.search_index import SearchIndex
from services.ingest.servicer import IngestServicer
from services.ingest.settings import IngestSettings
from services.ingest.worker import WorkerPool

_LOGGER = logging.getLogger(__name__)

SERVICE_NAME = ingest_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name


@dataclass
class IngestApp:
    server: RunningServer
    documents: Documents
    workers: WorkerPool
    index: VectorIndex
    embed: EmbedClient
    engine: AsyncEngine
    retrieval: Retrieval
    syncer: asyncio.Task

    async def close(self) -> None:
        self.syncer.cancel()
        await self.workers.close()
        await self.embed.close()
        await self.index.close()
        await self.engine.dispose()


async def start(
    settings: IngestSettings,
    *,
    search_index: SearchIndex | None = None,
    vector_index: VectorIndex | None = None,
) -> IngestApp:
    """Returns once the service is ready; it answers health checks from before the search
    index (search_index, a fresh one by default) is loaded. vector_index replaces the one
    the settings choose."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = create_engine(settings.resolved_database_url)
    try:
        await storage.migrate(engine)
    except Exception as exc:
        await engine.dispose()
        raise ValueError(f"cannot prepare the database: {exc}") from exc
    sessions = sessionmaker(engine)
    blobs = BlobStore(settings.resolved_blob_dir)
    blobs.open()
    if search_index is None:
        search_index = SearchIndex(Analyzer())
    index: VectorIndex
    if vector_index is not None:
        index = vector_index
    elif settings.qdrant_url:
        client = AsyncQdrantClient(url=settings.qdrant_url, api_key=settings.qdrant_api_key or None)
        index = QdrantVectorIndex(client)
    else:
        index = LocalVectorIndex(search_index)
    embed = EmbedClient(
        settings.embed_target,
        timeout=settings.embed_timeout_seconds,
        api_key=settings.embed_api_key,
    )
    retrieval = Retrieval(
        sessions,
        search_index,
        index,
        embed,
        fusion=settings.fusion,
        semantic_weight=settings.semantic_weight,
        rrf_k=settings.rrf_k,
        keep_vectors_in_memory=isinstance(index, LocalVectorIndex),
    )
    signals = JobSignals()
    documents = Documents(
        sessions,
        blobs,
        index,
        search_index,
        signals,
        max_upload_bytes=settings.max_upload_bytes,
        watch_poll_seconds=settings.job_poll_seconds,
    )
    workers = WorkerPool(settings, sessions, documents, blobs, index, embed, signals, retrieval)
    servicer = IngestServicer(documents, retrieval)
    running = await create_server(
        settings,
        [ServiceSpec(SERVICE_NAME, servicer, ingest_pb2_grpc.add_IngestServiceServicer_to_server)],
        serving=False,
    )
    # Alive from here (the "liveness" health name), ready only once the search index is
    # loaded, which takes minutes on a large corpus: a liveness probe must not restart it.
    try:
        chunks = await retrieval.load()
    except BaseException:
        await running.stop(0)
        await embed.close()
        await index.close()
        await engine.dispose()
        raise
    _LOGGER.info("search index holds %d chunks", chunks)
    workers.start()
    syncer = asyncio.create_task(_keep_in_sync(retrieval, settings.index_sync_seconds))
    await running.set_serving(True)
    return IngestApp(running, documents, workers, index, embed, engine, retrieval, syncer)


async def _keep_in_sync(retrieval: Retrieval, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            await retrieval.sync()
        except Exception:
            _LOGGER.exception("catching up the search index failed; retrying")
