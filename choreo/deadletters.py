"""Parking records that cannot be processed: the dead-letter table and topic."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncSession

from choreo import outbox
from choreo.database import without_values
from choreo.envelope import EVENT_ID, EVENT_TYPE, SAGA_ID, new_id
from choreo.kafka import Record
from choreo.tables import dead_letter_table

REASON = "choreo-dead-letter-reason"
CONSUMER = "choreo-dead-letter-consumer"
ERROR = "choreo-dead-letter-error"
SOURCE = "choreo-dead-letter-source"


def topic_for(service: str) -> str:
    """The dead-letter topic of a service."""
    return f"{service}.dead-letters"


def _text_headers(record: Record) -> dict[str, str]:
    return {name: value.decode(errors="replace") for name, value in record.headers if value is not None}


async def park(
    session: AsyncSession,
    record: Record,
    *,
    service: str,
    consumer: str,
    reason: str,
    error: str,
    traceback: str | None,
    attempts: int,
    first_failed_at: datetime,
    now: datetime,
) -> None:
    """Store `record` as a dead letter and queue it for the dead-letter topic, in the caller's txn."""
    headers = _text_headers(record)
    error, traceback = without_values(error), traceback and without_values(traceback)
    await session.execute(
        insert(dead_letter_table).values(
            consumer=consumer,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            key=record.key,
            headers=headers,
            payload=record.value,
            event_id=headers.get(EVENT_ID),
            event_type=headers.get(EVENT_TYPE),
            saga_id=headers.get(SAGA_ID),
            reason=reason,
            error=error[:10_000],
            traceback=traceback,
            attempts=attempts,
            first_failed_at=first_failed_at,
            last_failed_at=now,
            status="parked",
        )
    )
    # The original headers travel on, so the trace collector files the letter under its saga.
    letter_headers = {
        **headers,
        REASON: reason,
        CONSUMER: consumer,
        ERROR: error[:1000],
        SOURCE: f"{record.topic}/{record.partition}/{record.offset}",
    }
    await outbox.write_rows(
        session,
        [
            {
                "event_id": new_id(),
                "topic": topic_for(service),
                "key": record.key.decode(errors="replace") if record.key is not None else None,
                "event_type": headers.get(EVENT_TYPE, "unknown"),
                "event_version": 0,
                "saga_id": headers.get(SAGA_ID, ""),
                "headers": letter_headers,
                "payload": record.value,
                "created_at": now,
                "available_at": now,
            }
        ],
    )
