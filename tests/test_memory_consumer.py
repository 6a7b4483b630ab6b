"""Consumer outcomes on SQLite: duplicates, retries, dead letters, unknown and malformed records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import func, select

from choreo import Event, RetryPolicy, Service, Tx
from choreo.consumer import Consumer
from choreo.kafka import Record
from choreo.tables import DeadLetter, InboxRow, OutboxRow
from choreo.testing import in_memory, record_of
from tests.toy import OrderPlaced, Reservation, StockItem, add_stock, make_toy, reservations

FAST = RetryPolicy(max_attempts=3, initial_backoff=0.001, max_backoff=0.005)


class Flaky(Event, name="mem.flaky", topic="mem"):
    label: str


class Done(Event, name="mem.done", topic="mem-out"):
    label: str


class Unexpected(Event, name="mem.unexpected", topic="mem-out"):
    pass


def consumer_of(service: Service) -> Consumer:
    assert service.consumer is not None
    return service.consumer


async def count(service: Service, table: type, *where: object) -> int:
    async with service.engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(table).where(*where)) or 0)  # type: ignore[arg-type]


async def dead_letters(service: Service) -> list[DeadLetter]:
    async with service.transaction() as tx:
        return list((await tx.session.execute(select(DeadLetter).order_by(DeadLetter.id))).scalars())  # type: ignore[arg-type]


async def test_the_same_record_twice_changes_the_database_once_and_emits_once(tmp_path: Path) -> None:
    toy = make_toy(f"sqlite+aiosqlite:///{tmp_path}/a.db", f"sqlite+aiosqlite:///{tmp_path}/b.db")
    async with in_memory(toy.stock):
        await add_stock(toy.stock, "pear", 10)
        record = record_of(OrderPlaced(order_id="o1", sku="pear", quantity=2))
        await consumer_of(toy.stock).on_record(record)
        await consumer_of(toy.stock).on_record(record)
        assert len(await reservations(toy.stock)) == 1
        assert await count(toy.stock, OutboxRow, OutboxRow.event_type == "toy.stock_reserved") == 1
        assert consumer_of(toy.stock).stats.duplicates == 1
        async with toy.stock.transaction() as tx:
            item = await tx.session.get(StockItem, "pear")
            assert item is not None and item.available == 8


async def test_emitted_events_inherit_saga_and_causation(tmp_path: Path) -> None:
    toy = make_toy(f"sqlite+aiosqlite:///{tmp_path}/a.db", f"sqlite+aiosqlite:///{tmp_path}/b.db")
    async with in_memory(toy.stock):
        record = record_of(OrderPlaced(order_id="o1", sku="none", quantity=1), saga_id="saga-7", event_id="ev-1")
        await consumer_of(toy.stock).on_record(record)
        async with toy.stock.engine.connect() as conn:
            row = (await conn.execute(select(OutboxRow.__table__))).one()
        assert row.saga_id == "saga-7"
        assert row.key == "saga-7"
        assert row.headers["choreo-causation-id"] == "ev-1"
        assert row.headers["choreo-handler"] == "stock.reserve"
        assert row.headers["choreo-producer"] == "stock"
        assert json.loads(row.payload) == {"order_id": "o1"}


def flaky_service(tmp_path: Path, failures: dict[str, int]) -> Service:
    service = Service("flaky", database_url=f"sqlite+aiosqlite:///{tmp_path}/f.db", retry=FAST)

    @service.on(Flaky)
    async def handle(event: Flaky, tx: Tx) -> Done:
        if failures.get(event.label, 0) > 0:
            failures[event.label] -= 1
            raise RuntimeError(f"{event.label} is not ready")
        return Done(label=event.label)

    return service


async def test_a_handler_failing_twice_then_succeeding_has_one_effect(tmp_path: Path) -> None:
    service = flaky_service(tmp_path, {"twice": 2})
    async with in_memory(service):
        await consumer_of(service).on_record(record_of(Flaky(label="twice")))
        assert await count(service, OutboxRow, OutboxRow.topic == "mem-out") == 1
        assert await count(service, InboxRow) == 1
        assert await count(service, DeadLetter) == 0
        assert consumer_of(service).stats.retried == 2


async def test_a_handler_that_always_fails_is_dead_lettered_and_others_flow(tmp_path: Path) -> None:
    service = flaky_service(tmp_path, {"poison": 1000})
    async with in_memory(service):
        poison = record_of(Flaky(label="poison"), saga_id="s-poison", offset=1)
        await consumer_of(service).on_record(poison)
        await consumer_of(service).on_record(record_of(Flaky(label="fine"), offset=2))
        (letter,) = await dead_letters(service)
        assert letter.reason == "handler-error"
        assert letter.attempts == FAST.max_attempts
        assert letter.consumer == "flaky.handle"
        assert letter.saga_id == "s-poison"
        assert letter.payload == poison.value
        assert "RuntimeError: poison is not ready" in letter.error
        assert letter.traceback and "handle" in letter.traceback
        assert await count(service, OutboxRow, OutboxRow.topic == "mem-out") == 1  # "fine" went through
        # The letter also travels to the dead-letter topic, through the outbox.
        assert await count(service, OutboxRow, OutboxRow.topic == "flaky.dead-letters") == 1
        assert await count(service, InboxRow) == 1  # a dead letter is not "processed": it can be replayed


async def test_emitting_an_undeclared_event_is_a_handler_error(tmp_path: Path) -> None:
    service = Service("strict", database_url=f"sqlite+aiosqlite:///{tmp_path}/s.db", retry=FAST)
    service.declare(Unexpected)

    @service.on(Flaky)
    async def handle(event: Flaky, tx: Tx) -> Done:
        tx.emit(Unexpected())
        return Done(label=event.label)

    async with in_memory(service):
        await consumer_of(service).on_record(record_of(Flaky(label="x")))
        (letter,) = await dead_letters(service)
        assert "UndeclaredEmitError" in letter.error
        assert "declares only Done (mem.done v1)" in letter.error
        assert await count(service, OutboxRow, OutboxRow.topic == "mem-out") == 0


def tamper(record: Record, *, value: bytes | None = None, drop: str | None = None, **headers: str) -> Record:
    kept = [(k, v) for k, v in record.headers if k != drop and k not in headers]
    kept += [(k, v.encode()) for k, v in headers.items()]
    return Record(
        record.topic, record.partition, record.offset, record.key, record.value if value is None else value, tuple(kept)
    )


@pytest.mark.parametrize(
    ("mutation", "reason", "consumer"),
    [
        ({"value": b"{not json"}, "invalid-json", "flaky.handle"),
        ({"value": b'{"label": 42}'}, "schema-violation", "flaky.handle"),
        ({"value": b"[]"}, "schema-violation", "flaky.handle"),
        ({"choreo-event-version": "2"}, "unknown-version", "flaky.handle"),
        ({"drop": "choreo-event-id"}, "missing-header", "flaky"),
        ({"choreo-event-version": "two"}, "bad-header", "flaky"),
        ({"value": b'{"label": "' + b"x" * 2_000_000 + b'"}'}, "oversized", "flaky"),
    ],
)
async def test_malformed_records_are_dead_lettered_at_once_with_their_reason(
    tmp_path: Path, mutation: dict[str, object], reason: str, consumer: str
) -> None:
    service = flaky_service(tmp_path, {})
    async with in_memory(service):
        bad = tamper(record_of(Flaky(label="x")), **mutation)  # type: ignore[arg-type]
        await consumer_of(service).on_record(bad)
        await consumer_of(service).on_record(record_of(Flaky(label="next")))
        (letter,) = await dead_letters(service)
        assert (letter.reason, letter.consumer, letter.attempts) == (reason, consumer, 1)
        assert await count(service, OutboxRow, OutboxRow.topic == "mem-out") == 1


async def test_unknown_event_types_are_counted_not_fatal(tmp_path: Path) -> None:
    service = flaky_service(tmp_path, {})
    async with in_memory(service):
        stranger = tamper(record_of(Flaky(label="x")), **{"choreo-event-type": "mem.someone_elses"})
        await consumer_of(service).on_record(stranger)
        await consumer_of(service).on_record(stranger)
        assert consumer_of(service).stats.unknown == 2
        assert consumer_of(service).stats.unknown_types == {"mem.someone_elses"}
        assert await count(service, DeadLetter) == 0


async def test_a_rolled_back_handler_leaves_no_trace(tmp_path: Path) -> None:
    service = Service(
        "atomic", database_url=f"sqlite+aiosqlite:///{tmp_path}/t.db", retry=FAST, metadata=StockItem.metadata
    )

    @service.on(Flaky)
    async def handle(event: Flaky, tx: Tx) -> Done:
        tx.session.add(Reservation(order_id=event.label, quantity=1))
        tx.emit(Done(label=event.label))
        raise RuntimeError("after writing")

    async with in_memory(service):
        await consumer_of(service).on_record(record_of(Flaky(label="x")))
        assert await count(service, Reservation) == 0
        assert await count(service, InboxRow) == 0
        assert await count(service, OutboxRow, OutboxRow.topic == "mem-out") == 0
        assert await count(service, DeadLetter) == 1


async def test_a_replayed_letter_succeeds_once_and_stays_auditable(tmp_path: Path) -> None:
    from choreo import dlq

    failures = {"late": 1000, "gone": 1000}
    service = flaky_service(tmp_path, failures)
    async with in_memory(service):
        await consumer_of(service).on_record(record_of(Flaky(label="late"), saga_id="s-late"))
        await consumer_of(service).on_record(record_of(Flaky(label="gone"), saga_id="s-gone"))
        (letter,) = await dlq.letters(service, saga_id="s-late")
        failures["late"] = 0  # the cause is fixed
        results = await dlq.replay(service, [letter])
        assert [(r.letter_id, r.outcome) for r in results] == [(letter.id, "handled")]
        assert await dlq.replay(service, await dlq.letters(service, status=None, ids=[letter.id])) == [
            dlq.ReplayResult(letter.id, "not-parked")  # type: ignore[arg-type]
        ]
        (gone,) = await dlq.letters(service, saga_id="s-gone")
        assert await dlq.discard(service, [gone]) == [gone.id]
        statuses = {d.saga_id: d.status for d in await dlq.letters(service, status=None)}
        assert statuses == {"s-late": "replayed", "s-gone": "discarded"}
        async with service.engine.connect() as conn:
            rows = (await conn.execute(select(OutboxRow.__table__).where(OutboxRow.topic == "mem-out"))).all()
        assert [(r.saga_id, r.headers["choreo-causation-id"]) for r in rows] == [("s-late", letter.event_id)]
        # Replaying the same record again is absorbed by the inbox.
        again = await consumer_of(service).process(
            record_of(Flaky(label="late"), saga_id="s-late", event_id=letter.event_id)
        )
        assert again == ["duplicate"]


async def test_metrics_and_readiness_report_the_backlog_and_outcomes(tmp_path: Path) -> None:
    from choreo.health import metrics, readiness

    service = flaky_service(tmp_path, {"bad": 1000})
    async with in_memory(service):
        await consumer_of(service).on_record(record_of(Flaky(label="ok")))
        await consumer_of(service).on_record(record_of(Flaky(label="bad")))
        text = await metrics(service)
        assert 'choreo_handled_total{service="flaky"} 1' in text
        assert 'choreo_dead_lettered_total{service="flaky"} 1' in text
        assert 'choreo_dead_letters_parked{service="flaky"} 1' in text
        assert "# TYPE choreo_outbox_backlog gauge" in text
        report = await readiness(service)
        assert report["ready"] is True and report["checks"]["database"] == "ok"
