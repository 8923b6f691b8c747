"""Search over a tenant's chunks: keyword (BM25), semantic (embeddings) and hybrid.

Hybrid fuses the channels by a weighted sum of scores divided by each channel's top score
("ratio"), which beat the better single channel on both our evaluation sets, where
min-max ("convex") and reciprocal rank fusion ("rrf") each lost on one (docs/decisions.md,
Search).

Keyword candidates come from the in-process SearchIndex, semantic ones from the vector
store; every hit is then read back from SQL, so only chunks of READY documents in the
caller's tenant are ever returned.
"""

import asyncio
import logging
from dataclasses import dataclass, field

import numpy as np
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.common.errors import InvalidArgument
from services.ingest import storage
from services.ingest.embed_client import EmbedClient
from services.ingest.index import ChunkVectors, Point, collection_name
from services.ingest.search_index import Filter, IndexedChunk, SearchIndex
from services.ingest.storage import ChunkRow

_LOGGER = logging.getLogger(__name__)

KEYWORD, SEMANTIC, HYBRID = "keyword", "semantic", "hybrid"
MAX_QUERY_CHARS = 4096
MAX_TOP_K = 100
# Each channel contributes this many candidates per hit asked for, so fusion and the
# READY check have room to work with.
_CANDIDATES_PER_HIT = 3
_MIN_CANDIDATES = 50


@dataclass
class Query:
    text: str
    mode: str = HYBRID
    top_k: int = 10
    where: Filter = field(default_factory=lambda: Filter(tenant="default"))
    min_score: float = 0.0
    include_neighbors: bool = False


@dataclass
class Hit:
    chunk: ChunkRow
    filename: str
    score: float
    keyword: tuple[float, int] | None  # (score, 1-based rank)
    semantic: tuple[float, int] | None
    matched_terms: list[str]
    previous: ChunkRow | None = None
    next: ChunkRow | None = None


def check_query(text: str, top_k: int) -> None:
    if not text.strip():
        raise InvalidArgument("query must not be empty", field="query")
    if len(text) > MAX_QUERY_CHARS:
        raise InvalidArgument(
            f"query is {len(text)} characters; the limit is {MAX_QUERY_CHARS}", field="query"
        )
    if not 1 <= top_k <= MAX_TOP_K:
        raise InvalidArgument(f"top_k must be 1-{MAX_TOP_K}, got {top_k}", field="top_k")


def top_ratio_fusion(
    keyword: list[tuple[str, float]], semantic: list[tuple[str, float]], semantic_weight: float
) -> dict[str, float]:
    """weight * semantic + (1 - weight) * keyword, each score divided by its channel's top
    score; a chunk one channel did not return counts as that channel's lowest ratio.

    Dividing by the top (not min-max) keeps each channel's own contrast for this query: a
    BM25 list whose first hit matches a rare identifier stays steep and decides the order,
    a cosine list whose hits are all alike stays flat and only reorders them.
    """
    channels = []
    for weight, run in ((1.0 - semantic_weight, keyword), (semantic_weight, semantic)):
        if not run:
            continue
        top = max(score for _, score in run)
        ratios = {key: max(score, 0.0) / top if top > 0 else 1.0 for key, score in run}
        channels.append((weight, ratios, min(ratios.values())))
    keys = set().union(*(ratios for _, ratios, _ in channels))
    return {
        key: sum(weight * ratios.get(key, floor) for weight, ratios, floor in channels)
        for key in keys
    }


def convex_fusion(
    keyword: list[tuple[str, float]], semantic: list[tuple[str, float]], semantic_weight: float
) -> dict[str, float]:
    """weight * semantic + (1 - weight) * keyword, each min-max normalised over its own
    candidates (a chunk one channel did not return counts as that channel's minimum)."""
    fused: dict[str, float] = {}
    for weight, run in ((1.0 - semantic_weight, keyword), (semantic_weight, semantic)):
        if not run:
            continue
        scores = [score for _, score in run]
        low, high = min(scores), max(scores)
        for key, score in run:
            normalised = (score - low) / (high - low) if high > low else 1.0
            fused[key] = fused.get(key, 0.0) + weight * normalised
    return fused


def reciprocal_rank_fusion(rankings: list[list[str]], k: int) -> dict[str, float]:
    """score(d) = sum over rankings of 1 / (k + rank of d); ranks start at 1."""
    fused: dict[str, float] = {}
    for ranking in rankings:
        for rank, key in enumerate(ranking, start=1):
            fused[key] = fused.get(key, 0.0) + 1.0 / (k + rank)
    return fused


async def _nothing() -> list[tuple[str, float]]:
    return []


class Retrieval:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        search_index: SearchIndex,
        vectors: ChunkVectors,
        embed: EmbedClient,
        *,
        fusion: str = "ratio",
        semantic_weight: float = 0.7,
        rrf_k: int = 60,
        catch_up_vectors: bool = False,
    ) -> None:
        """catch_up_vectors: the vector store is this replica's own (an Edge shard beside
        other replicas'), so documents other replicas made READY or removed are written
        to it or removed from it too, from the vectors their chunk rows keep."""
        self._sessions = sessions
        self._index = search_index
        self._vectors = vectors
        self._embed = embed
        self._fusion = fusion
        self._semantic_weight = semantic_weight
        self._rrf_k = rrf_k
        self._catch_up = catch_up_vectors

    async def load(self, document_ids: list[str] | None = None) -> int:
        """Indexes READY documents' chunks from SQL (all, or these) for keyword search, and
        with catch_up_vectors (only these) writes their vectors; returns the chunk count."""
        with_vectors = self._catch_up and document_ids is not None
        loaded = 0
        batch: list[tuple[ChunkRow, str, list[str], str]] = []
        async with self._sessions() as session:
            result = await storage.ready_chunks(session, document_ids, vectors=with_vectors)
            async for row in result:
                batch.append(tuple(row))
                if len(batch) >= 2000:
                    loaded += await self._add(batch, with_vectors)
                    batch = []
        if batch:
            loaded += await self._add(batch, with_vectors)
        return loaded

    async def _add(self, rows: list[tuple[ChunkRow, str, list[str], str]], vectors: bool) -> int:
        if vectors:
            await self._write_vectors(rows)
        chunks = [
            IndexedChunk(c.id, c.document_id, c.tenant, mime_type, tuple(tags), c.text)
            for c, mime_type, tags, _ in rows
        ]
        # Analysis (tokenizing, stemming) is CPU work: keep it off the event loop.
        await asyncio.to_thread(self._index.add, chunks)
        return len(chunks)

    async def _write_vectors(self, rows: list[tuple[ChunkRow, str, list[str], str]]) -> None:
        """Writes the vectors the chunk rows keep to their documents' collections."""
        by_collection: dict[str, list[Point]] = {}
        for chunk, mime_type, tags, collection in rows:
            if collection and chunk.vector is not None:
                vector = np.frombuffer(chunk.vector, np.float32)
                by_collection.setdefault(collection, []).append(
                    Point(
                        chunk.id,
                        vector,
                        chunk.document_id,
                        chunk.index,
                        chunk.tenant,
                        tags,
                        mime_type,
                    )
                )
        for collection, points in by_collection.items():
            await self._vectors.ensure_collection(collection, len(points[0].vector))
            await self._vectors.upsert(collection, points)

    async def add_chunks(
        self, document_id: str, chunks: list[ChunkRow], mime_type: str, tags
    ) -> None:
        """Indexes a document's chunks for keyword search (replacing any it had) as it
        becomes READY; its vectors are already stored."""
        self._index.remove_document(document_id)
        await self._add([(chunk, mime_type, tags, "") for chunk in chunks], vectors=False)

    def remove_document(self, document_id: str) -> None:
        self._index.remove_document(document_id)

    async def sync(self) -> None:
        """Catches up with documents other replicas made READY or deleted."""
        async with self._sessions() as session:
            statuses = await storage.document_statuses(session)
        indexed = self._index.document_ids()
        for document_id in indexed:
            # A document still being processed is indexed just before it turns READY.
            if statuses.get(document_id, storage.DELETING) in (storage.DELETING, storage.FAILED):
                self._index.remove_document(document_id)
                if self._catch_up:
                    await self._vectors.delete_document(document_id)
        ready = {d for d, status in statuses.items() if status == storage.READY}
        missing = sorted(ready - indexed)
        if missing:
            await self.load(missing)

    async def search(self, query: Query) -> list[Hit]:
        check_query(query.text, query.top_k)
        candidates = max(query.top_k * _CANDIDATES_PER_HIT, _MIN_CANDIDATES)
        # The two channels run side by side: keyword in a thread while the query is embedded.
        keyword, semantic = await asyncio.gather(
            self._keyword(query, candidates) if query.mode != SEMANTIC else _nothing(),
            self._semantic(query, candidates) if query.mode != KEYWORD else _nothing(),
        )
        keyword_ranks = {cid: (score, rank) for rank, (cid, score) in enumerate(keyword, 1)}
        semantic_ranks = {cid: (score, rank) for rank, (cid, score) in enumerate(semantic, 1)}
        if query.mode == HYBRID and self._fusion == "rrf":
            scores = reciprocal_rank_fusion(
                [[cid for cid, _ in keyword], [cid for cid, _ in semantic]], self._rrf_k
            )
        elif query.mode == HYBRID and self._fusion == "convex":
            scores = convex_fusion(keyword, semantic, self._semantic_weight)
        elif query.mode == HYBRID:
            scores = top_ratio_fusion(keyword, semantic, self._semantic_weight)
        else:
            scores = dict(keyword if query.mode == KEYWORD else semantic)
        ranked = sorted(scores, key=lambda cid: -scores[cid])
        async with self._sessions() as session:
            rows = await storage.searchable_chunks(session, query.where.tenant, ranked)
            hits = []
            for cid in ranked:
                if cid not in rows or scores[cid] < query.min_score:
                    continue
                chunk, filename = rows[cid]
                hits.append(
                    Hit(
                        chunk,
                        filename,
                        scores[cid],
                        keyword_ranks.get(cid),
                        semantic_ranks.get(cid),
                        self._index.analyzer.matched_words(query.text, chunk.text),
                    )
                )
                if len(hits) == query.top_k:
                    break
            if query.include_neighbors:
                await self._attach_neighbors(session, hits)
        return hits

    async def _keyword(self, query: Query, limit: int) -> list[tuple[str, float]]:
        return await asyncio.to_thread(self._index.keyword, query.text, query.where, limit)

    async def _semantic(self, query: Query, limit: int) -> list[tuple[str, float]]:
        model = await self._embed.model()
        vector = np.asarray((await self._embed.embed([query.text], query=True))[0], np.float32)
        collection = collection_name(model.name, model.dimension)
        return await self._vectors.search(collection, vector, query.where, limit)

    @staticmethod
    async def _attach_neighbors(session: AsyncSession, hits: list[Hit]) -> None:
        places = set()
        for hit in hits:
            places.add((hit.chunk.document_id, hit.chunk.index - 1))
            places.add((hit.chunk.document_id, hit.chunk.index + 1))
        found = await storage.chunks_at(session, places)
        for hit in hits:
            hit.previous = found.get((hit.chunk.document_id, hit.chunk.index - 1))
            hit.next = found.get((hit.chunk.document_id, hit.chunk.index + 1))
