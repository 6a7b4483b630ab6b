"""Saga traces rebuilt from the collector's index: three services, in-memory Kafka, SQLite."""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from choreo.envelope import utcnow
from choreo.kafka import Record
from choreo.tables import outbox_table
from choreo.tracing import (
    CollectorStats,
    Hop,
    SagaDeclaration,
    SagaState,
    SagaTrace,
    TraceCollector,
    TracedEvent,
    TraceStore,
    build_trace,
    index_record,
)
from tests.toy3 import Toy3, make_toy3, place, traced_in_memory

FLOW_TIMEOUT = 10.0


def toy_in(tmp_path: Path, **options: Any) -> Toy3:
    return make_toy3(
        *(f"sqlite+aiosqlite:///{tmp_path}/{name}.db" for name in ("orders", "stock", "payments")), **options
    )


def collector_for(toy: Toy3, tmp_path: Path) -> TraceCollector:
    return TraceCollector(toy.services, f"sqlite+aiosqlite:///{tmp_path}/trace.db")


async def settle_due(toy: Toy3, *running: Any) -> None:
    """Wait until no running service has an outbox row that is due and unpublished."""
    services = running or toy.services
    async with asyncio.timeout(FLOW_TIMEOUT):
        while True:
            due = 0
            for service in services:
                async with service.engine.connect() as conn:
                    due += int(
                        await conn.scalar(
                            select(func.count()).where(
                                outbox_table.c.published_at.is_(None), outbox_table.c.available_at <= utcnow()
                            )
                        )
                        or 0
                    )
            if not due:
                return
            for service in services:
                if service.relay is not None:
                    service.relay.wake()  # a dead letter's outbox row does not wake the relay itself
            await asyncio.sleep(0.01)


SUCCESS_SHAPE = (
    "orders",
    "t3.order_placed",
    "",
    (
        (
            "stock.reserve",
            "t3.stock_reserved",
            "",
            (("payments.charge", "t3.payment_captured", "", (("orders.confirm", "t3.order_confirmed", "", ()),)),),
        ),
    ),
)
"""The tree of a successful purchase, as `shape` renders it."""


def shape(hop: Hop) -> tuple[Any, ...]:
    """(by, event type, marks, children) with siblings sorted: the tree without its timings."""
    marks = ("↺" if hop.event.is_compensation else "") + ("✗" * len(hop.dead_letters))
    return (hop.event.by, hop.event.event_type, marks, tuple(sorted(shape(c) for c in hop.children)))


async def run_flows(tmp_path: Path) -> tuple[Toy3, TraceCollector, dict[str, str]]:
    """Play a success, a compensation, an out-of-stock and a dead-letter saga; return saga ids by name."""
    toy = toy_in(tmp_path)
    collector = collector_for(toy, tmp_path)
    async with traced_in_memory(collector, *toy.services):
        ids = {
            "success": await place(toy.orders, "ok-1", 40),
            "compensation": await place(toy.orders, "big-1", 150),
            "rejected": await place(toy.orders, "none-1", 10),
            "dead-letter": await place(toy.orders, "boom-1", 10),
        }
        await settle_due(toy)
        await collector.store.open()
    return toy, collector, ids


@dataclass(frozen=True)
class Flows:
    """The trace database of `run_flows`, played once per module."""

    directory: Path
    ids: dict[str, str]
    stats: CollectorStats

    def store(self) -> TraceStore:
        return TraceStore(f"sqlite+aiosqlite:///{self.directory}/trace.db")


def play_flows(directory: Path) -> Flows:
    """`run_flows` on a loop of its own (callable from any fixture, whatever loop runs here)."""

    async def play() -> Flows:
        _, collector, ids = await run_flows(directory)
        return Flows(directory, ids, collector.stats)

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, play()).result()


@pytest.fixture(scope="module")
def flows(tmp_path_factory: pytest.TempPathFactory) -> Flows:
    return play_flows(tmp_path_factory.mktemp("flows"))


async def trace_of(flows: Flows, name: str) -> SagaTrace:
    async with flows.store() as store:
        trace = await store.trace(flows.ids[name])
    assert trace is not None
    return trace


async def test_ids_propagate_across_three_services(flows: Flows) -> None:
    ids = flows.ids
    async with flows.store() as store:
        records = await store.records(ids["success"])
    by_type = {r.event_type: r for r in records}
    assert set(by_type) == {"t3.order_placed", "t3.stock_reserved", "t3.payment_captured", "t3.order_confirmed"}
    assert {r.saga_id for r in records} == {ids["success"]}
    chain = ["t3.order_placed", "t3.stock_reserved", "t3.payment_captured", "t3.order_confirmed"]
    assert by_type["t3.order_placed"].causation_id is None
    for cause, effect in itertools.pairwise(chain):
        assert by_type[effect].causation_id == by_type[cause].event_id
    assert [by_type[t].producer for t in chain] == ["orders", "stock", "payments", "orders"]
    assert [by_type[t].handler for t in chain] == [None, "stock.reserve", "payments.charge", "orders.confirm"]
    assert all(r.published_at is not None for r in records)  # the Kafka timestamp is kept
    assert flows.stats.ignored == 0 and flows.stats.dead_letters == 1


async def test_trace_of_a_successful_saga(flows: Flows) -> None:
    trace = await trace_of(flows, "success")
    assert trace.state is SagaState.COMPLETED
    assert trace.declaration is not None and trace.declaration.name == "purchase"
    (root,) = trace.roots
    assert shape(root) == SUCCESS_SHAPE
    assert trace.ended_by is not None and trace.ended_by.event.event_type == "t3.order_confirmed"
    assert trace.stopped_at == [] and trace.compensations == []
    hops = list(trace.hops())
    assert hops[0].latency is None
    assert all(h.latency is not None and h.latency >= timedelta(0) for h in hops[1:])
    assert all(h.publish_delay is not None for h in hops)
    assert trace.offset(hops[-1]) == trace.duration
    assert trace.summary().startswith("ended: t3.order_confirmed (orders.confirm) after ")
    assert trace.services == ["orders", "stock", "payments"]


async def test_trace_of_a_compensated_saga(flows: Flows) -> None:
    trace = await trace_of(flows, "compensation")
    assert trace.state is SagaState.COMPENSATED
    (root,) = trace.roots
    assert shape(root) == (
        "orders",
        "t3.order_placed",
        "",
        (
            (
                "stock.reserve",
                "t3.stock_reserved",
                "",
                (
                    (
                        "payments.charge",
                        "t3.payment_failed",
                        "",
                        (
                            ("orders.reject", "t3.order_rejected", "", ()),
                            ("stock.release", "t3.stock_released", "↺", ()),
                        ),
                    ),
                ),
            ),
        ),
    )
    (compensation,) = trace.compensations
    assert compensation.event.compensates == ("t3.stock_reserved",)
    assert trace.summary().endswith("compensated by t3.stock_released")
    document = trace.to_dict()
    assert document["state"] == "compensated" and document["compensations"] == ["t3.stock_released"]


async def test_a_rejection_without_compensation_is_completed(flows: Flows) -> None:
    trace = await trace_of(flows, "rejected")
    assert trace.state is SagaState.COMPLETED
    (root,) = trace.roots
    assert shape(root) == (
        "orders",
        "t3.order_placed",
        "",
        (("stock.reserve", "t3.out_of_stock", "", (("orders.reject", "t3.order_rejected", "", ()),)),),
    )


async def test_trace_of_a_dead_lettered_saga_stops_where_it_failed(flows: Flows) -> None:
    trace = await trace_of(flows, "dead-letter")
    assert trace.state is SagaState.FAILED
    (root,) = trace.roots
    assert shape(root) == ("orders", "t3.order_placed", "", (("stock.reserve", "t3.stock_reserved", "✗", ()),))
    (stopped,) = trace.stopped_at
    (letter,) = stopped.dead_letters
    assert (letter.consumer, letter.reason, letter.topic) == (
        "payments.charge",
        "handler-error",
        "payments.dead-letters",
    )
    assert letter.error == "RuntimeError: card processor exploded"
    assert trace.summary() == (
        "stopped at: t3.stock_reserved (stock.reserve) ✗ payments.charge: handler-error: "
        "RuntimeError: card processor exploded"
    )
    assert trace.ended_by is None


async def test_an_unfinished_saga_is_in_flight_then_overdue(tmp_path: Path) -> None:
    toy = toy_in(tmp_path)
    collector = collector_for(toy, tmp_path)
    async with traced_in_memory(collector, toy.orders, toy.stock):  # payments is down
        saga_id = await place(toy.orders, "ok-2", 20)
        await settle_due(toy, toy.orders, toy.stock)
        await collector.store.open()
    async with TraceStore(f"sqlite+aiosqlite:///{tmp_path}/trace.db") as store:
        trace = await store.trace(saga_id)
        assert trace is not None
        assert trace.state is SagaState.IN_FLIGHT
        assert [h.event.event_type for h in trace.stopped_at] == ["t3.stock_reserved"]
        assert "in-flight, last event" in trace.summary()
        later = trace.started_at + timedelta(minutes=6)
        overdue = await store.trace(saga_id, now=later)
        assert overdue is not None and overdue.state is SagaState.OVERDUE
        assert "overdue by 60.0 s (deadline 5.0 min)" in overdue.summary()
        listed = await store.sagas(state=SagaState.OVERDUE, now=later)
        assert [t.saga_id for t in listed] == [saga_id]
        assert await store.sagas(state=SagaState.OVERDUE) == []


async def test_listing_filters_by_state_and_age(flows: Flows) -> None:
    ids = flows.ids
    async with flows.store() as store:
        everything = await store.sagas()
        assert {t.saga_id for t in everything} == set(ids.values())
        starts = [t.started_at for t in everything]
        assert starts == sorted(starts, reverse=True)  # newest first
        assert [t.saga_id for t in await store.sagas(state=SagaState.FAILED)] == [ids["dead-letter"]]
        assert [t.saga_id for t in await store.sagas(state=SagaState.COMPENSATED)] == [ids["compensation"]]
        assert len(await store.sagas(limit=2)) == 2
        future = everything[0].started_at + timedelta(hours=1)
        assert await store.sagas(since=future) == []
        assert await store.resolve(ids["success"][:8]) == ids["success"]
        assert await store.resolve("no-such-saga") is None


def record(headers: dict[str, str], *, offset: int = 0, timestamp_ms: int | None = 1_700_000_000_000) -> Record:
    return Record("t3-orders", 0, offset, None, b"{}", tuple((k, v.encode()) for k, v in headers.items()), timestamp_ms)


async def test_the_collector_ignores_foreign_records_and_collapses_duplicates(tmp_path: Path) -> None:
    toy = toy_in(tmp_path)
    collector = collector_for(toy, tmp_path)
    await collector.store.open()
    try:
        headers = {
            "choreo-event-id": "e1",
            "choreo-event-type": "t3.stock_released",
            "choreo-event-version": "1",
            "choreo-saga-id": "s1",
            "choreo-producer": "stock",
            "choreo-occurred-at": "2024-01-01T00:00:00+00:00",
        }
        await collector.on_record(record(headers))
        await collector.on_record(record(headers, offset=7))  # the same event, published twice
        await collector.on_record(record({"content-type": "application/json"}))
        await collector.on_record(Record("t3-orders", 0, 9, None, b"", (("choreo-event-id", b"\xff"),)))
        assert collector.stats == CollectorStats(indexed=1, duplicates=1, ignored=2)
        (stored,) = await collector.store.records("s1")
        assert stored.is_compensation and stored.compensates == ("t3.stock_reserved",)
        assert stored.published_at is not None and stored.published_at.year == 2023
    finally:
        await collector.store.close()
    assert collector.topics == [
        "orders.dead-letters",
        "payments.dead-letters",
        "stock.dead-letters",
        "t3-orders",
        "t3-payments",
        "t3-stock",
    ]


def event(event_id: str, event_type: str, cause: str | None, second: int, **extra: Any) -> TracedEvent:
    base = dict(
        kind="event",
        event_id=event_id,
        saga_id="s",
        event_type=event_type,
        event_version=1,
        causation_id=cause,
        producer=event_type.split(".")[0],
        handler=None,
        occurred_at=_at(second),
        topic="t",
        partition=0,
        offset=second,
    )
    return TracedEvent(**{**base, **extra})  # type: ignore[arg-type]


def _at(second: int) -> Any:
    from datetime import UTC, datetime

    return datetime(2024, 1, 1, tzinfo=UTC) + timedelta(seconds=second)


def test_a_dead_letter_of_an_uncollected_event_stands_in_for_it() -> None:
    rows = [
        event("a", "x.start", None, 0),
        event("b", "y.step", "a", 2, kind="dead-letter", consumer="z.handle", reason="schema-violation", error="bad"),
    ]
    trace = build_trace("s", rows, [SagaDeclaration("flow", "x.start", frozenset({"x.end"}))], now=_at(10))
    (root,) = trace.roots
    (child,) = root.children
    assert not child.seen and child.event.event_type == "y.step" and child.dead_letters[0].consumer == "z.handle"
    assert trace.state is SagaState.FAILED


def test_orphans_become_roots_and_undeclared_sagas_are_classified_by_what_happened() -> None:
    rows = [event("b", "y.step", "missing", 1), event("c", "z.undo", "b", 2, compensates=("y.step",))]
    trace = build_trace("s", rows, [], now=_at(10))
    assert [h.event.event_id for h in trace.roots] == ["b"]
    assert trace.declaration is None and trace.state is SagaState.COMPENSATED
    plain = build_trace("s", rows[:1], [], now=_at(10))
    assert plain.state is SagaState.UNKNOWN
    cycle = build_trace("s", [event("p", "a.a", "q", 1), event("q", "b.b", "p", 2)], [], now=_at(3))
    assert len(list(cycle.hops())) == 2


def test_an_end_after_compensation_is_compensated_even_without_the_start() -> None:
    declaration = SagaDeclaration("flow", "x.start", frozenset({"x.end"}), deadline=timedelta(seconds=5))
    rows = [event("b", "y.undo", "a", 1, compensates=("y.do",)), event("c", "x.end", "b", 2)]
    trace = build_trace("s", rows, [declaration], now=_at(100))
    assert trace.declaration == declaration
    assert trace.state is SagaState.COMPENSATED
    assert trace.ended_by is not None and trace.ended_by.event.event_id == "c"


def test_index_record_reads_dead_letter_headers() -> None:
    headers = {
        "choreo-event-id": "e1",
        "choreo-event-type": "t3.stock_reserved",
        "choreo-event-version": "1",
        "choreo-saga-id": "s1",
        "choreo-causation-id": "e0",
        "choreo-producer": "stock",
        "choreo-handler": "stock.reserve",
        "choreo-occurred-at": "2024-01-01T00:00:00+00:00",
        "choreo-dead-letter-reason": "handler-error",
        "choreo-dead-letter-consumer": "payments.charge",
        "choreo-dead-letter-error": "RuntimeError: no",
    }
    indexed = index_record(record(headers))
    assert indexed is not None and indexed.is_dead_letter
    assert (indexed.consumer, indexed.reason, indexed.error) == ("payments.charge", "handler-error", "RuntimeError: no")
    assert indexed.causation_id == "e0" and indexed.handler == "stock.reserve"


def test_choreo_runs_without_the_otel_extra(tmp_path: Path) -> None:
    script = f"""
import asyncio, sys
sys.modules["opentelemetry"] = None  # as if the extra were not installed
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from choreo import otel
from tests.test_tracing import run_flows
from pathlib import Path
assert not otel.AVAILABLE and not otel.enabled() and otel.current_traceparent() is None
_, collector, _ = asyncio.run(run_flows(Path({str(tmp_path)!r})))
assert collector.stats.indexed == 14, collector.stats
"""
    env = {**os.environ, "CHOREO_OTEL": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "CHOREO_OTEL is set but OpenTelemetry is not installed" in done.stderr
