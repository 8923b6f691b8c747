"""The worker pool: takes jobs from the database and runs parse, chunk, embed and index."""

import asyncio
import contextlib
import logging
import os
import socket
import uuid

import numpy as np
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.common.errors import DeadlineExceeded, ServiceError, Unavailable
from services.ingest import storage
from services.ingest.blobs import BlobStore
from services.ingest.chunker import TokenizerLimits, plan_chunks, token_spans
from services.ingest.documents import Documents, JobSignals
from services.ingest.embed_client import EmbedClient
from services.ingest.index import Point, VectorIndex, collection_name
from services.ingest.parsers import ParseError, parse
from services.ingest.search import Retrieval
from services.ingest.settings import IngestSettings
from services.ingest.storage import ChunkRow, JobRow

_LOGGER = logging.getLogger(__name__)

_ACTIVE = (storage.PENDING, storage.PARSING, storage.CHUNKING, storage.EMBEDDING)
_CHUNK_NAMESPACE = uuid.UUID("5b0f6c1e-8f43-4f5e-9d0a-3c7f2f1d9e41")


class _Gone(Exception):
    """The document was deleted while it was being processed."""


def chunk_id(document_id: str, index: int) -> str:
    """Stable per position, so a retried job overwrites its own vectors instead of adding."""
    return str(uuid.uuid5(_CHUNK_NAMESPACE, f"{document_id}:{index}"))


class WorkerPool:
    def __init__(
        self,
        settings: IngestSettings,
        sessions: async_sessionmaker[AsyncSession],
        documents: Documents,
        blobs: BlobStore,
        index: VectorIndex,
        embed: EmbedClient,
        signals: JobSignals,
        retrieval: Retrieval,
    ) -> None:
        self._settings = settings
        self._sessions = sessions
        self._documents = documents
        self._blobs = blobs
        self._index = index
        self._embed = embed
        self._signals = signals
        self._retrieval = retrieval
        self._owner = f"{socket.gethostname()[:40]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._run(), name=f"ingest-worker-{n}")
            for n in range(self._settings.workers)
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            async with storage.writing(self._sessions) as session:
                await storage.release_jobs(session, self._owner)
        except Exception:
            _LOGGER.warning("could not release job leases; they expire on their own", exc_info=True)

    async def _run(self) -> None:
        while True:
            try:
                async with storage.writing(self._sessions) as session:
                    job = await storage.claim_job(
                        session, self._owner, self._settings.job_lease_seconds
                    )
            except Exception:
                _LOGGER.exception("could not take a job; retrying")
                job = None
            if job is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._signals.queued.wait(), self._settings.job_poll_seconds
                    )
                self._signals.queued.clear()
                continue
            task = asyncio.create_task(self._execute(job))
            self._signals.running[job.document_id] = task
            try:
                # wait(), not await: a delete cancels the job, which must not end this loop.
                await asyncio.wait({task})
            except asyncio.CancelledError:
                task.cancel()
                await asyncio.wait({task})
                raise
            finally:
                self._signals.running.pop(job.document_id, None)

    async def _execute(self, job: JobRow) -> None:
        renewer = asyncio.create_task(self._renew(job.document_id))
        try:
            if job.kind == storage.JOB_DELETE:
                await self._documents.finish_delete(job.document_id)
            else:
                await self._ingest_safely(job)
        except asyncio.CancelledError:
            _LOGGER.info("stopped work on document %s", job.document_id)
        except Exception:
            # Only deletes get here (ingest handles its own errors): never give up on them.
            _LOGGER.exception("deleting document %s failed; retrying", job.document_id)
            await self._retry(job, 5.0)
        finally:
            renewer.cancel()

    async def _renew(self, document_id: str) -> None:
        interval = self._settings.job_lease_seconds / 3
        while True:
            await asyncio.sleep(interval)
            with contextlib.suppress(Exception):
                async with storage.writing(self._sessions) as session:
                    await storage.renew_lease(
                        session, document_id, self._owner, self._settings.job_lease_seconds
                    )

    async def _ingest_safely(self, job: JobRow) -> None:
        document_id = job.document_id
        try:
            await self._ingest(document_id)
        except _Gone:
            _LOGGER.info("document %s was deleted while being processed", document_id)
            self._retrieval.remove_document(document_id)
            await self._index.delete_document(document_id)
        except ParseError as exc:
            await self._fail(document_id, str(exc))
        except (Unavailable, DeadlineExceeded) as exc:
            await self._retry_or_fail(job, exc.message)
        except ServiceError as exc:
            await self._fail(document_id, exc.message)
        except Exception:
            _LOGGER.exception("processing document %s failed unexpectedly", document_id)
            await self._retry_or_fail(job, "an internal error stopped processing (see the log)")

    async def _retry_or_fail(self, job: JobRow, reason: str) -> None:
        """Transient trouble gets retries with backoff, then a FAILED document that says why."""
        attempts = job.attempts + 1
        if attempts >= self._settings.job_max_attempts:
            await self._fail(job.document_id, f"{reason} (gave up after {attempts} attempts)")
            return
        delay = min(2.0**attempts, 60.0)
        _LOGGER.warning(
            "document %s: %s; retry %d in %.0f s", job.document_id, reason, attempts, delay
        )
        await self._retry(job, delay)

    async def _retry(self, job: JobRow, delay: float) -> None:
        async with storage.writing(self._sessions) as session:
            await storage.retry_job(session, job.document_id, self._owner, delay)

    async def _fail(self, document_id: str, reason: str) -> None:
        _LOGGER.info("document %s failed: %s", document_id, reason)
        async with storage.writing(self._sessions) as session:
            await storage.set_status(
                session, document_id, storage.FAILED, expect=_ACTIVE, error=reason
            )
            await storage.finish_job(session, document_id, storage.JOB_INGEST)
        self._signals.changed(document_id)

    async def _move(self, document_id: str, status: str, **values) -> None:
        async with storage.writing(self._sessions) as session:
            if not await storage.set_status(session, document_id, status, expect=_ACTIVE, **values):
                raise _Gone
        self._signals.changed(document_id)

    async def _ingest(self, document_id: str) -> None:
        settings = self._settings
        async with self._sessions() as session:
            row = await session.get(storage.DocumentRow, document_id)
        if row is None or row.status not in _ACTIVE:
            async with storage.writing(self._sessions) as session:
                await storage.finish_job(session, document_id, storage.JOB_INGEST)
            return
        path = self._blobs.path(document_id)
        if not path.exists():
            raise ParseError("the stored file is missing; upload the document again")

        await self._move(document_id, storage.PARSING)
        parsed = await asyncio.to_thread(
            parse,
            path,
            row.mime_type,
            max_docx_bytes=settings.max_docx_uncompressed_bytes,
            max_chars=settings.max_text_chars,
        )
        async with storage.writing(self._sessions) as session:
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
        plan = plan_chunks(parsed, tokens, size=size, overlap=overlap)
        if not plan:
            raise ParseError("no text found in the file")

        await self._move(document_id, storage.EMBEDDING)
        collection = collection_name(model.name, model.dimension)
        await self._index.ensure_collection(collection, model.dimension)
        texts = [parsed.text[spec.start : spec.end] for spec in plan]
        limiter = asyncio.Semaphore(settings.embed_concurrency)
        batch = min(settings.embed_batch_size, model.max_texts)
        embeddings: dict[int, bytes] = {}

        async def embed_and_index(first: int) -> None:
            async with limiter:
                vectors = await self._embed.embed(texts[first : first + batch])
                for offset, vector in enumerate(vectors):
                    embeddings[first + offset] = np.asarray(vector, dtype=np.float32).tobytes()
                await self._index.upsert(
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
        # Searchable before READY commits, so a caller who sees READY finds the chunks;
        # until then search drops them, as it reads every hit back from READY rows.
        await self._retrieval.add_chunks(document_id, chunks, row.mime_type, row.tags)
        async with storage.writing(self._sessions) as session:
            await storage.replace_chunks(session, document_id, chunks)
            if not await storage.set_status(
                session,
                document_id,
                storage.READY,
                expect=(storage.EMBEDDING,),
                chunk_count=len(chunks),
                error="",
            ):
                raise _Gone
            await storage.finish_job(session, document_id, storage.JOB_INGEST)
        self._signals.changed(document_id)
        _LOGGER.info("document %s ready: %d chunks", document_id, len(chunks))
