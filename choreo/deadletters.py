"""Parking records that cannot be processed: the dead-letter table and topic."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Table, insert
from sqlalchemy.ext.asyncio import AsyncSession

from choreo import outbox
from choreo.database import without_values
from choreo.envelope import EVENT_ID, EVENT_TYPE, EVENT_VERSION, SAGA_ID, new_id
from choreo.kafka import DEFAULT_MAX_REQUEST_SIZE, Record, record_size
from choreo.outbox import OutboxRecord
from choreo.tables import DeadLetter, dead_letter_table, outbox_table

REASON = "choreo-dead-letter-reason"
CONSUMER = "choreo-dead-letter-consumer"
ERROR = "choreo-dead-letter-error"
SOURCE = "choreo-dead-letter-source"
PAYLOAD_OMITTED = "choreo-dead-letter-payload-omitted"
"""Set (to the payload's size in bytes) when the payload was too large to go on the topic."""

UNPUBLISHABLE = "unpublishable"
"""The reason of a letter the relay parked: Kafka refused the outbox row for good."""


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
    limit: int = DEFAULT_MAX_REQUEST_SIZE,
) -> None:
    """Store `record` as a dead letter and queue it for the dead-letter topic, in the caller's txn.

    Whatever the record holds, the letter fits its columns: every text is cleaned and cut to
    its column's length (the record is parked *because* it may not fit), while the key and
    the payload are kept byte for byte. `minimal` stores the letter without the record's
    headers and without queueing it for the topic: the last resort when the full letter
    cannot be stored. `limit` is the producer's largest record (`KafkaTransport.max_record_size`).
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
    await _queue_copy(session, service, key, letter_headers, record.value, now, limit=limit)


async def park_unpublishable(
    session: AsyncSession,
    row: OutboxRecord,
    *,
    service: str,
    error: BaseException,
    now: datetime,
    limit: int = DEFAULT_MAX_REQUEST_SIZE,
) -> None:
    """Store an outbox row Kafka refuses for good as a dead letter and take it off the relay's
    queue (marked published: the letter keeps the row), in the caller's transaction.

    The letter's partition is -1 (it never reached Kafka) and its offset is the outbox id.
    """
    text = f"{type(error).__name__}: {error}"
    await session.execute(
        insert(dead_letter_table).values(
            consumer=service,
            topic=row.topic,
            partition=-1,
            offset=row.id,
            key=row.key.encode() if row.key is not None else None,
            headers=row.headers,
            payload=row.payload,
            event_id=row.headers.get(EVENT_ID),
            event_type=row.headers.get(EVENT_TYPE),
            saga_id=row.headers.get(SAGA_ID),
            reason=UNPUBLISHABLE,
            error=text[:10_000],
            traceback=None,
            attempts=1,
            first_failed_at=now,
            last_failed_at=now,
            status="parked",
        )
    )
    await outbox.mark_published(session, [row.id], now)
    if row.topic == topic_for(service):
        return  # a letter that cannot be published would only beget another
    letter_headers = {
        **row.headers,
        REASON: UNPUBLISHABLE,
        CONSUMER: service,
        ERROR: text[:1000],
        SOURCE: f"outbox/{row.id}",
    }
    await _queue_copy(session, service, row.key, letter_headers, row.payload, now, limit=limit)


async def reenqueue(session: AsyncSession, letter: DeadLetter, now: datetime) -> None:
    """Queue a letter the relay parked (`UNPUBLISHABLE`) for publication again, behind its key's
    current rows, under its own event id (consumers still deduplicate it)."""
    headers: dict[str, str] = {name: str(value) for name, value in letter.headers.items()}
    event_id = letter.event_id or new_id()
    # The parked row (marked published) holds the event id, which the outbox keeps unique.
    await outbox.withdraw_any(session, [event_id])
    await outbox.write_rows(
        session,
        [
            {
                "event_id": event_id,
                "topic": letter.topic,
                "key": letter.key.decode(errors="replace") if letter.key is not None else None,
                "event_type": letter.event_type or headers.get(EVENT_TYPE, "unknown"),
                "event_version": int(headers.get(EVENT_VERSION, "0") or 0),
                "saga_id": letter.saga_id or headers.get(SAGA_ID, ""),
                "headers": headers,
                "payload": letter.payload,
                "created_at": now,
                "available_at": now,
            }
        ],
    )


async def _queue_copy(
    session: AsyncSession,
    service: str,
    key: str | None,
    headers: dict[str, str],
    payload: bytes,
    now: datetime,
    *,
    limit: int,
) -> None:
    # The letter travels on the dead-letter topic too, so the trace collector files it under
    # its saga. A payload too large for Kafka stays in the table only: the copy says so.
    if record_size(key, payload, headers) > limit:
        headers = {**headers, PAYLOAD_OMITTED: str(len(payload))}
        payload = b""
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
                "headers": headers,
                "payload": payload,
                "created_at": now,
                "available_at": now,
            }
        ],
    )


def _text_headers(record: Record) -> dict[str, str]:
    # JSON text must be valid UTF-8 without NUL (PostgreSQL); the raw bytes stay in Kafka.
    return {clean(name): clean(value.decode(errors="replace")) for name, value in record.headers if value is not None}
