"""The per-saga summary index behind the explorer's list: kept current by every write, filtered, counted, indexed."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import delete
from sqlalchemy import event as sa_event

from choreo.envelope import utcnow
from choreo.tracing import (
    DEAD_LETTER,
    SagaDeclaration,
    SagaState,
    TracedEvent,
    TraceStore,
    summaries_table,
)
from tests.conftest import DatabaseFactory

pytestmark = pytest.mark.infra

ENDS = frozenset({"order.approved", "order.rejected"})
ORDER = SagaDeclaration("order", "order.created", ENDS, timedelta(seconds=30))
T0 = utcnow() - timedelta(minutes=10)


def event(saga: str, n: int, event_type: str, producer: str, cause: int | None = None, **extra: object) -> TracedEvent:
    fields: dict[str, object] = {
        "kind": "event",
        "event_id": f"{saga}-{n}",
        "saga_id": saga,
        "event_type": event_type,
        "event_version": 1,
        "causation_id": f"{saga}-{cause}" if cause is not None else None,
        "producer": producer,
        "handler": None if cause is None else f"{producer}.h{n}",
        "occurred_at": T0 + timedelta(seconds=int(saga[-1]), milliseconds=10 * n),
        "topic": producer,
        "partition": 0,
        "offset": n,
    }
    fields.update(extra)
    return TracedEvent(**fields)  # type: ignore[arg-type]


def completed(saga: str) -> list[TracedEvent]:
    return [
        event(saga, 0, "order.created", "orders"),
        event(saga, 1, "credit.reserved", "customers", 0),
        event(saga, 2, "order.approved", "orders", 1),
    ]


def compensated(saga: str) -> list[TracedEvent]:
    return [
        event(saga, 0, "order.created", "orders"),
        event(saga, 1, "credit.reserved", "customers", 0),
        event(saga, 2, "payment.declined", "payments", 1),
        event(saga, 3, "order.rejected", "orders", 2),
        event(saga, 4, "credit.released", "customers", 2, compensates=("credit.reserved",)),
    ]


def failed(saga: str) -> list[TracedEvent]:
    letter = event(saga, 1, "credit.reserved", "customers", 0, kind=DEAD_LETTER, consumer="payments.authorize")
    return [event(saga, 0, "order.created", "orders"), event(saga, 1, "credit.reserved", "customers", 0), letter]


@pytest.fixture
async def store(database: DatabaseFactory) -> TraceStore:
    store = TraceStore(await database("trace"))
    await store.open()
    await store.save_declarations([ORDER])
    await store.add_all([*completed("s1"), *compensated("s2"), *failed("s3")])
    await store.add_all(completed("s4")[:2])  # in flight: started 10 min ago, deadline 30 s
    return store


async def test_the_summary_follows_each_saga(store: TraceStore) -> None:
    rows = {s.saga_id: s for s in await store.summaries()}
    assert [s.saga_id for s in await store.summaries()] == ["s4", "s3", "s2", "s1"]  # newest start first
    assert {k: v.state for k, v in rows.items()} == {
        "s1": SagaState.COMPLETED,
        "s2": SagaState.COMPENSATED,
        "s3": SagaState.FAILED,
        "s4": SagaState.OVERDUE,
    }
    s2 = rows["s2"]
    assert (s2.saga, s2.hops, s2.compensations, s2.dead_letters) == ("order", 5, 1, 0)
    assert s2.services == ("orders", "customers", "payments")
    assert s2.to_end == timedelta(milliseconds=30) and s2.to_settle == timedelta(milliseconds=40)
    assert rows["s3"].services == ("orders", "customers", "payments")  # payments only parked a letter
    assert rows["s4"].to_end is None
    # Overdue is judged by the reader's clock: before the deadline the same row is in flight.
    early = await store.summaries(now=T0 + timedelta(seconds=10))
    assert {s.saga_id: s.state for s in early}["s4"] is SagaState.IN_FLIGHT
    await store.close()


async def test_a_later_record_rewrites_the_summary(store: TraceStore) -> None:
    later = [event("s3", 5, "payment.authorized", "payments", 1), event("s3", 6, "order.approved", "orders", 5)]
    await store.add_all(later)
    (s3,) = [s for s in await store.summaries() if s.saga_id == "s3"]
    assert (s3.state, s3.hops, s3.dead_letters) == (SagaState.COMPLETED, 4, 1)
    await store.close()


async def test_filters_and_counts(store: TraceStore) -> None:
    ids = lambda found: [s.saga_id for s in found]  # noqa: E731
    assert ids(await store.summaries(state=SagaState.OVERDUE)) == ["s4"]
    assert ids(await store.summaries(state=SagaState.IN_FLIGHT)) == []
    assert ids(await store.summaries(state=SagaState.COMPENSATED)) == ["s2"]
    assert ids(await store.summaries(service="payments")) == ["s3", "s2"]
    assert ids(await store.summaries(service="pay")) == []  # a whole name, not a substring
    assert ids(await store.summaries(saga="other")) == []
    assert ids(await store.summaries(since=T0 + timedelta(seconds=3))) == ["s4", "s3"]
    assert ids(await store.summaries(limit=2)) == ["s4", "s3"]
    counts = await store.state_counts()
    assert {state.value: n for state, n in counts.items() if n} == {
        "completed": 1,
        "compensated": 1,
        "failed": 1,
        "overdue": 1,
    }
    counts = await store.state_counts(service="payments", since=T0 + timedelta(seconds=3))
    assert {state.value: n for state, n in counts.items() if n} == {"failed": 1}
    await store.close()


async def test_sagas_indexed_before_summaries_are_summarized_once(store: TraceStore) -> None:
    async with store.engine.begin() as conn:
        await conn.execute(delete(summaries_table))
    assert await store.summaries() == []
    assert await store.summarize_missing(batch=3) == 4
    assert len(await store.summaries()) == 4
    assert await store.summarize_missing() == 0
    await store.close()


async def test_the_list_queries_use_indexes(tmp_path: Path) -> None:
    """Every query the list runs, explained by SQLite: an index each time, never a table scan or a sort."""
    store = TraceStore(f"sqlite+aiosqlite:///{tmp_path}/plan.db")
    await store.open()
    await store.save_declarations([ORDER])
    await store.add_all([*completed("s1"), *compensated("s2"), *failed("s3")])
    statements: list[tuple[str, object]] = []

    def capture(conn: object, cursor: object, statement: str, parameters: object, *_: object) -> None:
        if "choreo_trace_summary" in statement and not statement.startswith("EXPLAIN"):
            statements.append((statement, parameters))

    sa_event.listen(store.engine.sync_engine, "before_cursor_execute", capture)
    since = T0 - timedelta(days=1)
    for filters in [
        {},
        {"since": since},
        {"state": SagaState.FAILED},
        {"state": SagaState.OVERDUE, "since": since},
        {"saga": "order", "since": since},
        {"service": "payments"},
        {"service": "payments", "state": SagaState.COMPENSATED, "since": since},
    ]:
        assert await store.summaries(**filters) is not None  # type: ignore[arg-type]
        counted = {k: v for k, v in filters.items() if k != "state"}
        assert await store.state_counts(**counted) is not None  # type: ignore[arg-type]
    sa_event.remove(store.engine.sync_engine, "before_cursor_execute", capture)
    assert len(statements) == 7 * 3
    async with store.engine.connect() as conn:
        for statement, parameters in statements:
            rows = await conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters)  # type: ignore[arg-type]
            plan = [row[-1] for row in rows]
            for step in plan:
                if "choreo_trace_summary" in step:
                    assert " USING " in step, (statement, plan)  # an index, not a scan of the table
                assert "TEMP B-TREE FOR ORDER BY" not in step, (statement, plan)
    await store.close()
