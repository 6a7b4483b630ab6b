"""The ceiling: a saga's four durable commits with bare asyncpg, no messaging at all.

`python -m bench.ceiling <spec.json> <out.json>` runs `concurrency` sagas at a time, each one
after the other:

1. orders:    INSERT the order                                          COMMIT
2. customers: SELECT the customer FOR UPDATE, UPDATE its credit, INSERT the reservation COMMIT
3. payments:  INSERT the payment                                        COMMIT
4. orders:    SELECT the order FOR UPDATE, UPDATE it to APPROVED        COMMIT

on the demo shop's own tables in three databases. No framework could do the same work with
fewer commits, so its rate is what the database and this machine allow.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg

from bench.driver import order_total
from bench.infra import asyncpg_dsn
from bench.measure import percentiles


async def one_saga(pools: dict[str, asyncpg.Pool], customer_id: str, total: Decimal) -> None:
    order_id, payment_id, now = str(uuid.uuid4()), str(uuid.uuid4()), datetime.now(UTC)
    async with pools["orders"].acquire() as conn:
        await conn.execute(
            "INSERT INTO orders (id, customer_id, total, state, saga_id, created_at, updated_at)"
            " VALUES ($1, $2, $3, 'PENDING', $1, $4, $4)",
            order_id,
            customer_id,
            total,
            now,
        )
    async with pools["customers"].acquire() as conn, conn.transaction():
        customer = await conn.fetchrow(
            "SELECT credit_limit, credit_reserved FROM customers WHERE id = $1 FOR UPDATE", customer_id
        )
        if customer is None or customer["credit_limit"] - customer["credit_reserved"] < total:
            raise RuntimeError(f"customer {customer_id} cannot take {total}")
        await conn.execute(
            "UPDATE customers SET credit_reserved = credit_reserved + $2 WHERE id = $1", customer_id, total
        )
        await conn.execute(
            "INSERT INTO reservations (order_id, customer_id, amount, state, created_at)"
            " VALUES ($1, $2, $3, 'RESERVED', $4)",
            order_id,
            customer_id,
            total,
            now,
        )
    async with pools["payments"].acquire() as conn:
        await conn.execute(
            "INSERT INTO payments (id, order_id, customer_id, amount, state, created_at)"
            " VALUES ($1, $2, $3, $4, 'AUTHORIZED', $5)",
            payment_id,
            order_id,
            customer_id,
            total,
            now,
        )
    async with pools["orders"].acquire() as conn, conn.transaction():
        state = await conn.fetchval("SELECT state FROM orders WHERE id = $1 FOR UPDATE", order_id)
        if state == "PENDING":
            await conn.execute(
                "UPDATE orders SET state = 'APPROVED', updated_at = $2 WHERE id = $1", order_id, datetime.now(UTC)
            )


async def run(spec: dict[str, Any], customers: list[str]) -> dict[str, Any]:
    concurrency, warmup, duration = int(spec["concurrency"]), float(spec["warmup"]), float(spec["duration"])
    rng = random.Random(spec.get("seed", 3))
    size = max(2, min(concurrency, 20))
    pools = {
        name: await asyncpg.create_pool(asyncpg_dsn(url), min_size=size, max_size=size)
        for name, url in spec["urls"].items()
    }
    began = time.time()
    window = (began + warmup, began + warmup + duration)
    ends: list[float] = []
    latencies: list[float] = []

    async def worker() -> None:
        while time.time() < window[1]:
            t0 = time.time()
            await one_saga(pools, rng.choice(customers), order_total(rng))
            t1 = time.time()
            if window[0] <= t1 <= window[1]:
                ends.append(t1)
                latencies.append(t1 - t0)

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        for pool in pools.values():
            await pool.close()
    return {
        "concurrency": concurrency,
        "window": window,
        "completed_in_window": len(ends),
        "sagas_per_s": round(len(ends) / duration, 2),
        "saga_ms": percentiles(latencies),
    }


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit("usage: python -m bench.ceiling <spec.json> <out.json>")
    spec = json.loads(Path(sys.argv[1]).read_text())
    customers = json.loads(Path(spec["customers_file"]).read_text())
    Path(sys.argv[2]).write_text(json.dumps(asyncio.run(run(spec, customers))))


if __name__ == "__main__":
    main()
