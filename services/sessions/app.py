"""Starts the sessions service: database and migrations, the memory store, the upstream
services, the background memory indexer, the server."""

import asyncio
import contextlib
from dataclasses import dataclass

from ragmesh.sessions.v1 import sessions_pb2, sessions_pb2_grpc
from services.common.database import Database
from services.common.server import RunningServer, ServiceSpec, create_server
from services.common.vectors import VectorStore, open_vector_store
from services.sessions import storage
from services.sessions.chat import Chat
from services.sessions.directory import Directory
from services.sessions.memory import Memory
from services.sessions.servicer import SessionsServicer
from services.sessions.settings import SessionsSettings
from services.sessions.tags import Tagger
from services.sessions.upstreams import Embed, Ingest, LlmRouter

SERVICE_NAME = sessions_pb2.DESCRIPTOR.services_by_name["SessionsService"].full_name
# PostgreSQL advisory lock held while migrating (the bytes of "sessions").
MIGRATION_LOCK_KEY = 0x73657373696F6E73


@dataclass
class SessionsApp:
    server: RunningServer
    database: Database
    store: VectorStore
    ingest: Ingest
    embed: Embed
    llm: LlmRouter
    memory: Memory
    indexer: asyncio.Task

    async def close(self) -> None:
        self.indexer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.indexer
        for closable in (self.ingest, self.embed, self.llm, self.store):
            await closable.close()
        await self.database.dispose()


async def start(settings: SessionsSettings) -> SessionsApp:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    database = Database(settings.resolved_database_url)
    try:
        await database.migrate(storage.MIGRATIONS_DIR, MIGRATION_LOCK_KEY)
    except Exception as exc:
        await database.dispose()
        raise ValueError(f"cannot prepare the database: {exc}") from exc
    store = await open_vector_store(
        settings.qdrant_url, settings.qdrant_api_key, settings.data_dir / "vectors"
    )
    ingest, embed, llm = Ingest(settings), Embed(settings), LlmRouter(settings)
    tagger = Tagger(database, embed, settings.auto_tags)
    memory = Memory(database, embed, store, tagger, min_score=settings.memory_min_score)
    directory = Directory(database, ingest, llm, memory, name_scan=settings.search_name_scan)
    chat = Chat(settings, database, ingest, llm, memory)
    server = await create_server(
        settings,
        [
            ServiceSpec(
                SERVICE_NAME,
                SessionsServicer(settings, directory, chat),
                sessions_pb2_grpc.add_SessionsServiceServicer_to_server,
            )
        ],
    )
    indexer = asyncio.create_task(memory.run(), name="memory-indexer")
    return SessionsApp(server, database, store, ingest, embed, llm, memory, indexer)
