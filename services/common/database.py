"""SQL storage every service shares: engines for SQLite and PostgreSQL, read and write
sessions, Alembic migrations under a database lock, UTC datetimes.

SQLite (the embedded default) runs in WAL mode, where readers never wait for a writer:
read sessions begin a plain deferred transaction, and only write sessions take the write
lock up front (BEGIN IMMEDIATE) so that two writers queue on the busy timeout instead of
failing with "database is locked".
"""

import contextlib
import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import DateTime, event, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.types import TypeDecorator

from services.common.errors import Unavailable

# Where a failure to reach the database surfaces: the asyncpg driver raises the socket's
# own error (connection refused) through SQLAlchemy when it cannot connect.
_DATABASE_MODULES = ("sqlalchemy", "asyncpg", "aiosqlite")
# PostgreSQL's SQLSTATE classes for a server that cannot serve now: 08 connection exceptions,
# 57 operator intervention (shutting down, crashed, starting up: 57P01-57P03), 53 out of
# resources (too many connections). asyncpg raises these as its own error types, which
# SQLAlchemy wraps as a plain DBAPIError.
_UNAVAILABLE_SQLSTATE_CLASSES = ("08", "53", "57")


def unreachable(exc: BaseException) -> Unavailable | None:
    """The UNAVAILABLE error for exc when it says the database cannot be used now (server
    down or restarting, connection lost, SQLite file unopenable or locked past the busy
    timeout); None for any other error, including a broken query or a corrupt file."""
    if isinstance(exc, sa_exc.DBAPIError):
        sqlstate = getattr(exc.orig, "sqlstate", None) or ""
        if not (
            exc.connection_invalidated
            or isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError))
            or sqlstate.startswith(_UNAVAILABLE_SQLSTATE_CLASSES)
        ):
            return None
        cause = str(exc.orig) if exc.orig is not None else str(exc)
    elif isinstance(exc, OSError):  # ConnectionRefusedError, TimeoutError, ...
        frames = []
        tb = exc.__traceback__
        while tb is not None:
            frames.append(tb.tb_frame.f_globals.get("__name__", ""))
            tb = tb.tb_next
        if not any(name.startswith(_DATABASE_MODULES) for name in frames):
            return None
        cause = str(exc) or type(exc).__name__
    else:
        return None
    return Unavailable(
        f"the database is unavailable ({cause.splitlines()[0][:200]}); retry later",
        reason="DATABASE_UNAVAILABLE",
    )


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UtcDateTime(TypeDecorator):
    """Aware UTC datetimes on every backend (SQLite hands back naive ones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return None if value is None else value.astimezone(dt.UTC)

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value


# Execution option marking a connection's transaction as one that writes.
_WRITE = "ragmesh_write"


def create_engine(url: str) -> AsyncEngine:
    if not url.startswith("sqlite"):
        return create_async_engine(url, pool_pre_ping=True)
    engine = create_async_engine(url, connect_args={"timeout": 30})

    @event.listens_for(engine.sync_engine, "connect")
    def _connect(dbapi_connection, _record):
        # Let SQLAlchemy, not the driver, open transactions (see the begin hook).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _begin(connection):
        # A write transaction takes the write lock up front: a deferred one that later
        # writes can fail with "database is locked" without waiting when another writer
        # is active. Reads stay deferred, so WAL serves them beside a writer.
        if connection.get_execution_options().get(_WRITE):
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            connection.exec_driver_sql("BEGIN")

    return engine


def sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


@contextlib.asynccontextmanager
async def writing(sessions: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    """A session in a write transaction, committed on exit (rolled back on an error).

    Reads use a plain `sessions()` session; every transaction that writes goes through
    here, so on SQLite it holds the write lock from its first statement."""
    async with sessions() as session, session.begin():
        await session.connection(execution_options={_WRITE: True})
        yield session


async def migrate(engine: AsyncEngine, migrations_dir: Path, lock_key: int) -> None:
    """Brings the schema to the newest Alembic revision, one process at a time.

    Replicas starting together queue on a lock held until the migration commits: the
    PostgreSQL advisory lock lock_key, or SQLite's write lock (the transaction begins
    IMMEDIATE). Each later one then finds the schema up to date."""

    def upgrade(connection) -> None:
        config = Config()
        config.set_main_option("script_location", str(migrations_dir))
        config.attributes["connection"] = connection
        command.upgrade(config, "head")

    async with engine.execution_options(**{_WRITE: True}).begin() as connection:
        if connection.dialect.name == "postgresql":
            await connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": lock_key})
        await connection.run_sync(upgrade)


def run_alembic_env(metadata) -> None:
    """The body of a service's migrations/env.py: migrate on the connection `migrate`
    hands Alembic, against the service's own tables."""
    from alembic import context

    connection = context.config.attributes["connection"]
    context.configure(
        connection=connection,
        target_metadata=metadata,
        # SQLite cannot ALTER most things in place; batch mode rebuilds tables instead.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


class Database:
    """One database: `read()` and `write()` sessions, each one transaction."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = create_engine(url)
        self._sessions = sessionmaker(self.engine)

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        """A session for reads: on SQLite it never waits for a writer."""
        async with self._sessions() as session:
            yield session

    def write(self):
        """A session in one write transaction (see `writing`)."""
        return writing(self._sessions)

    async def migrate(self, migrations_dir: Path, lock_key: int) -> None:
        await migrate(self.engine, migrations_dir, lock_key)

    async def dispose(self) -> None:
        await self.engine.dispose()
