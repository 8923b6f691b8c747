"""The SessionsService servicer: validates, converts to and from the contract, and calls
the domain (directory for sessions, chat for SendMessage)."""

import datetime as dt

from google.protobuf import timestamp_pb2

from ragmesh.sessions.v1 import sessions_pb2, sessions_pb2_grpc
from services.common.context import current_tenant
from services.common.errors import InvalidArgument
from services.sessions.chat import (
    DOCUMENT,
    AssistantStored,
    Chat,
    Delta,
    RetrievalDone,
    Retrieved,
    Turn,
    UserStored,
    check_turn,
)
from services.sessions.directory import Directory, SessionFields
from services.sessions.generation import overrides_from_pb, overrides_to_pb
from services.sessions.settings import SessionsSettings
from services.sessions.storage import ASSISTANT, ExchangeRow, MessageRow, SessionRow

_ROLES = {"user": sessions_pb2.MESSAGE_ROLE_USER, ASSISTANT: sessions_pb2.MESSAGE_ROLE_ASSISTANT}
_SOURCES = {
    DOCUMENT: sessions_pb2.RetrievalHit.SOURCE_DOCUMENT,
    "memory": sessions_pb2.RetrievalHit.SOURCE_MEMORY,
}


def _timestamp(value) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def session_to_pb(row: SessionRow) -> sessions_pb2.Session:
    return sessions_pb2.Session(
        id=row.id,
        tenant=row.tenant,
        name=row.name,
        model=row.model,
        document_ids=row.document_ids,
        tags=row.tags,
        auto_tags=row.auto_tags,
        message_count=row.message_count,
        create_time=_timestamp(row.created_at),
        update_time=_timestamp(row.updated_at),
        last_exchange_time=_timestamp(row.last_exchange_at),
        system_prompt=row.system_prompt,
        generation=overrides_to_pb(row.generation),
    )


def citation_to_pb(citation: dict) -> sessions_pb2.Citation:
    return sessions_pb2.Citation(**citation)


def message_to_pb(row: MessageRow) -> sessions_pb2.Message:
    return sessions_pb2.Message(
        id=row.id,
        session_id=row.session_id,
        role=_ROLES[row.role],
        content=row.content,
        citations=[citation_to_pb(c) for c in row.citations],
        model=row.model,
        finish_reason=sessions_pb2.FinishReason.Value(f"FINISH_REASON_{row.finish_reason}")
        if row.finish_reason
        else sessions_pb2.FINISH_REASON_UNSPECIFIED,
        prompt_tokens=row.prompt_tokens,
        completion_tokens=row.completion_tokens,
        time_to_first_token_seconds=row.time_to_first_token_seconds,
        total_seconds=row.total_seconds,
        error=row.error,
        create_time=_timestamp(row.created_at),
    )


def retrieval_to_pb(retrieved: Retrieved) -> sessions_pb2.RetrievalHits:
    hits = [
        sessions_pb2.RetrievalHit(
            source=sessions_pb2.RetrievalHit.SOURCE_DOCUMENT,
            text=hit.text,
            score=hit.score,
            citation=sessions_pb2.Citation(
                document_id=hit.document_id,
                chunk_id=hit.chunk_id,
                filename=hit.filename,
                page=hit.page,
                score=hit.score,
            ),
        )
        for hit in retrieved.documents
    ]
    hits.extend(
        sessions_pb2.RetrievalHit(
            source=sessions_pb2.RetrievalHit.SOURCE_DOCUMENT,
            score=citation["score"],
            citation=citation_to_pb(citation),
        )
        for citation in retrieved.citations
    )
    hits.extend(
        sessions_pb2.RetrievalHit(
            source=sessions_pb2.RetrievalHit.SOURCE_MEMORY,
            text=memory.exchange.text,
            score=memory.score,
            message_id=memory.exchange.user_message_id,
        )
        for memory in retrieved.memories
    )
    skipped = [
        sessions_pb2.RetrievalSkip(source=_SOURCES[s.source], reason=s.reason, message=s.message)
        for s in retrieved.skipped
    ]
    return sessions_pb2.RetrievalHits(hits=hits, skipped=skipped)


def memory_hit_to_pb(exchange: ExchangeRow, score: float) -> sessions_pb2.MemoryHit:
    return sessions_pb2.MemoryHit(
        session_id=exchange.session_id,
        message_id=exchange.user_message_id,
        text=exchange.text,
        score=score,
        create_time=_timestamp(exchange.created_at),
    )


def _fields(session: sessions_pb2.Session | sessions_pb2.CreateSessionRequest) -> SessionFields:
    return SessionFields(
        name=session.name,
        model=session.model,
        document_ids=list(session.document_ids),
        tags=list(session.tags),
        system_prompt=session.system_prompt,
        generation=overrides_from_pb(session.generation),
    )


class SessionsServicer(sessions_pb2_grpc.SessionsServiceServicer):
    def __init__(self, settings: SessionsSettings, directory: Directory, chat: Chat) -> None:
        self._settings = settings
        self._directory = directory
        self._chat = chat

    async def CreateSession(self, request, context):
        row = await self._directory.create(current_tenant(), _fields(request))
        return sessions_pb2.CreateSessionResponse(session=session_to_pb(row))

    async def GetSession(self, request, context):
        _require(request.session_id, "session_id")
        row = await self._directory.get(current_tenant(), request.session_id)
        return sessions_pb2.GetSessionResponse(session=session_to_pb(row))

    async def ListSessions(self, request, context):
        rows, token = await self._directory.list_sessions(
            current_tenant(),
            page_size_=request.page_size,
            page_token=request.page_token,
            tag=request.tag,
            model=request.model,
            exchanged_after=_time(request, "last_exchange_after"),
            exchanged_before=_time(request, "last_exchange_before"),
        )
        return sessions_pb2.ListSessionsResponse(
            sessions=[session_to_pb(r) for r in rows], next_page_token=token
        )

    async def UpdateSession(self, request, context):
        _require(request.session.id, "session.id")
        row = await self._directory.update(
            current_tenant(),
            request.session.id,
            _fields(request.session),
            list(request.update_mask.paths),
        )
        return sessions_pb2.UpdateSessionResponse(session=session_to_pb(row))

    async def DeleteSession(self, request, context):
        _require(request.session_id, "session_id")
        await self._directory.delete(current_tenant(), request.session_id)
        return sessions_pb2.DeleteSessionResponse()

    async def SearchSessions(self, request, context):
        matches = await self._directory.search(current_tenant(), request.query, request.top_k)
        return sessions_pb2.SearchSessionsResponse(
            matches=[
                sessions_pb2.SessionMatch(
                    session=session_to_pb(m.session),
                    score=m.score,
                    matched_fields=m.matched_fields,
                    snippet=m.snippet,
                )
                for m in matches
            ]
        )

    async def SendMessage(self, request, context):
        _require(request.session_id, "session_id")
        settings = self._settings
        document_top_k = (
            request.document_top_k
            if request.HasField("document_top_k")
            else settings.document_top_k
        )
        memory_top_k = (
            request.memory_top_k if request.HasField("memory_top_k") else settings.memory_top_k
        )
        overrides = overrides_from_pb(request.overrides)
        check_turn(
            request.content, document_top_k, memory_top_k, request.client_request_id, overrides
        )
        if request.document_ids:
            await self._directory.check_documents(list(request.document_ids))
        turn = Turn(
            tenant=current_tenant(),
            session_id=request.session_id,
            content=request.content,
            document_top_k=document_top_k,
            memory_top_k=memory_top_k,
            overrides=overrides,
            document_ids=list(request.document_ids) or None,
            whole_tenant_memory=request.memory_scope == sessions_pb2.MEMORY_SCOPE_TENANT,
            client_request_id=request.client_request_id,
        )
        async for event in self._chat.send(turn):
            if isinstance(event, UserStored):
                yield sessions_pb2.SendMessageResponse(user_message=message_to_pb(event.message))
            elif isinstance(event, RetrievalDone):
                yield sessions_pb2.SendMessageResponse(retrieval=retrieval_to_pb(event.retrieved))
            elif isinstance(event, Delta):
                yield sessions_pb2.SendMessageResponse(delta=event.text)
            elif isinstance(event, AssistantStored):
                yield sessions_pb2.SendMessageResponse(
                    assistant_message=message_to_pb(event.message)
                )

    async def ListMessages(self, request, context):
        _require(request.session_id, "session_id")
        rows, token = await self._directory.messages(
            current_tenant(),
            request.session_id,
            page_size_=request.page_size,
            page_token=request.page_token,
        )
        return sessions_pb2.ListMessagesResponse(
            messages=[message_to_pb(r) for r in rows], next_page_token=token
        )

    async def SearchMemory(self, request, context):
        hits = await self._directory.search_memory(
            current_tenant(), request.query, request.session_id, request.top_k
        )
        return sessions_pb2.SearchMemoryResponse(
            hits=[memory_hit_to_pb(exchange, score) for exchange, score in hits]
        )


def _require(value: str, field: str) -> None:
    if not value:
        raise InvalidArgument(f"{field} is required", field=field)


def _time(request, field: str) -> dt.datetime | None:
    """The timestamp field as a datetime; None when unset."""
    if not request.HasField(field):
        return None
    try:
        return getattr(request, field).ToDatetime(tzinfo=dt.UTC)
    except ValueError as exc:
        raise InvalidArgument(f"{field} is not a valid timestamp: {exc}", field=field) from exc
