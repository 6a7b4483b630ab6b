"""Engines, dialect differences and failure classification for a service's own database."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

from sqlalchemy import bindparam, event, exc, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.sql.dml import Insert

from choreo.exceptions import ConfigurationError, HandlerFailed
from choreo.tables import inbox_table

NOTIFY_CHANNEL = "choreo_outbox"

# SQLSTATEs worth retrying: serialization failure, deadlock, lock timeout, admin shutdown,
# cannot connect now, too many connections; class 08 (connection exceptions) is added below.
_TRANSIENT_SQLSTATES = {"40001", "40P01", "55P03", "57P01", "57P02", "57P03", "53300"}


def masked_url(url: str) -> str:
    """`url` with its password replaced by ***, for messages and logs; never the raw text."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (exc.ArgumentError, ValueError):
        # Not a URL SQLAlchemy can read, but it may still hold "user:password@".
        return re.sub(r"([^:/@\s]+):[^@/\s]*@", r"\1:***@", url)


_DRIVER_DETAIL = re.compile(r"^(?:DETAIL|HINT): .*$\n?", re.MULTILINE)


def without_values(error_text: str) -> str:
    """A database error's text without the row values PostgreSQL quotes in its DETAIL lines.

    Engines already hide statement parameters (see `create_engine`); this is for the driver's
    own message, e.g. "Key (card)=(4111...) already exists", where the error is stored or sent.
    """
    return _DRIVER_DETAIL.sub("", error_text)


def normalize_url(url: str) -> str:
    """Accept plain `postgresql://` and `sqlite://` URLs and pick the async drivers for them."""
    try:
        parsed = make_url(url)
    except (exc.ArgumentError, ValueError):
        raise ConfigurationError(
            f"database URL {masked_url(url)!r} is not a URL; use e.g. sqlite+aiosqlite:///orders.db "
            "or postgresql+asyncpg://user:password@host:5432/orders"
        ) from None
    backend = parsed.get_backend_name()
    if backend in ("postgresql", "postgres"):
        return parsed.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)
    if backend == "sqlite":
        return parsed.set(drivername="sqlite+aiosqlite").render_as_string(hide_password=False)
    raise ConfigurationError(
        f"database URL {parsed.render_as_string()!r}: choreo supports PostgreSQL "
        f"(postgresql+asyncpg://...) and SQLite (sqlite+aiosqlite:///file.db), not {backend!r}"
    )


def require_existing(url: str, what: str, fix: str) -> None:
    """Refuse a SQLite URL whose file does not exist (opening it would create an empty one)."""
    parsed = make_url(normalize_url(url))
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return
    if not Path(parsed.database).exists():
        raise ConfigurationError(f"{what} {parsed.database} does not exist; {fix}")


def create_engine(url: str, **options: Any) -> AsyncEngine:
    """An async engine for a service database; SQLite gets WAL and serialized writers."""
    url = normalize_url(url)
    # SQL errors would otherwise quote their bound values (payload data) into logs, dead
    # letters and the dead-letter topic's headers.
    options.setdefault("hide_parameters", True)
    if make_url(url).get_backend_name() != "sqlite":
        options.setdefault("pool_size", 10)
        options.setdefault("max_overflow", 10)
        engine = create_async_engine(url, **options)
        event.listen(engine.sync_engine, "checkout", _discard_closed)
        return engine
    engine = create_async_engine(url, **options)

    @event.listens_for(engine.sync_engine, "connect")
    def _configure(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the driver, decide when transactions begin (see below).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=10000")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _begin_immediate(connection: Any) -> None:
        # SQLite ignores SELECT ... FOR UPDATE. Taking the write lock when the transaction
        # begins makes concurrent read-modify-write handlers queue up instead of losing
        # updates or failing with "database is locked" when they upgrade to writing.
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _discard_closed(_dbapi_connection: Any, record: Any, _proxy: Any) -> None:
    # A server that ends a session (pg_terminate_backend, a restart, idle_session_timeout) sends
    # a FATAL message and closes the socket; asyncpg reads it while the connection idles in the
    # pool and marks itself closed. Handing it out would fail the caller's first statement (an
    # HTTP request would answer 500), so make the pool discard it and connect afresh. This costs
    # no round trip, unlike pool_pre_ping; a socket that died silently is caught by the next
    # statement's error instead.
    if record.driver_connection.is_closed():
        raise exc.DisconnectionError("the server closed this pooled connection")


def dialect_of(bind: AsyncEngine | AsyncConnection | AsyncSession) -> str:
    """`postgresql` or `sqlite`."""
    if isinstance(bind, AsyncSession):
        engine = bind.bind
        assert engine is not None, "choreo sessions are always bound to the service engine"
        return engine.dialect.name
    return bind.dialect.name


def is_postgres(bind: AsyncEngine | AsyncConnection | AsyncSession) -> bool:
    """True when `bind` talks to PostgreSQL."""
    return dialect_of(bind) == "postgresql"


def insert_ignoring_duplicates(table: Any, dialect_name: str) -> Insert:
    """INSERT ... ON CONFLICT DO NOTHING for the given dialect."""
    if dialect_name == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing()
    return sqlite.insert(table).on_conflict_do_nothing()


# Built once: the inbox claim runs for every record a handler processes. ON CONFLICT DO NOTHING
# reads the same on PostgreSQL and SQLite.
_CLAIM_INBOX = text(
    "INSERT INTO choreo_inbox (consumer, event_id, processed_at)"
    " VALUES (:consumer, :event_id, :processed_at) ON CONFLICT DO NOTHING"
).bindparams(*(bindparam(column.name, type_=column.type) for column in inbox_table.c))


async def claim_inbox(session: AsyncSession | AsyncConnection, consumer: str, event_id: str, now: Any) -> bool:
    """Insert the inbox row; False when this consumer already processed the event.

    ON CONFLICT DO NOTHING (rather than catching IntegrityError) keeps the transaction usable
    on PostgreSQL, and when a concurrent transaction holds the same key it waits for that
    transaction's outcome instead of processing the event a second time.
    """
    result = await session.execute(_CLAIM_INBOX, {"consumer": consumer, "event_id": event_id, "processed_at": now})
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def lock_schema(conn: AsyncConnection) -> None:
    """Serialize schema creation between processes for the rest of this transaction (PostgreSQL)."""
    if is_postgres(conn):
        await conn.execute(text("SELECT pg_advisory_xact_lock(:a, :b)"), {"a": 0x63686F72, "b": 0x7363686D})


def is_transient(error: BaseException) -> bool:
    """True for failures of the infrastructure, not of the handler's logic: retry forever.

    Decided by origin first: anything out of handler code arrives as `HandlerFailed` and is
    never transient, whatever it wraps. What is left came from choreo's own database or Kafka
    operations (the handler's session included: its DBAPIErrors are not wrapped), and is
    classified by SQLSTATE, by SQLAlchemy's invalidation flag, or by the driver's error type.
    """
    if isinstance(error, HandlerFailed):
        return False
    if isinstance(error, (ConnectionError, TimeoutError, asyncio.TimeoutError)):
        return True
    if isinstance(error, (exc.DisconnectionError, exc.TimeoutError)):
        return True
    if isinstance(error, exc.DBAPIError):
        if error.connection_invalidated:
            return True
        sqlstate = getattr(error.orig, "sqlstate", None) or getattr(error.orig, "pgcode", None)
        if sqlstate and (sqlstate in _TRANSIENT_SQLSTATES or sqlstate.startswith("08")):
            return True
        if isinstance(error, exc.InterfaceError):
            return True
        if isinstance(error, exc.OperationalError):
            if error.orig is not None and type(error.orig).__module__.startswith("sqlite3"):
                # SQLite reports a busy database and a typo in SQL alike as OperationalError.
                message = str(error.orig).lower()
                return any(hint in message for hint in ("locked", "busy", "unable to open", "i/o"))
            return True
        return False
    cause = error.__cause__ or error.__context__
    if cause is not None and cause is not error:
        return _is_transient_driver_error(cause)
    return _is_transient_driver_error(error)


def _is_transient_driver_error(error: BaseException) -> bool:
    # The unit of work's own statements reach asyncpg directly (`hotpath`): its errors carry
    # the SQLSTATE themselves.
    sqlstate = getattr(error, "sqlstate", None)
    if isinstance(sqlstate, str) and (sqlstate in _TRANSIENT_SQLSTATES or sqlstate.startswith("08")):
        return True
    name = type(error).__name__
    module = type(error).__module__
    if module.startswith("asyncpg") and (
        "Connection" in name or "CannotConnectNow" in name or "TooManyConnections" in name
    ):
        return True
    if module.startswith("aiokafka"):
        return bool(getattr(error, "retriable", False)) or "Connection" in name or "Timeout" in name
    return isinstance(error, (ConnectionError, OSError, asyncio.TimeoutError))
