"""The load driver, a process of its own: `python -m bench.driver <spec.json> <out.json>`.

It starts sagas the way an application would and watches them end by polling the orders
table (the same query for every system). choreo: it opens the orders service's database
without Kafka (`service.start(kafka=False)`) and calls the demo's `place_order`; the outbox row
and PostgreSQL's NOTIFY wake the orders process's relay. Baseline: it inserts the order with the
ORM, commits, then publishes `order.created` itself with FastStream. Lean: the same with one bare
asyncpg INSERT and aiokafka's producer.

Actions (the spec's "action"):
- `customers`: create `count` customers with a large credit limit; writes their ids.
- `closed`: `concurrency` workers, each starting a saga and waiting for its end, for `warmup`
  plus `duration` seconds (at most `max_sagas`); throughput counts ends inside the window.
- `open`: start `rate` sagas per second on a fixed schedule for `duration` seconds, then wait
  up to `drain_timeout` for them to end.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg

from bench.infra import asyncpg_dsn, sqlalchemy_url

Start = Callable[[str, Decimal], Awaitable[tuple[str, str, float | None]]]
"""Start one saga for (customer id, total): returns (order id, saga id, pre-commit time or None)."""

CREDIT_LIMIT = Decimal("1000000000.00")


def order_total(rng: random.Random) -> Decimal:
    """10.00 to 99.99, never ending in .13 (the demo's payments decline those)."""
    cents = rng.randint(1000, 9999)
    if cents % 100 == 13:
        cents += 1
    return Decimal(cents) / 100


class Watcher:
    """Resolves a future per order when its row leaves PENDING (one query per `interval`)."""

    def __init__(self, orders_url: str, interval: float) -> None:
        self.dsn = asyncpg_dsn(orders_url)
        self.interval = interval
        self.pending: dict[str, asyncio.Future[tuple[str, float]]] = {}
        self._task: asyncio.Task[None] | None = None
        self.queries = 0

    async def start(self) -> None:
        self.conn = await asyncpg.connect(self.dsn)
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await self.conn.close()

    def watch(self, order_id: str) -> asyncio.Future[tuple[str, float]]:
        future: asyncio.Future[tuple[str, float]] = asyncio.get_running_loop().create_future()
        self.pending[order_id] = future
        return future

    async def _run(self) -> None:
        while True:
            if self.pending:
                rows = await self.conn.fetch(
                    "SELECT id, state FROM orders WHERE id = ANY($1::varchar[]) AND state <> 'PENDING'",
                    list(self.pending),
                )
                self.queries += 1
                now = time.time()
                for row in rows:
                    future = self.pending.pop(row["id"], None)
                    if future is not None and not future.done():
                        future.set_result((row["state"], now))
            await asyncio.sleep(self.interval)


# -- the three ways of starting a saga ---------------------------------------------------------


async def choreo_starter(spec: dict[str, Any]) -> tuple[Start, Callable[[], Awaitable[None]]]:
    os.environ["CHOREO_ORDERS_DATABASE_URL"] = spec["orders_url"]
    from demo_shop.orders.handlers import place_order
    from demo_shop.orders.handlers import service as orders

    await orders.start(kafka=False)

    async def start(customer_id: str, total: Decimal) -> tuple[str, str, float | None]:
        order = await place_order(orders, customer_id, total)
        return order.id, order.saga_id, None

    return start, orders.stop


async def baseline_starter(spec: dict[str, Any]) -> tuple[Start, Callable[[], Awaitable[None]]]:
    from faststream.kafka import KafkaBroker
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    from bench.baseline.events import OrderCreated
    from demo_shop.orders.models import Order

    engine = create_async_engine(sqlalchemy_url(spec["orders_url"]), pool_size=10, max_overflow=10)
    broker = KafkaBroker(
        spec["kafka"], client_id="baseline-driver", acks="all", enable_idempotence=spec.get("idempotence", True)
    )
    await broker.start()
    topic = spec.get("topic_prefix", "") + OrderCreated.topic

    async def start(customer_id: str, total: Decimal) -> tuple[str, str, float | None]:
        order_id = str(uuid.uuid4())
        async with AsyncSession(engine, expire_on_commit=False) as session, session.begin():
            session.add(Order(id=order_id, customer_id=customer_id, total=total, saga_id=order_id))
            emitted = time.time()
        event = OrderCreated(order_id=order_id, customer_id=customer_id, total=total)
        await broker.publish(event.model_dump(mode="json"), topic, key=order_id.encode(), headers=event.headers())
        return order_id, order_id, emitted

    async def stop() -> None:
        await broker.stop()
        await engine.dispose()

    return start, stop


async def lean_starter(spec: dict[str, Any]) -> tuple[Start, Callable[[], Awaitable[None]]]:
    from aiokafka import AIOKafkaProducer

    from bench.lean.events import TOPICS, encode
    from bench.lean.services import keep_session

    pool = await asyncpg.create_pool(asyncpg_dsn(spec["orders_url"]), min_size=2, max_size=10, reset=keep_session)
    producer = AIOKafkaProducer(
        bootstrap_servers=spec["kafka"],
        client_id="lean-driver",
        acks="all",
        enable_idempotence=spec.get("idempotence", True),
    )
    await producer.start()
    topic = spec.get("topic_prefix", "") + TOPICS["order.created"]

    async def start(customer_id: str, total: Decimal) -> tuple[str, str, float | None]:
        order_id = str(uuid.uuid4())
        emitted = time.time()
        await pool.execute(
            "INSERT INTO orders (id, customer_id, total, state, saga_id, created_at, updated_at)"
            " VALUES ($1, $2, $3, 'PENDING', $1, $4, $4)",
            order_id,
            customer_id,
            total,
            datetime.now(UTC),
        )
        value, headers = encode(
            "order.created", {"order_id": order_id, "customer_id": customer_id, "total": str(total)}
        )
        await producer.send_and_wait(topic, value, key=order_id.encode(), headers=headers)
        return order_id, order_id, emitted

    async def stop() -> None:
        await producer.stop()
        await pool.close()

    return start, stop


STARTERS = {"choreo": choreo_starter, "baseline": baseline_starter, "lean": lean_starter}


async def create_customers(spec: dict[str, Any]) -> list[str]:
    count = int(spec["count"])
    if spec["system"] == "choreo":
        os.environ["CHOREO_CUSTOMERS_DATABASE_URL"] = spec["customers_url"]
        from demo_shop.customers.handlers import add_customer
        from demo_shop.customers.handlers import service as customers

        await customers.start(kafka=False)
        gate = asyncio.Semaphore(8)

        async def one(i: int) -> str:
            async with gate:
                return (await add_customer(customers, f"customer {i}", CREDIT_LIMIT)).id

        try:
            return list(await asyncio.gather(*(one(i) for i in range(count))))
        finally:
            await customers.stop()
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    from demo_shop.customers.models import Customer

    engine = create_async_engine(sqlalchemy_url(spec["customers_url"]))
    ids = [str(uuid.uuid4()) for _ in range(count)]
    try:
        async with AsyncSession(engine) as session, session.begin():
            session.add_all(Customer(id=i, name=f"customer {n}", credit_limit=CREDIT_LIMIT) for n, i in enumerate(ids))
    finally:
        await engine.dispose()
    return ids


# -- load shapes -----------------------------------------------------------------------------


def _saga_row(
    order_id: str, saga_id: str, called: float, emitted: float | None, done: tuple[str, float] | None
) -> list[Any]:
    return [order_id, saga_id, round(called, 6), emitted, done[1] if done else None, done[0] if done else None]


async def closed_loop(spec: dict[str, Any], start: Start, watcher: Watcher, customers: list[str]) -> dict[str, Any]:
    concurrency, warmup, duration = int(spec["concurrency"]), float(spec["warmup"]), float(spec["duration"])
    max_sagas, saga_timeout = int(spec.get("max_sagas", 10**7)), float(spec.get("saga_timeout", 60))
    rng = random.Random(spec.get("seed", 1))
    began = time.time()
    window = (began + warmup, began + warmup + duration)
    sagas: list[list[Any]] = []
    errors: list[str] = []
    started = 0

    async def worker() -> None:
        nonlocal started
        while time.time() < window[1] and started < max_sagas and len(errors) < 10:
            started += 1
            called = time.time()
            try:
                order_id, saga_id, emitted = await start(rng.choice(customers), order_total(rng))
                done = await asyncio.wait_for(watcher.watch(order_id), saga_timeout)
            except Exception as error:
                errors.append(f"{type(error).__name__}: {error}")
                continue
            sagas.append(_saga_row(order_id, saga_id, called, emitted, done))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    ended = [row for row in sagas if window[0] <= row[4] <= window[1]]
    measured = min(window[1], time.time()) - window[0]
    return {
        "action": "closed",
        "concurrency": concurrency,
        "window": window,
        "started": started,
        "completed": len(sagas),
        "approved": sum(1 for row in sagas if row[5] == "APPROVED"),
        "completed_in_window": len(ended),
        "sagas_per_s": round(len(ended) / measured, 2) if measured > 0 else 0.0,
        "per_second": _per_second(ended, window),
        "errors": errors,
        "sagas": sagas,
    }


async def open_loop(spec: dict[str, Any], start: Start, watcher: Watcher, customers: list[str]) -> dict[str, Any]:
    rate, duration = float(spec["rate"]), float(spec["duration"])
    drain_timeout, max_starting = float(spec.get("drain_timeout", 60)), int(spec.get("max_starting", 400))
    count = max(1, round(rate * duration))
    rng = random.Random(spec.get("seed", 2))
    loop = asyncio.get_running_loop()
    rows: list[list[Any]] = []
    futures: list[asyncio.Future[tuple[str, float]]] = []
    lags: list[float] = []
    errors: list[str] = []
    starting = asyncio.Semaphore(max_starting)

    async def one(scheduled: float) -> None:
        async with starting:
            called = time.time()
            lags.append(max(0.0, loop.time() - scheduled))
            try:
                order_id, saga_id, emitted = await start(rng.choice(customers), order_total(rng))
            except Exception as error:
                errors.append(f"{type(error).__name__}: {error}")
                return
            future = watcher.watch(order_id)
            futures.append(future)
            row = _saga_row(order_id, saga_id, called, emitted, None)
            rows.append(row)

            def ended(done: asyncio.Future[tuple[str, float]], row: list[Any] = row) -> None:
                state, at = done.result()
                row[4:6] = [at, state]

            future.add_done_callback(ended)

    t0 = loop.time() + 0.05
    wall0 = time.time() + 0.05
    tasks = []
    for i in range(count):
        scheduled = t0 + i / rate
        delay = scheduled - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(scheduled)))
    await asyncio.gather(*tasks)
    starts_done = time.time()
    pending = [f for f in futures if not f.done()]
    if pending:
        await asyncio.wait(pending, timeout=drain_timeout)
    finished = [row for row in rows if row[4] is not None]
    lags.sort()
    return {
        "action": "open",
        "rate": rate,
        "window": (wall0, starts_done),
        "started": len(rows),
        "start_rate": round(len(rows) / max(1e-9, starts_done - wall0), 2),
        "completed": len(finished),
        "approved": sum(1 for row in finished if row[5] == "APPROVED"),
        "start_lag_ms": {
            "p50": round(lags[len(lags) // 2] * 1000, 2) if lags else None,
            "p99": round(lags[int(len(lags) * 0.99)] * 1000, 2) if lags else None,
            "max": round(lags[-1] * 1000, 2) if lags else None,
        },
        "errors": errors[:10],
        "sagas": rows,
    }


def _per_second(rows: list[list[Any]], window: tuple[float, float]) -> list[int]:
    buckets = [0] * max(1, int(window[1] - window[0] + 0.999))
    for row in rows:
        index = int(row[4] - window[0])
        if 0 <= index < len(buckets):
            buckets[index] += 1
    return buckets


async def run(spec: dict[str, Any], customers: list[str]) -> dict[str, Any]:
    if spec["action"] == "customers":
        return {"action": "customers", "customers": await create_customers(spec)}
    start, stop = await STARTERS[spec["system"]](spec)
    watcher = Watcher(spec["orders_url"], float(spec.get("poll_interval", 0.01)))
    await watcher.start()
    try:
        if spec["action"] == "closed":
            result = await closed_loop(spec, start, watcher, customers)
        else:
            result = await open_loop(spec, start, watcher, customers)
    finally:
        await watcher.stop()
        await stop()
    result["watch_queries"] = watcher.queries
    return result


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit("usage: python -m bench.driver <spec.json> <out.json>")
    spec = json.loads(Path(sys.argv[1]).read_text())
    customers = [] if spec["action"] == "customers" else json.loads(Path(spec["customers_file"]).read_text())
    result = asyncio.run(run(spec, customers))
    Path(sys.argv[2]).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
