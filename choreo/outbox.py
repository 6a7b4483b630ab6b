"""Writing events to the outbox inside the caller's transaction, and reading them back."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from choreo.database import lock_keys_and_notify
from choreo.envelope import Envelope
from choreo.events import Event
from choreo.tables import outbox_table

_outbox = outbox_table


@dataclass(frozen=True, slots=True)
class PendingEvent:
    """An event emitted in a transaction, not yet written."""

    event: Event
    envelope: Envelope
    topic: str
    key: str
    available_at: datetime


@dataclass(frozen=True, slots=True)
class OutboxRecord:
    """An outbox row as the relay publishes it."""

    id: int
    topic: str
    key: str | None
    headers: dict[str, str]
    payload: bytes


async def write(session: AsyncSession, pending: Sequence[PendingEvent], now: datetime) -> None:
    """Insert `pending` into the outbox on the caller's session, in emit order."""
    await write_rows(
        session,
        [
            {
                "event_id": p.envelope.event_id,
                "topic": p.topic,
                "key": p.key,
                "event_type": p.envelope.event_type,
                "event_version": p.envelope.event_version,
                "saga_id": p.envelope.saga_id,
                "headers": p.envelope.to_headers(),
                "payload": p.event.model_dump_json().encode(),
                "created_at": now,
                "available_at": p.available_at,
            }
            for p in pending
        ],
    )


async def write_rows(session: AsyncSession, rows: Sequence[dict[str, Any]]) -> None:
    """Insert prepared outbox rows (all columns but id and published_at), in order."""
    if not rows:
        return
    await lock_keys_and_notify(session, [row["key"] for row in rows if row["key"] is not None])
    # One statement per row: ids then follow emit order on every driver.
    for row in rows:
        await session.execute(insert(_outbox), row)


async def fetch_due(conn: AsyncConnection, now: datetime, limit: int) -> list[OutboxRecord]:
    """The oldest unpublished rows that are due, in id (= publication) order."""
    result = await conn.execute(
        select(_outbox.c.id, _outbox.c.topic, _outbox.c.key, _outbox.c.headers, _outbox.c.payload)
        .where(_outbox.c.published_at.is_(None), _outbox.c.available_at <= now)
        .order_by(_outbox.c.id)
        .limit(limit)
    )
    return [OutboxRecord(r.id, r.topic, r.key, r.headers, r.payload) for r in result]


async def mark_published(conn: AsyncConnection, ids: Sequence[int], now: datetime) -> None:
    """Record that rows reached Kafka."""
    if ids:
        await conn.execute(update(_outbox).where(_outbox.c.id.in_(ids)).values(published_at=now))
