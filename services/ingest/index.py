"""The vector index of chunks in Qdrant: a server by URL, or local on-disk mode by path."""

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from qdrant_client import AsyncQdrantClient, models

_LOGGER = logging.getLogger(__name__)

_PAYLOAD_INDEXES = {
    "document_id": models.PayloadSchemaType.KEYWORD,
    "tenant": models.PayloadSchemaType.KEYWORD,
    "tags": models.PayloadSchemaType.KEYWORD,
    "chunk_index": models.PayloadSchemaType.INTEGER,
}


@dataclass(frozen=True)
class Point:
    id: str
    vector: list[float]
    document_id: str
    chunk_index: int
    tenant: str
    tags: list[str]


def collection_name(model: str, dimension: int) -> str:
    """One collection per embedding model and dimension, so vectors never mix."""
    slug = re.sub(r"[^a-z0-9]+", "-", model.rsplit("/", 1)[-1].lower()).strip("-")
    return f"chunks_{slug or 'model'}_{dimension}"


class VectorIndex:
    def __init__(self, *, url: str = "", api_key: str = "", path: Path | None = None) -> None:
        self._server = bool(url)
        if url:
            self._client = AsyncQdrantClient(url=url, api_key=api_key or None)
        else:
            assert path is not None
            path.mkdir(parents=True, exist_ok=True)
            self._client = AsyncQdrantClient(path=str(path))
        self._ready: set[str] = set()

    async def close(self) -> None:
        await self._client.close()

    async def ensure_collection(self, name: str, dimension: int) -> None:
        if name in self._ready:
            return
        if not await self._client.collection_exists(name):
            _LOGGER.info("creating Qdrant collection %s (%d dimensions)", name, dimension)
            await self._client.create_collection(
                name,
                vectors_config=models.VectorParams(size=dimension, distance=models.Distance.COSINE),
            )
            # Local mode scans payloads and has no payload indexes to create.
            if self._server:
                for field, schema in _PAYLOAD_INDEXES.items():
                    await self._client.create_payload_index(name, field, field_schema=schema)
        self._ready.add(name)

    async def upsert(self, collection: str, points: list[Point]) -> None:
        await self._client.upsert(
            collection,
            points=[
                models.PointStruct(
                    id=point.id,
                    vector=point.vector,
                    payload={
                        "document_id": point.document_id,
                        "chunk_index": point.chunk_index,
                        "tenant": point.tenant,
                        "tags": point.tags,
                    },
                )
                for point in points
            ],
            wait=True,
        )

    async def delete_document(self, document_id: str) -> None:
        """Removes the document's points from every chunk collection (models may change)."""
        selector = models.FilterSelector(filter=_document_filter(document_id))
        for name in await self._collections():
            await self._client.delete(name, points_selector=selector, wait=True)

    async def count_document(self, document_id: str) -> int:
        total = 0
        for name in await self._collections():
            result = await self._client.count(
                name, count_filter=_document_filter(document_id), exact=True
            )
            total += result.count
        return total

    async def _collections(self) -> list[str]:
        response = await self._client.get_collections()
        return [c.name for c in response.collections if c.name.startswith("chunks_")]


def _document_filter(document_id: str) -> models.Filter:
    return models.Filter(
        must=[models.FieldCondition(key="document_id", match=models.MatchValue(value=document_id))]
    )
