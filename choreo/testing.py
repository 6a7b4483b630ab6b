"""Run services against FastStream's in-memory Kafka: the same handlers, units of work and relay, no broker.

async with choreo.testing.in_memory(orders, customers):
    async with orders.transaction() as tx:
        tx.emit(OrderCreated(...))
    await choreo.testing.settle(orders, customers)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from faststream.kafka import TestKafkaBroker

from choreo import outbox
from choreo.envelope import Envelope, new_id, utcnow
from choreo.events import Event
from choreo.kafka import Record
from choreo.service import Service


@asynccontextmanager
async def in_memory(*services: Service) -> AsyncIterator[tuple[Service, ...]]:
    """Start `services` (with their own databases) on one in-memory Kafka, stop them on exit.

    Delivery is synchronous: the relay's publish runs the consuming handlers before it returns.
    """
    brokers = [(await service._open(ensure_topics=False)).route_in_memory() for service in services]
    try:
        async with TestKafkaBroker(*brokers):
            for service in services:
                await service._launch(start_transport=False, relay=None)
            yield services
    finally:
        for service in services:
            await service.stop()


async def unpublished(service: Service) -> int:
    """How many outbox rows of `service` are due but not yet published (scheduled ones wait)."""
    async with service.engine.connect() as conn:
        count, _ = await outbox.backlog(conn, utcnow())
    return count


async def settle(*services: Service, timeout: float = 10.0) -> None:
    """Wait until no service has unpublished outbox rows due now (the sagas have run out).

    Delivery writes into other services' outboxes while they are being counted, so quiet is
    only trusted when two rounds in a row find nothing.
    """
    quiet_rounds = 0
    async with asyncio.timeout(timeout):
        while quiet_rounds < 2:
            counts = [await unpublished(s) for s in services]
            quiet_rounds = quiet_rounds + 1 if not any(counts) else 0
            for service in services:
                if service.relay is not None:
                    service.relay.wake()
            await asyncio.sleep(0.01)


def record_of(
    event: Event,
    *,
    saga_id: str | None = None,
    event_id: str | None = None,
    producer: str = "test",
    offset: int = 0,
) -> Record:
    """A consumed record carrying `event`, as it would arrive from Kafka."""
    envelope = Envelope(
        event_type=event.event_name,
        event_version=event.event_version,
        saga_id=saga_id or new_id(),
        producer=producer,
        event_id=event_id or new_id(),
    )
    return Record(
        topic=event.event_topic,
        partition=0,
        offset=offset,
        key=event.kafka_key(envelope.saga_id).encode(),
        value=event.model_dump_json().encode(),
        headers=tuple((name, value.encode()) for name, value in envelope.to_headers().items()),
    )
