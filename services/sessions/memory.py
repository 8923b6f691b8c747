"""Long-term memory: every finished exchange embedded and indexed per tenant, recalled by
meaning.

SQL is the source of truth: an exchange row is written with its answer and marked
indexed once its vector is in the store, so a restart indexes what was left. Every hit
the store returns is read back from SQL by tenant, so a deleted session's leftovers, or
another tenant's points, never answer.
"""

import asyncio
import logging
import re
from dataclasses import dataclass

from services.common.context import background
from services.common.database import Database
from services.common.errors import ServiceError
from services.common.vectors import Match, VectorPoint, VectorStore
from services.sessions import storage
from services.sessions.storage import ExchangeRow
from services.sessions.tags import Tagger
from services.sessions.upstreams import Embed

_LOGGER = logging.getLogger(__name__)

INDEXED_FIELDS = ("tenant", "session_id")
BATCH = 32
# Seconds between looks for exchanges left unindexed (another replica, a failure).
POLL_SECONDS = 5.0


@dataclass(frozen=True)
class Recalled:
    exchange: ExchangeRow
    score: float


def collection_name(model: str, dimension: int) -> str:
    """One memory collection per embedding model and dimension, so vectors never mix."""
    slug = re.sub(r"[^a-z0-9]+", "-", model.rsplit("/", 1)[-1].lower()).strip("-")
    return f"memory_{slug or 'model'}_{dimension}"


class Memory:
    def __init__(
        self,
        database: Database,
        embed: Embed,
        store: VectorStore,
        tagger: Tagger,
        *,
        min_score: float,
    ) -> None:
        self._db = database
        self._embed = embed
        self._store = store
        self._tagger = tagger
        self._min_score = min_score
        self._wake = asyncio.Event()

    async def collection(self) -> str:
        """The memory collection of the embedding model embed serves, made when missing."""
        model, dimension = await self._embed.model()
        name = collection_name(model, dimension)
        await self._store.ensure_collection(name, dimension, INDEXED_FIELDS)
        return name

    async def recall(
        self,
        tenant: str,
        text: str,
        *,
        session_id: str | None,
        top_k: int,
        min_score: float | None = None,
    ) -> list[Recalled]:
        """The tenant's exchanges closest in meaning to text (one session's when given),
        scoring at least min_score (by default the service's memory_min_score)."""
        floor = self._min_score if min_score is None else min_score
        (vector,) = await self._embed.embed([text], query=True)
        collection = await self.collection()
        where = [Match("tenant", tenant)]
        if session_id is not None:
            where.append(Match("session_id", session_id))
        found = await self._store.search(collection, vector, where, top_k * 2)
        ranked = [(pid, score) for pid, score in found if score >= floor]
        async with self._db.read() as db:
            rows = await storage.exchanges_by_id(db, tenant, [pid for pid, _ in ranked])
        recalled = [Recalled(rows[pid], score) for pid, score in ranked if pid in rows]
        return recalled[:top_k]

    async def forget_session(self, session_id: str) -> None:
        """Removes a deleted session's vectors; SQL already forgot it, so leftovers after a
        failure here never answer, and the next delete of the same id finds none."""
        collection = await self.collection()
        await self._store.delete(collection, [Match("session_id", session_id)])

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Indexes exchanges as they are stored, as the service itself, until cancelled."""
        with background():
            while True:
                try:
                    indexed = await self.index_pending()
                except ServiceError as exc:
                    _LOGGER.warning("memory indexing waits: %s", exc.message)
                    indexed = 0
                except Exception:
                    _LOGGER.exception("memory indexing failed; retrying")
                    indexed = 0
                if indexed == BATCH:
                    continue
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), POLL_SECONDS)
                except TimeoutError:
                    pass

    async def index_pending(self) -> int:
        """Embeds and indexes one batch of unindexed exchanges; returns how many."""
        async with self._db.read() as db:
            rows = await storage.unindexed_exchanges(db, BATCH)
        if not rows:
            return 0
        vectors = await self._embed.embed([row.text for row in rows], query=False)
        collection = await self.collection()
        await self._store.upsert(
            collection,
            [
                VectorPoint(
                    row.id,
                    vector,
                    {
                        "tenant": row.tenant,
                        "session_id": row.session_id,
                        "user_message_id": row.user_message_id,
                        "assistant_message_id": row.assistant_message_id,
                    },
                )
                for row, vector in zip(rows, vectors, strict=True)
            ],
        )
        async with self._db.write() as db:
            await storage.mark_indexed(db, [row.id for row in rows])
        for tenant, session_id in sorted({(row.tenant, row.session_id) for row in rows}):
            await self._tagger.update(tenant, session_id)
        return len(rows)
