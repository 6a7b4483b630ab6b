"""Parking records that cannot be processed: the dead-letter table and topic."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Table, insert
from sqlalchemy.ext.asyncio import AsyncSession

from choreo import outbox
from choreo.database import without_values
from choreo.envelope import EVENT_ID, EVENT_TYPE, SAGA_ID, new_id
from choreo.kafka import Record
from choreo.tables import dead_letter_table, outbox_table

REASON = "choreo-dead-letter-reason"
CONSUMER = "choreo-dead-letter-consumer"
ERROR = "choreo-dead-letter-error"
SOURCE = "choreo-dead-letter-source"


def topic_for(service: str) -> str:
    """The dead-letter topic of a service."""
    return f"{service}.dead-letters"


def clean(text: str, limit: int | None = None) -> str:
    """`text` as any database stores it: valid UTF-8, NUL replaced, at most `limit` characters."""
    text = text.encode(errors="replace").decode().replace("\x00", "\ufffd")
    return text if limit is None else text[:limit]


def fit(table: Table, column: str, text: str | None) -> str | None:
    """`text` cleaned and cut to the length of `table.column` (none for TEXT)."""
    if text is None:
        return None
    return clean(text, getattr(table.c[column].type, "length", None))


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
    minimal: bool = False,
) -> None:
    """Store `record` as a dead letter and queue it for the dead-letter topic, in the caller's txn.

    Whatever the record holds, the letter fits its columns: every text is cleaned and cut to
    its column's length (the record is parked *because* it may not fit), while the key and
    the payload are kept byte for byte. `minimal` stores the letter without the record's
    headers and without queueing it for the topic: the last resort when the full letter
    cannot be stored.
    """
    headers = {} if minimal else _text_headers(record)
    error, traceback = without_values(error), traceback and without_values(traceback)
    letters = dead_letter_table
    await session.execute(
        insert(letters).values(
            consumer=fit(letters, "consumer", consumer),
            topic=fit(letters, "topic", record.topic),
            partition=record.partition,
            offset=record.offset,
            key=record.key,
            headers=headers,
            payload=record.value,
            event_id=fit(letters, "event_id", headers.get(EVENT_ID)),
            event_type=fit(letters, "event_type", headers.get(EVENT_TYPE)),
            saga_id=fit(letters, "saga_id", headers.get(SAGA_ID)),
            reason=fit(letters, "reason", reason),
            error=clean(error, 10_000),
            traceback=fit(letters, "traceback", traceback),
            attempts=attempts,
            first_failed_at=first_failed_at,
            last_failed_at=now,
            status="parked",
        )
    )
    if minimal:
        return
    # The original headers travel on, so the trace collector files the letter under its saga.
    letter_headers = {
        **headers,
        REASON: clean(reason),
        CONSUMER: clean(consumer),
        ERROR: clean(error, 1000),
        SOURCE: clean(f"{record.topic}/{record.partition}/{record.offset}"),
    }
    key = record.key.decode(errors="replace") if record.key is not None else None
    await outbox.write_rows(
        session,
        [
            {
                "event_id": new_id(),
                "topic": topic_for(service),
                "key": fit(outbox_table, "key", key),
                "event_type": fit(outbox_table, "event_type", headers.get(EVENT_TYPE, "unknown")),
                "event_version": 0,
                "saga_id": fit(outbox_table, "saga_id", headers.get(SAGA_ID, "")),
                "headers": letter_headers,
                "payload": record.value,
                "created_at": now,
                "available_at": now,
            }
        ],
    )


def _text_headers(record: Record) -> dict[str, str]:
    # JSON text must be valid UTF-8 without NUL (PostgreSQL); the raw bytes stay in Kafka.
    return {clean(name): clean(value.decode(errors="replace")) for name, value in record.headers if value is not None}
