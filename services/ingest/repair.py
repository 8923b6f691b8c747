"""Checks the vector store against the database and repairs it:

    python -m services.ingest.repair [--dry-run]

with the service's own settings (RAGMESH_INGEST_*). The database is the source of truth:
every chunk of a READY document has a point in the collection its document names, and no
other point exists but those of documents still being processed (written before their
READY commits). The check scrolls every point id of every chunk collection and compares:

- a READY chunk without a point is written again from the vector its chunk row keeps (no
  embedding needed);
- a point without a READY chunk (its document deleted or FAILED, or written by hand) is
  deleted, unless its document is being processed;
- a READY document that names no collection (made READY before collections were
  recorded) is given the collection of the model the embed service serves.

--dry-run reports without changing anything. Exit status: 0 when the store matches the
database (after repairing), 1 when the check cannot run (the message says why; an Edge
folder is owned by the running service, so stop it first), 3 when differences remain (a
dry run that found some).

Run while the service serves (a Qdrant server), it races nothing that matters: chunks made
READY and documents taken up while it scrolls are read again before anything is deleted,
and points it writes for a document deleted meanwhile are removed again.
"""

import argparse
import asyncio
import sys
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.common.database import create_engine, sessionmaker, writing
from services.common.errors import ServiceError
from services.common.vectors import Match, VectorPoint, VectorStore, open_vector_store
from services.ingest import storage
from services.ingest.embed_client import EmbedClient
from services.ingest.index import COLLECTIONS, ChunkVectors, Point, collection_name
from services.ingest.settings import IngestSettings

_BATCH = 1000
# The store deletes by payload filter only: a stray point is first overwritten with this
# field (and a value of this run), whatever payload it had, then deleted by it.
_DOOMED = "repair_delete"


@dataclass
class CollectionCheck:
    name: str
    points: int = 0
    ready_chunks: int = 0
    missing: int = 0  # READY chunks without a point
    stray: int = 0  # points without a READY chunk

    def __str__(self) -> str:
        return (
            f"{self.name}: {self.points} points, {self.ready_chunks} READY chunks; "
            f"{self.missing} chunks without a point, {self.stray} points without a chunk"
        )


@dataclass
class Report:
    fixed: bool
    collections: list[CollectionCheck] = field(default_factory=list)
    assigned: int = 0  # documents given the current collection
    unassigned: int = 0  # documents that name no collection, left so (no model known)

    @property
    def differences(self) -> int:
        return sum(c.missing + c.stray for c in self.collections) + self.assigned

    @property
    def consistent(self) -> bool:
        return not self.unassigned and (self.fixed or not self.differences)

    def __str__(self) -> str:
        lines = [str(c) for c in self.collections] or ["no chunk collections"]
        if self.assigned:
            verb = "given" if self.fixed else "to be given"
            lines.append(f"{self.assigned} documents named no collection: {verb} the current one")
        if self.unassigned:
            lines.append(
                f"{self.unassigned} documents name no collection and the embed service's "
                "model is unknown: their points are neither checked nor deleted"
            )
        if not self.differences and not self.unassigned:
            lines.append("the vector store matches the database")
        elif self.fixed:
            lines.append("repaired: missing points written, stray points deleted")
        return "; ".join(lines)


async def reconcile(
    sessions: async_sessionmaker[AsyncSession],
    store: VectorStore,
    *,
    fix: bool,
    current_collection: str | None = None,
) -> Report:
    """Compares every chunk collection with the database; with `fix`, repairs it.
    `current_collection` (the embed service's model) is given to documents naming none."""
    report = Report(fixed=fix)
    async with sessions() as session:
        named = await storage.ready_collections(session)
    report.unassigned = named.pop("", 0)
    if report.unassigned and current_collection:
        if fix:
            async with writing(sessions) as session:
                report.assigned = await storage.assign_collection(session, current_collection)
        else:
            report.assigned = report.unassigned
        report.unassigned = 0
        named[current_collection] = report.assigned
    names = set(named) | set(await store.collections(COLLECTIONS.value))
    # A dry run counts the documents it would assign as assigned already.
    pretend = report.assigned and not fix
    for name in sorted(names):
        sources = [name, ""] if pretend and name == current_collection else [name]
        report.collections.append(await _check(sessions, store, name, sources, fix))
    return report


async def _check(
    sessions: async_sessionmaker[AsyncSession],
    store: VectorStore,
    name: str,
    sources: list[str],
    fix: bool,
) -> CollectionCheck:
    points = {point async for point in store.ids(name)}
    async with sessions() as session:
        ready = {chunk async for chunk in await storage.ready_chunk_ids(session, sources)}
    check = CollectionCheck(name, points=len(points), ready_chunks=len(ready))
    missing = sorted(ready - points)
    strays = await _strays(sessions, store, name, sources, points - ready)
    check.missing, check.stray = len(missing), len(strays)
    if fix:
        await _write(sessions, store, name, sources, missing)
        await _delete(store, name, strays)
    return check


async def _strays(sessions, store, name, sources, candidates: set[str]) -> list[str]:
    """Of the points without a READY chunk at the scroll, those still without one now:
    not made READY meanwhile, not of a document being processed, and not of one that
    names no collection yet."""
    if not candidates:
        return []
    async with sessions() as session:
        now_ready = await storage.ready_among(session, list(candidates), sources)
        unsettled = await storage.unsettled_documents(session)
    kept = set(now_ready)
    if unsettled:
        kept |= {point async for point in store.ids(name, [Match("document_id", unsettled)])}
    return sorted(candidates - kept)


async def _write(sessions, store, name: str, sources: list[str], chunk_ids: list[str]) -> None:
    vectors = ChunkVectors(store)
    for batch in _batches(chunk_ids):
        async with sessions() as session:
            rows = await storage.chunk_vectors(session, batch, sources)
        points = [
            Point(chunk, np.frombuffer(vector, np.float32), document, index, tenant, tags, mime)
            for chunk, document, index, tenant, vector, mime, tags in rows
            if vector
        ]
        if not points:
            continue
        await vectors.ensure_collection(name, len(points[0].vector))
        await vectors.upsert(name, points)
        # A document deleted (or re-processed into FAILED) since its rows were read lost
        # its points before these were written: remove them again.
        documents = sorted({point.document_id for point in points})
        async with sessions() as session:
            still = set(await storage.ready_among_documents(session, documents))
        for document_id in documents:
            if document_id not in still:
                await vectors.delete_document(document_id)


async def _delete(store: VectorStore, name: str, point_ids: list[str]) -> None:
    if not point_ids:
        return
    dimension = _dimension(name)
    marker = str(uuid.uuid4())
    # Any unit vector: the point is deleted right after.
    vector = np.zeros(dimension, dtype=np.float32)
    vector[0] = 1.0
    for batch in _batches(point_ids):
        await store.upsert(name, [VectorPoint(p, vector, {_DOOMED: marker}) for p in batch])
        await store.delete(name, [Match(_DOOMED, marker)])


def _dimension(name: str) -> int:
    """The dimension collection_name() ends the name with."""
    suffix = name.rsplit("_", 1)[-1]
    if not suffix.isdigit():
        raise ValueError(f"collection {name} does not end with its dimension")
    return int(suffix)


def _batches(items: list[str]) -> Iterable[list[str]]:
    for first in range(0, len(items), _BATCH):
        yield items[first : first + _BATCH]


async def _current_collection(settings: IngestSettings) -> str:
    """The collection of the model the embed service serves."""
    embed = EmbedClient(
        settings.embed_target,
        timeout=settings.embed_timeout_seconds,
        api_key=settings.embed_api_key,
    )
    try:
        model = await embed.model()
    finally:
        await embed.close()
    return collection_name(model.name, model.dimension)


async def _main(dry_run: bool) -> int:
    settings = IngestSettings()
    engine = create_engine(settings.resolved_database_url)
    sessions = sessionmaker(engine)
    try:
        try:
            await storage.migrate(engine)
        except Exception as exc:
            raise ValueError(f"cannot prepare the database: {exc}") from exc
        store = await open_vector_store(
            settings.qdrant_url, settings.qdrant_api_key, settings.vector_folder
        )
        try:
            async with sessions() as session:
                unassigned = (await storage.ready_collections(session)).get("", 0)
            current = await _current_collection(settings) if unassigned else None
            report = await reconcile(sessions, store, fix=not dry_run, current_collection=current)
        finally:
            await store.close()
    finally:
        await engine.dispose()
    print(report)
    return 0 if report.consistent else 3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m services.ingest.repair",
        description="Check the vector store against the database, and repair it.",
    )
    parser.add_argument("--dry-run", action="store_true", help="report only; change nothing")
    args = parser.parse_args(argv)
    try:
        status = asyncio.run(_main(args.dry_run))
    except ServiceError as exc:
        sys.exit(f"cannot check the vector store: {exc.message}")
    except ValueError as exc:  # invalid settings, among them
        sys.exit(f"cannot check the vector store: {exc}")
    sys.exit(status)


if __name__ == "__main__":
    main()
