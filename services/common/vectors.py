"""One vector-store interface for every service: Qdrant Edge shards on disk, or a Qdrant server.

A collection holds points (a UUID, a vector, a payload dict) compared by cosine
similarity; a filter is a conjunction of `Match` (the field holds any of these values),
`Range` and `HasId` conditions. `open_vector_store` picks the implementation:

- `QdrantServerStore` when a Qdrant URL is configured (qdrant_client.AsyncQdrantClient);
- `EdgeVectorStore` otherwise: one Qdrant Edge shard (`qdrant-edge-py`) per collection
  under the service's data folder, write-ahead log on, reopened as it was at start-up.

Qdrant Edge holds the GIL for the whole of every call (query, update, load, close, and
`optimize()`, the HNSW build, which runs for minutes at 100k points: in a thread of the
serving process it would stall every request). So a collection is optimized in a child
process, on a flushed copy of its shard: once the points outside HNSW segments reach
`optimize_threshold`, the shard is flushed and copied (writes wait, reads go on), the
child builds the copy's HNSW segments at low priority (nothing waits), and the copy is
loaded, given the writes made meanwhile, and swapped in (writes wait). Until then new
points are scanned exactly next to the HNSW segments. See bench/vector_bench.py for the
figures this rests on.

Which search a query gets: a collection below the threshold is scanned exactly; a filter
matching fewer vectors than full_scan_threshold is scored exactly over the payload index
(Qdrant's planner); one value of an indexed field walks that value's own graph
(payload_m); any other filter uses ACORN; `exact=True` forces a scan.
"""

import abc
import asyncio
import contextlib
import fcntl
import json
import logging
import math
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np
import qdrant_edge as qe

from services.common.errors import FailedPrecondition, Unavailable

_LOGGER = logging.getLogger(__name__)

T = TypeVar("T")

KEYWORD, INTEGER, FLOAT, DATETIME, BOOL = "keyword", "integer", "float", "datetime", "bool"
FIELD_KINDS = (KEYWORD, INTEGER, FLOAT, DATETIME, BOOL)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}")
_PAGE = 1000  # points per shard call: reads get a turn between batches of a large upsert


# --------------------------------------------------------------------------- errors


class VectorStoreUnavailable(Unavailable):
    """The vector store cannot be reached or used now; services answer UNAVAILABLE."""

    default_reason = "VECTOR_STORE_UNAVAILABLE"


class VectorFolderInUse(VectorStoreUnavailable):
    """Another process (or another store in this one) already owns the Edge folder."""

    default_reason = "VECTOR_FOLDER_IN_USE"


class CollectionNotFound(FailedPrecondition):
    """A write named a collection that `ensure_collection` never created."""

    default_reason = "VECTOR_COLLECTION_NOT_FOUND"


class DimensionMismatch(FailedPrecondition):
    """Vectors whose size differs from the collection's (a changed embedding model)."""

    default_reason = "VECTOR_DIMENSION_MISMATCH"


# --------------------------------------------------------------------------- types


class VectorPoint(NamedTuple):
    id: str  # a UUID; answers carry it in canonical form (lowercase, hyphenated)
    vector: Sequence[float] | np.ndarray
    payload: Mapping[str, Any]


@dataclass(frozen=True)
class Match:
    """The payload field holds one of `values` (for a list field: one of its items does).

    No values matches nothing. Several `Match`es on one field must all hold, which is how
    "has every one of these tags" is written.
    """

    field: str
    values: tuple[str | int | bool, ...]

    def __init__(self, field: str, values: str | int | bool | Iterable[str | int | bool]):
        if isinstance(values, str | int | bool):
            values = (values,)
        object.__setattr__(self, "field", field)
        object.__setattr__(self, "values", tuple(values))


@dataclass(frozen=True)
class Range:
    """The payload field lies within the bounds: numbers, or datetimes (stored ISO 8601)."""

    field: str
    gte: float | datetime | None = None
    gt: float | datetime | None = None
    lte: float | datetime | None = None
    lt: float | datetime | None = None

    @property
    def bounds(self) -> dict[str, float | datetime]:
        return {
            k: v
            for k, v in (("gte", self.gte), ("gt", self.gt), ("lte", self.lte), ("lt", self.lt))
            if v is not None
        }


@dataclass(frozen=True)
class HasId:
    """The point is one of these (UUIDs); none matches nothing."""

    ids: tuple[str, ...]

    def __init__(self, ids: str | Iterable[str]):
        object.__setattr__(
            self, "ids", tuple(map(_point_id, [ids] if isinstance(ids, str) else ids))
        )


Condition = Match | Range | HasId
Filter = Sequence[Condition]  # all conditions hold; empty means every point


@dataclass(frozen=True)
class Prefix:
    """Names every collection whose name starts with `value` (for delete and count)."""

    value: str


def where(**fields: str | int | bool | Iterable[str | int | bool]) -> tuple[Match, ...]:
    """where(tenant="acme", document_id=[a, b]) -> one Match per field."""
    return tuple(Match(name, values) for name, values in fields.items())


def _matches_nothing(conditions: Filter) -> bool:
    return any(
        (isinstance(c, Match) and not c.values) or (isinstance(c, HasId) and not c.ids)
        for c in conditions
    )


def _check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"collection name {name!r} must be 1-200 letters, digits, '_', '-' or '.', "
            "starting with a letter or digit"
        )
    return name


def _field_kinds(indexed_fields: Mapping[str, str] | Iterable[str]) -> dict[str, str]:
    kinds = (
        dict(indexed_fields)
        if isinstance(indexed_fields, Mapping)
        else dict.fromkeys(indexed_fields, KEYWORD)
    )
    for field, kind in kinds.items():
        if kind not in FIELD_KINDS:
            raise ValueError(f"field {field!r}: index kind {kind!r} is not one of {FIELD_KINDS}")
    return kinds


def _point_id(value: str) -> str:
    try:
        return str(uuid.UUID(str(value)))
    except ValueError:
        raise ValueError(f"point id {value!r} is not a UUID") from None


def _vectors(points: Sequence[VectorPoint], dimension: int, collection: str) -> np.ndarray:
    matrix = np.asarray([np.asarray(p.vector, dtype=np.float32) for p in points])
    if matrix.ndim != 2 or matrix.shape[1] != dimension:
        got = matrix.shape[-1] if matrix.ndim == 2 else "ragged"
        raise DimensionMismatch(
            f"collection {collection} holds {dimension}-dimension vectors; got {got}"
        )
    if not np.isfinite(matrix).all():
        raise ValueError("vectors must hold finite numbers only")
    return matrix


def _query_vector(vector: Sequence[float] | np.ndarray, dimension: int, collection: str):
    array = np.asarray(vector, dtype=np.float32).reshape(-1)
    if array.shape[0] != dimension:
        raise DimensionMismatch(
            f"collection {collection} holds {dimension}-dimension vectors; the query has "
            f"{array.shape[0]}"
        )
    return array


def _payload(payload: Mapping[str, Any]) -> dict[str, Any]:
    """Datetimes become ISO 8601 strings, which Qdrant's datetime ranges compare."""
    return {k: _iso(v) if isinstance(v, datetime) else v for k, v in payload.items()}


def _iso(value: datetime) -> str:
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()


# --------------------------------------------------------------------------- interface


class VectorStore(abc.ABC):
    """Collections of (UUID, vector, payload) points searched by cosine similarity.

    SQL stays the source of truth for what a point belongs to and whether it may be
    returned: callers filter by tenant here and check hits against their rows.
    """

    @abc.abstractmethod
    async def ensure_collection(
        self, name: str, dimension: int, indexed_fields: Mapping[str, str] | Iterable[str] = ()
    ) -> None:
        """Creates the collection if missing and any payload index it lacks.

        `indexed_fields` names the fields filters use: a list means keyword indexes, a
        mapping gives each field's kind (keyword, integer, float, datetime, bool). An
        existing collection of another dimension raises DimensionMismatch.
        """

    @abc.abstractmethod
    async def upsert(self, collection: str, points: Sequence[VectorPoint]) -> None:
        """Writes points (replacing any with the same id); durable when it returns."""

    @abc.abstractmethod
    async def delete(self, collection: str | Prefix, where: Filter) -> None:
        """Deletes the matching points at once; a missing collection is no error."""

    @abc.abstractmethod
    async def count(self, collection: str | Prefix, where: Filter = ()) -> int:
        """Exact count of the matching points; 0 for a missing collection."""

    @abc.abstractmethod
    async def search(
        self,
        collection: str,
        vector: Sequence[float] | np.ndarray,
        where: Filter = (),
        limit: int = 10,
        *,
        exact: bool | None = None,
    ) -> list[tuple[str, float]]:
        """The `limit` nearest matching points as (id, cosine similarity), best first.

        `exact` scans every matching point instead of walking the HNSW graph (default:
        the store's setting). A missing collection searches as empty.
        """

    @abc.abstractmethod
    def ids(self, collection: str, where: Filter = ()) -> AsyncIterator[str]:
        """Every matching point id, page by page (for a check against SQL)."""

    @abc.abstractmethod
    async def collections(self, prefix: str = "") -> list[str]:
        """Names of the collections starting with `prefix`, sorted."""

    @abc.abstractmethod
    async def drop_collection(self, name: str) -> None:
        """Removes a collection and all its points; a missing one is no error."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Releases the store; pending writes are durable."""

    async def _targets(self, collection: str | Prefix) -> list[str]:
        if isinstance(collection, Prefix):
            return await self.collections(collection.value)
        return [collection]


async def open_vector_store(
    qdrant_url: str = "",
    qdrant_api_key: str = "",
    folder: str | os.PathLike[str] | None = None,
    *,
    exact: bool = False,
    hnsw_ef: int | None = 128,
    request_timeout: float = 10.0,
    **edge_options: Any,
) -> VectorStore:
    """A Qdrant server store when `qdrant_url` is set, else Edge shards under `folder`."""
    if qdrant_url:
        return QdrantServerStore(
            qdrant_url, qdrant_api_key, exact=exact, hnsw_ef=hnsw_ef, timeout=request_timeout
        )
    if folder is None:
        raise ValueError("the embedded vector store needs a folder (the service's data folder)")
    return await EdgeVectorStore.open(folder, exact=exact, hnsw_ef=hnsw_ef, **edge_options)


# --------------------------------------------------------------------------- Qdrant Edge

_META = "collection.json"
_LOCK = "LOCK"
_SHARD = "shard-{:06d}"
_IMPORT_ROOT = str(Path(__file__).resolve().parents[2])  # where `services` imports from


@dataclass(frozen=True)
class OptimizationRun:
    started: float  # time.monotonic()
    changed: bool
    copy_seconds: float  # flush and copy of the shard; writes wait, reads go on
    build_seconds: float  # the child process; nothing waits
    swap_seconds: float  # load the copy, replay the writes made meanwhile; writes wait
    replayed_writes: int

    def __str__(self) -> str:
        return (
            f"copy {self.copy_seconds:.1f} s, build {self.build_seconds:.1f} s, swap "
            f"{self.swap_seconds:.1f} s ({self.replayed_writes} writes replayed)"
        )


@dataclass(frozen=True)
class CollectionStatus:
    points: int
    indexed_points: int  # in HNSW segments; the rest are scanned exactly
    segments: int
    optimizing: bool
    last_optimization: OptimizationRun | None


class _EdgeCollection:
    """A shard and the state around it. Every call on the shard runs on the collection's
    own thread, one at a time: Edge holds the GIL for each call anyway (two threads add
    no throughput), and a shard replaced by an optimized one is closed only between calls.
    """

    def __init__(self, path: Path, dimension: int, fields: dict[str, str], generation: int):
        self.path = path
        self.name = path.name
        self.dimension = dimension
        self.fields = fields
        self.generation = generation
        self.shard: Any = None
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"edge-{self.name}"[:15])
        self.write_lock = asyncio.Lock()
        # While an optimization runs, every write applied to the live shard, to replay
        # into the optimized copy.
        self.pending: list[Any] | None = None
        self.task: asyncio.Task | None = None
        self.retry_at = 0.0  # monotonic time before which no automatic optimization starts
        self.last_run: OptimizationRun | None = None

    @property
    def shard_path(self) -> Path:
        return self.path / _SHARD.format(self.generation)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def write_meta(self, generation: int | None = None) -> None:
        meta = {
            "dimension": self.dimension,
            "fields": self.fields,
            "generation": generation or self.generation,
        }
        _write_atomically(self.path / _META, json.dumps(meta, indent=2))


@dataclass(frozen=True)
class EdgeOptions:
    """How EdgeVectorStore builds and searches its shards."""

    exact: bool = False  # always scan exactly (no HNSW at query time)
    hnsw_ef: int | None = 128  # HNSW candidates per query; None: Qdrant's (ef_construct)
    # Once this many points are outside HNSW segments, an optimization starts in the
    # background; 0 turns that off (optimize() still runs one). Collections below it stay
    # exact: a plain scan of 20k points costs about what an HNSW search does.
    optimize_threshold: int = 20_000
    hnsw_m: int = 16
    ef_construct: int = 100
    # Links per value of each indexed keyword field with enough points (tenants): keeps
    # filtered HNSW recall high (0.23 without them, 1.00 with, tenant filter at 100k).
    payload_m: int | None = None  # None: hnsw_m
    # A filter matching fewer vectors than this is scored exactly over the payload index.
    full_scan_threshold_kb: int = 10_000
    # "cold" maps vectors, graphs and payload indexes from disk and reads them on first
    # use, so opening a shard (at start-up, and when an optimized copy is swapped in, both
    # holding the GIL) is quick; "default" keeps Qdrant's placement, read at open.
    memory: str = "cold"
    retry_seconds: float = 600.0  # wait after a failed or fruitless optimization

    def __post_init__(self) -> None:
        if self.memory not in ("cold", "default"):
            raise ValueError(f"memory must be 'cold' or 'default', not {self.memory!r}")


class EdgeVectorStore(VectorStore):
    """Qdrant Edge shards under `folder`, one per collection, owned by this process.

    Open with `await EdgeVectorStore.open(folder, **options)` (see EdgeOptions).
    """

    def __init__(self, folder: Path, lock_file: Any, options: EdgeOptions) -> None:
        self._folder = folder
        self._lock_file = lock_file
        self._options = options
        self._memory = qe.Memory.Cold if options.memory == "cold" else None
        self._collections: dict[str, _EdgeCollection] = {}
        self._guard = asyncio.Lock()
        self._closed = False
        self._followup: asyncio.Future | None = None

    @classmethod
    async def open(cls, folder: str | os.PathLike[str], **options: Any) -> "EdgeVectorStore":
        """Takes ownership of `folder` (VectorFolderInUse if another holds it) and loads
        every collection in it; starts the optimizations start-up finds due."""
        settings = EdgeOptions(**options)
        path = Path(folder)
        lock_file = await asyncio.to_thread(_lock_folder, path)
        store = cls(path, lock_file, settings)
        try:
            for child in await asyncio.to_thread(_collection_folders, path):
                collection = await asyncio.to_thread(store._load, child)
                store._collections[collection.name] = collection
                await store._maybe_optimize(collection)
        except BaseException:
            await store.close()
            raise
        return store

    # ---- lifecycle

    def _load(self, path: Path) -> _EdgeCollection:
        meta = json.loads((path / _META).read_text())
        collection = _EdgeCollection(path, meta["dimension"], meta["fields"], meta["generation"])
        # What an interrupted optimization left behind.
        for stray in path.glob("shard-*"):
            if stray != collection.shard_path:
                shutil.rmtree(stray, ignore_errors=True)
        if not collection.shard_path.is_dir():
            raise RuntimeError(f"vector collection {path} names a missing shard folder")
        collection.shard = collection.executor.submit(
            _edge_call, qe.EdgeShard.load, str(collection.shard_path)
        ).result()
        return collection

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._followup is not None:
            self._followup.cancel()
        for collection in self._collections.values():
            await self._stop(collection)
        self._collections.clear()
        if self._lock_file is not None:
            self._lock_file.close()  # releases the flock
            self._lock_file = None

    async def _stop(self, collection: _EdgeCollection) -> None:
        if collection.task is not None:
            collection.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await collection.task
        if collection.shard is not None:
            shard, collection.shard = collection.shard, None
            await collection.run(_close_shard, shard)
        collection.executor.shutdown(wait=True)

    def _get(self, name: str) -> _EdgeCollection | None:
        if self._closed:
            raise VectorStoreUnavailable("the vector store is closed")
        return self._collections.get(name)

    def _require(self, name: str) -> _EdgeCollection:
        collection = self._get(name)
        if collection is None:
            raise CollectionNotFound(f"vector collection {name} does not exist")
        return collection

    # ---- interface

    async def ensure_collection(self, name, dimension, indexed_fields=()):
        _check_name(name)
        kinds = _field_kinds(indexed_fields)
        async with self._guard:
            collection = self._get(name)
            if collection is None:
                collection = _EdgeCollection(self._folder / name, dimension, {}, 1)
                config = self._config(dimension)
                collection.shard = await collection.run(
                    _create_shard, collection.shard_path, config
                )
                await collection.run(collection.write_meta)
                self._collections[name] = collection
        if collection.dimension != dimension:
            raise DimensionMismatch(
                f"collection {name} holds {collection.dimension}-dimension vectors, not {dimension}"
            )
        missing = {f: k for f, k in kinds.items() if collection.fields.get(f) != k}
        if missing:
            async with collection.write_lock:
                for field, kind in missing.items():
                    schema = _edge_schema(kind, self._memory)
                    op = qe.UpdateOperation.create_field_index(field, schema)
                    await self._apply(collection, [op])
                    collection.fields[field] = kind
                await collection.run(collection.write_meta)

    async def upsert(self, collection, points):
        target = self._require(collection)
        if not points:
            return
        matrix = _vectors(points, target.dimension, collection)
        ops = [
            qe.UpdateOperation.upsert_points(
                [
                    qe.Point(_point_id(p.id), matrix[first + i], _payload(p.payload))
                    for i, p in enumerate(points[first : first + _PAGE])
                ]
            )
            for first in range(0, len(points), _PAGE)
        ]
        async with target.write_lock:
            await self._apply(target, ops)
        await self._maybe_optimize(target)

    async def delete(self, collection, where):
        if not where:
            raise ValueError("delete needs a filter; drop_collection removes everything")
        if _matches_nothing(where):
            return
        op = qe.UpdateOperation.delete_points_by_filter(_edge_filter(where))
        for name in await self._targets(collection):
            target = self._get(name)
            if target is not None:
                async with target.write_lock:
                    await self._apply(target, [op])

    async def count(self, collection, where=()):
        if _matches_nothing(where):
            return 0
        request = qe.CountRequest(exact=True, filter=_edge_filter(where) if where else None)
        total = 0
        for name in await self._targets(collection):
            target = self._get(name)
            if target is not None:
                total += await target.run(lambda t=target: _edge_call(t.shard.count, request))
        return total

    async def search(self, collection, vector, where=(), limit=10, *, exact=None):
        target = self._get(collection)
        if target is None or _matches_nothing(where) or limit < 1:
            return []
        query = _query_vector(vector, target.dimension, collection)
        request = qe.QueryRequest(
            limit=limit,
            query=qe.Query.Nearest(query.tolist()),
            filter=_edge_filter(where) if where else None,
            params=qe.SearchParams(
                exact=self._options.exact if exact is None else exact,
                hnsw_ef=self._options.hnsw_ef,
                acorn=None if _graph_covers(where, target.fields) else _ACORN,
            ),
            with_payload=False,
            with_vector=False,
        )
        points = await target.run(lambda: _edge_call(target.shard.query, request))
        return [(str(p.id), p.score) for p in points]

    async def ids(self, collection, where=()):
        target = self._get(collection)
        if target is None or _matches_nothing(where):
            return
        edge_filter = _edge_filter(where) if where else None
        offset = None
        while True:
            request = qe.ScrollRequest(
                offset=offset,
                limit=_PAGE,
                filter=edge_filter,
                with_payload=False,
                with_vector=False,
            )
            records, offset = await target.run(lambda r=request: _edge_call(target.shard.scroll, r))
            for record in records:
                yield str(record.id)
            if offset is None:
                return

    async def collections(self, prefix=""):
        if self._closed:
            raise VectorStoreUnavailable("the vector store is closed")
        return sorted(name for name in self._collections if name.startswith(prefix))

    async def drop_collection(self, name):
        async with self._guard:
            collection = self._get(name)
            if collection is None:
                return
            del self._collections[name]
            await self._stop(collection)
            await asyncio.to_thread(shutil.rmtree, collection.path, ignore_errors=True)

    # ---- Edge only

    async def status(self, name: str) -> CollectionStatus:
        collection = self._require(name)
        info = await collection.run(lambda: _edge_call(collection.shard.info))
        return CollectionStatus(
            points=info.points_count,
            indexed_points=info.indexed_vectors_count,
            segments=info.segments_count,
            optimizing=collection.task is not None and not collection.task.done(),
            last_optimization=collection.last_run,
        )

    async def optimize(self, name: str) -> bool:
        """Optimizes now (in a child process, as in the background) and waits for it.
        Returns whether anything changed."""
        collection = self._require(name)
        if collection.task is not None and not collection.task.done():
            await asyncio.shield(collection.task)
        collection.task = asyncio.create_task(self._optimize(collection))
        return await asyncio.shield(collection.task)

    # ---- internals

    def _config(self, dimension: int):
        options = self._options
        # We decide when to optimize (optimize_threshold); once it runs, Qdrant should index
        # every segment, not only those past its own indexing_threshold (10 MB by default).
        return qe.EdgeConfig(
            vectors=qe.EdgeVectorParams(
                size=dimension, distance=qe.Distance.Cosine, memory=self._memory
            ),
            hnsw_config=qe.HnswIndexConfig(
                m=options.hnsw_m,
                ef_construct=options.ef_construct,
                full_scan_threshold=options.full_scan_threshold_kb,
                payload_m=options.hnsw_m if options.payload_m is None else options.payload_m,
                memory=self._memory,
            ),
            optimizers=qe.EdgeOptimizersConfig(indexing_threshold=1),
            payload_memory=self._memory,
            wal_enabled=True,
        )

    async def _apply(self, collection: _EdgeCollection, ops: list[Any]) -> None:
        """Applies writes to the live shard (the caller holds the write lock)."""
        for op in ops:
            await collection.run(lambda o=op: _edge_call(collection.shard.update, o))
            if collection.pending is not None:
                collection.pending.append(op)

    async def _maybe_optimize(self, collection: _EdgeCollection) -> None:
        if self._closed or not self._options.optimize_threshold:
            return
        if collection.task is not None and not collection.task.done():
            return
        if time.monotonic() < collection.retry_at:
            return
        info = await collection.run(lambda: _edge_call(collection.shard.info))
        unindexed = info.points_count - info.indexed_vectors_count
        if unindexed >= self._options.optimize_threshold:
            _LOGGER.info(
                "optimizing vector collection %s in the background (%d points not indexed)",
                collection.name,
                unindexed,
            )
            collection.task = asyncio.create_task(self._optimize(collection))
            collection.task.add_done_callback(lambda task: self._after_background(collection, task))

    def _after_background(self, collection: _EdgeCollection, task: asyncio.Task) -> None:
        if task.cancelled():
            return
        if task.exception() is not None:
            _LOGGER.error("background vector optimization failed", exc_info=task.exception())
        elif not self._closed and self._collections.get(collection.name) is collection:
            # The writes replayed into the new shard may already call for another run.
            self._followup = asyncio.ensure_future(self._maybe_optimize(collection))

    async def _optimize(self, collection: _EdgeCollection) -> bool:
        started = time.monotonic()
        generation = collection.generation + 1
        target = collection.path / _SHARD.format(generation)
        committing = False
        try:
            # Writes wait while the shard is flushed and copied; reads go on.
            async with collection.write_lock:
                await collection.run(lambda: _edge_call(collection.shard.flush))
                await _uninterrupted(shutil.copytree, collection.shard_path, target)
                collection.pending = []
            copied = time.monotonic()
            changed = await _optimize_in_child(target)
            built = time.monotonic()
            async with collection.write_lock:
                shard = await _uninterrupted(
                    _edge_call, qe.EdgeShard.load, str(target), cleanup=_close_shard
                )
                try:
                    replayed = len(collection.pending)
                    for op in collection.pending:
                        await asyncio.to_thread(_edge_call, shard.update, op)
                    await asyncio.to_thread(_edge_call, shard.flush)
                except BaseException:
                    await asyncio.to_thread(_close_shard, shard)
                    raise
                # collection.json naming the new shard is the commit point: from here on
                # the copy is the collection, even if this task is cancelled.
                committing = True
                commit = asyncio.ensure_future(self._commit(collection, shard, generation))
                try:
                    old = await asyncio.shield(commit)
                except asyncio.CancelledError:
                    await commit
                    raise
            await asyncio.to_thread(shutil.rmtree, old, ignore_errors=True)
            info = await collection.run(lambda: _edge_call(collection.shard.info))
            collection.last_run = OptimizationRun(
                started=started,
                changed=changed,
                copy_seconds=copied - started,
                build_seconds=built - copied,
                swap_seconds=time.monotonic() - built,
                replayed_writes=replayed,
            )
            _LOGGER.info(
                "optimized vector collection %s: %s; %d of %d points indexed",
                collection.name,
                collection.last_run,
                info.indexed_vectors_count,
                info.points_count,
            )
            if not changed:  # nothing Qdrant could index: do not retry at once
                collection.retry_at = time.monotonic() + self._options.retry_seconds
            return changed
        except BaseException:
            collection.retry_at = time.monotonic() + self._options.retry_seconds
            raise
        finally:
            collection.pending = None
            if not committing:
                await asyncio.shield(asyncio.to_thread(shutil.rmtree, target, True))

    async def _commit(self, collection: _EdgeCollection, shard: Any, generation: int) -> Path:
        old = collection.shard_path
        await asyncio.to_thread(collection.write_meta, generation)
        collection.generation = generation
        await collection.run(_swap, collection, shard)
        collection.pending = None
        return old


async def _uninterrupted(fn: Callable[..., T], *args: Any, cleanup: Callable | None = None) -> T:
    """Runs fn in a thread. A cancellation first waits for it to end (a thread cannot be
    stopped: cleaning up around a copy still being written would leave debris), hands
    what it made to `cleanup`, then propagates."""
    future = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            result = await future
            if cleanup is not None:
                await asyncio.to_thread(cleanup, result)
        raise


def _swap(collection: _EdgeCollection, shard: Any) -> None:
    old, collection.shard = collection.shard, shard
    _close_shard(old)


def _close_shard(shard: Any) -> None:
    shard.flush()
    shard.close()


def _create_shard(path: Path, config: Any) -> Any:
    if path.exists():  # left by a creation that never wrote its collection.json
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return _edge_call(qe.EdgeShard.create, str(path), config)


def _edge_call(fn: Callable[..., T], *args: Any) -> T:
    """Edge raises plain Exceptions; the one a second opener of a shard meets is named."""
    try:
        return fn(*args)
    except Exception as exc:
        if "WouldBlock" in str(exc) and "WAL" in str(exc):
            raise VectorFolderInUse(
                f"the vector shard is already open in another process: {exc}"
            ) from exc
        raise


def _collection_folders(path: Path) -> list[Path]:
    return sorted(child for child in path.iterdir() if (child / _META).is_file())


def _lock_folder(path: Path):
    path.mkdir(parents=True, exist_ok=True)
    lock_file = open(path / _LOCK, "a+")  # held, and locked, for the store's lifetime
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.seek(0)
        owner = lock_file.read().strip() or "unknown"
        lock_file.close()
        raise VectorFolderInUse(
            f"vector folder {path} is in use by another store (process {owner}); "
            "a folder is owned by one process: stop it or give this one its own data folder"
        ) from None
    lock_file.truncate(0)
    lock_file.write(str(os.getpid()))
    lock_file.flush()
    return lock_file


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_suffix(".tmp")
    with open(temporary, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


async def _optimize_in_child(path: Path) -> bool:
    """Builds the HNSW segments of the shard at `path` in a child process at low priority,
    so the serving process keeps its GIL and the CPU goes to requests first."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_IMPORT_ROOT, env.get("PYTHONPATH")]))
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.common.vectors",
        "optimize",
        str(path),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await process.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await asyncio.shield(process.wait())
        raise
    if process.returncode != 0:
        raise RuntimeError(
            f"optimizing {path} failed (exit {process.returncode}): "
            f"{err.decode(errors='replace').strip()[-2000:]}"
        )
    return out.decode().strip() == "changed"


def _optimize_main(path: str) -> None:
    with contextlib.suppress(OSError):
        os.nice(10)
    shard = qe.EdgeShard.load(path)
    changed = shard.optimize()
    shard.flush()
    shard.close()
    print("changed" if changed else "unchanged")


# A filter the HNSW graphs do not cover is searched with ACORN (which also looks at the
# neighbours' neighbours); plain HNSW search under it lost recall (0.93, worst query 0.4,
# tenant and tag at 50k), while ACORN matched exact search on every query.
_ACORN = qe.AcornSearchParams(enable=True)


def _graph_covers(conditions: Filter, fields: Mapping[str, str] | None) -> bool:
    """Whether HNSW alone searches this filter well: no filter (the main graph), or one
    value of one indexed field (any field when `fields` is None), which has a graph of its
    own (payload_m) when it has more points than full_scan_threshold, and is scanned
    exactly when it has fewer."""
    if not conditions:
        return True
    if len(conditions) > 1:
        return False
    (condition,) = conditions
    one_value = isinstance(condition, Match) and len(condition.values) == 1
    return one_value and (fields is None or condition.field in fields)


def _edge_schema(kind: str, memory: Any):
    if memory is None:
        return {
            KEYWORD: qe.PayloadSchemaType.Keyword,
            INTEGER: qe.PayloadSchemaType.Integer,
            FLOAT: qe.PayloadSchemaType.Float,
            DATETIME: qe.PayloadSchemaType.Datetime,
            BOOL: qe.PayloadSchemaType.Bool,
        }[kind]
    if kind == INTEGER:
        return qe.IntegerIndexParams(lookup=True, range=True, memory=memory)
    return {
        KEYWORD: qe.KeywordIndexParams,
        FLOAT: qe.FloatIndexParams,
        DATETIME: qe.DatetimeIndexParams,
        BOOL: qe.BoolIndexParams,
    }[kind](memory=memory)


def _edge_filter(conditions: Filter):
    must: list[Any] = []
    for condition in conditions:
        if isinstance(condition, Match):
            values = list(condition.values)
            if len(values) == 1 or any(isinstance(v, bool) for v in values):
                options = [
                    qe.FieldCondition(condition.field, match=qe.MatchValue(v)) for v in values
                ]
                must.append(options[0] if len(options) == 1 else qe.Filter(should=options))
            else:
                must.append(qe.FieldCondition(condition.field, match=qe.MatchAny(values)))
        elif isinstance(condition, HasId):
            must.append(qe.HasIdCondition({uuid.UUID(i) for i in condition.ids}))
        else:
            bounds = condition.bounds
            if any(isinstance(v, datetime) for v in bounds.values()):
                edge_range: Any = qe.RangeDateTime(
                    **{k: _iso(v) if isinstance(v, datetime) else v for k, v in bounds.items()}
                )
            else:
                edge_range = qe.RangeFloat(**{k: float(v) for k, v in bounds.items()})
            must.append(qe.FieldCondition(condition.field, range=edge_range))
    return qe.Filter(must=must)


# --------------------------------------------------------------------------- Qdrant server


class QdrantServerStore(VectorStore):
    """Collections on a Qdrant server; `client` lets tests pass qdrant-client's local mode."""

    def __init__(
        self,
        url: str = "",
        api_key: str = "",
        *,
        exact: bool = False,
        hnsw_ef: int | None = 128,
        timeout: float = 10.0,
        client: Any = None,
    ) -> None:
        from qdrant_client import AsyncQdrantClient

        self._where = url or "local mode"
        # No version check: it is a blocking request made inside the constructor.
        self._client = client or AsyncQdrantClient(
            url=url,
            api_key=api_key or None,
            timeout=math.ceil(timeout),
            check_compatibility=False,
        )
        self._exact = exact
        self._hnsw_ef = hnsw_ef
        self._dimensions: dict[str, int] = {}

    async def close(self) -> None:
        await self._client.close()

    async def _call(self, make: Callable[[], Awaitable[T]], *, missing_ok: bool = False) -> Any:
        """Runs a client call. An outage raises VectorStoreUnavailable; a missing
        collection answers None with `missing_ok`, else raises CollectionNotFound."""
        try:
            return await make()
        except Exception as exc:
            if _is_missing(exc):
                if not missing_ok:
                    raise CollectionNotFound(f"vector collection does not exist: {exc}") from exc
                return None
            if _is_outage(exc):
                raise VectorStoreUnavailable(
                    f"Qdrant at {self._where} is unavailable: {_describe(exc)}"
                ) from exc
            raise

    async def ensure_collection(self, name, dimension, indexed_fields=()):
        from qdrant_client import models

        _check_name(name)
        kinds = _field_kinds(indexed_fields)
        exists = await self._call(lambda: self._client.collection_exists(name))
        if not exists:
            _LOGGER.info("creating Qdrant collection %s (%d dimensions)", name, dimension)
            try:
                await self._call(
                    lambda: self._client.create_collection(
                        name,
                        vectors_config=models.VectorParams(
                            size=dimension, distance=models.Distance.COSINE
                        ),
                    )
                )
            except Exception as exc:  # another replica created it first
                if "already exists" not in str(exc):
                    raise
        info = await self._call(lambda: self._client.get_collection(name))
        size = info.config.params.vectors.size
        if size != dimension:
            raise DimensionMismatch(
                f"collection {name} holds {size}-dimension vectors, not {dimension}"
            )
        have = info.payload_schema or {}
        for field, kind in kinds.items():
            if field not in have:
                await self._call(
                    lambda f=field, k=kind: self._client.create_payload_index(
                        name, f, field_schema=_server_schema(k), wait=True
                    )
                )
        self._dimensions[name] = dimension

    async def _dimension(self, name: str) -> int | None:
        if name not in self._dimensions:
            info = await self._call(lambda: self._client.get_collection(name), missing_ok=True)
            if info is None:
                return None
            self._dimensions[name] = info.config.params.vectors.size
        return self._dimensions[name]

    async def upsert(self, collection, points):
        from qdrant_client import models

        if not points:
            return
        dimension = await self._dimension(collection)
        if dimension is None:
            raise CollectionNotFound(f"vector collection {collection} does not exist")
        matrix = _vectors(points, dimension, collection)
        for first in range(0, len(points), _PAGE):
            batch = [
                models.PointStruct(
                    id=_point_id(p.id),
                    vector=matrix[first + i].tolist(),
                    payload=_payload(p.payload),
                )
                for i, p in enumerate(points[first : first + _PAGE])
            ]
            await self._call(lambda b=batch: self._client.upsert(collection, points=b, wait=True))

    async def delete(self, collection, where):
        from qdrant_client import models

        if not where:
            raise ValueError("delete needs a filter; drop_collection removes everything")
        if _matches_nothing(where):
            return
        selector = models.FilterSelector(filter=_server_filter(where))
        for name in await self._targets(collection):
            await self._call(
                lambda n=name: self._client.delete(n, points_selector=selector, wait=True),
                missing_ok=True,
            )

    async def count(self, collection, where=()):
        if _matches_nothing(where):
            return 0
        query_filter = _server_filter(where) if where else None
        total = 0
        for name in await self._targets(collection):
            result = await self._call(
                lambda n=name: self._client.count(n, count_filter=query_filter, exact=True),
                missing_ok=True,
            )
            total += result.count if result is not None else 0
        return total

    async def search(self, collection, vector, where=(), limit=10, *, exact=None):
        from qdrant_client import models

        if _matches_nothing(where) or limit < 1:
            return []
        dimension = await self._dimension(collection)
        if dimension is None:
            return []
        query = _query_vector(vector, dimension, collection)
        answer = await self._call(
            lambda: self._client.query_points(
                collection,
                query=query.tolist(),
                query_filter=_server_filter(where) if where else None,
                limit=limit,
                search_params=models.SearchParams(
                    exact=self._exact if exact is None else exact,
                    hnsw_ef=self._hnsw_ef,
                    acorn=None
                    if _graph_covers(where, None)
                    else models.AcornSearchParams(enable=True),
                ),
                with_payload=False,
                with_vectors=False,
            ),
            missing_ok=True,
        )
        if answer is None:
            return []
        return [(str(p.id), p.score) for p in answer.points]

    async def ids(self, collection, where=()):
        if _matches_nothing(where):
            return
        query_filter = _server_filter(where) if where else None
        offset = None
        while True:
            page = await self._call(
                lambda o=offset: self._client.scroll(
                    collection,
                    scroll_filter=query_filter,
                    limit=_PAGE,
                    offset=o,
                    with_payload=False,
                    with_vectors=False,
                ),
                missing_ok=True,
            )
            if page is None:
                return
            records, offset = page
            for record in records:
                yield str(record.id)
            if offset is None:
                return

    async def collections(self, prefix=""):
        response = await self._call(self._client.get_collections)
        return sorted(c.name for c in response.collections if c.name.startswith(prefix))

    async def drop_collection(self, name):
        self._dimensions.pop(name, None)
        await self._call(lambda: self._client.delete_collection(name), missing_ok=True)


def _server_schema(kind: str):
    from qdrant_client import models

    return {
        KEYWORD: models.PayloadSchemaType.KEYWORD,
        INTEGER: models.PayloadSchemaType.INTEGER,
        FLOAT: models.PayloadSchemaType.FLOAT,
        DATETIME: models.PayloadSchemaType.DATETIME,
        BOOL: models.PayloadSchemaType.BOOL,
    }[kind]


def _server_filter(conditions: Filter):
    from qdrant_client import models

    must: list[Any] = []
    for condition in conditions:
        if isinstance(condition, Match):
            values = list(condition.values)
            if len(values) == 1 or any(isinstance(v, bool) for v in values):
                options = [
                    models.FieldCondition(key=condition.field, match=models.MatchValue(value=v))
                    for v in values
                ]
                must.append(options[0] if len(options) == 1 else models.Filter(should=options))
            else:
                must.append(
                    models.FieldCondition(key=condition.field, match=models.MatchAny(any=values))
                )
        elif isinstance(condition, HasId):
            must.append(models.HasIdCondition(has_id=list(condition.ids)))
        else:
            bounds = condition.bounds
            if any(isinstance(v, datetime) for v in bounds.values()):
                server_range: Any = models.DatetimeRange(**bounds)
            else:
                server_range = models.Range(**{k: float(v) for k, v in bounds.items()})
            must.append(models.FieldCondition(key=condition.field, range=server_range))
    return models.Filter(must=must)


def _is_missing(exc: Exception) -> bool:
    from qdrant_client.http.exceptions import UnexpectedResponse

    if isinstance(exc, UnexpectedResponse):
        return exc.status_code == 404
    if _grpc_code(exc) == "NOT_FOUND":
        return True
    # qdrant-client's local mode
    return isinstance(exc, ValueError) and bool(re.search(r"Collection .* not found", str(exc)))


def _is_outage(exc: Exception) -> bool:
    import httpx
    from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

    if isinstance(exc, ResponseHandlingException | httpx.TransportError | TimeoutError):
        return True
    if isinstance(exc, UnexpectedResponse):
        return exc.status_code is not None and exc.status_code in (429, 502, 503, 504)
    return _grpc_code(exc) in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED")


def _grpc_code(exc: Exception) -> str | None:
    code = getattr(exc, "code", None)
    if callable(code):
        with contextlib.suppress(Exception):
            return code().name
    return None


def _describe(exc: Exception) -> str:
    source = getattr(exc, "source", None)
    return str(source or exc) or type(exc).__name__


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "optimize":
        sys.exit("usage: python -m services.common.vectors optimize SHARD_FOLDER")
    _optimize_main(sys.argv[2])
