"""orders, customers and payments on bare asyncpg and aiokafka: commit, then publish.

Configured by the environment (set by `bench.run`): BENCH_DATABASE_URL, KAFKA_BOOTSTRAP_SERVERS,
BENCH_TOPIC_PREFIX, BENCH_WORKERS (partitions handled at once, and database connections;
default 8), BENCH_KAFKA_IDEMPOTENCE, BENCH_TIMINGS (a file the handlers' timestamps are
appended to) and BENCH_READY_FILE.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from aiokafka.errors import KafkaError

from bench.handwritten import CONSUMES, Timings
from bench.infra import asyncpg_dsn
from bench.lean.events import TOPICS, decode, encode

log = logging.getLogger("lean")


@dataclass(frozen=True)
class Reply:
    """The event a handler publishes once its transaction committed, and when it was about to commit."""

    type_name: str
    body: dict[str, str]
    emitted: float


Handler = Callable[[asyncpg.Pool, str | None, dict[str, Any]], Awaitable[Reply | None]]


# -- the handlers: hand-written SQL, run by asyncpg as prepared statements (cached per connection)


async def reserve_credit(pool: asyncpg.Pool, kind: str | None, body: dict[str, Any]) -> Reply | None:
    """order.created -> credit.reserved (or credit.refused), under the customer's row lock."""
    if kind != "order.created":
        return None
    order_id, customer_id, total = str(body["order_id"]), str(body["customer_id"]), Decimal(body["total"])
    async with pool.acquire() as conn, conn.transaction():
        # The row lock serializes this customer's reservations: credit_reserved is read and
        # raised by one transaction at a time, as in the demo's handler.
        customer = await conn.fetchrow(
            "SELECT credit_limit, credit_reserved FROM customers WHERE id = $1 FOR UPDATE", customer_id
        )
        if customer is None or customer["credit_limit"] - customer["credit_reserved"] < total:
            reply = ("credit.refused", {"order_id": order_id, "reason": "no customer or credit"})
        else:
            await conn.execute(
                "UPDATE customers SET credit_reserved = credit_reserved + $2 WHERE id = $1", customer_id, total
            )
            await conn.execute(
                "INSERT INTO reservations (order_id, customer_id, amount, state, created_at)"
                " VALUES ($1, $2, $3, 'RESERVED', $4)",
                order_id,
                customer_id,
                total,
                datetime.now(UTC),
            )
            reply = ("credit.reserved", {"order_id": order_id, "customer_id": customer_id, "amount": str(total)})
        emitted = time.time()
    return Reply(*reply, emitted)


async def authorize_payment(pool: asyncpg.Pool, kind: str | None, body: dict[str, Any]) -> Reply | None:
    """credit.reserved -> payment.authorized (or payment.declined, by the demo's .13 rule)."""
    if kind != "credit.reserved":
        return None
    order_id, customer_id = str(body["order_id"]), str(body["customer_id"])
    amount = Decimal(body["amount"]).quantize(Decimal("0.01"))
    declined = amount % 1 == Decimal("0.13")
    payment_id = str(uuid.uuid4())
    emitted = time.time()
    # One statement, its own transaction: no BEGIN/COMMIT round trips.
    await pool.execute(
        "INSERT INTO payments (id, order_id, customer_id, amount, state, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
        payment_id,
        order_id,
        customer_id,
        amount,
        "DECLINED" if declined else "AUTHORIZED",
        datetime.now(UTC),
    )
    if declined:
        return Reply("payment.declined", {"order_id": order_id, "reason": "card declined"}, emitted)
    return Reply("payment.authorized", {"order_id": order_id, "payment_id": payment_id, "amount": str(amount)}, emitted)


async def decide_order(pool: asyncpg.Pool, kind: str | None, body: dict[str, Any]) -> Reply | None:
    """payment.authorized -> order.approved; payment.declined -> order.rejected."""
    if kind not in ("payment.authorized", "payment.declined"):
        return None
    order_id = str(body["order_id"])
    async with pool.acquire() as conn, conn.transaction():
        # Locked so a concurrent cancellation (or a redelivery) cannot decide the order twice.
        state = await conn.fetchval("SELECT state FROM orders WHERE id = $1 FOR UPDATE", order_id)
        if state != "PENDING":
            return None
        if kind == "payment.authorized":
            new_state, reason, reply = "APPROVED", None, ("order.approved", {"order_id": order_id})
        else:
            reason = "payment declined"
            new_state, reply = "REJECTED", ("order.rejected", {"order_id": order_id, "reason": reason})
        await conn.execute(
            "UPDATE orders SET state = $2, rejection_reason = $3, updated_at = $4 WHERE id = $1",
            order_id,
            new_state,
            reason,
            datetime.now(UTC),
        )
        emitted = time.time()
    return Reply(*reply, emitted)


async def keep_session(conn: asyncpg.Connection) -> None:
    """A pool's reset that sends nothing.

    asyncpg's default runs `RESET ALL; UNLISTEN *; ...` on every release: a round trip and a
    transaction per handler. These handlers leave no session state behind (no SET, LISTEN or
    advisory lock), and asyncpg still rolls back a transaction left open.
    """


HANDLERS: dict[str, Handler] = {"customers": reserve_credit, "payments": authorize_payment, "orders": decide_order}


class Service:
    """One lean service: a consumer, a producer, a connection pool and its handler."""

    def __init__(self, name: str, env: dict[str, str]) -> None:
        self.name = name
        self.handler = HANDLERS[name]
        self.prefix = env.get("BENCH_TOPIC_PREFIX", "")
        self.workers = int(env.get("BENCH_WORKERS", "8"))
        self.dsn = asyncpg_dsn(env["BENCH_DATABASE_URL"])
        bootstrap = env.get("KAFKA_BOOTSTRAP_SERVERS", "localhost:9092")
        idempotence = env.get("BENCH_KAFKA_IDEMPOTENCE", "1") not in ("0", "false", "no")
        # The same producer durability as choreo's relay and the FastStream baseline.
        self.producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap, client_id=f"lean-{name}", acks="all", enable_idempotence=idempotence
        )
        self.consumer = AIOKafkaConsumer(
            self.prefix + CONSUMES[name],
            bootstrap_servers=bootstrap,
            client_id=f"lean-{name}",
            group_id=f"lean-{name}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        self.timings = Timings(env.get("BENCH_TIMINGS"))

    async def start(self) -> None:
        self.pool = await asyncpg.create_pool(
            self.dsn, min_size=self.workers, max_size=self.workers, reset=keep_session
        )
        await self.producer.start()
        await self.consumer.start()

    async def stop(self) -> None:
        await self.consumer.stop()
        await self.producer.stop()
        await self.pool.close()
        self.timings.flush()

    async def consume(self) -> None:
        """Poll, handle each partition's records in order (partitions side by side), commit offsets."""
        while True:
            batch = await self.consumer.getmany(timeout_ms=1000)
            if not batch:
                continue
            await asyncio.gather(*(self._partition(records) for records in batch.values()))
            # Offsets only after every reply of the batch was acknowledged: a crash before this
            # redelivers the batch (at least once); a crash between commit and publish loses events.
            try:
                await self.consumer.commit({tp: records[-1].offset + 1 for tp, records in batch.items()})
            except KafkaError as error:  # a rebalance: the new owner gets the batch again
                log.warning("lean-%s could not commit offsets: %s", self.name, error)

    async def _partition(self, records: list[ConsumerRecord[bytes, bytes]]) -> None:
        # A partition's records one after the other (per-key order); the pool's size bounds how
        # many partitions hold a connection at once.
        sent: list[asyncio.Future[Any]] = []
        for record in records:
            received = time.time()
            kind, body = decode(record.value, record.headers)
            reply = await self.handler(self.pool, kind, body)
            if reply is None:
                continue
            order_id = str(body["order_id"])
            value, headers = encode(reply.type_name, reply.body)
            # Publish after the commit. send() queues the record in call order, so one
            # partition's replies keep their order without waiting for each acknowledgement.
            topic = self.prefix + TOPICS[reply.type_name]
            sent.append(await self.producer.send(topic, value, key=order_id.encode(), headers=headers))
            self.timings.add(order_id, self.name, received, reply.emitted)
        await asyncio.gather(*sent)


def _mark_ready(path: str | None) -> None:
    if path:
        Path(path).write_text("ready\n")


async def serve(name: str, env: dict[str, str]) -> None:
    """Run one service until SIGTERM or SIGINT."""
    service = Service(name, env)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await service.start()
    consumer = asyncio.create_task(service.consume())
    stopped = asyncio.create_task(stop.wait())
    tasks = [consumer, stopped, asyncio.create_task(service.timings.run())]
    _mark_ready(env.get("BENCH_READY_FILE"))
    try:
        await asyncio.wait([consumer, stopped], return_when=asyncio.FIRST_COMPLETED)
        if consumer.done():
            consumer.result()  # the consumer failed: say why
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await service.stop()


def main(name: str) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(name, dict(os.environ)))
