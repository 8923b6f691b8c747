"""The worker pool: takes jobs from the database and runs parse, chunk, embed and index."""

import asyncio
import contextlib
import logging
import os
import socket
import uuid

import numpy as np
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.common.database import unreachable, writing
from services.common.errors import DeadlineExceeded, ServiceError, Unavailable
from services.ingest import storage
from services.ingest.blobs import BlobStore
from services.ingest.chunker import TokenizerLimits, plan_chunks, token_spans
from services.ingest.documents import Documents, JobSignals
from services.ingest.embed_client import EmbedClient
from services.ingest.index import ChunkVectors, Point, collection_name
from services.ingest.parse_process import ParserProcesses
from services.ingest.parsers import ParseError
from services.ingest.search import Retrieval
from services.ingest.settings import IngestSettings
from services.ingest.storage import ChunkRow, JobRow

_LOGGER = logging.getLogger(__name__)

_ACTIVE = (storage.PENDING, storage.PARSING, storage.CHUNKING, storage.EMBEDDING)
_CHUNK_NAMESPACE = uuid.UUID("5b0f6c1e-8f43-4f5e-9d0a-3c7f2f1d9e41")
# Upstream reasons that mean "busy now, retry later": embed's full queue
# (RAGMESH_EMBED_MAX_QUEUED_TEXTS) and the per-caller limit on calls in flight. A request
# that can never fit is answered otherwise (TOO_MANY_TEXTS, TEXT_TOO_LONG) and fails.
_BUSY_REASONS = frozenset({"QUEUE_FULL", "CALLER_CALL_LIMIT"})


class _Gone(Exception):
    """The document left the processing states while it was being processed."""


def chunk_id(document_id: str, index: int) -> str:
    """Stable per position, so a retried job overwrites its own vectors instead of adding."""
    return str(uuid.uuid5(_CHUNK_NAMESPACE, f"{document_id}:{index}"))


def _attempts(count: int) -> str:
    return f"{count} attempt" if count == 1 else f"{count} attempts"


class WorkerPool:
    def __init__(
        self,
        settings: IngestSettings,
        sessions: async_sessionmaker[AsyncSession],
        documents: Documents,
        blobs: BlobStore,
        vectors: ChunkVectors,
        embed: EmbedClient,
        signals: JobSignals,
        retrieval: Retrieval,
    ) -> None:
        self._settings = settings
        self._sessions = sessions
        self._documents = documents
        self._blobs = blobs
        self._vectors = vectors
        self._embed = embed
        self._signals = signals
        self._retrieval = retrieval
        self._parsers = ParserProcesses(
            timeout=settings.parse_timeout_seconds,
            memory_bytes=settings.parse_memory_bytes,
            max_docx_bytes=settings.max_docx_uncompressed_bytes,
            max_chars=settings.max_text_chars,
        )
        process = f"{socket.gethostname()[:40]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        # One lease owner per worker, so a job one of them lost is not another's to finish.
        self._owners = [f"{process}-{n}" for n in range(settings.workers)]
        self._tasks: list[asyncio.Task] = []
        # While the database cannot be reached, each poll fails alike: said once, not per poll.
        self._database_down = False

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._run(owner), name=f"ingest-worker-{n}")
            for n, owner in enumerate(self._owners)
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._parsers.close()
        try:
            async with writing(self._sessions) as session:
                await storage.release_jobs(session, self._owners)
        except Exception:
            _LOGGER.warning("could not release job leases; they expire on their own", exc_info=True)

    async def _run(self, owner: str) -> None:
        loop = asyncio.get_running_loop()
        while True:
            claimed_at = loop.time()
            job = await self._claim(owner)
            if job is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._signals.queued.wait(), self._settings.job_poll_seconds
                    )
                self._signals.queued.clear()
                continue
            work = asyncio.create_task(self._execute(job))
            self._signals.running[job.document_id] = work
            keeper = asyncio.create_task(self._keep_lease(job, claimed_at))
            try:
                # wait(), not await: a delete cancels the work, which must not end this loop.
                await asyncio.wait({work, keeper}, return_when=asyncio.FIRST_COMPLETED)
                if not work.done():
                    # The lease is lost: stop, and leave the job to whoever holds it now.
                    work.cancel()
                    await asyncio.wait({work})
                    await self._let_go(job.document_id)
            except asyncio.CancelledError:
                work.cancel()
                await asyncio.wait({work})
                raise
            finally:
                keeper.cancel()
                if self._signals.running.get(job.document_id) is work:
                    del self._signals.running[job.document_id]

    async def _claim(self, owner: str) -> JobRow | None:
        try:
            async with writing(self._sessions) as session:
                job = await storage.claim_job(session, owner, self._settings.job_lease_seconds)
        except Exception as exc:
            if (down := unreachable(exc)) is None:
                _LOGGER.exception("could not take a job; retrying")
            elif not self._database_down:
                self._database_down = True
                _LOGGER.warning("the workers wait for the database: %s", down.message)
            return None
        if self._database_down:
            self._database_down = False
            _LOGGER.warning("the database is reachable again; the workers go on")
        return job

    async def _keep_lease(self, job: JobRow, claimed_at: float) -> None:
        """Renews the job's lease; returns once it is lost: taken over, or not renewed
        before it ran out (another worker may have taken the job since)."""
        seconds = self._settings.job_lease_seconds
        loop = asyncio.get_running_loop()
        expires = claimed_at + seconds
        while True:
            await asyncio.sleep(seconds / 3)
            started = loop.time()
            try:
                async with asyncio.timeout_at(expires), writing(self._sessions) as session:
                    renewed = await storage.renew_lease(
                        session, job.document_id, job.kind, job.lease_owner, seconds
                    )
            except Exception:
                if loop.time() >= expires:
                    _LOGGER.warning(
                        "could not renew the lease on document %s before it ran out; "
                        "stopping work on it",
                        job.document_id,
                        exc_info=True,
                    )
                    return
                _LOGGER.warning(
                    "renewing the lease on document %s failed; retrying",
                    job.document_id,
                    exc_info=True,
                )
                continue
            if not renewed:
                _LOGGER.warning(
                    "the job on document %s is no longer this worker's; stopping work on it",
                    job.document_id,
                )
                return
            expires = started + seconds

    async def _execute(self, job: JobRow) -> None:
        try:
            if job.kind == storage.JOB_DELETE:
                await self._delete(job)
            else:
                await self._ingest_safely(job)
        except (storage.LeaseLost, _Gone):
            await self._let_go(job.document_id)
        except asyncio.CancelledError:
            _LOGGER.info("stopped work on document %s", job.document_id)
        except Exception:
            # Recording the outcome failed (the database is unreachable): the lease runs
            # out and the job is taken again.
            _LOGGER.exception("work on document %s stopped; it runs again", job.document_id)

    async def _delete(self, job: JobRow) -> None:
        try:
            await self._documents.finish_delete(job.document_id, job.lease_owner)
        except storage.LeaseLost:
            raise
        except Exception:
            # Never give up on a delete.
            _LOGGER.exception("deleting document %s failed; retrying", job.document_id)
            await self._retry(job, 5.0)

    async def _let_go(self, document_id: str) -> None:
        """After losing a job: if its document was deleted or FAILED meanwhile, removes what
        this worker may have indexed since; else leaves all to the job's new owner."""
        try:
            async with self._sessions() as session:
                row = await session.get(storage.DocumentRow, document_id)
        except Exception:
            _LOGGER.exception("could not read document %s after losing its job", document_id)
            return
        if row is not None and row.status not in (storage.DELETING, storage.FAILED):
            _LOGGER.info("document %s is in other hands now; leaving it", document_id)
            return
        _LOGGER.info("document %s was deleted or failed while being processed", document_id)
        await self._remove_vectors(document_id)

    async def _ingest_safely(self, job: JobRow) -> None:
        document_id = job.document_id
        if job.attempts > self._settings.job_max_attempts:
            # Every attempt so far was counted when it was claimed, and the last one never
            # reported back: the process stopped while working on this file.
            await self._fail(
                job,
                f"gave up after {_attempts(self._settings.job_max_attempts)}; the last one "
                "stopped before it finished (the service may have crashed on this file)",
            )
            return
        try:
            await self._ingest(job)
        except (storage.LeaseLost, _Gone):
            raise
        except ParseError as exc:
            await self._fail(job, str(exc))
        except (Unavailable, DeadlineExceeded) as exc:
            await self._retry_or_fail(job, exc.message)
        except ServiceError as exc:
            if exc.metadata.get("upstream_reason") in _BUSY_REASONS:
                await self._retry_or_fail(job, exc.message)
            else:
                await self._fail(job, exc.message)
        except Exception:
            _LOGGER.exception("processing document %s failed unexpectedly", document_id)
            await self._retry_or_fail(job, "an internal error stopped processing (see the log)")

    async def _retry_or_fail(self, job: JobRow, reason: str) -> None:
        """Transient trouble gets retries with backoff, then a FAILED document that says why."""
        attempts = job.attempts
        if attempts >= self._settings.job_max_attempts:
            await self._fail(job, f"{reason} (gave up after {_attempts(attempts)})")
            return
        delay = min(2.0**attempts, 60.0)
        _LOGGER.warning(
            "document %s: %s; retry %d in %.0f s", job.document_id, reason, attempts, delay
        )
        await self._retry(job, delay)

    @staticmethod
    async def _hold(session: AsyncSession, job: JobRow) -> None:
        await storage.hold_job(session, job.document_id, job.kind, job.lease_owner)

    async def _retry(self, job: JobRow, delay: float) -> None:
        async with writing(self._sessions) as session:
            await self._hold(session, job)
            await storage.retry_job(session, job.document_id, job.kind, job.lease_owner, delay)

    async def _fail(self, job: JobRow, reason: str) -> None:
        document_id = job.document_id
        _LOGGER.info("document %s failed: %s", document_id, reason)
        async with writing(self._sessions) as session:
            await self._hold(session, job)
            await storage.set_status(
                session, document_id, storage.FAILED, expect=_ACTIVE, error=reason
            )
            await storage.finish_job(session, document_id, storage.JOB_INGEST, job.lease_owner)
        self._signals.changed(document_id)
        await self._remove_vectors(document_id)

    async def _remove_vectors(self, document_id: str) -> None:
        """A FAILED or deleted document keeps no vectors: those its batches stored go."""
        self._retrieval.remove_document(document_id)
        try:
            await self._vectors.delete_document(document_id)
        except Exception:
            _LOGGER.warning(
                "could not remove the vectors of document %s; deleting it removes them",
                document_id,
                exc_info=True,
            )

    async def _move(self, job: JobRow, status: str, **values) -> None:
        async with writing(self._sessions) as session:
            await self._hold(session, job)
            if not await storage.set_status(
                session, job.document_id, status, expect=_ACTIVE, **values
            ):
                raise _Gone
        self._signals.changed(job.document_id)

    async def _ingest(self, job: JobRow) -> None:
        settings = self._settings
        document_id = job.document_id
        async with self._sessions() as session:
            row = await session.get(storage.DocumentRow, document_id)
        if row is None or row.status not in _ACTIVE:
            async with writing(self._sessions) as session:
                await self._hold(session, job)
                await storage.finish_job(session, document_id, storage.JOB_INGEST, job.lease_owner)
            return
        path = self._blobs.path(document_id)
        if not path.exists():
            raise ParseError("the stored file is missing; upload the document again")

        await self._move(job, storage.PARSING)
        parsed = await self._parsers.parse(path, row.mime_type)
        async with writing(self._sessions) as session:
            await self._hold(session, job)
            await storage.put_text(session, document_id, parsed.text)
            if not await storage.set_status(
                session, document_id, storage.CHUNKING, expect=_ACTIVE, page_count=parsed.page_count
            ):
                raise _Gone
        self._signals.changed(document_id)

        model = await self._embed.model()
        # The model reads max_tokens including its two special tokens.
        size = min(settings.chunk_tokens, model.max_tokens - 2)
        overlap = min(settings.chunk_overlap_tokens, size // 2)
        tokens = await token_spans(
            parsed.text,
            [(span.start, span.end) for span in parsed.spans],
            self._embed.tokenize,
            TokenizerLimits(model.max_texts, model.max_chars),
        )
        plan = plan_chunks(parsed, tokens, size=size, overlap=overlap, max_chars=model.max_chars)
        if not plan:
            raise ParseError("no text found in the file")

        await self._move(job, storage.EMBEDDING)
        collection = collection_name(model.name, model.dimension)
        await self._vectors.ensure_collection(collection, model.dimension)
        texts = [parsed.text[spec.start : spec.end] for spec in plan]
        limiter = asyncio.Semaphore(settings.embed_concurrency)
        batch = min(settings.embed_batch_size, model.max_texts)
        embeddings: dict[int, bytes] = {}

        async def embed_and_index(first: int) -> None:
            async with limiter:
                vectors = await self._embed.embed(texts[first : first + batch])
                for offset, vector in enumerate(vectors):
                    embeddings[first + offset] = np.asarray(vector, dtype=np.float32).tobytes()
                await self._vectors.upsert(
                    collection,
                    [
                        Point(
                            chunk_id(document_id, spec.index),
                            vector,
                            document_id,
                            spec.index,
                            row.tenant,
                            list(row.tags),
                            row.mime_type,
                        )
                        for spec, vector in zip(plan[first : first + batch], vectors, strict=True)
                    ],
                )

        tasks = [
            asyncio.create_task(embed_and_index(first)) for first in range(0, len(plan), batch)
        ]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

        chunks = [
            ChunkRow(
                id=chunk_id(document_id, spec.index),
                document_id=document_id,
                tenant=row.tenant,
                index=spec.index,
                text=text,
                start_char=spec.start,
                end_char=spec.end,
                page=spec.page,
                token_count=spec.token_count,
                heading=spec.heading,
                vector=embeddings[position],
            )
            for position, (spec, text) in enumerate(zip(plan, texts, strict=True))
        ]
        # Searchable before READY commits (the vectors are stored already, durably), so a
        # caller who sees READY finds the chunks; until then search drops them, as it
        # reads every hit back from READY rows.
        await self._retrieval.add_chunks(document_id, chunks, row.mime_type, row.tags)
        async with writing(self._sessions) as session:
            await self._hold(session, job)
            await storage.replace_chunks(session, document_id, chunks)
            if not await storage.set_status(
                session,
                document_id,
                storage.READY,
                expect=(storage.EMBEDDING,),
                chunk_count=len(chunks),
                error="",
                vector_collection=collection,
            ):
                raise _Gone
            await storage.finish_job(session, document_id, storage.JOB_INGEST, job.lease_owner)
        self._signals.changed(document_id)
        _LOGGER.info("document %s ready: %d chunks", document_id, len(chunks))
