"""Starts the ingest service: database and migrations, blobs, the vector store, server,
keyword index and workers."""

import asyncio
import logging
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine

from ragmesh.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from services.common.database import create_engine, sessionmaker
from services.common.server import RunningServer, ServiceSpec, create_server
from services.common.text import Analyzer
from services.common.vectors import VectorFolderInUse, VectorStore, open_vector_store
from services.ingest import repair, storage
from services.ingest.blobs import BlobStore
from services.ingest.documents import Documents, JobSignals
from services.ingest.embed_client import EmbedClient
from services.ingest.index import ChunkVectors
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
    vectors: ChunkVectors
    embed: EmbedClient
    engine: AsyncEngine
    retrieval: Retrieval
    syncer: asyncio.Task

    async def close(self) -> None:
        self.syncer.cancel()
        await self.workers.close()
        await self.embed.close()
        await self.vectors.close()
        await self.engine.dispose()


async def start(
    settings: IngestSettings,
    *,
    search_index: SearchIndex | None = None,
    vector_store: VectorStore | None = None,
) -> IngestApp:
    """Returns once the service is ready; it answers health checks from before the keyword
    index (search_index, a fresh one by default) is loaded. vector_store replaces the one
    the settings choose."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = create_engine(settings.resolved_database_url)
    try:
        await storage.migrate(engine)
    except Exception as exc:
        await engine.dispose()
        raise ValueError(f"cannot prepare the database: {exc}") from exc
    if vector_store is None:
        try:
            vector_store = await open_vector_store(
                settings.qdrant_url, settings.qdrant_api_key, settings.vector_folder
            )
        except VectorFolderInUse as exc:
            await engine.dispose()
            raise ValueError(exc.message) from exc
    sessions = sessionmaker(engine)
    blobs = BlobStore(settings.resolved_blob_dir)
    blobs.open()
    if search_index is None:
        search_index = SearchIndex(Analyzer())
    vectors = ChunkVectors(vector_store)
    # An Edge shard beside other replicas' catches up from the database; a server is shared.
    catch_up = settings.edge_catch_up and not settings.qdrant_url
    embed = EmbedClient(
        settings.embed_target,
        timeout=settings.embed_timeout_seconds,
        api_key=settings.embed_api_key,
    )
    retrieval = Retrieval(
        sessions,
        search_index,
        vectors,
        embed,
        fusion=settings.fusion,
        semantic_weight=settings.semantic_weight,
        rrf_k=settings.rrf_k,
        catch_up_vectors=catch_up,
    )
    signals = JobSignals()
    documents = Documents(
        sessions,
        blobs,
        vectors,
        search_index,
        signals,
        max_upload_bytes=settings.max_upload_bytes,
        max_documents_per_tenant=settings.max_documents_per_tenant,
        max_bytes_per_tenant=settings.max_bytes_per_tenant,
        watch_poll_seconds=settings.job_poll_seconds,
    )
    workers = WorkerPool(settings, sessions, documents, blobs, vectors, embed, signals, retrieval)
    servicer = IngestServicer(documents, retrieval)
    running = await create_server(
        settings,
        [ServiceSpec(SERVICE_NAME, servicer, ingest_pb2_grpc.add_IngestServiceServicer_to_server)],
        serving=False,
    )
    # Alive from here (the "liveness" health name), ready only once the keyword index is
    # loaded (and, catching up, the shard checked), which takes minutes on a large
    # corpus: a liveness probe must not restart it.
    try:
        chunks = await retrieval.load()
        _LOGGER.info("keyword index holds %d chunks", chunks)
        if catch_up:
            report = await repair.reconcile(sessions, vector_store, fix=True)
            _LOGGER.info("vector shard caught up with the database: %s", report)
        await _warn_of_unassigned(sessions)
    except BaseException:
        await running.stop(0)
        await embed.close()
        await vectors.close()
        await engine.dispose()
        raise
    workers.start()
    syncer = asyncio.create_task(_keep_in_sync(retrieval, settings.index_sync_seconds))
    await running.set_serving(True)
    return IngestApp(running, documents, workers, vectors, embed, engine, retrieval, syncer)


async def _warn_of_unassigned(sessions) -> None:
    async with sessions() as session:
        unassigned = (await storage.ready_collections(session)).get("", 0)
    if unassigned:
        _LOGGER.warning(
            "%d READY documents name no vector collection (made READY before vectors moved "
            "to the vector store): semantic search misses them until `python -m "
            "services.ingest.repair` writes their stored vectors to the store",
            unassigned,
        )


async def _keep_in_sync(retrieval: Retrieval, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            await retrieval.sync()
        except Exception:
            _LOGGER.exception("catching up the search index failed; retrying")
