"""Chunk vectors in the shared VectorStore (services/common/vectors.py): Qdrant Edge shards
under <data_dir>/vectors by default, a Qdrant server when QDRANT_URL is set.

One collection per embedding model and dimension, so vectors never mix; a document's row
names the collection its vectors went to. A point's id is its chunk's id and its payload
what a search filters on (indexed). The chunk rows keep their vectors too, so the store
can be checked, repaired or rebuilt without embedding again (services/ingest/repair.py).
"""

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from services.common.vectors import (
    Condition,
    Match,
    Prefix,
    VectorPoint,
    VectorStore,
    where,
)
from services.ingest.search_index import Filter

COLLECTIONS = Prefix("chunks_")
INDEXED_FIELDS = ("tenant", "document_id", "tags", "mime_type")


@dataclass(frozen=True)
class Point:
    id: str
    vector: Sequence[float] | np.ndarray
    document_id: str
    chunk_index: int
    tenant: str
    tags: Sequence[str]
    mime_type: str

    def to_vector_point(self) -> VectorPoint:
        payload = {
            "document_id": self.document_id,
            "chunk_index": self.chunk_index,
            "tenant": self.tenant,
            "tags": list(self.tags),
            "mime_type": self.mime_type,
        }
        return VectorPoint(self.id, self.vector, payload)


def collection_name(model: str, dimension: int) -> str:
    """One collection per embedding model and dimension, so vectors never mix."""
    slug = re.sub(r"[^a-z0-9]+", "-", model.rsplit("/", 1)[-1].lower()).strip("-")
    return f"chunks_{slug or 'model'}_{dimension}"


def conditions(search_filter: Filter) -> list[Condition]:
    """A search filter as store conditions: the tenant, any of the documents and of the
    types, every one of the tags."""
    found: list[Condition] = [Match("tenant", search_filter.tenant)]
    if search_filter.document_ids:
        found.append(Match("document_id", search_filter.document_ids))
    found.extend(Match("tags", tag) for tag in search_filter.tags)
    if search_filter.mime_types:
        found.append(Match("mime_type", search_filter.mime_types))
    return found


class ChunkVectors:
    """Ingest's view of the store: chunk points written, searched and removed by document."""

    def __init__(self, store: VectorStore) -> None:
        self.store = store

    async def close(self) -> None:
        await self.store.close()

    async def ensure_collection(self, name: str, dimension: int) -> None:
        await self.store.ensure_collection(name, dimension, INDEXED_FIELDS)

    async def upsert(self, collection: str, points: Sequence[Point]) -> None:
        await self.store.upsert(collection, [point.to_vector_point() for point in points])

    async def delete_document(self, document_id: str) -> None:
        """Removes the document's points from every chunk collection (models may change)."""
        await self.store.delete(COLLECTIONS, where(document_id=document_id))

    async def count_document(self, document_id: str) -> int:
        return await self.store.count(COLLECTIONS, where(document_id=document_id))

    async def search(
        self, collection: str, vector: np.ndarray, search_filter: Filter, limit: int
    ) -> list[tuple[str, float]]:
        """(chunk id, cosine similarity), best first; a missing collection finds nothing."""
        return await self.store.search(collection, vector, conditions(search_filter), limit)
