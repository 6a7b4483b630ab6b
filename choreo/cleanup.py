"""Retention: published outbox rows and inbox rows are deleted, in small batches, once old.

The inbox is what makes a redelivered record harmless, so its retention must exceed the
longest time a record can take to come back: the consumer group's offset retention on the
broker (Kafka's `offsets.retention.minutes`, 7 days by default) when a service may be down
that long, and at least the longest outage you plan to sit out. Dead letters are never
deleted automatically.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select, tuple_
from sqlalchemy.ext.asyncio import AsyncEngine

from choreo.database import is_transient
from choreo.envelope import utcnow
from choreo.exceptions import ConfigurationError
from choreo.tables import inbox_table, outbox_table

log = logging.getLogger("choreo.cleanup")

_outbox = outbox_table
_inbox = inbox_table


@dataclass(frozen=True)
class Retention:
    """How long processed bookkeeping rows are kept, and how the cleaner works through them."""

    outbox: timedelta = timedelta(days=7)
    inbox: timedelta = timedelta(days=7)
    interval: timedelta = timedelta(minutes=1)
    batch_size: int = 1000

    def __post_init__(self) -> None:
        if self.inbox < timedelta(hours=1):
            raise ConfigurationError(
                f"inbox retention {self.inbox} is shorter than an hour: a record redelivered "
                "after that would be processed twice; keep it above the longest redelivery window"
            )
        if self.batch_size < 1:
            raise ConfigurationError("retention batch_size must be at least 1")


async def purge_once(engine: AsyncEngine, retention: Retention, now: datetime | None = None) -> tuple[int, int]:
    """Delete what is past retention; returns (outbox rows, inbox rows) deleted."""
    now = now or utcnow()
    outbox_cutoff, inbox_cutoff = now - retention.outbox, now - retention.inbox
    outbox_deleted = inbox_deleted = 0
    while True:
        # Small batches keep each transaction short, so the hot path never waits long on locks.
        async with engine.begin() as conn:
            # No ORDER BY: any batch past retention will do, and ordering by id would invite
            # a walk of the whole table in id order when nothing is old enough.
            oldest = select(_outbox.c.id).where(_outbox.c.published_at < outbox_cutoff).limit(retention.batch_size)
            deleted = (await conn.execute(delete(_outbox).where(_outbox.c.id.in_(oldest)))).rowcount
        outbox_deleted += deleted
        if deleted < retention.batch_size:
            break
    key = tuple_(_inbox.c.consumer, _inbox.c.event_id)
    while True:
        async with engine.begin() as conn:
            oldest_inbox = (
                select(_inbox.c.consumer, _inbox.c.event_id)
                .where(_inbox.c.processed_at < inbox_cutoff)
                .limit(retention.batch_size)
            )
            deleted = (await conn.execute(delete(_inbox).where(key.in_(oldest_inbox)))).rowcount
        inbox_deleted += deleted
        if deleted < retention.batch_size:
            break
    return outbox_deleted, inbox_deleted


async def run_cleaner(engine: AsyncEngine, retention: Retention, name: str) -> None:
    """Purge every `retention.interval` until cancelled; outages only delay it."""
    while True:
        try:
            outbox_deleted, inbox_deleted = await purge_once(engine, retention)
        except Exception as error:
            level = logging.DEBUG if is_transient(error) else logging.WARNING
            log.log(level, "%s: cleanup failed: %s", name, error)
        else:
            if outbox_deleted or inbox_deleted:
                log.info("%s: deleted %d outbox and %d inbox rows past retention", name, outbox_deleted, inbox_deleted)
        await asyncio.sleep(retention.interval.total_seconds())
