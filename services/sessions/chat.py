"""SendMessage: store the question, retrieve, build the prompt, stream the answer, store
it and hand the exchange to memory.

The exchange runs in a task of its own that feeds the caller's stream through a queue,
so what must be stored is stored even when the caller goes away: a client that cancels
(or whose deadline passes) abandons the exchange, which cancels the llm call — its
stream and, by request id, its decode slot — and stores the partial answer as
CANCELLED.

The exchange describes itself on the SendMessage server span (the current span when
tracing is on, see services/common/tracing.py): the session, the retrieval sizes, the
model and the token counts, with the OpenTelemetry gen_ai names where there is one.
"""

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import grpc
from opentelemetry import trace

from ragmesh.llm.v1 import llm_pb2
from services.common.clients import Upstream
from services.common.database import Database, utcnow
from services.common.errors import InvalidArgument, NotFound, ServiceError, Unavailable
from services.sessions import storage
from services.sessions.generation import check_overrides, merged, overrides_to_pb
from services.sessions.memory import Memory, Recalled
from services.sessions.settings import SessionsSettings
from services.sessions.storage import MessageRow, SessionRow
from services.sessions.upstreams import DocumentHit, Ingest, LlmRouter

_LOGGER = logging.getLogger(__name__)

MAX_CONTENT_CHARS = 32_000
MAX_TOP_K = 50
MAX_CLIENT_REQUEST_ID = 128
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant. Answer the user's questions accurately."
DOCUMENTS_HEADER = (
    "Passages from the user's documents. Answer from them when they are relevant, and "
    "cite each passage you use by its label in square brackets, for example [D1]."
)
MEMORIES_HEADER = (
    "Notes from earlier conversations with this user; use them when they are relevant."
)

# Finish reasons as stored (and as the proto's FinishReason names them).
FINISH_NAMES = {
    llm_pb2.FINISH_REASON_LENGTH: "LENGTH",
    llm_pb2.FINISH_REASON_STOP: "STOP",
    llm_pb2.FINISH_REASON_EOS: "EOS",
    llm_pb2.FINISH_REASON_CANCELLED: "CANCELLED",
}
CANCELLED = "CANCELLED"
ERROR = "ERROR"

DOCUMENT, MEMORY = "document", "memory"


@dataclass(frozen=True)
class Turn:
    """One SendMessage, validated."""

    tenant: str
    session_id: str
    content: str
    document_top_k: int
    memory_top_k: int
    overrides: dict
    # Replace the session's documents for this message when not None.
    document_ids: list[str] | None
    whole_tenant_memory: bool
    client_request_id: str


@dataclass(frozen=True)
class Skip:
    source: str
    reason: str
    message: str


@dataclass
class Retrieved:
    documents: list[DocumentHit] = field(default_factory=list)
    memories: list[Recalled] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    # Stored citations, when replaying an exchange.
    citations: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class UserStored:
    message: MessageRow


@dataclass(frozen=True)
class RetrievalDone:
    retrieved: Retrieved


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class AssistantStored:
    message: MessageRow


Event = UserStored | RetrievalDone | Delta | AssistantStored


def check_turn(
    content: str, document_top_k: int, memory_top_k: int, client_request_id: str, overrides: dict
) -> None:
    if not content.strip():
        raise InvalidArgument("content must not be empty", field="content")
    if len(content) > MAX_CONTENT_CHARS:
        raise InvalidArgument(
            f"content has {len(content)} characters; the limit is {MAX_CONTENT_CHARS}",
            field="content",
        )
    for name, value in (("document_top_k", document_top_k), ("memory_top_k", memory_top_k)):
        if not 0 <= value <= MAX_TOP_K:
            raise InvalidArgument(f"{name} must be between 0 and {MAX_TOP_K}", field=name)
    if len(client_request_id) > MAX_CLIENT_REQUEST_ID:
        raise InvalidArgument(
            f"client_request_id is at most {MAX_CLIENT_REQUEST_ID} characters",
            field="client_request_id",
        )
    check_overrides(overrides, "overrides")


class Chat:
    def __init__(
        self,
        settings: SessionsSettings,
        database: Database,
        ingest: Ingest,
        llm: LlmRouter,
        memory: Memory,
    ) -> None:
        self._settings = settings
        self._db = database
        self._ingest = ingest
        self._llm = llm
        self._memory = memory

    async def send(self, turn: Turn) -> AsyncIterator[Event]:
        """The exchange's events, in order; raises the error that ended it, if any."""
        exchange = _Exchange(self, turn)
        task = asyncio.create_task(exchange.run(), name=f"exchange-{turn.session_id}")
        try:
            while True:
                item = await exchange.events.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if not task.done():
                exchange.abandon()


class _Exchange:
    def __init__(self, chat: Chat, turn: Turn) -> None:
        self.chat = chat
        self.turn = turn
        self.events: asyncio.Queue[Event | BaseException | None] = asyncio.Queue()
        self._abandoned = asyncio.Event()
        self._call = None

    def abandon(self) -> None:
        """The caller went away: stop generating; what was produced is stored."""
        self._abandoned.set()
        if self._call is not None:
            self._call.cancel()

    async def run(self) -> None:
        try:
            await self._run()
        except ServiceError as exc:
            self.events.put_nowait(exc)
        except Exception as exc:
            _LOGGER.exception("exchange in session %s failed", self.turn.session_id)
            self.events.put_nowait(exc)
        finally:
            self.events.put_nowait(None)

    async def _run(self) -> None:
        chat, turn, settings = self.chat, self.turn, self.chat._settings
        started = time.monotonic()
        span = trace.get_current_span()
        span.set_attribute("ragmesh.session.id", turn.session_id)
        user, answer, session = await self._store_question()
        self.events.put_nowait(UserStored(user))
        if answer is not None:
            # A retry of a finished exchange: stream what was stored.
            self.events.put_nowait(RetrievalDone(Retrieved(citations=answer.citations)))
            if answer.content:
                self.events.put_nowait(Delta(answer.content))
            self.events.put_nowait(AssistantStored(answer))
            return
        llm = chat._llm.for_model(session.model)
        document_ids = session.document_ids if turn.document_ids is None else turn.document_ids
        retrieved, context_length = await asyncio.gather(
            self._retrieve(document_ids),
            _capture(chat._llm.context_length(llm)),
        )
        self.events.put_nowait(RetrievalDone(retrieved))
        span.set_attributes(
            {
                "ragmesh.retrieval.chunks_requested": turn.document_top_k,
                "ragmesh.retrieval.chunks_returned": len(retrieved.documents),
                "ragmesh.retrieval.memories_requested": turn.memory_top_k,
                "ragmesh.retrieval.memories_recalled": len(retrieved.memories),
                "ragmesh.retrieval.skipped": [skip.source for skip in retrieved.skipped],
            }
        )
        if isinstance(context_length, BaseException):
            raise context_length
        overrides = merged(session.generation, turn.overrides)
        system = system_prompt(session.system_prompt, retrieved)
        history = await self._history(user)
        reserve = overrides.get("max_new_tokens") or settings.answer_reserve_tokens
        messages = await fit_history(
            lambda candidate: chat._llm.count_tokens(llm, candidate),
            system,
            history,
            user.content,
            budget=context_length - reserve,
        )
        if self._abandoned.is_set():
            return
        await self._answer(llm, session, user, retrieved, system, messages, overrides, started)

    async def _store_question(self) -> tuple[MessageRow, MessageRow | None, SessionRow]:
        turn = self.turn
        async with self.chat._db.write() as db:
            session = await storage.lock_session(db, turn.tenant, turn.session_id)
            if session is None:
                raise NotFound(
                    f"no session {turn.session_id}",
                    reason="SESSION_NOT_FOUND",
                    metadata={"session_id": turn.session_id},
                )
            if turn.client_request_id:
                found = await storage.find_request(
                    db, turn.tenant, turn.session_id, turn.client_request_id
                )
                if found is not None:
                    return found[0], found[1], session
            now = utcnow()
            user = MessageRow(
                id=str(uuid.uuid4()),
                session_id=session.id,
                tenant=turn.tenant,
                seq=await storage.next_seq(db, turn.tenant, session.id),
                role=storage.USER,
                content=turn.content,
                client_request_id=turn.client_request_id or None,
                citations=[],
                created_at=now,
            )
            db.add(user)
            session.message_count += 1
            session.updated_at = now
        return user, None, session

    async def _retrieve(self, document_ids: Sequence[str]) -> Retrieved:
        retrieved = Retrieved()
        documents = self._documents(document_ids, retrieved)
        memories = self._memories(retrieved)
        await asyncio.gather(documents, memories)
        return retrieved

    async def _documents(self, document_ids: Sequence[str], retrieved: Retrieved) -> None:
        turn = self.turn
        if turn.document_top_k == 0:
            retrieved.skipped.append(Skip(DOCUMENT, "DISABLED", "document_top_k is 0"))
            return
        if not document_ids:
            retrieved.skipped.append(
                Skip(DOCUMENT, "NO_DOCUMENTS", "the session names no documents")
            )
            return
        try:
            retrieved.documents = await self.chat._ingest.search(
                turn.content, document_ids, turn.document_top_k
            )
        except ServiceError as exc:
            reason = "INGEST_UNAVAILABLE" if isinstance(exc, Unavailable) else exc.reason
            retrieved.skipped.append(Skip(DOCUMENT, reason, exc.message))

    async def _memories(self, retrieved: Retrieved) -> None:
        turn = self.turn
        if turn.memory_top_k == 0:
            retrieved.skipped.append(Skip(MEMORY, "DISABLED", "memory_top_k is 0"))
            return
        try:
            retrieved.memories = await self.chat._memory.recall(
                turn.tenant,
                turn.content,
                session_id=None if turn.whole_tenant_memory else turn.session_id,
                top_k=turn.memory_top_k,
            )
        except ServiceError as exc:
            reason = "EMBED_UNAVAILABLE" if isinstance(exc, Unavailable) else exc.reason
            retrieved.skipped.append(Skip(MEMORY, reason, exc.message))

    async def _history(self, user: MessageRow) -> list[MessageRow]:
        async with self.chat._db.read() as db:
            rows = await storage.recent_messages(
                db,
                self.turn.tenant,
                user.session_id,
                before_seq=user.seq,
                limit=self.chat._settings.history_messages,
            )
        return [row for row in rows if row.content]

    async def _answer(
        self,
        llm: Upstream,
        session: SessionRow,
        user: MessageRow,
        retrieved: Retrieved,
        system: str,
        messages: list[llm_pb2.ChatMessage],
        overrides: dict,
        started: float,
    ) -> None:
        request_id = uuid.uuid4().hex
        call = self.chat._llm.chat(
            llm,
            llm_pb2.ChatRequest(
                messages=messages,
                system_prompt=system,
                overrides=overrides_to_pb(overrides),
                request_id=request_id,
            ),
        )
        self._call = call
        parts: list[str] = []
        completion: llm_pb2.Completion | None = None
        first_token: float | None = None
        failure: ServiceError | None = None
        try:
            async for event in call:
                if event.WhichOneof("event") == "delta":
                    if first_token is None:
                        first_token = time.monotonic()
                    parts.append(event.delta)
                    self.events.put_nowait(Delta(event.delta))
                else:
                    completion = event.completion
        except grpc.aio.AioRpcError as exc:
            if not self._abandoned.is_set():
                failure = llm.error(exc)
                if not parts:
                    raise failure from exc
        except asyncio.CancelledError:
            if not self._abandoned.is_set():
                raise
        if self._abandoned.is_set():
            with contextlib.suppress(ServiceError):
                await self.chat._llm.cancel(llm, request_id)
            finish = CANCELLED
        elif failure is not None:
            finish = ERROR
        else:
            finish = FINISH_NAMES.get(completion.finish_reason, "STOP") if completion else ERROR
        now = time.monotonic()
        answer = MessageRow(
            id=str(uuid.uuid4()),
            session_id=session.id,
            tenant=self.turn.tenant,
            role=storage.ASSISTANT,
            content=(completion.text if completion is not None else "") or "".join(parts),
            reply_to=user.id,
            citations=[citation(hit) for hit in retrieved.documents],
            model=(completion.model if completion is not None else "") or session.model,
            finish_reason=finish,
            prompt_tokens=completion.usage.prompt_tokens if completion is not None else 0,
            completion_tokens=completion.usage.completion_tokens if completion is not None else 0,
            time_to_first_token_seconds=(first_token - started) if first_token else 0.0,
            total_seconds=now - started,
            error=failure.message if failure is not None else "",
            created_at=utcnow(),
        )
        span = trace.get_current_span()
        if session.model:
            span.set_attribute("gen_ai.request.model", session.model)
        span.set_attributes(
            {
                "gen_ai.response.model": answer.model,
                "gen_ai.usage.input_tokens": answer.prompt_tokens,
                "gen_ai.usage.output_tokens": answer.completion_tokens,
                "gen_ai.response.finish_reasons": [finish],
            }
        )
        await self._store_answer(session, user, answer)
        self.events.put_nowait(AssistantStored(answer))
        if failure is not None:
            raise failure

    async def _store_answer(
        self, session: SessionRow, user: MessageRow, answer: MessageRow
    ) -> None:
        remember = answer.finish_reason != ERROR and bool(answer.content.strip())
        async with self.chat._db.write() as db:
            row = await storage.lock_session(db, self.turn.tenant, session.id)
            if row is None:
                return  # deleted while answering: nothing to keep
            answer.seq = await storage.next_seq(db, self.turn.tenant, session.id)
            db.add(answer)
            row.message_count += 1
            row.updated_at = row.last_exchange_at = answer.created_at
            if not row.name:
                row.name = derive_name(user.content)
                row.name_is_auto = True
            if remember:
                db.add(
                    storage.ExchangeRow(
                        id=str(uuid.uuid4()),
                        session_id=session.id,
                        tenant=self.turn.tenant,
                        user_message_id=user.id,
                        assistant_message_id=answer.id,
                        text=f"User: {user.content}\nAssistant: {answer.content}",
                        indexed=False,
                        created_at=answer.created_at,
                    )
                )
        if remember:
            self.chat._memory.wake()


async def _capture(awaitable):
    """The awaitable's result, or the ServiceError it raised (gather keeps going)."""
    try:
        return await awaitable
    except ServiceError as exc:
        return exc


def citation(hit: DocumentHit) -> dict:
    return {
        "document_id": hit.document_id,
        "chunk_id": hit.chunk_id,
        "filename": hit.filename,
        "page": hit.page,
        "score": hit.score,
    }


def system_prompt(session_prompt: str, retrieved: Retrieved) -> str:
    parts = [session_prompt.strip() or DEFAULT_SYSTEM_PROMPT]
    if retrieved.documents:
        parts.append(DOCUMENTS_HEADER)
        for n, hit in enumerate(retrieved.documents, 1):
            where = f"{hit.filename}, page {hit.page}" if hit.page else hit.filename
            parts.append(f"[D{n}] ({where})\n{hit.text}")
    if retrieved.memories:
        parts.append(MEMORIES_HEADER)
        for n, memory in enumerate(retrieved.memories, 1):
            day = memory.exchange.created_at.date().isoformat()
            parts.append(f"[M{n}] ({day})\n{memory.exchange.text}")
    return "\n\n".join(parts)


async def fit_history(
    count_tokens, system: str, history: list[MessageRow], question: str, *, budget: int
) -> list[llm_pb2.ChatMessage]:
    """The newest whole messages of history that fit budget with the system prompt and the
    question (always kept), as chat messages; found with a binary search over CountTokens."""
    roles = {storage.USER: llm_pb2.ROLE_USER, storage.ASSISTANT: llm_pb2.ROLE_ASSISTANT}
    past = [llm_pb2.ChatMessage(role=roles[row.role], content=row.content) for row in history]
    last = llm_pb2.ChatMessage(role=llm_pb2.ROLE_USER, content=question)
    head = [llm_pb2.ChatMessage(role=llm_pb2.ROLE_SYSTEM, content=system)]

    async def fits(n: int) -> bool:
        kept = past[len(past) - n :] if n else []
        return await count_tokens([*head, *kept, last]) <= budget

    if not past or await fits(len(past)):
        return [*past, last]
    low, high = 0, len(past) - 1  # fits(high + 1) is False
    while low < high:
        middle = (low + high + 1) // 2
        if await fits(middle):
            low = middle
        else:
            high = middle - 1
    kept = past[len(past) - low :] if low else []
    return [*kept, last]


def derive_name(content: str, limit: int = 60) -> str:
    """A session name from its first question: the first line, cut at a word."""
    line = " ".join(content.split())
    if len(line) <= limit:
        return line
    cut = line[:limit].rsplit(" ", 1)[0] or line[:limit]
    return cut.rstrip(",.;:") + "…"
