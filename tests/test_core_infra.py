"""The delivery guarantees against a real Kafka broker, on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence

import pytest
from aiokafka import AIOKafkaConsumer
from sqlalchemy import select

from choreo import KafkaSettings, Relay, Service, outbox
from choreo.database import create_engine
from choreo.envelope import utcnow
from choreo.health import metrics
from choreo.kafka import Record
from choreo.outbox import OutboxRecord
from choreo.testing import unpublished
from tests.conftest import DatabaseFactory
from tests.test_outbox import Statements
from tests.toy import Arrival, Numbered, add_stock, make_toy, order_status, place_order, reservations

pytestmark = pytest.mark.infra


async def eventually(check: Callable[[], Awaitable[bool] | bool], timeout: float = 60.0) -> None:
    """Poll `check` (a function or a coroutine function) until it holds; fail with the timeout otherwise."""
    async with asyncio.timeout(timeout):
        while True:
            outcome = check()
            if await outcome if isinstance(outcome, Awaitable) else outcome:
                return
            await asyncio.sleep(0.05)


async def records_on(settings: KafkaSettings, topic: str, expected: int, timeout: float = 30.0) -> list[Record]:
    """Read a topic from the beginning until `expected` records arrived (or time runs out)."""
    consumer = AIOKafkaConsumer(
        settings.topic_prefix + topic,
        bootstrap_servers=settings.bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        fetch_max_wait_ms=settings.fetch_max_wait_ms,
    )
    await consumer.start()
    seen: list[Record] = []
    try:
        async with asyncio.timeout(timeout):
            while len(seen) < expected:
                batch = await consumer.getmany(timeout_ms=200)
                for records in batch.values():
                    seen += [Record(r.topic, r.partition, r.offset, r.key, r.value, tuple(r.headers)) for r in records]
    except TimeoutError:
        pass
    finally:
        await consumer.stop()
    return seen


def event_ids(records: Sequence[Record]) -> list[str]:
    return [dict(r.headers)["choreo-event-id"].decode() for r in records]


async def test_two_services_play_a_saga_through_kafka(database: DatabaseFactory, kafka_settings: KafkaSettings) -> None:
    toy = make_toy(await database("shop"), await database("stock"), kafka_settings)
    async with toy.shop.running(), toy.stock.running():
        await add_stock(toy.stock, "apple", 5)
        sagas = [await place_order(toy.shop, f"o{i}", "apple", 2) for i in range(3)]

        async def all_final() -> bool:
            return all([await order_status(toy.shop, f"o{i}") != "PENDING" for i in range(3)])

        await eventually(all_final)
        # Sagas run on different keys, hence partitions: which two win the stock is not fixed.
        statuses = {f"o{i}": await order_status(toy.shop, f"o{i}") for i in range(3)}
        confirmed = sorted(o for o, status in statuses.items() if status == "CONFIRMED")
        assert sorted(statuses.values()) == ["CONFIRMED", "CONFIRMED", "REJECTED"]
        assert sorted(r.order_id for r in await reservations(toy.stock)) == confirmed
        stock_events = await records_on(kafka_settings, "toy-stock", 3)
        by_saga = {dict(r.headers)["choreo-saga-id"].decode() for r in stock_events}
        assert by_saga == set(sagas)
        assert {r.key.decode() for r in stock_events if r.key} == set(sagas)
        exposition = await metrics(toy.stock)
        lag_lines = [line for line in exposition.splitlines() if line.startswith("choreo_consumer_lag{")]
        assert any('topic="toy-orders"' in line for line in lag_lines)
        assert 'choreo_handled_total{service="stock"} 3' in exposition


async def test_the_same_record_twice_on_the_wire_has_one_effect(
    database: DatabaseFactory, kafka_settings: KafkaSettings
) -> None:
    toy = make_toy(await database("shop"), await database("stock"), kafka_settings)
    async with toy.shop.running(relay=False), toy.stock.running():
        await add_stock(toy.stock, "apple", 5)
        await place_order(toy.shop, "o1", "apple", 1)
        async with toy.shop.engine.connect() as conn:
            (row,) = await outbox.fetch_due(conn, utcnow(), 10)
        await toy.shop.transport.publish([row, row])
        consumer = toy.stock.consumer
        assert consumer is not None

        async def both_seen() -> bool:
            return consumer.stats.handled + consumer.stats.duplicates == 2

        await eventually(both_seen)
        assert consumer.stats.duplicates == 1
        assert len(await reservations(toy.stock)) == 1


async def test_a_crash_between_local_commit_and_offset_commit_has_no_second_effect(
    database: DatabaseFactory, kafka_settings: KafkaSettings
) -> None:
    shop_db, stock_db = await database("shop"), await database("stock")
    toy = make_toy(shop_db, stock_db, kafka_settings)
    async with toy.shop.running():
        # First life of the stock service: it commits the handler's transaction, then "dies"
        # before the offset is committed (the consume callback never returns).
        first = toy.stock
        await first._open(ensure_topics=True, consume=False)
        assert first.consumer is not None
        consumer_one = first.consumer
        committed = asyncio.Event()

        async def commit_then_die(record: Record) -> None:
            await consumer_one.on_record(record)
            committed.set()
            await asyncio.Event().wait()  # never acknowledged

        first.transport.subscribe("toy-orders", first.group_id, commit_then_die)
        await first._launch(start_transport=True, relay=False)
        await add_stock(first, "apple", 5)
        await place_order(toy.shop, "o1", "apple", 2)
        await asyncio.wait_for(committed.wait(), 60)
        assert consumer_one.stats.handled == 1
        await first.stop()

        # Second life, same database and consumer group: the record comes again and the
        # inbox absorbs it.
        second = make_toy(shop_db, stock_db, kafka_settings).stock
        async with second.running():
            assert second.consumer is not None
            consumer_two = second.consumer

            async def redelivered() -> bool:
                return consumer_two.stats.duplicates >= 1

            await eventually(redelivered)
            assert consumer_two.stats.handled == 0
            assert len(await reservations(second)) == 1

            async def confirmed() -> bool:
                return await order_status(toy.shop, "o1") == "CONFIRMED"

            await eventually(confirmed)


class CrashAfterPublishing:
    """A publisher whose first batch reaches Kafka but whose relay "dies" before marking it."""

    def __init__(self, inner: Relay | object) -> None:
        self.inner = inner
        self.crashed = False

    async def publish(self, records: Sequence[OutboxRecord]) -> list[BaseException | None]:
        outcomes = await self.inner.publish(records)  # type: ignore[attr-defined]
        if not self.crashed:
            self.crashed = True
            raise ConnectionResetError("relay lost its database connection after publishing")
        return outcomes


async def test_a_relay_dying_before_marking_rows_causes_duplicates_that_consumers_absorb(
    database: DatabaseFactory, kafka_settings: KafkaSettings
) -> None:
    toy = make_toy(await database("shop"), await database("stock"), kafka_settings)
    async with toy.shop.running(relay=False), toy.stock.running():
        crashing = CrashAfterPublishing(toy.shop.transport)
        relay = Relay(toy.shop.engine, crashing, name="shop")
        relay.start()
        try:
            await add_stock(toy.stock, "apple", 5)
            await place_order(toy.shop, "o1", "apple", 2)

            async def confirmed() -> bool:
                return await order_status(toy.shop, "o1") == "CONFIRMED"

            await eventually(confirmed)
            assert crashing.crashed and relay.stats.failures >= 1
            on_wire = await records_on(kafka_settings, "toy-orders", 2)
            placed = Counter(
                eid
                for eid, r in zip(event_ids(on_wire), on_wire, strict=True)
                if dict(r.headers)["choreo-event-type"] == b"toy.order_placed"
            )
            assert list(placed.values()) == [2]  # the same event, published twice
            assert toy.stock.consumer is not None
            await eventually(lambda: _true(toy.stock.consumer.stats.duplicates >= 1))  # type: ignore[union-attr]
            assert len(await reservations(toy.stock)) == 1
        finally:
            await relay.stop()


async def _true(value: bool) -> bool:
    return value


async def test_events_arrive_in_per_key_order(database: DatabaseFactory, kafka_settings: KafkaSettings) -> None:
    lanes = [f"lane-{i}" for i in range(50)]
    next_seq = Counter[str]()
    rng = random.Random(7)
    toy = make_toy(await database("shop"), await database("stock"), kafka_settings)
    async with toy.shop.running(), toy.stock.running():
        for _ in range(200):  # 1,000 events in 200 transactions of five, keys interleaved
            async with toy.shop.transaction() as tx:
                for lane in rng.sample(lanes, 5):
                    tx.emit(Numbered(lane=lane, seq=next_seq[lane]), key=lane)
                    next_seq[lane] += 1
        assert sum(next_seq.values()) == 1000

        async def all_arrived() -> bool:
            return len(await arrivals(toy.stock)) == 1000

        await eventually(all_arrived, timeout=120)
        seen: dict[str, list[int]] = {}
        for arrival in await arrivals(toy.stock):
            seen.setdefault(arrival.lane, []).append(arrival.seq)
        assert seen == {lane: list(range(next_seq[lane])) for lane in lanes}
        assert await unpublished(toy.shop) == 0


async def arrivals(stock: Service) -> list[Arrival]:
    async with stock.transaction() as tx:
        return list((await tx.session.execute(select(Arrival).order_by(Arrival.id))).scalars())  # type: ignore[arg-type]


class Recording:
    """Forwards to Kafka and remembers which relay published what."""

    def __init__(self, inner: object, log: list[tuple[str, str]], name: str) -> None:
        self.inner, self.log, self.name = inner, log, name

    async def publish(self, records: Sequence[OutboxRecord]) -> list[BaseException | None]:
        self.log += [(self.name, r.headers["choreo-event-id"]) for r in records]
        return await self.inner.publish(records)  # type: ignore[attr-defined,no-any-return]


async def test_two_relays_on_one_postgres_database_take_turns_without_losing_anything(
    fresh_pg_database: Callable[[str], Awaitable[str]], kafka_settings: KafkaSettings
) -> None:
    url = await fresh_pg_database("relays")
    toy = make_toy(url, url, kafka_settings)
    published: list[tuple[str, str]] = []

    async def emit(count: int) -> list[str]:
        ids = []
        for i in range(count):
            async with toy.shop.transaction() as tx:
                ids.append(tx.emit(Numbered(lane=f"lane-{i % 7}", seq=i)))
        return ids

    async with toy.shop.running(relay=False):
        engines = [create_engine(url), create_engine(url)]
        relays = [
            Relay(engine, Recording(toy.shop.transport, published, name), name=name, standby_interval=0.2)
            for engine, name in zip(engines, ["a", "b"], strict=True)
        ]
        for relay in relays:
            relay.start()
        try:
            first = await emit(150)
            await eventually(lambda: _true(set(first) <= {eid for _, eid in published}))
            leaders = [r for r in relays if r.stats.is_leader]
            assert len(leaders) == 1
            leader, standby = leaders[0], next(r for r in relays if r is not leaders[0])
            assert {name for name, _ in published} == {leader.name}  # the standby published nothing

            await leader.stop()  # the leader dies; its connection, and so its lock, go with it
            second = await emit(150)
            await eventually(lambda: _true(set(second) <= {eid for _, eid in published}))
            assert standby.stats.is_leader
            assert {eid for name, eid in published if name == standby.name} >= set(second)
            on_wire = await records_on(kafka_settings, "toy-numbers", 300)
            assert set(event_ids(on_wire)) == set(first) | set(second)

            async def all_marked() -> bool:  # a batch is marked after Kafka acknowledged it
                return await unpublished(toy.shop) == 0

            await eventually(all_marked, timeout=10)
        finally:
            for relay in relays:
                await relay.stop()
            for engine in engines:
                await engine.dispose()


async def test_only_commits_away_from_the_leading_relay_send_a_notify(
    fresh_pg_database: Callable[[str], Awaitable[str]], kafka_settings: KafkaSettings
) -> None:
    shop_db, stock_db = await fresh_pg_database("shop"), await fresh_pg_database("stock")
    toy = make_toy(shop_db, stock_db, kafka_settings)
    script = make_toy(shop_db, stock_db, kafka_settings).shop  # e.g. a script or an HTTP worker
    async with toy.shop.running(), toy.stock.running(), script.running(kafka=False):
        await add_stock(toy.stock, "apple", 5)
        assert toy.shop.relay is not None

        async def leading() -> bool:
            return toy.shop.relay is not None and toy.shop.relay.stats.is_leader

        await eventually(leading)
        here, away = Statements(toy.shop.engine), Statements(script.engine)
        await place_order(toy.shop, "here", "apple", 1)  # its relay is woken directly
        await place_order(script, "away", "apple", 1)  # only a NOTIFY wakes the leader
        assert not any("pg_notify" in statement for statement, _ in here.sent)
        assert any("pg_notify" in statement for statement, _ in away.sent)

        async def both_confirmed() -> bool:
            return [await order_status(toy.shop, o) for o in ("here", "away")] == ["CONFIRMED"] * 2

        await eventually(both_confirmed, timeout=20)
