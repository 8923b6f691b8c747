"""The tenant's sessions: create, read, list, update, delete, and find them again."""

import asyncio
import datetime as dt
import logging
import uuid
from dataclasses import dataclass, field

from services.common.database import Database, utcnow
from services.common.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    ServiceError,
    Unavailable,
)
from services.common.pages import bad_page_token, decode_page_token, encode_page_token, page_size
from services.common.text import Analyzer
from services.sessions import storage
from services.sessions.generation import check_overrides
from services.sessions.memory import Memory
from services.sessions.storage import ExchangeRow, SessionRow
from services.sessions.upstreams import Ingest, LlmRouter

_LOGGER = logging.getLogger(__name__)

MAX_NAME = 200
MAX_DOCUMENTS = 100
MAX_TAGS = 32
MAX_TAG_CHARS = 64
MAX_SYSTEM_PROMPT = 16_000
DEFAULT_PAGE, MAX_PAGE = 50, 500
DEFAULT_MESSAGES_PAGE, MAX_MESSAGES_PAGE = 100, 1000
DEFAULT_SEARCH, MAX_SEARCH = 20, 100
DEFAULT_MEMORY, MAX_MEMORY = 5, 100
MAX_QUERY = 4096
SNIPPET_CHARS = 240
UPDATABLE = {"name", "model", "document_ids", "tags", "system_prompt", "generation"}


@dataclass
class SessionFields:
    """What a caller may set on a session."""

    name: str = ""
    model: str = ""
    document_ids: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    system_prompt: str = ""
    generation: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Match:
    session: SessionRow
    score: float
    matched_fields: list[str]
    snippet: str


def _not_found(session_id: str) -> NotFound:
    return NotFound(
        f"no session {session_id}", reason="SESSION_NOT_FOUND", metadata={"session_id": session_id}
    )


def _check_fields(fields: SessionFields, paths: set[str]) -> None:
    if "name" in paths and len(fields.name) > MAX_NAME:
        raise InvalidArgument(f"name is at most {MAX_NAME} characters", field="name")
    if "document_ids" in paths:
        if len(fields.document_ids) > MAX_DOCUMENTS:
            raise InvalidArgument(f"at most {MAX_DOCUMENTS} document ids", field="document_ids")
        if any(not d.strip() for d in fields.document_ids):
            raise InvalidArgument("document ids must not be empty", field="document_ids")
    if "tags" in paths:
        if len(fields.tags) > MAX_TAGS:
            raise InvalidArgument(f"at most {MAX_TAGS} tags", field="tags")
        if any(not t.strip() or len(t) > MAX_TAG_CHARS for t in fields.tags):
            raise InvalidArgument(f"each tag is 1 to {MAX_TAG_CHARS} characters", field="tags")
    if "system_prompt" in paths and len(fields.system_prompt) > MAX_SYSTEM_PROMPT:
        raise InvalidArgument(
            f"system_prompt is at most {MAX_SYSTEM_PROMPT} characters", field="system_prompt"
        )
    if "generation" in paths:
        check_overrides(fields.generation, "generation")


class Directory:
    def __init__(
        self,
        database: Database,
        ingest: Ingest,
        llm: LlmRouter,
        memory: Memory,
        *,
        name_scan: int,
    ) -> None:
        self._db = database
        self._ingest = ingest
        self._llm = llm
        self._memory = memory
        self._name_scan = name_scan
        self._analyzer = Analyzer()

    async def _check_references(self, fields: SessionFields, paths: set[str]) -> None:
        """The documents must be the caller's and the model one the mesh serves."""
        checks = []
        if "document_ids" in paths and fields.document_ids:
            checks.append(self._check_documents(list(dict.fromkeys(fields.document_ids))))
        if "model" in paths:
            checks.append(self._llm.check_model(fields.model))
        await asyncio.gather(*checks)

    async def check_documents(self, document_ids: list[str]) -> None:
        """For a message's own documents: at most MAX_DOCUMENTS, each one of the caller's.

        While ingest cannot answer, the message goes on: its retrieval is skipped then
        (INGEST_UNAVAILABLE), and ingest's search never returns another tenant's chunks.
        """
        _check_fields(SessionFields(document_ids=document_ids), {"document_ids"})
        try:
            await self._check_documents(list(dict.fromkeys(document_ids)))
        except (Unavailable, DeadlineExceeded) as exc:
            _LOGGER.warning("document ids of a message left unchecked: %s", exc.message)

    async def _check_documents(self, document_ids: list[str]) -> None:
        missing = await self._ingest.missing_documents(document_ids)
        if missing:
            raise NotFound(
                f"no such document in this tenant: {', '.join(missing)}",
                reason="DOCUMENTS_NOT_FOUND",
                metadata={"document_ids": ",".join(missing)},
                field_violations=[("document_ids", f"no document {d}") for d in missing],
            )

    async def create(self, tenant: str, fields: SessionFields) -> SessionRow:
        _check_fields(fields, UPDATABLE)
        await self._check_references(fields, UPDATABLE)
        now = utcnow()
        row = SessionRow(
            id=str(uuid.uuid4()),
            tenant=tenant,
            name=fields.name.strip(),
            name_is_auto=False,
            model=fields.model,
            document_ids=list(dict.fromkeys(fields.document_ids)),
            tags=list(dict.fromkeys(t.strip() for t in fields.tags)),
            auto_tags=[],
            system_prompt=fields.system_prompt,
            generation=fields.generation,
            message_count=0,
            created_at=now,
            updated_at=now,
            last_exchange_at=None,
        )
        async with self._db.write() as db:
            storage.add_session(db, row)
        return row

    async def get(self, tenant: str, session_id: str) -> SessionRow:
        async with self._db.read() as db:
            row = await storage.get_session(db, tenant, session_id)
        if row is None:
            raise _not_found(session_id)
        return row

    async def list_sessions(
        self,
        tenant: str,
        *,
        page_size_: int,
        page_token: str,
        tag: str,
        model: str,
        exchanged_after: dt.datetime | None,
        exchanged_before: dt.datetime | None,
    ) -> tuple[list[SessionRow], str]:
        limit = page_size(page_size_, DEFAULT_PAGE, MAX_PAGE)
        if exchanged_after and exchanged_before and exchanged_before <= exchanged_after:
            raise InvalidArgument(
                "last_exchange_before must be later than last_exchange_after",
                field="last_exchange_before",
            )
        after = None
        if page_token:
            position = decode_page_token(page_token, {"f", "t", "i"})
            try:
                dt.datetime.fromisoformat(position["t"])
            except (TypeError, ValueError) as exc:
                raise bad_page_token() from exc
            if position["f"] not in ("0", "1"):
                raise bad_page_token()
            after = (position["f"], position["t"], str(position["i"]))
        async with self._db.read() as db:
            rows = await storage.list_sessions(
                db,
                tenant,
                limit=limit + 1,
                after=after,
                tag=tag,
                model=model,
                exchanged_after=exchanged_after,
                exchanged_before=exchanged_before,
            )
        token = ""
        if len(rows) > limit:
            rows = rows[:limit]
            flag, at, last = storage.page_key(rows[-1])
            token = encode_page_token({"f": flag, "t": at, "i": last})
        return rows, token

    async def update(
        self, tenant: str, session_id: str, fields: SessionFields, paths: list[str]
    ) -> SessionRow:
        if not paths:
            raise InvalidArgument(
                f"update_mask must name the fields to change: {', '.join(sorted(UPDATABLE))}",
                field="update_mask",
            )
        unknown = sorted(set(paths) - UPDATABLE)
        if unknown:
            raise InvalidArgument(
                f"update_mask names fields that cannot be changed: {', '.join(unknown)}; "
                f"updatable: {', '.join(sorted(UPDATABLE))}",
                field="update_mask",
            )
        chosen = set(paths)
        _check_fields(fields, chosen)
        await self._check_references(fields, chosen)
        async with self._db.write() as db:
            row = await storage.lock_session(db, tenant, session_id)
            if row is None:
                raise _not_found(session_id)
            if "name" in chosen:
                row.name = fields.name.strip()
                row.name_is_auto = False
            if "model" in chosen:
                row.model = fields.model
            if "document_ids" in chosen:
                row.document_ids = list(dict.fromkeys(fields.document_ids))
            if "tags" in chosen:
                await storage.replace_tags(
                    db, row, storage.TAG_SET, list(dict.fromkeys(t.strip() for t in fields.tags))
                )
            if "system_prompt" in chosen:
                row.system_prompt = fields.system_prompt
            if "generation" in chosen:
                row.generation = fields.generation
            row.updated_at = utcnow()
        return row

    async def delete(self, tenant: str, session_id: str) -> None:
        async with self._db.write() as db:
            if not await storage.delete_session(db, tenant, session_id):
                raise _not_found(session_id)
        try:
            await self._memory.forget_session(session_id)
        except ServiceError as exc:
            # SQL no longer holds the session, so its vectors can never answer.
            _LOGGER.warning("memory vectors of session %s stay for now: %s", session_id, exc)

    async def messages(
        self, tenant: str, session_id: str, *, page_size_: int, page_token: str
    ) -> tuple[list[storage.MessageRow], str]:
        limit = page_size(page_size_, DEFAULT_MESSAGES_PAGE, MAX_MESSAGES_PAGE)
        after_seq = 0
        if page_token:
            after_seq = decode_page_token(page_token, {"s"})["s"]
            if not isinstance(after_seq, int) or after_seq < 0:
                raise bad_page_token()
        async with self._db.read() as db:
            if await storage.get_session(db, tenant, session_id) is None:
                raise _not_found(session_id)
            rows = await storage.list_messages(
                db, tenant, session_id, after_seq=after_seq, limit=limit + 1
            )
        token = ""
        if len(rows) > limit:
            rows = rows[:limit]
            token = encode_page_token({"s": rows[-1].seq})
        return rows, token

    async def search_memory(
        self, tenant: str, query: str, session_id: str, top_k: int
    ) -> list[tuple[ExchangeRow, float]]:
        _check_query(query)
        if not 0 <= top_k <= MAX_MEMORY:
            raise InvalidArgument(f"top_k must be between 0 and {MAX_MEMORY}", field="top_k")
        if session_id:
            await self.get(tenant, session_id)
        recalled = await self._memory.recall(
            tenant, query, session_id=session_id or None, top_k=top_k or DEFAULT_MEMORY
        )
        return [(r.exchange, r.score) for r in recalled]

    async def search(self, tenant: str, query: str, top_k: int) -> list[Match]:
        """Sessions by the words of their names and tags, and by the meaning of their
        exchanges. A word match adds to the score of the exchanges' best cosine."""
        _check_query(query)
        if not 0 <= top_k <= MAX_SEARCH:
            raise InvalidArgument(f"top_k must be between 0 and {MAX_SEARCH}", field="top_k")
        top_k = top_k or DEFAULT_SEARCH
        terms = set(self._analyzer.terms(query))
        scores: dict[str, float] = {}
        fields: dict[str, list[str]] = {}
        snippets: dict[str, str] = {}
        try:
            recalled = await self._memory.recall(
                tenant, query, session_id=None, top_k=top_k * 4, min_score=-1.0
            )
        except ServiceError as exc:
            _LOGGER.info("session search by meaning skipped: %s", exc.message)
            recalled = []
        for memory in recalled:
            sid = memory.exchange.session_id
            if sid not in scores:
                scores[sid] = memory.score
                fields[sid] = ["content"]
                snippets[sid] = _snippet(memory.exchange.text)
        async with self._db.read() as db:
            recent = await storage.tenant_sessions(db, tenant, self._name_scan)
        by_id = {row.id: row for row in recent}
        for row in recent:
            for name, texts, weight in (
                ("name", [row.name], 0.5),
                ("tag", row.tags, 0.4),
                ("auto_tag", row.auto_tags, 0.3),
            ):
                matched = self._overlap(terms, texts)
                if matched:
                    scores[row.id] = scores.get(row.id, 0.0) + weight * matched
                    fields.setdefault(row.id, []).append(name)
        missing = [sid for sid in scores if sid not in by_id]
        if missing:
            async with self._db.read() as db:
                by_id.update(await storage.sessions_by_id(db, tenant, missing))
        ranked = sorted(
            (sid for sid in scores if sid in by_id), key=lambda sid: (-scores[sid], sid)
        )
        return [
            Match(by_id[sid], scores[sid], sorted(fields[sid]), snippets.get(sid, ""))
            for sid in ranked[:top_k]
        ]

    def _overlap(self, terms: set[str], texts: list[str]) -> float:
        """The share of the query's terms found in texts."""
        if not terms:
            return 0.0
        found = {t for text in texts for t in self._analyzer.terms(text)}
        return len(terms & found) / len(terms)


def _check_query(query: str) -> None:
    if not query.strip():
        raise InvalidArgument("query must not be empty", field="query")
    if len(query) > MAX_QUERY:
        raise InvalidArgument(f"query is at most {MAX_QUERY} characters", field="query")


def _snippet(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= SNIPPET_CHARS else flat[:SNIPPET_CHARS].rsplit(" ", 1)[0] + "…"
