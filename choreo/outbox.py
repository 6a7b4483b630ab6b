"""Writing events to the outbox inside the caller's transaction, and reading them back.

The statements here run for every event, so they are built once, at import: executing a prebuilt
statement skips SQLAlchemy's per-call construction and cache-key generation. Their bind
parameters carry the columns' types, so datetimes and JSON headers are converted exactly as the
table's own columns convert them, on either dialect.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Integer, TextClause, TextualSelect, bindparam, func, select, text, union_all
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from choreo.database import NOTIFY_CHANNEL, is_postgres
from choreo.envelope import Envelope
from choreo.events import Event
from choreo.tables import UNPUBLISHED_IMMEDIATE, UNPUBLISHED_SCHEDULED, UtcDateTime, outbox_table

_outbox = outbox_table
Session = AsyncSession | AsyncConnection
"""Where outbox rows are written: a unit of work's session or its connection."""


@dataclass(frozen=True, slots=True)
class PendingEvent:
    """An event emitted in a transaction, not yet written."""

    event: Event
    envelope: Envelope
    topic: str
    key: str
    available_at: datetime | None
    """When a scheduled event becomes due; None for an event due at once."""
    headers: dict[str, str]
    """`envelope.to_headers()`, computed once at emit time."""
    payload: bytes
    """The event's JSON, serialized once at emit time (where its size is checked)."""


@dataclass(frozen=True, slots=True)
class OutboxRecord:
    """An outbox row as the relay publishes it."""

    id: int
    topic: str
    key: str | None
    headers: dict[str, str]
    payload: bytes


# The columns a writer supplies: all but `id` (from the sequence) and `published_at`.
_WRITTEN = (
    "event_id",
    "topic",
    "key",
    "event_type",
    "event_version",
    "saga_id",
    "headers",
    "payload",
    "created_at",
    "available_at",
)
_WRITTEN_BINDS = [bindparam(name, type_=_outbox.c[name].type) for name in _WRITTEN]
_COLUMNS = ", ".join(f'"{name}"' for name in _WRITTEN)
_VALUES = ", ".join(f":{name}" for name in _WRITTEN)

# An event id is written once: a saga started again under its id keeps the timeout it was
# scheduled first (`Saga.timeout_id`); every other id is random.
_ONCE = "ON CONFLICT (event_id) DO NOTHING"
_INSERT = text(f"INSERT INTO choreo_outbox ({_COLUMNS}) VALUES ({_VALUES}) {_ONCE}").bindparams(*_WRITTEN_BINDS)


# PostgreSQL: the first row of a transaction's batch also serializes emitters per key and,
# unless the process's own relay leads and is woken directly, wakes the leading relay through
# NOTIFY (delivered at commit), in the same statement.
#
# Outbox ids come from a sequence, which hands out numbers at insert time, not commit time: two
# transactions emitting for one key could commit in the opposite order of their ids, and the
# relay would publish the later event first. A transaction-scoped advisory lock per key, taken
# before the row's id is drawn, makes id order equal commit order for each key. Here the locks
# are taken in the materialized CTE, and the inserted row comes out of that CTE only through
# `WHERE locks >= 0`: the id default is evaluated for a row the CTE has produced, so after every
# lock is held. Keys are locked in hash order so that two transactions sharing several keys
# cannot deadlock.
def _lock_and_insert(*, notify: bool) -> TextClause:
    return text(
        "WITH locked AS MATERIALIZED (SELECT"
        + (f" pg_notify('{NOTIFY_CHANNEL}', '')," if notify else "")
        + " (SELECT count(pg_advisory_xact_lock(h)) FROM ("
        " SELECT DISTINCT hashtextextended(k, 0) AS h FROM unnest(CAST(:keys AS text[])) AS k"
        " ORDER BY h) AS hashed) AS locks)"
        f" INSERT INTO choreo_outbox ({_COLUMNS}) SELECT {_VALUES} FROM locked WHERE locked.locks >= 0 {_ONCE}"
    ).bindparams(*_WRITTEN_BINDS)


_LOCK_NOTIFY_INSERT = _lock_and_insert(notify=True)
_LOCK_INSERT = _lock_and_insert(notify=False)

_DUE_BINDS = (bindparam("now", type_=UtcDateTime), bindparam("limit", type_=Integer))
_RECORD_COLUMNS = (_outbox.c.id, _outbox.c.topic, _outbox.c.key, _outbox.c.headers, _outbox.c.payload)


# Due rows in id order, from two partial indexes (see `tables.OutboxRow`): rows due when written
# are read in id order straight off their index, at most `limit` of them however long the
# backlog; scheduled rows (available_at > created_at) are found by due time, so the pending
# ones cost nothing; the two short lists are merged by id. A single index cannot serve both: in
# id order every poll walks past all pending deadlines, in due-time order every poll of a
# backlog reads all of it to find the smallest ids.
#
# The scheduled part must not be planned as "walk the primary key in id order and filter",
# which PostgreSQL's generic plan for the prepared statement prefers (it cannot see how few
# rows are due) and which reads the whole table: on PostgreSQL its ids come from a
# materialized CTE, which leaves the due-time index as the only cheap plan, and its rows are
# then fetched by an array of ids (never planned as a join over the whole table); on SQLite,
# ordering by the expression +id has the same effect.
def _due_query(*, postgres: bool, held: str = "") -> TextualSelect:
    immediate = (
        'SELECT id, topic, "key", headers, payload FROM choreo_outbox'
        f" WHERE {UNPUBLISHED_IMMEDIATE}{held} ORDER BY id LIMIT :limit"
    )
    scheduled_due = f"{UNPUBLISHED_SCHEDULED} AND available_at <= :now{held}"
    if postgres:
        sql = (
            f"WITH scheduled AS MATERIALIZED (SELECT id FROM choreo_outbox WHERE {scheduled_due})"
            ' SELECT id, topic, "key", headers, payload FROM ('
            f" SELECT * FROM ({immediate}) AS immediate"
            " UNION ALL"
            ' SELECT id, topic, "key", headers, payload FROM choreo_outbox'
            "  WHERE id = ANY(ARRAY(SELECT id FROM scheduled ORDER BY id LIMIT :limit))"
            ") AS due ORDER BY id LIMIT :limit"
        )
    else:
        sql = (
            'SELECT id, topic, "key", headers, payload FROM ('
            f" SELECT * FROM ({immediate}) AS immediate"
            " UNION ALL"
            ' SELECT * FROM (SELECT id, topic, "key", headers, payload FROM choreo_outbox'
            f"  WHERE {scheduled_due} ORDER BY +id LIMIT :limit) AS scheduled"
            ") AS due ORDER BY id LIMIT :limit"
        )
    binds = [*_DUE_BINDS, bindparam("held", expanding=True)] if held and not postgres else _DUE_BINDS
    return text(sql).bindparams(*binds).columns(*_RECORD_COLUMNS)


_FETCH_DUE_POSTGRES = _due_query(postgres=True)
_FETCH_DUE_SQLITE = _due_query(postgres=False)
# Keys the relay holds back (a send of theirs failed) are left out, so a stuck key's backlog
# cannot fill every batch; each one's first row is read by id instead (`_HEADS`).
_FETCH_DUE_HELD_POSTGRES = _due_query(
    postgres=True, held=' AND ("key" IS NULL OR NOT "key" = ANY(CAST(:held AS text[])))'
)
_FETCH_DUE_HELD_SQLITE = _due_query(postgres=False, held=' AND ("key" IS NULL OR "key" NOT IN :held)')
_HEADS = (
    text('SELECT id, topic, "key", headers, payload FROM choreo_outbox WHERE published_at IS NULL AND id IN :heads')
    .bindparams(bindparam("heads", expanding=True))
    .columns(*_RECORD_COLUMNS)
)

# One statement text whatever the batch size, so asyncpg prepares it once.
_MARK_PUBLISHED_POSTGRES = text(
    "UPDATE choreo_outbox SET published_at = :now WHERE id = ANY(CAST(:ids AS bigint[]))"
).bindparams(bindparam("now", type_=UtcDateTime))
_MARK_PUBLISHED_SQLITE = text("UPDATE choreo_outbox SET published_at = :now WHERE id IN :ids").bindparams(
    bindparam("now", type_=UtcDateTime), bindparam("ids", expanding=True)
)


async def write(session: Session, pending: Sequence[PendingEvent], now: datetime, *, notify: bool = True) -> None:
    """Insert `pending` into the outbox on the caller's session, in emit order.

    `notify=False` when the relay that will publish them runs in this process and is woken directly.
    """
    await write_rows(session, [row_of(p, now) for p in pending], notify=notify)


def row_of(pending: PendingEvent, now: datetime) -> dict[str, Any]:
    """The outbox row of `pending`, written at `now` (all columns but id and published_at)."""
    return {
        "event_id": pending.envelope.event_id,
        "topic": pending.topic,
        "key": pending.key,
        "event_type": pending.envelope.event_type,
        "event_version": pending.envelope.event_version,
        "saga_id": pending.envelope.saga_id,
        "headers": pending.headers,
        "payload": pending.payload,
        "created_at": now,
        # An event due at once is due when written, by definition: were it given its emit time
        # instead, a clock stepped back between emit and write would make it look scheduled
        # (available_at > created_at) and wait for the clock to catch up.
        "available_at": now if pending.available_at is None else pending.available_at,
    }


async def write_rows(session: Session, rows: Sequence[dict[str, Any]], *, notify: bool = True) -> None:
    """Insert prepared outbox rows (all columns but id and published_at), in order."""
    if not rows:
        return
    first, rest = rows[0], rows[1:]
    if is_postgres(session):
        keys = [row["key"] for row in rows if row["key"] is not None]
        await session.execute(_LOCK_NOTIFY_INSERT if notify else _LOCK_INSERT, {**first, "keys": keys})
    else:
        await session.execute(_INSERT, first)
    if rest:
        # One execution per row, in order, so ids follow emit order on every driver (a
        # multi-row INSERT leaves the order of its ids to the plan); asyncpg pipelines them.
        await session.execute(_INSERT, list(rest))


_WITHDRAW = text("DELETE FROM choreo_outbox WHERE event_id IN :event_ids AND published_at IS NULL").bindparams(
    bindparam("event_ids", expanding=True)
)


_DELETE = text("DELETE FROM choreo_outbox WHERE event_id IN :event_ids").bindparams(
    bindparam("event_ids", expanding=True)
)


async def withdraw_any(session: Session, event_ids: Sequence[str]) -> None:
    """Delete the rows of `event_ids`, published or not (to queue an event anew)."""
    if event_ids:
        await session.execute(_DELETE, {"event_ids": list(event_ids)})


async def withdraw(session: Session, event_ids: Sequence[str]) -> None:
    """Delete scheduled events that have become moot, unless they are already published."""
    if event_ids:
        await session.execute(_WITHDRAW, {"event_ids": list(event_ids)})


async def fetch_due(
    conn: AsyncConnection,
    now: datetime,
    limit: int,
    *,
    held: Sequence[str] = (),
    heads: Sequence[int] = (),
) -> list[OutboxRecord]:
    """The oldest unpublished rows that are due, in id (= publication) order.

    Rows of the `held` keys are left out, except the unpublished rows among `heads` (ids).
    """
    postgres = is_postgres(conn)
    if not held:
        result = await conn.execute(
            _FETCH_DUE_POSTGRES if postgres else _FETCH_DUE_SQLITE, {"now": now, "limit": limit}
        )
        return [OutboxRecord(r.id, r.topic, r.key, r.headers, r.payload) for r in result]
    first = list((await conn.execute(_HEADS, {"heads": list(heads)})).all()) if heads else []
    statement = _FETCH_DUE_HELD_POSTGRES if postgres else _FETCH_DUE_HELD_SQLITE
    rest = await conn.execute(statement, {"now": now, "limit": max(0, limit - len(first)), "held": list(held)})
    rows = sorted([*first, *rest], key=lambda r: int(r.id))
    return [OutboxRecord(r.id, r.topic, r.key, r.headers, r.payload) for r in rows]


async def backlog(conn: AsyncConnection, now: datetime) -> tuple[int, datetime | None]:
    """How many unpublished rows are due, and since when the oldest of them has been due.

    Counted through the relay's two partial indexes, so a metrics scrape never reads the
    published history.
    """
    rows = _outbox.c
    parts = union_all(
        select(func.count().label("n"), func.min(rows.available_at).label("due")).where(text(UNPUBLISHED_IMMEDIATE)),
        select(func.count(), func.min(rows.available_at)).where(text(UNPUBLISHED_SCHEDULED), rows.available_at <= now),
    ).subquery()
    count, oldest = (await conn.execute(select(func.coalesce(func.sum(parts.c.n), 0), func.min(parts.c.due)))).one()
    if isinstance(oldest, str):  # SQLite returns aggregates of datetimes as text
        oldest = datetime.fromisoformat(oldest)
    if oldest is not None and oldest.tzinfo is None:
        oldest = oldest.replace(tzinfo=UTC)
    return int(count), oldest


async def mark_published(conn: AsyncConnection | AsyncSession, ids: Sequence[int], now: datetime) -> None:
    """Record that rows reached Kafka."""
    if ids:
        statement = _MARK_PUBLISHED_POSTGRES if is_postgres(conn) else _MARK_PUBLISHED_SQLITE
        await conn.execute(statement, {"now": now, "ids": list(ids)})
