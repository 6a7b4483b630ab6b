"""Malformed records end as dead letters at once and never wedge their partition, on SQLite and PostgreSQL.

SQLite ignores VARCHAR lengths and stores NUL; PostgreSQL enforces both, which is where a record
that passes decoding but cannot be written used to be retried forever.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import replace

import pytest
from aiokafka import AIOKafkaProducer
from sqlalchemy import select, text

from choreo import Event, KafkaSettings, RetryPolicy, Service, Tx
from choreo.kafka import Record
from choreo.tables import DeadLetter, InboxRow, OutboxRow, outbox_table
from choreo.testing import in_memory, record_of
from tests.conftest import DatabaseFactory
from tests.test_core_infra import eventually
from tests.test_memory_consumer import consumer_of, count, dead_letters

POLICY = RetryPolicy(max_attempts=3, initial_backoff=0.001, max_backoff=0.005, max_record_bytes=4096)


class Item(Event, name="malformed.item", topic="malformed"):
    label: str


class Seen(Event, name="malformed.seen", topic="malformed-out"):
    label: str


def item_service(database_url: str, seen: list[str], kafka: KafkaSettings | None = None) -> Service:
    """A service whose handler notes every label it processes."""
    service = Service("malformed", database_url=database_url, kafka=kafka, retry=POLICY)

    @service.on(Item)
    async def note(event: Item, tx: Tx) -> Seen:
        seen.append(event.label)
        return Seen(label=event.label)

    return service


def with_headers(record: Record, **changes: bytes | None) -> Record:
    """`record` with headers replaced (`name_with_underscores=value`) or dropped (None)."""
    names = {name.replace("_", "-"): value for name, value in changes.items()}
    kept = [(k, v) for k, v in record.headers if k not in names]
    return replace(record, headers=(*kept, *((k, v) for k, v in names.items() if v is not None)))


Mutation = Callable[[Record], Record]

CASES: dict[str, tuple[Mutation, str, str]] = {
    # name: (how the record is broken, the letter's reason, the letter's consumer)
    "invalid-json": (lambda r: replace(r, value=b"{not json"), "invalid-json", "malformed.note"),
    "non-utf8-value": (lambda r: replace(r, value=b'{"label": "\xff\xfe"}'), "invalid-json", "malformed.note"),
    "schema-violation": (lambda r: replace(r, value=b'{"name": "x"}'), "schema-violation", "malformed.note"),
    "wrong-field-type": (lambda r: replace(r, value=b'{"label": ["x"]}'), "schema-violation", "malformed.note"),
    "unknown-version": (lambda r: with_headers(r, choreo_event_version=b"7"), "unknown-version", "malformed.note"),
    "missing-headers": (lambda r: replace(r, headers=()), "missing-header", "malformed"),
    "non-utf8-header": (lambda r: with_headers(r, choreo_saga_id=b"saga-\xff"), "bad-header", "malformed"),
    "long-event-id": (lambda r: with_headers(r, choreo_event_id=b"e" * 65), "bad-header", "malformed"),
    "nul-event-id": (lambda r: with_headers(r, choreo_event_id=b"ev\x00-1"), "bad-header", "malformed"),
    "event-id-not-an-id": (lambda r: with_headers(r, choreo_event_id=b"../not an id!"), "bad-header", "malformed"),
    "long-saga-id": (lambda r: with_headers(r, choreo_saga_id=b"s" * 65), "bad-header", "malformed"),
    "nul-saga-id": (lambda r: with_headers(r, choreo_saga_id=b"saga\x00"), "bad-header", "malformed"),
    "long-event-type": (lambda r: with_headers(r, choreo_event_type=b"t" * 256), "bad-header", "malformed"),
    "nul-event-type": (lambda r: with_headers(r, choreo_event_type=b"malformed.item\x00"), "bad-header", "malformed"),
    "bad-causation-id": (lambda r: with_headers(r, choreo_causation_id=b"c" * 65), "bad-header", "malformed"),
    "long-key": (lambda r: replace(r, key=b"k" * 256), "bad-key", "malformed"),
    "nul-key": (lambda r: replace(r, key=b"key\x00"), "bad-key", "malformed"),
    "tombstone": (lambda r: replace(r, value=b""), "empty-value", "malformed.note"),
    "oversized": (lambda r: replace(r, value=b'{"label": "' + b"x" * 5000 + b'"}'), "oversized", "malformed"),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_a_malformed_record_is_dead_lettered_and_the_next_record_of_its_partition_flows(
    database: DatabaseFactory, case: str
) -> None:
    mutate, reason, consumer = CASES[case]
    seen: list[str] = []
    service = item_service(await database("malformed"), seen)
    async with in_memory(service):
        poison = mutate(record_of(Item(label="poison"), offset=1))
        good = replace(record_of(Item(label="next"), offset=2), key=b"same-key")
        # One poll: the poison record, then the next record of the same partition. The batch
        # returning at all is what lets the transport commit past the poison record.
        async with asyncio.timeout(30):
            await consumer_of(service).on_batch([poison, good])
        (letter,) = await dead_letters(service)
        assert (letter.reason, letter.consumer, letter.attempts) == (reason, consumer, 1)
        assert (letter.topic, letter.partition, letter.offset) == (poison.topic, 0, 1)
        assert letter.payload == poison.value  # the raw bytes, as consumed
        assert letter.key == poison.key
        assert seen == ["next"]  # the poison record never reached the handler; the next one did, once
        assert await count(service, InboxRow) == 1
        assert await count(service, OutboxRow, OutboxRow.topic == "malformed-out") == 1
        assert await count(service, OutboxRow, OutboxRow.topic == "malformed.dead-letters") == 1


async def test_a_letter_keeps_every_text_it_can_store_cleaned_and_cut_to_its_column(
    database: DatabaseFactory,
) -> None:
    service = item_service(await database("malformed"), [])
    async with in_memory(service):
        poison = with_headers(
            record_of(Item(label="x")),
            choreo_event_id=b"e" * 100,
            choreo_saga_id=b"saga\x00" + b"s" * 100,
            choreo_event_type=b"\xff" + b"t" * 300,
            traceparent=b"tp\x00\xff",
        )
        await consumer_of(service).process(poison)
        (letter,) = await dead_letters(service)
        assert letter.reason == "bad-header"
        assert letter.event_id == "e" * 64
        assert letter.saga_id == "saga\ufffd" + "s" * 59
        assert letter.event_type == "\ufffd" + "t" * 254
        assert letter.headers["traceparent"] == "tp\ufffd\ufffd"
        async with service.engine.connect() as conn:
            letters_out = select(outbox_table).where(outbox_table.c.topic == "malformed.dead-letters")
            row = (await conn.execute(letters_out)).one()
        assert (row.saga_id, row.event_type) == (letter.saga_id, "\ufffd" + "t" * 254)
        assert row.key == poison.key.decode()  # type: ignore[union-attr]
        assert row.headers["choreo-dead-letter-reason"] == "bad-header"
        assert row.headers["choreo-saga-id"] == "saga\ufffd" + "s" * 100  # headers are not cut, only cleaned


async def test_a_letter_that_cannot_be_stored_whole_is_stored_bare_not_retried_forever(
    database: DatabaseFactory,
) -> None:
    service = item_service(await database("malformed"), [])
    async with in_memory(service):
        # The full letter also goes into the outbox (for the dead-letter topic); without that
        # table every attempt fails the same way.
        async with service.engine.begin() as conn:
            await conn.execute(text("ALTER TABLE choreo_outbox RENAME TO choreo_outbox_gone"))
        poison = replace(record_of(Item(label="x"), offset=5), headers=())
        async with asyncio.timeout(30):
            assert await consumer_of(service).process(poison) == ["dead-lettered"]
        (letter,) = await dead_letters(service)
        assert (letter.reason, letter.offset, letter.payload, letter.headers) == ("missing-header", 5, poison.value, {})
        assert "stored without its headers" in letter.error and "choreo_outbox" in letter.error


async def test_a_poison_record_on_kafka_is_parked_and_the_next_record_is_processed(
    fresh_pg_database: Callable[[str], Awaitable[str]], kafka_settings: KafkaSettings
) -> None:
    seen: list[str] = []
    service = item_service(await fresh_pg_database("malformed"), seen, kafka_settings)
    async with service.running():
        producer = AIOKafkaProducer(bootstrap_servers=kafka_settings.bootstrap_servers)
        await producer.start()
        try:
            # Raw records as any Kafka client could write them: an event id longer than the
            # inbox column, then a good record with the same key (same partition, after it).
            poison = with_headers(record_of(Item(label="poison")), choreo_event_id=b"e" * 80)
            good = record_of(Item(label="good"))
            for record in (poison, good):
                await producer.send_and_wait(
                    kafka_settings.topic_prefix + "malformed", record.value, key=b"k1", headers=list(record.headers)
                )
        finally:
            await producer.stop()

        async def both_done() -> bool:
            return seen == ["good"] and await count(service, DeadLetter) == 1

        await eventually(both_done, timeout=60)
        (letter,) = await dead_letters(service)
        assert (letter.reason, letter.event_id) == ("bad-header", "e" * 64)
        assert await count(service, InboxRow) == 1
