"""`python -m bench.ui`: how fast the saga explorer answers over a big trace store.

Fills a trace store with demo-shop sagas (success, credit refused, payment declined with its
compensation, dead-lettered, still in flight) through `TraceStore.add_all`, the collector's
own write path, then times the explorer's pages in process (server time: routing, queries
and rendering, no network) and prints a Markdown table for docs/ui.md.

    python -m bench.ui --sagas 100000                    # SQLite file in bench/results/work/
    python -m bench.ui --db postgresql+asyncpg://postgres:postgres@127.0.0.1:5432/ui_bench
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import httpx
from sqlalchemy import insert

from choreo.envelope import utcnow
from choreo.explorer import create_app
from choreo.tracing import DEAD_LETTER, SagaState, TracedEvent, TraceStore, declarations_of, events_table
from demo_shop.shop import SERVICES, Shop

ROOT = Path(__file__).resolve().parent.parent
BATCH = 1000
"""Sagas per `add_all` call (one transaction, as one collector poll)."""

SHAPES: dict[str, list[tuple[str, str, str | None, int | None]]] = {
    # (event type, producer, handler, index of the cause)
    "success": [
        ("order.created", "orders", None, None),
        ("credit.reserved", "customers", "customers.reserve_credit", 0),
        ("payment.authorized", "payments", "payments.authorize_payment", 1),
        ("order.approved", "orders", "orders.approve_order", 2),
    ],
    "refused": [
        ("order.created", "orders", None, None),
        ("credit.limit_exceeded", "customers", "customers.reserve_credit", 0),
        ("order.rejected", "orders", "orders.reject_order", 1),
    ],
    "declined": [
        ("order.created", "orders", None, None),
        ("credit.reserved", "customers", "customers.reserve_credit", 0),
        ("payment.declined", "payments", "payments.authorize_payment", 1),
        ("order.rejected", "orders", "orders.reject_order", 2),
        ("credit.released", "customers", "customers.release_credit", 2),
    ],
    "failed": [
        ("order.created", "orders", None, None),
        ("credit.reserved", "customers", "customers.reserve_credit", 0),
    ],
    "in-flight": [
        ("order.created", "orders", None, None),
        ("credit.reserved", "customers", "customers.reserve_credit", 0),
    ],
}
MIX = ["success"] * 70 + ["refused"] * 10 + ["declined"] * 15 + ["failed"] * 3 + ["in-flight"] * 2


def saga_events(number: int, shape: str, start: float) -> list[TracedEvent]:
    """The indexed records of one saga of `shape`, started `start` seconds before now."""
    saga_id = f"{number:08x}-bench-{random.getrandbits(64):016x}"
    began = utcnow() - timedelta(seconds=start)
    events: list[TracedEvent] = []
    at = began
    for index, (event_type, producer, handler, cause) in enumerate(SHAPES[shape]):
        at += timedelta(milliseconds=random.uniform(5, 40)) if index else timedelta(0)
        events.append(
            TracedEvent(
                kind="event",
                event_id=f"{saga_id}-{index}",
                saga_id=saga_id,
                event_type=event_type,
                event_version=1,
                causation_id=f"{saga_id}-{cause}" if cause is not None else None,
                producer=producer,
                handler=handler,
                occurred_at=at,
                published_at=at + timedelta(milliseconds=3),
                topic=producer,
                partition=number % 4,
                offset=number * 8 + index,
                compensates=("credit.reserved",) if event_type == "credit.released" else (),
            )
        )
    if shape == "failed":
        last = events[-1]
        events.append(
            TracedEvent(
                **{
                    **last.__dict__,
                    "kind": DEAD_LETTER,
                    "consumer": "payments.authorize_payment",
                    "topic": "payments.dead-letters",
                    "reason": "handler-error",
                    "error": "RuntimeError: card processor unreachable",
                }
            )
        )
    return events


async def fill(store: TraceStore, sagas: int, span: timedelta) -> tuple[float, float]:
    """Index `sagas` sagas started over `span` up to now; returns seconds (events, summaries).

    Events go in with one multi-row INSERT per batch (the collector's `add_all` writes row by
    row to tell duplicates, which makes filling 100,000 sagas take many minutes on a shared
    machine); `summarize_missing` then builds the summaries the way `add_all` does.
    """
    await store.save_declarations(declarations_of(SERVICES.values()))
    began, now = time.perf_counter(), utcnow()
    for first in range(0, sagas, BATCH):
        rows = []
        for number in range(first, min(sagas, first + BATCH)):
            # In-flight sagas are the newest, so some are still within their deadline.
            shape = random.choice(MIX)
            start = random.uniform(0, 20) if shape == "in-flight" else (1 - number / sagas) * span.total_seconds()
            rows += [event.to_row(now) for event in saga_events(number, shape, start)]
        async with store.engine.begin() as conn:
            await conn.execute(insert(events_table), rows)
    events = time.perf_counter() - began
    began = time.perf_counter()
    await store.summarize_missing()
    return events, time.perf_counter() - began


async def timed(client: httpx.AsyncClient, path: str, runs: int) -> list[float]:
    """Server times (ms) of `runs` GETs of `path`, after one warm-up."""
    assert (await client.get(path)).status_code == 200, path
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        response = await client.get(path)
        times.append((time.perf_counter() - began) * 1000)
        assert response.status_code == 200, (path, response.status_code)
    return times


async def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ui", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sagas", type=int, default=100_000)
    parser.add_argument("--db", help="trace database URL (default: a fresh SQLite file)")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--reuse", action="store_true", help="time an already filled database")
    args = parser.parse_args()
    work = ROOT / "bench" / "results" / "work"
    work.mkdir(parents=True, exist_ok=True)
    url = args.db or f"sqlite+aiosqlite:///{work}/ui-trace.db"
    if not args.db and not args.reuse:
        await asyncio.to_thread(Path(f"{work}/ui-trace.db").unlink, missing_ok=True)
    store = TraceStore(url)
    await store.open()
    if not args.reuse:
        print(f"filling {url} with {args.sagas} sagas")
        events, summaries = await fill(store, args.sagas, timedelta(days=7))
        print(f"events inserted in {events:.0f} s, sagas summarized in {summaries:.0f} s")
    compensated = (await store.summaries(limit=1, state=SagaState.COMPENSATED))[0].saga_id
    failed = (await store.summaries(limit=1, state=SagaState.FAILED))[0].saga_id
    counts = await store.state_counts()
    await store.close()
    with tempfile.TemporaryDirectory() as scratch:
        shop = Shop.in_directory(Path(scratch))  # empty outboxes: the payload look-up runs, finds nothing
        app = create_app(url, list(shop))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
                pages = {
                    "list, first page + counts (last 24 h)": "/",
                    "list, first page + counts (all 100k)": "/?window=all",
                    "list, failed only (all time)": "/?window=all&state=failed",
                    "list, service=payments (7 days)": "/?window=7d&service=payments",
                    "list refresh (/rows, 24 h)": "/rows",
                    "saga page (compensated, 5 events)": f"/sagas/{compensated}",
                    "saga page (failed, dead letter)": f"/sagas/{failed}",
                    "choreography graph (1 h traffic)": "/graph",
                }
                results = {name: await timed(client, path, args.runs) for name, path in pages.items()}
    print(f"\n{sum(counts.values())} sagas: " + ", ".join(f"{k.value} {v}" for k, v in counts.items() if v))
    print("\n| page | median ms | p95 ms | max ms |\n|---|---:|---:|---:|")
    for name, times in results.items():
        ordered = sorted(times)
        p95 = ordered[int(0.95 * (len(ordered) - 1))]
        print(f"| {name} | {statistics.median(times):.1f} | {p95:.1f} | {max(times):.1f} |")


if __name__ == "__main__":
    asyncio.run(main())
