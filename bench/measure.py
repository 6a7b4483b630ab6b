"""Latencies read back from what the systems recorded themselves.

choreo: each outbox row's `created_at` is taken just before its transaction commits, in the
emitting service's database; each inbox row's `processed_at` when the reacting handler starts,
in the consumer's database. Joined by event id, they give every hop of a saga:

    order.created (orders outbox) -> customers inbox -> credit.reserved (customers outbox)
    -> payments inbox -> payment.authorized (payments outbox) -> orders inbox
    -> order.approved (orders outbox)

The baseline has no such tables: its handlers note the same two instants (handler start, just
before commit) in a file, and the driver notes the start's pre-commit time.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from bench.infra import asyncpg_dsn

HOPS = ("orders→customers", "customers→payments", "payments→orders")
STEPS = ("customers", "payments", "orders")
"""The reacting services, in saga order; `STEPS[i]` is the receiver of `HOPS[i]`."""

# The success flow, as choreo names it: (database, event emitted there, handler consuming it).
_CHAIN = (
    ("orders", "order.created", "customers.reserve_credit"),
    ("customers", "credit.reserved", "payments.authorize_payment"),
    ("payments", "payment.authorized", "orders.approve_order"),
)


@dataclass(frozen=True)
class SagaTimes:
    """Wall-clock instants (seconds since the epoch) along one saga's success flow.

    `emitted[0]` starts the saga; `received[i]` is when step i's handler started and
    `emitted[i + 1]` just before it committed (`emitted[3]` = order.approved).
    """

    saga_id: str
    emitted: tuple[float, float, float, float]
    received: tuple[float, float, float]
    published: tuple[float, float, float] | None = None
    """choreo only: when the relay marked each hop's event published (after Kafka's ack)."""

    @property
    def e2e(self) -> float:
        return self.emitted[3] - self.emitted[0]

    def hop(self, i: int) -> float:
        return self.received[i] - self.emitted[i]

    def handler(self, i: int) -> float:
        return self.emitted[i + 1] - self.received[i]

    def to_kafka(self, i: int) -> float:
        assert self.published is not None
        return self.published[i] - self.emitted[i]

    def from_kafka(self, i: int) -> float:
        assert self.published is not None
        return self.received[i] - self.published[i]


def percentiles(values: Sequence[float], scale: float = 1000.0) -> dict[str, float | int | None]:
    """count, mean, p50, p95, p99 and max of `values`, scaled (default: seconds to milliseconds)."""
    ordered = sorted(values)
    if not ordered:
        return {"count": 0, "mean": None, "p50": None, "p95": None, "p99": None, "max": None}

    def at(q: float) -> float:
        # Nearest rank: the smallest value with at least q of the samples at or below it.
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)] * scale

    return {
        "count": len(ordered),
        "mean": round(sum(ordered) / len(ordered) * scale, 3),
        "p50": round(at(0.50), 3),
        "p95": round(at(0.95), 3),
        "p99": round(at(0.99), 3),
        "max": round(ordered[-1] * scale, 3),
    }


def summarize(sagas: Iterable[SagaTimes]) -> dict[str, Any]:
    """Distributions of e2e, of each hop, and of each handler (start to pre-commit), in ms."""
    sagas = list(sagas)
    summary: dict[str, Any] = {
        "sagas": len(sagas),
        "e2e_ms": percentiles([s.e2e for s in sagas]),
        "hop_ms": {HOPS[i]: percentiles([s.hop(i) for s in sagas]) for i in range(3)},
        "hop_all_ms": percentiles([s.hop(i) for s in sagas for i in range(3)]),
        "handler_ms": {STEPS[i]: percentiles([s.handler(i) for s in sagas]) for i in range(3)},
    }
    relayed = [s for s in sagas if s.published is not None]
    if relayed:
        # A hop split at the relay's mark: commit -> Kafka's ack, then Kafka -> handler start.
        summary["hop_to_kafka_ms"] = percentiles([s.to_kafka(i) for s in relayed for i in range(3)])
        summary["hop_from_kafka_ms"] = percentiles([s.from_kafka(i) for s in relayed for i in range(3)])
    return summary


async def choreo_times(urls: Mapping[str, str], saga_ids: Sequence[str]) -> list[SagaTimes]:
    """The success-flow instants of `saga_ids`, from the three services' outboxes and inboxes."""
    wanted = list(saga_ids)
    # db -> (saga, type) -> (event id, created_at, published_at)
    outbox: dict[str, dict[tuple[str, str], tuple[str, float, float | None]]] = {}
    inbox: dict[str, dict[str, float]] = {}  # db -> event id -> processed_at
    for database in ("orders", "customers", "payments"):
        conn = await asyncpg.connect(asyncpg_dsn(urls[database]))
        try:
            rows = await conn.fetch(
                "SELECT saga_id, event_type, event_id, created_at, published_at FROM choreo_outbox"
                " WHERE saga_id = ANY($1::varchar[])",
                wanted,
            )
            outbox[database] = {
                (r["saga_id"], r["event_type"]): (
                    r["event_id"],
                    r["created_at"].timestamp(),
                    r["published_at"].timestamp() if r["published_at"] else None,
                )
                for r in rows
            }
            consumer = next(c for db, _, c in _CHAIN if c.startswith(database + "."))
            rows = await conn.fetch("SELECT event_id, processed_at FROM choreo_inbox WHERE consumer = $1", consumer)
            inbox[database] = {r["event_id"]: r["processed_at"].timestamp() for r in rows}
        finally:
            await conn.close()
    receivers = {"orders": "customers", "customers": "payments", "payments": "orders"}
    result = []
    for saga_id in wanted:
        try:
            emitted, received, published = [], [], []
            for database, event_type, _ in _CHAIN:
                event_id, created, marked = outbox[database][(saga_id, event_type)]
                emitted.append(created)
                published.append(marked)
                received.append(inbox[receivers[database]][event_id])
            emitted.append(outbox["orders"][(saga_id, "order.approved")][1])
        except KeyError:
            continue  # not (or not yet) through the success flow
        marks = tuple(published) if None not in published else None
        result.append(SagaTimes(saga_id, tuple(emitted), tuple(received), marks))  # type: ignore[arg-type]
    return result


def baseline_times(timing_files: Iterable[Path], sagas: Iterable[Sequence[Any]]) -> list[SagaTimes]:
    """The same instants for the baseline: handler timestamp files plus the driver's start times."""
    steps: dict[tuple[str, str], tuple[float, float]] = {}
    for path in timing_files:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            order_id, step, received, emitted = line.split(",")
            steps[(order_id, step)] = (float(received), float(emitted))
    result = []
    for row in sagas:
        order_id, started = row[0], row[3]
        try:
            (r1, e1), (r2, e2), (r3, e3) = (steps[(order_id, step)] for step in STEPS)
        except KeyError:
            continue
        if started is None:
            continue
        result.append(SagaTimes(order_id, (started, e1, e2, e3), (r1, r2, r3)))
    return result


async def table_sizes(url: str) -> dict[str, dict[str, int]]:
    """Rows and total bytes (with indexes and TOAST) of choreo's outbox and inbox."""
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        sizes = {}
        for table in ("choreo_outbox", "choreo_inbox"):
            rows = await conn.fetchval(f"SELECT count(*) FROM {table}")
            unpublished = (
                await conn.fetchval("SELECT count(*) FROM choreo_outbox WHERE published_at IS NULL")
                if table == "choreo_outbox"
                else None
            )
            size = await conn.fetchval("SELECT pg_total_relation_size($1::regclass)", table)
            sizes[table] = {"rows": int(rows), "bytes": int(size)}
            if unpublished is not None:
                sizes[table]["unpublished"] = int(unpublished)
        return sizes
    finally:
        await conn.close()


STAT_COLUMNS = (
    "xact_commit",
    "xact_rollback",
    "tup_returned",
    "tup_fetched",
    "tup_inserted",
    "tup_updated",
    "tup_deleted",
)


async def database_stats(urls: Mapping[str, str]) -> dict[str, dict[str, int]]:
    """Cumulative `pg_stat_database` counters of each service database.

    PostgreSQL publishes a busy backend's counters at most once a second, so differences over
    a run of tens of seconds are good to a few percent.
    """
    stats = {}
    for name, url in urls.items():
        conn = await asyncpg.connect(asyncpg_dsn(url))
        try:
            row = await conn.fetchrow(
                f"SELECT {', '.join(STAT_COLUMNS)} FROM pg_stat_database WHERE datname = current_database()"
            )
            stats[name] = {column: int(row[column]) for column in STAT_COLUMNS}
        finally:
            await conn.close()
    return stats


def per_saga(
    before: Mapping[str, Mapping[str, int]], after: Mapping[str, Mapping[str, int]], sagas: int
) -> dict[str, Any]:
    """Counter differences divided by `sagas`, per database and summed."""
    if not sagas:
        return {}
    result: dict[str, Any] = {}
    total = dict.fromkeys(STAT_COLUMNS, 0.0)
    for name in after:
        result[name] = {c: round((after[name][c] - before[name][c]) / sagas, 2) for c in STAT_COLUMNS}
        for c in STAT_COLUMNS:
            total[c] += result[name][c]
    result["all"] = {c: round(v, 2) for c, v in total.items()}
    return result
