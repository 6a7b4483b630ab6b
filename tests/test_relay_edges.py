"""The relay at its edges: a send that fails, a record Kafka refuses for good, a key stuck for a
while, an event too large to emit. Against the real broker, on SQLite and on PostgreSQL."""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaTimeoutError, MessageSizeTooLargeError
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from choreo import Event, EventTooLarge, KafkaSettings, Relay, Service, dlq, tables
from choreo.database import create_engine
from choreo.deadletters import PAYLOAD_OMITTED, UNPUBLISHABLE, park, topic_for
from choreo.envelope import new_id, utcnow
from choreo.health import metrics
from choreo.kafka import DEFAULT_MAX_REQUEST_SIZE, KafkaTransport, Record, record_size
from choreo.outbox import OutboxRecord
from choreo.tables import outbox_table
from tests.conftest import DatabaseFactory
from tests.test_core_infra import eventually, records_on
from tests.test_outbox import open_engine, write

pytestmark = pytest.mark.infra

TOPIC = "edges"


def row(key: str | None, seq: int, *, size: int = 0) -> dict[str, Any]:
    """An outbox row for `TOPIC` whose payload names its key and sequence (padded to `size`)."""
    now = utcnow()
    payload = json.dumps({"key": key, "seq": seq, "pad": "x" * size}).encode()
    return {
        "event_id": new_id(),
        "topic": TOPIC,
        "key": key,
        "event_type": "edges.numbered",
        "event_version": 1,
        "saga_id": key or "",
        "headers": {"choreo-event-id": f"{key}-{seq}", "choreo-event-type": "edges.numbered", "choreo-saga-id": "s"},
        "payload": payload,
        "created_at": now,
        "available_at": now,
    }


def label(key: str | None, seq: int) -> str:
    return f"{key}-{seq}"


def labels_of(records: Sequence[Record], key: str) -> list[str]:
    """The rows of `key` in the order the topic holds them (one key = one partition)."""
    return [dict(r.headers)["choreo-event-id"].decode() for r in records if r.key == key.encode()]


def first_seen(labels: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(labels))


@dataclass
class Faults:
    """Records (by label) to fail the way aiokafka fails them, and what was handed over.

    `too_large`: `send()` raises MessageSizeTooLargeError synchronously, as aiokafka's own size
    check does before a record is queued. `stalled`: `send()` raises KafkaTimeoutError
    synchronously, as aiokafka does when the partition's queue stays full (e.g. no leader) for
    request_timeout_ms. Failures of a delivery future are produced for real, by the broker.
    """

    too_large: set[str] = field(default_factory=set)
    stalled: set[str] = field(default_factory=set)
    sends: list[list[str]] = field(default_factory=list)
    """The labels handed to the producer, one list per `KafkaTransport.publish` call."""


class FaultyProducer(AIOKafkaProducer):  # type: ignore[misc]
    """The real producer, against the real broker, failing the records `faults` names."""

    def __init__(self, faults: Faults, **options: Any) -> None:
        super().__init__(**options)
        self.faults = faults

    async def send(self, topic: str, value: bytes, *, key: bytes | None, headers: list[tuple[str, bytes]]) -> Any:
        name = dict(headers)["choreo-event-id"].decode()
        if topic.endswith(topic_for("edges")):  # a letter's copy carries its record's headers
            return await super().send(topic, value, key=key, headers=headers)
        faults = self.faults
        faults.sends[-1].append(name)
        if name in faults.too_large:
            raise MessageSizeTooLargeError("The message is 2000000 bytes when serialized which is larger ...")
        if name in faults.stalled:
            raise KafkaTimeoutError()
        return await super().send(topic, value, key=key, headers=headers)


class FaultyTransport(KafkaTransport):
    """The Kafka transport over `FaultyProducer`s (also the ones it renews)."""

    def __init__(self, settings: KafkaSettings, faults: Faults) -> None:
        super().__init__(settings, client_id="edges")
        self.faults = faults
        self.producer_type = functools.partial(FaultyProducer, faults)

    async def publish(self, records: Sequence[OutboxRecord]) -> list[BaseException | None]:
        self.faults.sends.append([])
        return await super().publish(records)


@pytest.fixture
async def engine(database: DatabaseFactory) -> AsyncIterator[AsyncEngine]:
    engine = await open_engine(await database("edges"))
    yield engine
    await engine.dispose()


@contextlib.asynccontextmanager
async def started(transport: KafkaTransport) -> AsyncIterator[KafkaTransport]:
    await transport.ensure_topics([TOPIC, topic_for("edges")])
    await transport.start()
    try:
        yield transport
    finally:
        await transport.stop()


async def relay_until(relay: Relay, done: Callable[[], bool], timeout: float = 30.0) -> None:
    relay.start()
    try:
        await eventually(done, timeout)
    finally:
        await relay.stop()


async def parked_letters(engine: AsyncEngine) -> list[tables.DeadLetter]:
    async with AsyncSession(engine) as session:
        return list((await session.execute(select(tables.DeadLetter).order_by(tables.DeadLetter.id))).scalars())


# -- a send that fails: per-key order, parking --------------------------------------------------


async def test_a_record_refused_at_send_holds_its_key_back_and_is_parked(
    engine: AsyncEngine, kafka_settings: KafkaSettings
) -> None:
    faults = Faults(too_large={label("k", 2)})
    await write(engine, [row("k", seq) for seq in range(1, 5)] + [row("other", seq) for seq in (1, 2)])
    async with started(FaultyTransport(kafka_settings, faults)) as transport:
        relay = Relay(engine, transport, name="edges", poll_interval=0.05)
        await relay_until(relay, lambda: relay.stats.published == 5 + 1)  # and the letter's copy

    # k-3 and k-4 never went to the producer behind the refused k-2; then k-3 went alone.
    assert faults.sends[0] == ["k-1", "k-2", "other-1", "other-2"]
    assert faults.sends[1] == ["k-3"]
    on_wire = await records_on(kafka_settings, TOPIC, 6, timeout=3)
    assert labels_of(on_wire, "k") == ["k-1", "k-3", "k-4"]
    assert labels_of(on_wire, "other") == ["other-1", "other-2"]
    [letter] = await parked_letters(engine)
    assert (letter.reason, letter.status, letter.consumer, letter.topic) == (UNPUBLISHABLE, "parked", "edges", TOPIC)
    assert letter.event_id == "k-2" and json.loads(letter.payload)["seq"] == 2
    assert "MessageSizeTooLargeError" in letter.error
    assert relay.stats.parked == 1


async def test_a_record_larger_than_the_producer_allows_is_parked_for_real(
    engine: AsyncEngine, kafka_settings: KafkaSettings
) -> None:
    # Written before the emit-time check existed (or by another tool): aiokafka refuses it.
    await write(engine, [row("k", 1), row("k", 2, size=DEFAULT_MAX_REQUEST_SIZE), row("k", 3)])
    async with started(KafkaTransport(kafka_settings, client_id="edges")) as transport:
        relay = Relay(engine, transport, name="edges", poll_interval=0.05)
        await relay_until(relay, lambda: relay.stats.published == 2 + 1)  # and its dead-letter copy

    on_wire = await records_on(kafka_settings, TOPIC, 3, timeout=3)
    assert labels_of(on_wire, "k") == ["k-1", "k-3"]
    [letter] = await parked_letters(engine)
    assert letter.reason == UNPUBLISHABLE and len(letter.payload) > DEFAULT_MAX_REQUEST_SIZE
    [copy] = await records_on(kafka_settings, topic_for("edges"), 1)
    headers = dict(copy.headers)
    assert copy.value == b"" and int(headers[PAYLOAD_OMITTED]) == len(letter.payload)
    assert headers["choreo-dead-letter-reason"] == UNPUBLISHABLE.encode()


async def test_a_record_the_broker_refuses_is_parked_and_its_key_moves_on(
    engine: AsyncEngine, kafka_settings: KafkaSettings
) -> None:
    # The producer lets 1.5 MB through; the broker (message.max.bytes ~1 MB) refuses it, after
    # k-3 was handed over in a later producer batch of the same partition. With the idempotent
    # producer the broker then refuses every later batch of the partition
    # (OutOfOrderSequenceNumber), until the transport starts a new producer.
    settings = replace(kafka_settings, client_options={"max_request_size": 4 * DEFAULT_MAX_REQUEST_SIZE})
    await write(engine, [row("k", 1), row("k", 2, size=3 * DEFAULT_MAX_REQUEST_SIZE // 2), row("k", 3)])
    async with started(KafkaTransport(settings, client_id="edges")) as transport:
        relay = Relay(engine, transport, name="edges", poll_interval=0.05)
        await relay_until(relay, lambda: relay.stats.published == 2 + 1)  # and the letter's copy

    on_wire = await records_on(kafka_settings, TOPIC, 4, timeout=3)
    assert first_seen(labels_of(on_wire, "k")) == ["k-1", "k-3"]
    [letter] = await parked_letters(engine)
    assert letter.reason == UNPUBLISHABLE and "MessageSizeTooLarge" in letter.error


async def test_a_key_stuck_on_a_transient_failure_starves_no_other_key(
    engine: AsyncEngine, kafka_settings: KafkaSettings
) -> None:
    # The stuck key's rows come first and outnumber a batch.
    faults = Faults(stalled={label("k", 1)})
    await write(engine, [row("k", seq) for seq in range(1, 13)] + [row(f"o{seq}", seq) for seq in range(1, 7)])
    async with started(FaultyTransport(kafka_settings, faults)) as transport:
        relay = Relay(engine, transport, name="edges", batch_size=5, poll_interval=0.05, max_backoff=0.2)
        relay.start()
        try:
            await eventually(lambda: relay.stats.published == 6)
            assert relay.stats.failures >= 1
            # Only k-1 was ever handed over, alone each time.
            assert {name for call in faults.sends for name in call if name.startswith("k-")} == {"k-1"}
            assert all(sum(name.startswith("k-") for name in call) <= 1 for call in faults.sends)

            faults.stalled.clear()  # the broker recovers
            await eventually(lambda: relay.stats.published == 18)
        finally:
            await relay.stop()

    on_wire = await records_on(kafka_settings, TOPIC, 18, timeout=10)
    assert labels_of(on_wire, "k") == [label("k", seq) for seq in range(1, 13)]


# -- the relay's own backoff ------------------------------------------------------------------


class FailingCalls:
    """A publisher whose next `failures` calls fail outright (the producer is unreachable)."""

    def __init__(self, failures: int) -> None:
        self.failures = failures

    async def publish(self, records: Sequence[OutboxRecord]) -> list[BaseException | None]:
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionError("Kafka is unreachable")
        return [None] * len(records)


class BackoffLog(Relay):
    """A relay that logs how many consecutive failures each of its backoffs counted."""

    counted: list[int]

    def _backoff(self, failures: int) -> float:
        self.counted.append(failures)
        return 0.01


async def test_the_backoff_starts_afresh_after_the_relay_published_again(engine: AsyncEngine) -> None:
    publisher = FailingCalls(3)
    relay = BackoffLog(engine, publisher, name="edges", poll_interval=0.05)
    relay.counted = []
    await write(engine, [row("k", 1)])
    relay.start()
    try:
        await eventually(lambda: relay.stats.published == 1)
        publisher.failures = 1
        await write(engine, [row("k", 2)])
        relay.wake()
        await eventually(lambda: relay.stats.published == 2)
    finally:
        await relay.stop()
    assert relay.counted == [1, 2, 3, 1]


def test_the_backoff_stays_within_its_ceiling_however_long_the_outage(tmp_path: Path) -> None:
    relay = Relay(create_engine(f"sqlite+aiosqlite:///{tmp_path}/x.db"), FailingCalls(0), name="edges", max_backoff=5.0)
    assert all(2.5 <= relay._backoff(failures) <= 5.0 for failures in (10, 1_023, 1_024, 100_000))


# -- sizes: at emit time, and for dead letters ------------------------------------------------


class Blob(Event, name="edges.blob", topic=TOPIC):
    data: str


def blob_service(url: str, settings: KafkaSettings) -> Service:
    service = Service("edges", database_url=url, kafka=settings)
    service.declare(Blob)
    return service


async def test_emit_refuses_an_event_larger_than_the_producer_takes_and_the_largest_it_takes_gets_through(
    database: DatabaseFactory, kafka_settings: KafkaSettings
) -> None:
    service = blob_service(await database("edges"), kafka_settings)
    async with service.running():
        async with service.transaction() as tx:
            tx.emit(Blob(data=""))
            [probe] = tx.pending
            # Counted as aiokafka counts it, with this transaction's own key and envelope.

            def size(length: int) -> int:
                payload = Blob(data="x" * length).model_dump_json().encode()
                return record_size(probe.key, payload, probe.envelope.to_headers())

            largest = DEFAULT_MAX_REQUEST_SIZE - size(0)
            while size(largest + 1) <= DEFAULT_MAX_REQUEST_SIZE:
                largest += 1
            while size(largest) > DEFAULT_MAX_REQUEST_SIZE:
                largest -= 1
            with pytest.raises(EventTooLarge, match="max_request_size"):
                tx.emit(Blob(data="x" * (largest + 1)))
            tx.emit(Blob(data="x" * largest))
        await eventually(lambda: service.relay is not None and service.relay.stats.published == 2)
        assert service.relay is not None and service.relay.stats.parked == 0
    on_wire = await records_on(kafka_settings, TOPIC, 2)
    assert sorted(len(r.value) for r in on_wire)[-1] == len(Blob(data="x" * largest).model_dump_json())


async def test_the_emit_limit_follows_the_services_kafka_client_options(database: DatabaseFactory) -> None:
    settings = KafkaSettings(client_options={"max_request_size": 2000})
    service = blob_service(await database("edges"), settings)
    await service.start(kafka=False)
    try:
        async with service.transaction() as tx:
            tx.emit(Blob(data="x" * 1000))
            with pytest.raises(EventTooLarge, match="2000"):
                tx.emit(Blob(data="x" * 2000))
    finally:
        await service.stop()


class BlobExpired(Event, name="edges.blob_expired", topic=TOPIC):
    data: str


class BlobDone(Event, name="edges.blob_done", topic=TOPIC):
    pass


async def test_a_saga_whose_timeout_is_too_large_does_not_start(database: DatabaseFactory) -> None:
    service = blob_service(await database("edges"), KafkaSettings(client_options={"max_request_size": 2000}))
    service.saga(
        "blob",
        starts=Blob,
        ends={BlobDone},
        deadline=timedelta(minutes=1),
        on_deadline=lambda blob: BlobExpired(data=blob.data * 3),
        timeout_event=BlobExpired,
    )
    await service.start(kafka=False)
    try:
        async with service.transaction() as tx:
            with pytest.raises(EventTooLarge, match="edges.blob_expired"):
                tx.emit(Blob(data="x" * 1000))
            assert tx.pending == []
    finally:
        await service.stop()


async def test_a_dead_letters_copy_leaves_out_a_payload_too_large_for_kafka(engine: AsyncEngine) -> None:
    now = utcnow()
    big = b"x" * (DEFAULT_MAX_REQUEST_SIZE + 1)
    for offset, value in enumerate([b"small", big]):
        record = Record("orders", 0, offset, b"k", value, (("choreo-event-id", f"e{offset}".encode()),))
        async with AsyncSession(engine) as session, session.begin():
            await park(
                session,
                record,
                service="edges",
                consumer="edges.handle",
                reason="oversized",
                error="too large to handle",
                traceback=None,
                attempts=1,
                first_failed_at=now,
                now=now,
            )
    columns = outbox_table.c
    async with engine.connect() as conn:
        copies = (await conn.execute(select(columns.headers, columns.payload).order_by(columns.id))).all()
    assert [payload for _, payload in copies] == [b"small", b""]
    assert PAYLOAD_OMITTED not in copies[0].headers
    assert copies[1].headers[PAYLOAD_OMITTED] == str(len(big))
    assert [letter.payload for letter in await parked_letters(engine)] == [b"small", big]  # kept whole


# -- operating it: metrics, `choreo dlq`, replay ------------------------------------------------


async def test_a_parked_row_shows_in_metrics_and_dead_letters_and_replay_queues_it_again(
    database: DatabaseFactory, kafka_settings: KafkaSettings
) -> None:
    # The producer takes 4 MB, the broker ~1 MB: emit lets 1.5 MB through, the broker refuses it.
    settings = replace(kafka_settings, client_options={"max_request_size": 4 * DEFAULT_MAX_REQUEST_SIZE})
    service = blob_service(await database("edges"), settings)
    async with service.running():
        relay = service.relay
        assert relay is not None
        async with service.transaction(saga_id="saga") as tx:
            tx.emit(Blob(data="x" * (3 * DEFAULT_MAX_REQUEST_SIZE // 2)))
            tx.emit(Blob(data="after"))

        async def parked(count: int) -> bool:
            return len(await dlq.letters(service, status=None)) == count

        await eventually(lambda: parked(1))
        await eventually(lambda: relay.stats.published == 2)  # "after" and the letter's copy

        exposition = await metrics(service)
        assert 'choreo_relay_parked_total{service="edges"} 1' in exposition
        assert 'choreo_dead_letters_parked{service="edges"} 1' in exposition
        [letter] = await dlq.letters(service)
        assert (letter.reason, letter.consumer, letter.topic, letter.saga_id) == (UNPUBLISHABLE, "edges", TOPIC, "saga")

        [result] = await dlq.replay(service, [letter])
        assert result.outcome == "re-enqueued"
        # Queued again under its event id; the broker still refuses it, so it is parked anew.
        await eventually(lambda: parked(2))
        await eventually(lambda: relay.stats.parked == 2)  # counted once its transaction committed
        [again] = await dlq.letters(service)
        assert again.id != letter.id and again.event_id == letter.event_id
        assert [old.status for old in await dlq.letters(service, status="replayed")] == ["replayed"]
    # "after" may be there twice: handed over behind the refused row, and sent again alone.
    on_wire = await records_on(kafka_settings, TOPIC, 2, timeout=3)
    assert first_seen([json.loads(r.value)["data"] for r in on_wire]) == ["after"]
