"""Documents as callers see them: upload, read, list, watch, text, chunks and delete."""

import asyncio
import contextlib
import datetime as dt
import logging
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.common import pages
from services.common.database import utcnow, writing
from services.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from services.common.pages import bad_page_token
from services.ingest import storage
from services.ingest.blobs import BlobStore, TooLarge
from services.ingest.index import ChunkVectors
from services.ingest.parsers import SUPPORTED, sniff
from services.ingest.search_index import SearchIndex
from services.ingest.storage import ChunkRow, DocumentRow

_LOGGER = logging.getLogger(__name__)

MAX_FILENAME = 255
MAX_TAGS = 32
MAX_TAG = 64
MAX_ATTRIBUTES = 32
MAX_ATTRIBUTE_KEY = 64
MAX_ATTRIBUTE_VALUE = 1024
DEFAULT_DOCUMENTS_PAGE, MAX_DOCUMENTS_PAGE = 50, 500
DEFAULT_CHUNKS_PAGE, MAX_CHUNKS_PAGE = 100, 1000
# One GetDocumentText answer stays well under the 16 MiB message limit.
MAX_TEXT_CHARS_PER_CALL = 2_000_000
# A delete finishes inside its RPC; its job is the safety net for an interrupted one.
_DELETE_JOB_GRACE = 30.0
# The settings a refused upload names (services/ingest/settings.py).
DOCUMENTS_SETTING = "RAGMESH_INGEST_MAX_DOCUMENTS_PER_TENANT"
BYTES_SETTING = "RAGMESH_INGEST_MAX_BYTES_PER_TENANT"


@dataclass
class UploadMetadata:
    filename: str
    mime_type: str = ""
    tags: list[str] = field(default_factory=list)
    attributes: dict[str, str] = field(default_factory=dict)


@dataclass
class TextRange:
    text: str
    total_chars: int
    start: int
    end: int


class JobSignals:
    """In-process wake-ups between the RPCs and the worker pool."""

    def __init__(self) -> None:
        self.queued = asyncio.Event()
        self.running: dict[str, asyncio.Task] = {}
        self._listeners: dict[str, set[asyncio.Event]] = defaultdict(set)

    def changed(self, document_id: str) -> None:
        for event in self._listeners.get(document_id, ()):
            event.set()

    @contextlib.contextmanager
    def listen(self, document_id: str) -> Iterator[asyncio.Event]:
        event = asyncio.Event()
        self._listeners[document_id].add(event)
        try:
            yield event
        finally:
            listeners = self._listeners[document_id]
            listeners.discard(event)
            if not listeners:
                del self._listeners[document_id]

    async def stop_processing(self, document_id: str) -> None:
        """Cancels this process's work on the document, if any, and waits for it to stop."""
        task = self.running.get(document_id)
        if task is not None:
            task.cancel()
            await asyncio.wait({task})


def check_metadata(meta: UploadMetadata) -> None:
    if not meta.filename.strip():
        raise InvalidArgument("metadata.filename is required", field="metadata.filename")
    if len(meta.filename) > MAX_FILENAME:
        raise InvalidArgument(
            f"metadata.filename has {len(meta.filename)} characters; at most {MAX_FILENAME}",
            field="metadata.filename",
        )
    if len(meta.tags) > MAX_TAGS:
        raise InvalidArgument(f"at most {MAX_TAGS} tags", field="metadata.tags")
    for index, tag in enumerate(meta.tags):
        if not tag.strip() or len(tag) > MAX_TAG:
            raise InvalidArgument(
                f"tags must be 1 to {MAX_TAG} characters", field=f"metadata.tags[{index}]"
            )
    if len(meta.attributes) > MAX_ATTRIBUTES:
        raise InvalidArgument(f"at most {MAX_ATTRIBUTES} attributes", field="metadata.attributes")
    for key, value in meta.attributes.items():
        if not key or len(key) > MAX_ATTRIBUTE_KEY or len(value) > MAX_ATTRIBUTE_VALUE:
            raise InvalidArgument(
                f"attribute keys must be 1 to {MAX_ATTRIBUTE_KEY} characters and values at "
                f"most {MAX_ATTRIBUTE_VALUE}",
                field=f"metadata.attributes[{key[:MAX_ATTRIBUTE_KEY]}]",
            )


class Documents:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        blobs: BlobStore,
        vectors: ChunkVectors,
        search_index: SearchIndex,
        signals: JobSignals,
        *,
        max_upload_bytes: int,
        max_documents_per_tenant: int = 0,
        max_bytes_per_tenant: int = 0,
        watch_poll_seconds: float = 1.0,
    ) -> None:
        self._sessions = sessions
        self._blobs = blobs
        self._vectors = vectors
        self._search_index = search_index
        self._signals = signals
        self._max_upload_bytes = max_upload_bytes
        self._max_documents = max_documents_per_tenant
        self._max_bytes = max_bytes_per_tenant
        self._watch_poll = watch_poll_seconds

    async def upload(
        self, tenant: str, meta: UploadMetadata, data: AsyncIterator[bytes]
    ) -> tuple[DocumentRow, bool]:
        """Stores the bytes and the document row, queues processing; (row, duplicate)."""
        check_metadata(meta)
        writer = self._blobs.writer(self._max_upload_bytes)
        try:
            async for piece in data:
                try:
                    await asyncio.to_thread(writer.write, piece)
                except TooLarge:
                    raise ResourceExhausted(
                        f"the upload is larger than the limit of {self._max_upload_bytes} bytes",
                        reason="UPLOAD_TOO_LARGE",
                        metadata={"limit": str(self._max_upload_bytes)},
                    ) from None
            if writer.size == 0:
                raise InvalidArgument("the upload has no bytes", field="data")
            sha256 = await asyncio.to_thread(writer.finish)
            mime_type = await asyncio.to_thread(
                sniff, writer.head, writer.path, meta.filename, meta.mime_type
            )
            if mime_type is None:
                raise InvalidArgument(
                    f"{meta.filename}: the content is not a supported type "
                    f"({', '.join(SUPPORTED)}); the type is read from the bytes, not the name",
                    field="data",
                    reason="UNSUPPORTED_MEDIA_TYPE",
                )
            existing = await self._existing(tenant, sha256)
            if existing is not None:
                return existing, True
            return await self._store(tenant, meta, writer, sha256, mime_type)
        finally:
            # Whatever did not become a document (cancel, error, duplicate) is dropped.
            writer.discard()

    async def _existing(self, tenant: str, sha256: str) -> DocumentRow | None:
        async with self._sessions() as session:
            row = await storage.find_by_sha256(session, tenant, sha256)
        return _not_deleting(row)

    def _check_quota(self, tenant: str, documents: int, size: int, upload_size: int) -> None:
        """Refuses an upload that would take the tenant past its document or byte limit."""
        if self._max_documents and documents + 1 > self._max_documents:
            raise ResourceExhausted(
                f"tenant {tenant!r} holds {documents} documents, its limit "
                f"({DOCUMENTS_SETTING}={self._max_documents}); delete documents to upload more",
                reason="TENANT_DOCUMENT_LIMIT",
                metadata={
                    "setting": DOCUMENTS_SETTING,
                    "limit": str(self._max_documents),
                    "usage": str(documents),
                },
            )
        if self._max_bytes and size + upload_size > self._max_bytes:
            raise ResourceExhausted(
                f"tenant {tenant!r} holds {size} bytes of documents; this upload's "
                f"{upload_size} bytes would pass its limit ({BYTES_SETTING}={self._max_bytes})"
                "; delete documents to upload more",
                reason="TENANT_BYTES_LIMIT",
                metadata={
                    "setting": BYTES_SETTING,
                    "limit": str(self._max_bytes),
                    "usage": str(size),
                    "upload_bytes": str(upload_size),
                },
            )

    async def _store(self, tenant, meta, writer, sha256: str, mime_type: str):
        now = utcnow()
        row = DocumentRow(
            id=str(uuid.uuid4()),
            tenant=tenant,
            filename=meta.filename,
            mime_type=mime_type,
            size_bytes=writer.size,
            sha256=sha256,
            tags=list(dict.fromkeys(meta.tags)),
            attributes=dict(meta.attributes),
            status=storage.PENDING,
            error="",
            page_count=0,
            chunk_count=0,
            created_at=now,
            updated_at=now,
        )
        await asyncio.to_thread(self._blobs.keep, writer, row.id)
        try:
            async with writing(self._sessions) as session:
                # Counted and accepted in one transaction that holds the tenant's lock, so
                # concurrent uploads cannot both pass the limit nor both store the bytes.
                await storage.lock_tenant(session, tenant)
                existing = await storage.find_by_sha256(session, tenant, sha256)
                if existing is None:
                    self._check_quota(
                        tenant, *await storage.tenant_usage(session, tenant), row.size_bytes
                    )
                    storage.add_document(session, row)
                    await storage.put_job(session, row.id, storage.JOB_INGEST)
        except BaseException:
            self._blobs.delete(row.id)
            raise
        if existing is not None:
            # The same bytes were stored by a concurrent upload a moment ago.
            self._blobs.delete(row.id)
            return _not_deleting(existing), True
        _LOGGER.info("stored document %s (%s, %d bytes)", row.id, mime_type, row.size_bytes)
        self._signals.queued.set()
        return row, False

    async def get(self, tenant: str, document_id: str) -> DocumentRow:
        async with self._sessions() as session:
            return await self._require(session, tenant, document_id)

    async def _require(self, session: AsyncSession, tenant: str, document_id: str) -> DocumentRow:
        row = None
        with contextlib.suppress(ValueError):
            row = await storage.get_document(session, tenant, str(uuid.UUID(document_id)))
        if row is None:
            raise NotFound(
                f"document {document_id!r} does not exist",
                reason="DOCUMENT_NOT_FOUND",
                metadata={"document_id": document_id[:64]},
            )
        return row

    async def list_documents(
        self, tenant: str, *, page_size: int, page_token: str, status: str | None, tag: str
    ) -> tuple[list[DocumentRow], str]:
        limit = pages.page_size(page_size, DEFAULT_DOCUMENTS_PAGE, MAX_DOCUMENTS_PAGE)
        after = None
        if page_token:
            payload = pages.decode_page_token(page_token, {"c", "i"})
            try:
                after = (dt.datetime.fromisoformat(payload["c"]), str(payload["i"]))
            except (TypeError, ValueError) as exc:
                raise bad_page_token() from exc
        async with self._sessions() as session:
            rows = await storage.list_documents(
                session, tenant, limit=limit + 1, after=after, status=status, tag=tag
            )
        token = ""
        if len(rows) > limit:
            rows = rows[:limit]
            token = pages.encode_page_token(
                {"c": rows[-1].created_at.isoformat(), "i": rows[-1].id}
            )
        return rows, token

    async def watch(self, tenant: str, document_id: str) -> AsyncIterator[DocumentRow]:
        """The document now and after each change, until it reaches a terminal state."""
        last = None
        with self._signals.listen(document_id) as changed:
            while True:
                # Cleared before reading, so a change during the read is not missed.
                changed.clear()
                async with self._sessions() as session:
                    if last is None:
                        row = await self._require(session, tenant, document_id)
                    else:
                        row = await storage.get_document(session, tenant, document_id)
                if row is None:
                    return
                key = (row.status, row.updated_at, row.chunk_count)
                if key != last:
                    last = key
                    yield row
                if row.status in storage.TERMINAL:
                    return
                # Another replica's worker does not signal us; polling catches its changes.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), self._watch_poll)

    async def text(self, tenant: str, document_id: str, start: int, end: int) -> TextRange:
        async with self._sessions() as session:
            row = await self._require(session, tenant, document_id)
            if row.status in (storage.FAILED, storage.DELETING):
                raise FailedPrecondition(
                    f"document {document_id} has no text: it is {row.status}"
                    + (f" ({row.error})" if row.error else ""),
                    reason="DOCUMENT_NOT_PARSED",
                )
            text = await storage.get_text(session, row.id)
        if text is None:
            raise FailedPrecondition(
                f"document {document_id} is not parsed yet (status {row.status}); "
                "watch it with WatchDocument",
                reason="DOCUMENT_NOT_PARSED",
            )
        total = len(text)
        end = end or total
        if start > total:
            raise InvalidArgument(
                f"start {start} is past the end of the text ({total})", field="start"
            )
        if end > total or end < start:
            raise InvalidArgument(f"end must be between start and {total}", field="end")
        end = min(end, start + MAX_TEXT_CHARS_PER_CALL)
        return TextRange(text[start:end], total, start, end)

    async def chunks(
        self, tenant: str, document_id: str, *, page_size: int, page_token: str
    ) -> tuple[list[ChunkRow], str]:
        limit = pages.page_size(page_size, DEFAULT_CHUNKS_PAGE, MAX_CHUNKS_PAGE)
        from_index = 0
        if page_token:
            from_index = pages.decode_page_token(page_token, {"n"})["n"]
            if not isinstance(from_index, int) or from_index < 0:
                raise bad_page_token()
        async with self._sessions() as session:
            row = await self._require(session, tenant, document_id)
            rows = await storage.list_chunks(
                session, row.id, from_index=from_index, limit=limit + 1
            )
        token = ""
        if len(rows) > limit:
            rows = rows[:limit]
            token = pages.encode_page_token({"n": rows[-1].index + 1})
        return rows, token

    async def delete(self, tenant: str, document_id: str) -> None:
        """Marks the document DELETING (search skips it), then removes it everywhere."""
        async with writing(self._sessions) as session:
            row = await self._require(session, tenant, document_id)
            # The job row first, as workers lock it first: no lock-order deadlock.
            await storage.put_job(session, row.id, storage.JOB_DELETE, delay=_DELETE_JOB_GRACE)
            await storage.set_status(session, row.id, storage.DELETING)
        self._search_index.remove_document(row.id)
        self._signals.changed(row.id)
        await self._signals.stop_processing(row.id)
        await self.finish_delete(row.id)

    async def finish_delete(self, document_id: str, owner: str = "") -> None:
        """Removes vectors, bytes and rows, in that order; safe to repeat after a crash.

        A worker passes the owner of its lease on the delete job: the rows go only while
        it still holds it. DeleteDocument itself passes none."""
        self._search_index.remove_document(document_id)
        await self._vectors.delete_document(document_id)
        await asyncio.to_thread(self._blobs.delete, document_id)
        async with writing(self._sessions) as session:
            if owner:
                await storage.hold_job(session, document_id, storage.JOB_DELETE, owner)
            await storage.finish_job(session, document_id, storage.JOB_DELETE, owner)
            await storage.delete_document_rows(session, document_id)
        self._signals.changed(document_id)
        _LOGGER.info("deleted document %s", document_id)


def _not_deleting(row: DocumentRow | None) -> DocumentRow | None:
    """row, unless it is being deleted: the upload of its bytes must wait for that."""
    if row is not None and row.status == storage.DELETING:
        raise FailedPrecondition(
            f"document {row.id} with the same content is being deleted; retry the upload "
            "once its DeleteDocument call has returned",
            reason="DOCUMENT_DELETING",
        )
    return row
