"""Operating dead letters: list, show, replay and discard them. Nothing is ever deleted.

Replay sends the stored record through the service's normal unit of work, for the handler
that failed on it: the inbox keeps it idempotent, and saga and causation ids come from the
record's own headers. A replay that fails again parks a new letter; the old one stays as
`replayed`, so the history of a record is kept. A letter whose event the inbox shows as
processed by its handler (a later delivery succeeded) is not replayed unless forced: the
replay could only be a duplicate, and marking it `replayed` would hide that it never was.

A letter the relay parked (reason `unpublishable`: Kafka refused the outbox row) never reached a
handler: replaying it queues the row in the outbox again, for when the cause is fixed (a larger
`max_request_size`, a granted ACL). If Kafka still refuses it, the relay parks a new letter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncSession

from choreo import deadletters
from choreo.envelope import utcnow
from choreo.exceptions import ChoreoError
from choreo.kafka import Record
from choreo.service import Service
from choreo.tables import DeadLetter, dead_letter_table, inbox_table

STATUSES = ("parked", "replayed", "discarded")


@dataclass(frozen=True)
class ReplayResult:
    """What happened to one letter on replay."""

    letter_id: int
    outcome: str
    """handled, duplicate, dead-lettered (failed again), skipped, not-parked, already-processed,
    or re-enqueued (an unpublishable outbox row, queued for the relay again)."""
    detail: str = ""


async def letters(
    service: Service,
    *,
    status: str | None = "parked",
    saga_id: str | None = None,
    consumer: str | None = None,
    ids: Sequence[int] = (),
    limit: int = 100,
) -> list[DeadLetter]:
    """Dead letters of `service`, newest first, filtered."""
    if status is not None and status not in STATUSES:
        raise ChoreoError(f"unknown dead-letter status {status!r}; use one of {', '.join(STATUSES)}")
    columns = dead_letter_table.c
    query = select(DeadLetter).order_by(columns.id.desc()).limit(limit)
    if status is not None:
        query = query.where(columns.status == status)
    if saga_id is not None:
        query = query.where(columns.saga_id == saga_id)
    if consumer is not None:
        query = query.where(columns.consumer == consumer)
    if ids:
        query = query.where(columns.id.in_(ids))
    async with AsyncSession(service.engine) as session:
        return list((await session.execute(query)).scalars())


async def replay(service: Service, selected: Sequence[DeadLetter], *, force: bool = False) -> list[ReplayResult]:
    """Run each parked letter through its handler again; mark it replayed.

    A letter whose event its handler already processed stays parked as `already-processed`,
    unless `force`. A row the relay parked is queued in the outbox again instead.
    """
    consumer = service.consumer
    if consumer is None:
        raise ChoreoError(f"{service.name} is not open: `await service.start(kafka=False)` first")
    processed = {} if force else await _already_processed(service, selected)
    results = []
    for letter in selected:
        assert letter.id is not None
        if letter.status != "parked":
            results.append(ReplayResult(letter.id, "not-parked"))
            continue
        if letter.id in processed:
            at = processed[letter.id].strftime("%Y-%m-%d %H:%M:%S")
            detail = f"{letter.consumer} already processed event {letter.event_id} at {at} (inbox)"
            results.append(ReplayResult(letter.id, "already-processed", detail))
            continue
        if letter.reason == deadletters.UNPUBLISHABLE:
            async with AsyncSession(service.engine) as session, session.begin():
                await deadletters.reenqueue(session, letter, utcnow())
            await _resolve(service, [letter.id], "replayed")
            results.append(ReplayResult(letter.id, "re-enqueued"))
            continue
        record = Record(
            topic=letter.topic,
            partition=letter.partition,
            offset=letter.offset,
            key=letter.key,
            value=letter.payload,
            headers=tuple((name, str(value).encode()) for name, value in letter.headers.items()),
        )
        # A letter parked for the whole record (bad headers) names the service, not a handler.
        only = None if letter.consumer == service.name else letter.consumer
        outcomes = await consumer.process(record, only=only)
        await _resolve(service, [letter.id], "replayed")
        results.append(ReplayResult(letter.id, outcomes[0] if len(outcomes) == 1 else ",".join(outcomes)))
    return results


async def _already_processed(service: Service, selected: Sequence[DeadLetter]) -> dict[int, datetime]:
    """Per letter id, when the inbox says the letter's handler processed its event."""
    wanted = {
        (letter.consumer, letter.event_id): letter.id
        for letter in selected
        # A letter for the whole record (bad headers) names the service, not a handler.
        if letter.status == "parked" and letter.event_id and letter.id is not None and letter.consumer != service.name
    }
    if not wanted:
        return {}
    columns = inbox_table.c
    query = select(columns.consumer, columns.event_id, columns.processed_at).where(
        tuple_(columns.consumer, columns.event_id).in_(list(wanted))
    )
    async with service.engine.connect() as conn:
        rows = (await conn.execute(query)).all()
    return {wanted[(name, event_id)]: at for name, event_id, at in rows}


async def discard(service: Service, selected: Sequence[DeadLetter]) -> list[int]:
    """Mark parked letters discarded (kept for audit, never replayed); returns their ids."""
    ids = [letter.id for letter in selected if letter.status == "parked" and letter.id is not None]
    await _resolve(service, ids, "discarded")
    return ids


async def _resolve(service: Service, ids: Sequence[int], status: str) -> None:
    if not ids:
        return
    async with service.engine.begin() as conn:
        await conn.execute(
            update(dead_letter_table)
            .where(dead_letter_table.c.id.in_(ids), dead_letter_table.c.status == "parked")
            .values(status=status, resolved_at=utcnow())
        )
