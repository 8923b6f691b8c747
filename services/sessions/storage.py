"""SQL storage of sessions, their messages and the memory outbox: models and repositories.

Every repository function that reads or changes a tenant's data takes the tenant and
filters by it itself: no caller can forget it.
"""

import datetime as dt
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import (
    JSON,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    and_,
    delete,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from services.common.database import UtcDateTime

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

USER = "user"
ASSISTANT = "assistant"

TAG_SET = "set"
TAG_AUTO = "auto"


class Base(DeclarativeBase):
    pass


class SessionRow(Base):
    __tablename__ = "sessions"
    __table_args__ = (
        Index("ix_sessions_tenant_last_exchange", "tenant", "last_exchange_at", "id"),
        Index("ix_sessions_tenant_created", "tenant", "created_at", "id"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(255))
    name: Mapped[str] = mapped_column(String(200), default="")
    # True while the name was derived from the conversation, not given by the caller.
    name_is_auto: Mapped[bool] = mapped_column(Boolean, default=False)
    model: Mapped[str] = mapped_column(String(255), default="")
    document_ids: Mapped[list] = mapped_column(JSON, default=list)
    tags: Mapped[list] = mapped_column(JSON, default=list)
    auto_tags: Mapped[list] = mapped_column(JSON, default=list)
    system_prompt: Mapped[str] = mapped_column(Text, default="")
    # GenerationOverrides as a dict of the fields set.
    generation: Mapped[dict] = mapped_column(JSON, default=dict)
    message_count: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[dt.datetime] = mapped_column(UtcDateTime)
    last_exchange_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime, nullable=True)


class SessionTagRow(Base):
    """One row per tag (set or automatic), so listing can filter by tag with an index."""

    __tablename__ = "session_tags"

    session_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("sessions.id", ondelete="CASCADE"), primary_key=True
    )
    tag: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)
    kind: Mapped[str] = mapped_column(String(8), primary_key=True)


class MessageRow(Base):
    __tablename__ = "messages"
    __table_args__ = (
        Index("ix_messages_session_seq", "session_id", "seq", unique=True),
        # A retried SendMessage finds the exchange its client_request_id started.
        UniqueConstraint("session_id", "client_request_id", name="uq_messages_client_request"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    session_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("sessions.id", ondelete="CASCADE")
    )
    tenant: Mapped[str] = mapped_column(String(255))
    # Order within the session.
    seq: Mapped[int] = mapped_column(Integer)
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[str] = mapped_column(Text)
    # User messages only, when the client sent one.
    client_request_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    # Assistant messages: the user message answered.
    reply_to: Mapped[str | None] = mapped_column(String(36), nullable=True)
    citations: Mapped[list] = mapped_column(JSON, default=list)
    model: Mapped[str] = mapped_column(String(255), default="")
    finish_reason: Mapped[str] = mapped_column(String(16), default="")
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    time_to_first_token_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    total_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime)


class ExchangeRow(Base):
    """A user message and its answer, as remembered: the text embedded into memory.

    `indexed` turns true once the vector is in the store; a restart indexes the rest.
    The row's id is the vector's point id.
    """

    __tablename__ = "exchanges"
    __table_args__ = (Index("ix_exchanges_indexed", "indexed"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    session_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("sessions.id", ondelete="CASCADE"), index=True
    )
    tenant: Mapped[str] = mapped_column(String(255), index=True)
    user_message_id: Mapped[str] = mapped_column(String(36))
    assistant_message_id: Mapped[str] = mapped_column(String(36))
    text: Mapped[str] = mapped_column(Text)
    indexed: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime)


# Sessions.


async def get_session(session: AsyncSession, tenant: str, session_id: str) -> SessionRow | None:
    row = await session.get(SessionRow, session_id)
    return row if row is not None and row.tenant == tenant else None


async def lock_session(session: AsyncSession, tenant: str, session_id: str) -> SessionRow | None:
    """The session, locked for update (PostgreSQL; SQLite's write lock covers it)."""
    result = await session.execute(
        select(SessionRow)
        .where(SessionRow.id == session_id, SessionRow.tenant == tenant)
        .with_for_update()
    )
    return result.scalar_one_or_none()


def add_session(session: AsyncSession, row: SessionRow) -> None:
    session.add(row)
    _set_tags(session, row.id, TAG_SET, row.tags)


async def replace_tags(session: AsyncSession, row: SessionRow, kind: str, tags: list[str]) -> None:
    await session.execute(
        delete(SessionTagRow).where(SessionTagRow.session_id == row.id, SessionTagRow.kind == kind)
    )
    _set_tags(session, row.id, kind, tags)
    if kind == TAG_SET:
        row.tags = list(tags)
    else:
        row.auto_tags = list(tags)


def _set_tags(session: AsyncSession, session_id: str, kind: str, tags: Sequence[str]) -> None:
    for tag in dict.fromkeys(tags):
        session.add(SessionTagRow(session_id=session_id, tag=tag, kind=kind))


async def list_sessions(
    session: AsyncSession,
    tenant: str,
    *,
    limit: int,
    after: tuple[str, str, str] | None,
    tag: str,
    model: str,
    exchanged_after: dt.datetime | None,
    exchanged_before: dt.datetime | None,
) -> list[SessionRow]:
    """Most recent exchange first; sessions without one after them, newest first.

    The order key is (has an exchange, last exchange or creation time, id), descending;
    `after` is the key of the previous page's last row as (flag, iso time, id).
    """
    has_exchange = SessionRow.last_exchange_at.is_not(None)
    when = func.coalesce(SessionRow.last_exchange_at, SessionRow.created_at)
    query = select(SessionRow).where(SessionRow.tenant == tenant)
    if tag:
        query = query.where(
            SessionRow.id.in_(select(SessionTagRow.session_id).where(SessionTagRow.tag == tag))
        )
    if model:
        query = query.where(SessionRow.model == model)
    if exchanged_after is not None:
        query = query.where(SessionRow.last_exchange_at >= exchanged_after)
    if exchanged_before is not None:
        query = query.where(SessionRow.last_exchange_at < exchanged_before)
    if after is not None:
        flag, at, last_id = after
        at_time = dt.datetime.fromisoformat(at)
        if flag == "1":
            query = query.where(
                or_(
                    ~has_exchange,
                    SessionRow.last_exchange_at < at_time,
                    and_(SessionRow.last_exchange_at == at_time, SessionRow.id < last_id),
                )
            )
        else:
            query = query.where(
                ~has_exchange,
                or_(
                    SessionRow.created_at < at_time,
                    and_(SessionRow.created_at == at_time, SessionRow.id < last_id),
                ),
            )
    query = query.order_by(has_exchange.desc(), when.desc(), SessionRow.id.desc()).limit(limit)
    return list((await session.execute(query)).scalars())


def page_key(row: SessionRow) -> tuple[str, str, str]:
    if row.last_exchange_at is not None:
        return ("1", row.last_exchange_at.isoformat(), row.id)
    return ("0", row.created_at.isoformat(), row.id)


async def sessions_by_id(
    session: AsyncSession, tenant: str, session_ids: Sequence[str]
) -> dict[str, SessionRow]:
    if not session_ids:
        return {}
    result = await session.execute(
        select(SessionRow).where(SessionRow.tenant == tenant, SessionRow.id.in_(session_ids))
    )
    return {row.id: row for row in result.scalars()}


async def tenant_sessions(session: AsyncSession, tenant: str, limit: int) -> list[SessionRow]:
    """The tenant's most recently active sessions, for name and tag matching."""
    result = await session.execute(
        select(SessionRow)
        .where(SessionRow.tenant == tenant)
        .order_by(SessionRow.updated_at.desc())
        .limit(limit)
    )
    return list(result.scalars())


async def delete_session(session: AsyncSession, tenant: str, session_id: str) -> bool:
    """Deletes the session with its messages, tags and exchanges; False when absent."""
    row = await get_session(session, tenant, session_id)
    if row is None:
        return False
    # Explicit deletes, so SQLite without cascading foreign keys behaves the same.
    for table in (ExchangeRow, MessageRow, SessionTagRow):
        await session.execute(delete(table).where(table.session_id == session_id))
    await session.delete(row)
    return True


# Messages.


async def next_seq(session: AsyncSession, tenant: str, session_id: str) -> int:
    result = await session.execute(
        select(func.coalesce(func.max(MessageRow.seq), 0)).where(
            MessageRow.tenant == tenant, MessageRow.session_id == session_id
        )
    )
    return int(result.scalar_one()) + 1


async def find_request(
    session: AsyncSession, tenant: str, session_id: str, client_request_id: str
) -> tuple[MessageRow, MessageRow | None] | None:
    """The user message a client_request_id stored, and its answer when there is one."""
    result = await session.execute(
        select(MessageRow).where(
            MessageRow.tenant == tenant,
            MessageRow.session_id == session_id,
            MessageRow.client_request_id == client_request_id,
        )
    )
    user = result.scalar_one_or_none()
    if user is None:
        return None
    answer = await session.execute(
        select(MessageRow).where(MessageRow.tenant == tenant, MessageRow.reply_to == user.id)
    )
    return user, answer.scalar_one_or_none()


async def list_messages(
    session: AsyncSession, tenant: str, session_id: str, *, after_seq: int, limit: int
) -> list[MessageRow]:
    result = await session.execute(
        select(MessageRow)
        .where(
            MessageRow.tenant == tenant,
            MessageRow.session_id == session_id,
            MessageRow.seq > after_seq,
        )
        .order_by(MessageRow.seq)
        .limit(limit)
    )
    return list(result.scalars())


async def recent_messages(
    session: AsyncSession, tenant: str, session_id: str, *, before_seq: int | None, limit: int
) -> list[MessageRow]:
    """The latest limit messages (before before_seq when given), oldest first."""
    query = select(MessageRow).where(
        MessageRow.tenant == tenant, MessageRow.session_id == session_id
    )
    if before_seq is not None:
        query = query.where(MessageRow.seq < before_seq)
    result = await session.execute(query.order_by(MessageRow.seq.desc()).limit(limit))
    return list(reversed(result.scalars().all()))


async def messages_by_id(
    session: AsyncSession, tenant: str, message_ids: Sequence[str]
) -> dict[str, MessageRow]:
    if not message_ids:
        return {}
    result = await session.execute(
        select(MessageRow).where(MessageRow.tenant == tenant, MessageRow.id.in_(message_ids))
    )
    return {row.id: row for row in result.scalars()}


async def session_text(session: AsyncSession, tenant: str, session_id: str, limit: int) -> str:
    """The session's latest messages joined, for keyphrase extraction."""
    rows = await recent_messages(session, tenant, session_id, before_seq=None, limit=limit)
    return "\n".join(row.content for row in rows)


# Memory (exchanges).


async def exchanges_by_id(
    session: AsyncSession, tenant: str, exchange_ids: Sequence[str]
) -> dict[str, ExchangeRow]:
    if not exchange_ids:
        return {}
    result = await session.execute(
        select(ExchangeRow).where(ExchangeRow.tenant == tenant, ExchangeRow.id.in_(exchange_ids))
    )
    return {row.id: row for row in result.scalars()}


async def unindexed_exchanges(session: AsyncSession, limit: int) -> list[ExchangeRow]:
    """Exchanges of every tenant still waiting for their vector (the indexer's queue)."""
    result = await session.execute(
        select(ExchangeRow)
        .where(ExchangeRow.indexed.is_(False))
        .order_by(ExchangeRow.created_at)
        .limit(limit)
    )
    return list(result.scalars())


async def mark_indexed(session: AsyncSession, exchange_ids: Sequence[str]) -> None:
    await session.execute(
        update(ExchangeRow).where(ExchangeRow.id.in_(exchange_ids)).values(indexed=True)
    )
