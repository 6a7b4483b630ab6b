"""The outbox and relay contracts against the database itself: order, due times, key locks, cost."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from choreo import Event, Relay, Service, outbox, tables
from choreo.database import create_engine
from choreo.envelope import new_id, utcnow
from choreo.outbox import OutboxRecord
from tests.conftest import DatabaseFactory


def outbox_row(key: str | None = "k", *, available_at: datetime | None = None) -> dict[str, Any]:
    now = utcnow()
    return {
        "event_id": new_id(),
        "topic": "numbers",
        "key": key,
        "event_type": "toy.numbered",
        "event_version": 1,
        "saga_id": "saga",
        "headers": {"choreo-event-type": "toy.numbered"},
        "payload": b'{"seq": 1}',
        "created_at": now,
        "available_at": available_at or now,
    }


async def open_engine(url: str) -> AsyncEngine:
    engine = create_engine(url)
    async with engine.begin() as conn:
        await conn.run_sync(tables.metadata.create_all)
    return engine


@pytest.fixture
async def engine(database: DatabaseFactory) -> AsyncIterator[AsyncEngine]:
    """A service database with choreo's tables, on each backend."""
    engine = await open_engine(await database("outbox"))
    yield engine
    await engine.dispose()


@pytest.fixture
async def pg_engine(fresh_pg_database: Callable[[str], Awaitable[str]]) -> AsyncIterator[AsyncEngine]:
    """A PostgreSQL service database with choreo's tables."""
    engine = await open_engine(await fresh_pg_database("outbox"))
    yield engine
    await engine.dispose()


async def write(engine: AsyncEngine, rows: Sequence[dict[str, Any]]) -> None:
    async with AsyncSession(engine) as session, session.begin():
        await outbox.write_rows(session, rows)


async def ids_of(engine: AsyncEngine, rows: Sequence[dict[str, Any]]) -> list[int]:
    """The outbox ids of `rows`, in the order given."""
    columns = tables.outbox_table.c
    async with engine.connect() as conn:
        result = await conn.execute(select(columns.event_id, columns.id))
        by_event = {event_id: row_id for event_id, row_id in result}
    return [by_event[row["event_id"]] for row in rows]


class Statements:
    """Records what is sent to the database (one entry per execution or executemany), whether
    through SQLAlchemy or, on PostgreSQL, straight through asyncpg (`choreo.hotpath`)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.sent: list[tuple[str, Any]] = []
        self._watched: set[int] = set()
        event.listen(engine.sync_engine, "before_cursor_execute", self._record)
        if engine.dialect.driver == "asyncpg":
            # asyncpg logs the queries it is given directly, not SQLAlchemy's prepared statements.
            event.listen(engine.sync_engine, "checkout", self._watch)

    def _record(self, _conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if not statement.startswith("BEGIN"):  # SQLite's BEGIN IMMEDIATE, see create_engine
            self.sent.append((statement, parameters))

    def _watch(self, _dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        driver = record.driver_connection
        if id(driver) not in self._watched:
            self._watched.add(id(driver))
            driver.add_query_logger(self._logged)

    def _logged(self, query: Any) -> None:
        if "choreo_" in query.query:  # not BEGIN, COMMIT or asyncpg's own type introspection
            self.sent.append((query.query, query.args))


async def test_due_rows_come_in_id_order_and_scheduled_rows_wait(engine: AsyncEngine) -> None:
    now = utcnow()
    # Due times out of id order: the relay must still publish in id order (= commit order per key).
    first = outbox_row(available_at=now - timedelta(seconds=1))
    second = outbox_row(key=None, available_at=now - timedelta(seconds=5))
    third = outbox_row(available_at=now - timedelta(seconds=3))
    scheduled = outbox_row(available_at=now + timedelta(minutes=10))
    await write(engine, [first, scheduled])
    await write(engine, [second])
    await write(engine, [third])
    ids = await ids_of(engine, [first, second, third, scheduled])

    async with engine.connect() as conn:
        head = await outbox.fetch_due(conn, now, 2)
        assert [r.id for r in head] == ids[:2]
        assert head[0] == OutboxRecord(ids[0], "numbers", "k", first["headers"], first["payload"])
        assert head[1].key is None
        assert [r.id for r in await outbox.fetch_due(conn, now, 10)] == ids[:3]  # not the scheduled one

        await outbox.mark_published(conn, ids[:2], utcnow())
        await conn.commit()
        assert [r.id for r in await outbox.fetch_due(conn, now, 10)] == [ids[2]]
        later = await outbox.fetch_due(conn, now + timedelta(minutes=11), 10)
        assert [r.id for r in later] == sorted([ids[2], ids[3]])
        await conn.commit()


async def test_rows_written_together_get_ids_in_emit_order(engine: AsyncEngine) -> None:
    rows = [outbox_row(key) for key in ("b", "a", None, "b", "c")]
    await write(engine, rows)
    ids = await ids_of(engine, rows)
    assert ids == sorted(ids)


async def test_one_event_costs_one_statement_to_write(engine: AsyncEngine) -> None:
    # On PostgreSQL the key locks and the NOTIFY ride in the row's INSERT.
    statements = Statements(engine)
    await write(engine, [outbox_row()])
    assert len(statements.sent) == 1
    await write(engine, [outbox_row(), outbox_row("other")])
    assert len(statements.sent) == 3  # a second row adds one execution, no more


async def test_marking_published_is_one_prepared_statement_whatever_the_batch_size(pg_engine: AsyncEngine) -> None:
    rows = [outbox_row() for _ in range(6)]
    await write(pg_engine, rows)
    ids = await ids_of(pg_engine, rows)
    statements = Statements(pg_engine)
    async with pg_engine.connect() as conn:
        for batch in (ids[:1], ids[1:3], ids[3:6]):
            await outbox.mark_published(conn, batch, utcnow())
        await conn.commit()
        assert len({statement for statement, _ in statements.sent}) == 1
        assert await outbox.fetch_due(conn, utcnow(), 10) == []


@pytest.mark.parametrize("due", [5, 5000], ids=["a few due", "a backlog"])
async def test_the_relay_query_reads_one_batch_of_due_rows_only(pg_engine: AsyncEngine, due: int) -> None:
    now = utcnow()
    future = now + timedelta(seconds=30)
    async with pg_engine.begin() as conn:
        # A realistic table: published history, many pending deadlines, then the due rows, some
        # of them deadlines that came due.
        await conn.execute(
            tables.outbox_table.insert(),
            [{**outbox_row(available_at=now - timedelta(hours=1)), "published_at": now} for _ in range(20_000)],
        )
        await conn.execute(tables.outbox_table.insert(), [outbox_row(available_at=future) for _ in range(2000)])
        await conn.execute(tables.outbox_table.insert(), [outbox_row() for _ in range(due)])
        await conn.execute(
            tables.outbox_table.insert(),
            [{**outbox_row(available_at=now), "created_at": now - timedelta(seconds=30)} for _ in range(3)],
        )
    batch = 100
    async with pg_engine.connect() as conn:
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        await conn.execute(text("ANALYZE choreo_outbox"))  # the statistics autovacuum would gather
        statements = Statements(pg_engine)
        assert len(await outbox.fetch_due(conn, utcnow(), batch)) == min(batch, due + 3)
        ((statement, parameters),) = statements.sent
        plan = await explain_analyze(conn, statement, parameters)
    read = rows_read_from_outbox(plan)
    # At most a batch of each kind, whatever the pending deadlines, the history or the backlog.
    assert read <= 2 * batch, f"the due-row query read {read} rows:\n{json.dumps(plan, indent=1)}"


async def explain_analyze(conn: AsyncConnection, statement: str, parameters: Sequence[Any]) -> dict[str, Any]:
    raw: Any = (await conn.get_raw_connection()).driver_connection
    # The plan PostgreSQL settles on for a statement prepared once and executed many times, as
    # asyncpg does: it is planned without the parameters' values.
    await raw.execute("SET plan_cache_mode = force_generic_plan")
    await raw.execute(f"PREPARE explained AS {statement}")
    arguments = ", ".join(
        f"'{value.isoformat()}'" if isinstance(value, datetime) else str(value) for value in parameters
    )
    output = await raw.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE explained({arguments})")
    await raw.execute("DEALLOCATE explained")
    (document,) = json.loads(output) if isinstance(output, str) else output
    plan: dict[str, Any] = document["Plan"]
    return plan


def rows_read_from_outbox(plan: dict[str, Any]) -> int:
    """Rows the plan's scans took from choreo_outbox, kept or filtered out.

    Rows kept by a primary-key scan are lookups by id and not counted; rows it filtered out
    are (a walk of the table in id order).
    """
    read = 0
    if plan.get("Relation Name") == "choreo_outbox":
        loops = plan.get("Actual Loops", 1)
        kept = 0 if plan.get("Index Name") == "choreo_outbox_pkey" else plan["Actual Rows"]
        read += (kept + plan.get("Rows Removed by Filter", 0)) * loops
        read += plan.get("Rows Removed by Index Recheck", 0)
    return read + sum(rows_read_from_outbox(child) for child in plan.get("Plans", ()))


async def test_a_key_is_locked_before_the_row_id_is_drawn(pg_engine: AsyncEngine) -> None:
    # Two transactions emit for one key; the second waits for the first's lock. Had it drawn its
    # id before waiting, a row the first writes later would get a higher id yet commit earlier,
    # and the relay would publish the two events of the key out of commit order.
    first, blocked, later = outbox_row("k"), outbox_row("k"), outbox_row("other")
    async with AsyncSession(pg_engine) as one, one.begin():
        await outbox.write_rows(one, [first])

        async def second_transaction() -> None:
            async with AsyncSession(pg_engine) as two, two.begin():
                await outbox.write_rows(two, [blocked])

        waiting = asyncio.create_task(second_transaction())
        await until_someone_waits_for_an_advisory_lock(pg_engine)
        await outbox.write_rows(one, [later])
    await asyncio.wait_for(waiting, 10)
    first_id, blocked_id, later_id = await ids_of(pg_engine, [first, blocked, later])
    assert first_id < later_id < blocked_id


async def until_someone_waits_for_an_advisory_lock(engine: AsyncEngine) -> None:
    query = text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
    async with asyncio.timeout(10):
        while True:
            async with engine.connect() as conn:
                if await conn.scalar(query):
                    return
            await asyncio.sleep(0.01)


class Batches:
    """A publisher that acknowledges everything and remembers each batch's event ids."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    async def publish(self, records: Sequence[OutboxRecord]) -> list[BaseException | None]:
        self.batches.append([r.headers["choreo-event-id"] for r in records])
        return [None] * len(records)


async def test_the_relay_lingers_after_a_wake_up_under_load_so_a_burst_shares_one_batch(tmp_path: Path) -> None:
    engine = await open_engine(f"sqlite+aiosqlite:///{tmp_path}/burst.db")
    publisher = Batches()
    relay = Relay(engine, publisher, name="burst", poll_interval=30, linger=0.5)
    relay.start()

    async def commit(count: int) -> list[str]:
        rows = [outbox_row() for _ in range(count)]
        for row in rows:
            row["headers"] = {"choreo-event-id": row["event_id"]}
        await write(engine, rows)
        relay.wake()
        return [row["event_id"] for row in rows]

    async def published(count: int) -> None:
        async with asyncio.timeout(10):
            while relay.stats.published < count:
                await asyncio.sleep(0.01)

    try:
        async with asyncio.timeout(10):
            while not relay.stats.is_leader:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # its first, empty read is done: it waits for a wake-up
        alone = await commit(1)
        await published(1)  # at once: a lone commit does not wait for company
        several = await commit(2)
        await published(3)
        burst = []
        for _ in range(3):  # after a batch of several rows, the relay lingers
            burst += await commit(1)
            await asyncio.sleep(0.05)
        await published(6)
        assert publisher.batches == [alone, several, burst]
    finally:
        await relay.stop()
        await engine.dispose()


async def test_the_relays_relaxed_durability_never_reaches_pooled_connections(pg_engine: AsyncEngine) -> None:
    # The leader marks rows without waiting for the WAL flush; handlers share its engine and
    # must keep durable commits.
    relay = Relay(pg_engine, Batches(), name="durability", poll_interval=0.05)
    standby = Relay(pg_engine, Batches(), name="standby", standby_interval=0.05)
    relay.start()
    standby.start()
    try:
        async with asyncio.timeout(10):
            while not relay.stats.is_leader:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # the standby has tried, and tried again
        await standby.stop()  # its connection goes back to the pool
        async with pg_engine.connect() as a, pg_engine.connect() as b, pg_engine.connect() as c:
            settings = [await conn.scalar(text("SHOW synchronous_commit")) for conn in (a, b, c)]
        assert settings == ["on", "on", "on"]
    finally:
        await standby.stop()
        await relay.stop()
    async with pg_engine.connect() as a, pg_engine.connect() as b:
        assert [await conn.scalar(text("SHOW synchronous_commit")) for conn in (a, b)] == ["on", "on"]


async def test_the_backlog_counts_due_rows_of_both_kinds_since_they_became_due(engine: AsyncEngine) -> None:
    now = utcnow()
    came_due = {**outbox_row(available_at=now - timedelta(seconds=5)), "created_at": now - timedelta(seconds=35)}
    await write(engine, [outbox_row(available_at=now - timedelta(seconds=2)), came_due])
    await write(engine, [outbox_row(available_at=now + timedelta(minutes=5))])  # not due yet
    came_due_ids = await ids_of(engine, [came_due])
    async with engine.connect() as conn:
        count, oldest = await outbox.backlog(conn, now)
        assert (count, oldest) == (2, came_due["available_at"])
        await outbox.mark_published(conn, came_due_ids, now)
        await conn.commit()
        assert (await outbox.backlog(conn, now))[0] == 1
        assert await outbox.backlog(conn, now + timedelta(minutes=6)) == (2, now - timedelta(seconds=2))


async def test_an_immediate_row_stays_immediate_when_the_clock_steps_back(
    database: DatabaseFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = Service("clock", database_url=await database("clock"))
    service.declare(Ticked)
    async with service.running(kafka=False):
        async with service.transaction() as tx:
            tx.emit(Ticked(n=1))
            # NTP steps the clock back 5 s between emit() and the write at commit.
            stepped_back = utcnow() - timedelta(seconds=5)
            monkeypatch.setattr("choreo.service.utcnow", lambda: stepped_back)
        async with service.engine.connect() as conn:
            row = (await conn.execute(select(tables.outbox_table))).one()
            assert row.available_at <= row.created_at, "an event due at once is not scheduled"
            # Due now by the clock the relay reads, not only once it passes the emit time again.
            assert [r.id for r in await outbox.fetch_due(conn, stepped_back, 10)] == [row.id]


class Ticked(Event, name="clock.ticked", topic="clock"):
    n: int


class _Acknowledging:
    async def publish(self, records: Sequence[OutboxRecord]) -> list[BaseException | None]:
        return [None] * len(records)


async def test_a_wake_up_at_the_moment_of_stop_does_not_keep_the_relay_running(tmp_path: Path) -> None:
    engine = await open_engine(f"sqlite+aiosqlite:///{tmp_path}/relay.db")
    try:
        for _ in range(20):
            relay = Relay(engine, _Acknowledging(), name="stopping", poll_interval=30)
            relay.start()
            while not relay.stats.is_leader:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.01)  # asleep, waiting to be woken
            # A commit wakes the relay in the very step its service stops it: the cancellation
            # must not be lost (asyncio.wait_for on Python 3.11 loses it), or stop() never returns.
            relay.wake()
            stopping = asyncio.create_task(relay.stop())
            done, _ = await asyncio.wait({stopping}, timeout=5)
            if not done:
                assert relay._task is not None
                relay._task.cancel()  # again, to end this test's relay
                await stopping
            assert done, "stop() did not return: the relay lost the cancellation"
    finally:
        await engine.dispose()
