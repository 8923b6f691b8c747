"""SQL storage of documents, their text, chunks and jobs: models, engine, repositories."""

import datetime as dt
import logging
from pathlib import Path

from sqlalchemy import (
    JSON,
    BigInteger,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    and_,
    delete,
    func,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, undefer

from services.common import database
from services.common.database import (
    UtcDateTime,
    utcnow,
)

_LOGGER = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# PostgreSQL advisory lock taken around migrations (the bytes of "ingest" and a 1).
_MIGRATION_LOCK_KEY = 0x696E6765737401
# The first key of the per-tenant advisory lock an upload's write transaction takes
# (pg_advisory_xact_lock(int, int) keys are apart from the one-bigint migration lock).
_TENANT_LOCK_KEY = 0x696E6701

PENDING = "PENDING"
PARSING = "PARSING"
CHUNKING = "CHUNKING"
EMBEDDING = "EMBEDDING"
READY = "READY"
FAILED = "FAILED"
DELETING = "DELETING"
TERMINAL = frozenset({READY, FAILED, DELETING})

JOB_INGEST = "ingest"
JOB_DELETE = "delete"


class Base(DeclarativeBase):
    pass


class DocumentRow(Base):
    __tablename__ = "documents"
    __table_args__ = (
        # Same bytes in the same tenant are one document.
        UniqueConstraint("tenant", "sha256", name="uq_documents_tenant_sha256"),
        Index("ix_documents_tenant_created", "tenant", "created_at", "id"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(255))
    filename: Mapped[str] = mapped_column(String(255))
    mime_type: Mapped[str] = mapped_column(String(100))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    tags: Mapped[list] = mapped_column(JSON, default=list)
    attributes: Mapped[dict] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(16), index=True)
    error: Mapped[str] = mapped_column(Text, default="")
    page_count: Mapped[int] = mapped_column(Integer, default=0)
    chunk_count: Mapped[int] = mapped_column(Integer, default=0)
    # The vector collection its chunks' vectors went to, set as it turns READY; "" for
    # documents made READY before collections were recorded (repair assigns them one).
    vector_collection: Mapped[str] = mapped_column(String(255), default="")
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[dt.datetime] = mapped_column(UtcDateTime)


class DocumentTagRow(Base):
    """One row per tag, so listing and search can filter by tag with an index."""

    __tablename__ = "document_tags"

    document_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("documents.id", ondelete="CASCADE"), primary_key=True
    )
    tag: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)


class DocumentTextRow(Base):
    __tablename__ = "document_texts"

    document_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("documents.id", ondelete="CASCADE"), primary_key=True
    )
    text: Mapped[str] = mapped_column(Text)


class ChunkRow(Base):
    """A chunk's text, place and embedding (float32 bytes, unit length). The embedding is
    also in the vector store, which is searched; this copy lets the store be checked and
    rebuilt (services/ingest/repair.py) without embedding again."""

    __tablename__ = "chunks"
    __table_args__ = (UniqueConstraint("document_id", "index", name="uq_chunks_document_index"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    document_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("documents.id", ondelete="CASCADE")
    )
    tenant: Mapped[str] = mapped_column(String(255), index=True)
    index: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    start_char: Mapped[int] = mapped_column(BigInteger)
    end_char: Mapped[int] = mapped_column(BigInteger)
    page: Mapped[int] = mapped_column(Integer, default=0)
    token_count: Mapped[int] = mapped_column(Integer)
    heading: Mapped[str] = mapped_column(Text, default="")
    vector: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True, deferred=True)


class JobRow(Base):
    """Work still owed to a document; a row outlives crashes, so restarts resume it."""

    __tablename__ = "jobs"

    document_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    run_after: Mapped[dt.datetime] = mapped_column(UtcDateTime, index=True)
    lease_owner: Mapped[str] = mapped_column(String(64), default="")
    lease_until: Mapped[dt.datetime | None] = mapped_column(UtcDateTime, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime)


async def migrate(engine: AsyncEngine) -> None:
    """Brings ingest's schema to the newest Alembic revision, one replica at a time."""
    await database.migrate(engine, MIGRATIONS_DIR, _MIGRATION_LOCK_KEY)


# Documents


async def get_document(session: AsyncSession, tenant: str, document_id: str) -> DocumentRow | None:
    row = await session.get(DocumentRow, document_id)
    return row if row is not None and row.tenant == tenant else None


async def find_by_sha256(session: AsyncSession, tenant: str, sha256: str) -> DocumentRow | None:
    return await session.scalar(
        select(DocumentRow).where(DocumentRow.tenant == tenant, DocumentRow.sha256 == sha256)
    )


async def lock_tenant(session: AsyncSession, tenant: str) -> None:
    """Serialises the tenant's uploads until the transaction ends, so what it counts stays
    true until it commits. SQLite's write transaction already holds the database's write
    lock (BEGIN IMMEDIATE); PostgreSQL takes a transaction advisory lock on the tenant."""
    if (await session.connection()).dialect.name == "postgresql":
        await session.execute(
            text("SELECT pg_advisory_xact_lock(:key, hashtext(:tenant))"),
            {"key": _TENANT_LOCK_KEY, "tenant": tenant},
        )


async def tenant_usage(session: AsyncSession, tenant: str) -> tuple[int, int]:
    """The tenant's documents and their bytes, those being deleted included."""
    count, size = (
        await session.execute(
            select(func.count(), func.coalesce(func.sum(DocumentRow.size_bytes), 0)).where(
                DocumentRow.tenant == tenant
            )
        )
    ).one()
    return int(count), int(size)


def add_document(session: AsyncSession, row: DocumentRow) -> None:
    session.add(row)
    session.add_all(DocumentTagRow(document_id=row.id, tag=tag) for tag in set(row.tags))


async def list_documents(
    session: AsyncSession,
    tenant: str,
    *,
    limit: int,
    after: tuple[dt.datetime, str] | None,
    status: str | None,
    tag: str | None,
) -> list[DocumentRow]:
    """Newest first; `after` is the (created_at, id) of the last row already returned."""
    query = select(DocumentRow).where(DocumentRow.tenant == tenant)
    if status is not None:
        query = query.where(DocumentRow.status == status)
    if tag:
        query = query.where(
            DocumentRow.id.in_(select(DocumentTagRow.document_id).where(DocumentTagRow.tag == tag))
        )
    if after is not None:
        created, last_id = after
        query = query.where(
            or_(
                DocumentRow.created_at < created,
                and_(DocumentRow.created_at == created, DocumentRow.id < last_id),
            )
        )
    query = query.order_by(DocumentRow.created_at.desc(), DocumentRow.id.desc()).limit(limit)
    return list(await session.scalars(query))


async def set_status(
    session: AsyncSession,
    document_id: str,
    status: str,
    *,
    expect: tuple[str, ...] | None = None,
    **values,
) -> bool:
    """Moves a document to `status`; with `expect`, only from one of those statuses."""
    query = update(DocumentRow).where(DocumentRow.id == document_id)
    if expect is not None:
        query = query.where(DocumentRow.status.in_(expect))
    result = await session.execute(
        query.values(status=status, updated_at=utcnow(), **values).execution_options(
            synchronize_session=False
        )
    )
    return result.rowcount == 1


async def delete_document_rows(session: AsyncSession, document_id: str) -> None:
    """Removes everything SQL holds for a document (children first, for every backend)."""
    for model in (ChunkRow, DocumentTextRow, DocumentTagRow):
        await session.execute(delete(model).where(model.document_id == document_id))
    await session.execute(delete(DocumentRow).where(DocumentRow.id == document_id))


# Text and chunks


async def get_text(session: AsyncSession, document_id: str) -> str | None:
    return await session.scalar(
        select(DocumentTextRow.text).where(DocumentTextRow.document_id == document_id)
    )


async def put_text(session: AsyncSession, document_id: str, text: str) -> None:
    await session.execute(delete(DocumentTextRow).where(DocumentTextRow.document_id == document_id))
    session.add(DocumentTextRow(document_id=document_id, text=text))


async def replace_chunks(session: AsyncSession, document_id: str, rows: list[ChunkRow]) -> None:
    await session.execute(delete(ChunkRow).where(ChunkRow.document_id == document_id))
    session.add_all(rows)


async def list_chunks(
    session: AsyncSession, document_id: str, *, from_index: int, limit: int
) -> list[ChunkRow]:
    return list(
        await session.scalars(
            select(ChunkRow)
            .where(ChunkRow.document_id == document_id, ChunkRow.index >= from_index)
            .order_by(ChunkRow.index)
            .limit(limit)
        )
    )


async def ready_chunks(
    session: AsyncSession, document_ids: list[str] | None = None, *, vectors: bool = False
):
    """(chunk, mime type, tags, vector collection) for READY documents (all, or these);
    the chunk's embedding is loaded only with `vectors`."""
    query = (
        select(ChunkRow, DocumentRow.mime_type, DocumentRow.tags, DocumentRow.vector_collection)
        .join(DocumentRow, DocumentRow.id == ChunkRow.document_id)
        .where(DocumentRow.status == READY)
        .order_by(ChunkRow.document_id, ChunkRow.index)
    )
    if vectors:
        query = query.options(undefer(ChunkRow.vector))
    if document_ids is not None:
        query = query.where(ChunkRow.document_id.in_(document_ids))
    return await session.stream(query.execution_options(yield_per=2000))


async def ready_chunk_ids(session: AsyncSession, collections: list[str]):
    """Ids of the chunks of READY documents whose vectors belong in one of `collections`."""
    query = (
        select(ChunkRow.id)
        .join(DocumentRow, DocumentRow.id == ChunkRow.document_id)
        .where(DocumentRow.status == READY, DocumentRow.vector_collection.in_(collections))
    )
    return await session.stream_scalars(query.execution_options(yield_per=10_000))


async def ready_collections(session: AsyncSession) -> dict[str, int]:
    """vector collection -> number of READY documents naming it ("" for none)."""
    query = (
        select(DocumentRow.vector_collection, func.count())
        .where(DocumentRow.status == READY)
        .group_by(DocumentRow.vector_collection)
    )
    return dict((await session.execute(query)).all())


async def assign_collection(session: AsyncSession, collection: str) -> int:
    """Names `collection` on every READY document that names none; returns how many."""
    result = await session.execute(
        update(DocumentRow)
        .where(DocumentRow.status == READY, DocumentRow.vector_collection == "")
        .values(vector_collection=collection)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount


async def chunk_vectors(session: AsyncSession, chunk_ids: list[str], collections: list[str]):
    """(chunk id, document id, index, tenant, embedding, mime type, tags) of those chunks
    whose document is READY with its vectors in one of `collections`."""
    query = (
        select(
            ChunkRow.id,
            ChunkRow.document_id,
            ChunkRow.index,
            ChunkRow.tenant,
            ChunkRow.vector,
            DocumentRow.mime_type,
            DocumentRow.tags,
        )
        .join(DocumentRow, DocumentRow.id == ChunkRow.document_id)
        .where(
            ChunkRow.id.in_(chunk_ids),
            DocumentRow.status == READY,
            DocumentRow.vector_collection.in_(collections),
        )
    )
    return (await session.execute(query)).all()


async def ready_among(session: AsyncSession, chunk_ids: list[str], collections: list[str]):
    """Those of `chunk_ids` that are chunks of READY documents in one of `collections`."""
    found: list[str] = []
    for first in range(0, len(chunk_ids), 1000):
        query = (
            select(ChunkRow.id)
            .join(DocumentRow, DocumentRow.id == ChunkRow.document_id)
            .where(
                ChunkRow.id.in_(chunk_ids[first : first + 1000]),
                DocumentRow.status == READY,
                DocumentRow.vector_collection.in_(collections),
            )
        )
        found.extend(await session.scalars(query))
    return found


async def ready_among_documents(session: AsyncSession, document_ids: list[str]) -> list[str]:
    query = select(DocumentRow.id).where(
        DocumentRow.id.in_(document_ids), DocumentRow.status == READY
    )
    return list(await session.scalars(query))


async def unsettled_documents(session: AsyncSession) -> list[str]:
    """Documents whose points may exist without READY chunks naming their collection:
    those being processed (points come before READY) and READY ones naming none."""
    processing = DocumentRow.status.in_((PENDING, PARSING, CHUNKING, EMBEDDING))
    unnamed = and_(DocumentRow.status == READY, DocumentRow.vector_collection == "")
    return list(await session.scalars(select(DocumentRow.id).where(or_(processing, unnamed))))


async def document_statuses(session: AsyncSession) -> dict[str, str]:
    return dict((await session.execute(select(DocumentRow.id, DocumentRow.status))).all())


async def searchable_chunks(
    session: AsyncSession, tenant: str, chunk_ids: list[str]
) -> dict[str, tuple[ChunkRow, str]]:
    """chunk id -> (chunk, filename) for those chunks whose document is READY in tenant."""
    # Two primary-key lookups: as one join, SQLite's planner walks every READY document.
    chunks = list(await session.scalars(select(ChunkRow).where(ChunkRow.id.in_(chunk_ids))))
    documents = dict(
        (
            await session.execute(
                select(DocumentRow.id, DocumentRow.filename).where(
                    DocumentRow.id.in_({chunk.document_id for chunk in chunks}),
                    DocumentRow.tenant == tenant,
                    DocumentRow.status == READY,
                )
            )
        ).all()
    )
    return {
        chunk.id: (chunk, documents[chunk.document_id])
        for chunk in chunks
        if chunk.document_id in documents
    }


async def chunks_at(session: AsyncSession, places: set[tuple[str, int]]) -> dict:
    """(document id, index) -> chunk, for the given places that exist."""
    if not places:
        return {}
    rows = await session.scalars(
        select(ChunkRow).where(
            or_(*(and_(ChunkRow.document_id == d, ChunkRow.index == i) for d, i in places))
        )
    )
    return {(row.document_id, row.index): row for row in rows}


# Jobs


class LeaseLost(Exception):
    """The job is no longer this worker's (taken over after its lease ran out, replaced by
    a delete, or finished): its results are not this worker's to write."""


async def put_job(
    session: AsyncSession, document_id: str, kind: str, *, delay: float = 0.0
) -> None:
    """Queues `kind` for the document, replacing any job it had (delete wins over ingest)."""
    await session.execute(delete(JobRow).where(JobRow.document_id == document_id))
    now = utcnow()
    run_after = now + dt.timedelta(seconds=delay)
    session.add(
        JobRow(
            document_id=document_id,
            kind=kind,
            attempts=0,
            run_after=run_after,
            lease_owner="",
            lease_until=None,
            created_at=now,
        )
    )


async def claim_job(session: AsyncSession, owner: str, lease_seconds: float) -> JobRow | None:
    """Takes the oldest due job nobody holds a live lease on; safe across replicas.

    The claim counts as an attempt, so work that never ends (a file that kills the
    process) runs out of attempts like work that fails."""
    now = utcnow()
    free = or_(JobRow.lease_until.is_(None), JobRow.lease_until < now)
    candidates = await session.scalars(
        select(JobRow.document_id)
        .where(JobRow.run_after <= now, free)
        .order_by(JobRow.kind == JOB_INGEST, JobRow.created_at)
        .limit(8)
    )
    lease_until = now + dt.timedelta(seconds=lease_seconds)
    for document_id in list(candidates):
        result = await session.execute(
            update(JobRow)
            .where(JobRow.document_id == document_id, free)
            .values(lease_owner=owner, lease_until=lease_until, attempts=JobRow.attempts + 1)
            .execution_options(synchronize_session=False)
        )
        if result.rowcount == 1:
            return await session.get(JobRow, document_id, populate_existing=True)
    return None


def _owned(document_id: str, kind: str, owner: str):
    return and_(JobRow.document_id == document_id, JobRow.kind == kind, JobRow.lease_owner == owner)


async def renew_lease(
    session: AsyncSession, document_id: str, kind: str, owner: str, lease_seconds: float
) -> bool:
    """Extends the lease; False when the job is no longer this owner's."""
    result = await session.execute(
        update(JobRow)
        .where(_owned(document_id, kind, owner))
        .values(lease_until=utcnow() + dt.timedelta(seconds=lease_seconds))
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


async def hold_job(session: AsyncSession, document_id: str, kind: str, owner: str) -> None:
    """Raises LeaseLost unless owner still holds the job; else locks the job row until the
    transaction ends, so no one takes the job over before this transaction's writes commit.
    Every write of a job's results starts with it."""
    held = await session.scalar(
        select(JobRow.document_id).where(_owned(document_id, kind, owner)).with_for_update()
    )
    if held is None:
        raise LeaseLost(document_id)


async def finish_job(session: AsyncSession, document_id: str, kind: str, owner: str) -> None:
    """Removes the job if owner holds it ("" for a job no worker has taken)."""
    await session.execute(delete(JobRow).where(_owned(document_id, kind, owner)))


async def retry_job(
    session: AsyncSession, document_id: str, kind: str, owner: str, delay: float
) -> None:
    """Hands the job back to run again after delay (its attempt was counted at claim)."""
    await session.execute(
        update(JobRow)
        .where(_owned(document_id, kind, owner))
        .values(
            run_after=utcnow() + dt.timedelta(seconds=delay),
            lease_owner="",
            lease_until=None,
        )
        .execution_options(synchronize_session=False)
    )


async def release_jobs(session: AsyncSession, owners: list[str]) -> None:
    """Hands this process's jobs back at shutdown so a restart takes them at once; an
    attempt cut short by a shutdown is not the document's fault, so it is not counted."""
    await session.execute(
        update(JobRow)
        .where(JobRow.lease_owner.in_(owners))
        .values(lease_owner="", lease_until=None, attempts=JobRow.attempts - 1)
        .execution_options(synchronize_session=False)
    )


async def count_jobs(session: AsyncSession) -> int:
    return await session.scalar(select(func.count()).select_from(JobRow)) or 0
