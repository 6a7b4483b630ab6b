"""Parking records that cannot be processed: the dead-letter table and topic."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncSession

from choreo import outbox
from choreo.envelope import EVENT_ID, EVENT_TYPE, EVENT_VERSION, SAGA_ID, new_id
from choreo.kafka import DEFAULT_MAX_REQUEST_SIZE, Record, record_size
from choreo.outbox import OutboxRecord
from choreo.tables import DeadLetter, dead_letter_table

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
    limit: int = DEFAULT_MAX_REQUEST_SIZE,
) -> None:
    """Store `record` as a dead letter and queue it for the dead-letter topic, in the caller's txn.

    `limit` is the producer's largest record (`KafkaTransport.max_record_size`).
    """
    headers = _text_headers(record)
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
                "key": key,
                "event_type": headers.get(EVENT_TYPE, "unknown"),
                "event_version": 0,
                "saga_id": headers.get(SAGA_ID, ""),
                "headers": headers,
                "payload": payload,
                "created_at": now,
                "available_at": now,
            }
        ],
    )
