"""orders, customers and payments on bare FastStream: commit, then publish.

Configured by the environment (set by `bench.run`): BENCH_DATABASE_URL, KAFKA_BOOTSTRAP_SERVERS,
BENCH_TOPIC_PREFIX, BENCH_WORKERS (consumers per service, default 8), BENCH_KAFKA_IDEMPOTENCE,
BENCH_TIMINGS (a file the handlers' timestamps are appended to) and BENCH_READY_FILE.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

from faststream import AckPolicy
from faststream.kafka import KafkaBroker
from faststream.kafka.annotations import KafkaMessage
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from bench.baseline.events import (
    CreditRefused,
    CreditReserved,
    Message,
    OrderApproved,
    OrderCreated,
    OrderRejected,
    PaymentAuthorized,
    PaymentDeclined,
)
from bench.handwritten import Timings
from demo_shop.customers.models import Customer, Reservation
from demo_shop.money import cents
from demo_shop.orders.models import Order, OrderState
from demo_shop.payments.models import Payment, PaymentState

Handler = Callable[[dict[str, Any], KafkaMessage], Awaitable[None]]


class Shop:
    """One baseline service: its broker, its database sessions and the publish-after-commit helper."""

    def __init__(self, name: str, env: dict[str, str]) -> None:
        self.name = name
        self.prefix = env.get("BENCH_TOPIC_PREFIX", "")
        self.workers = int(env.get("BENCH_WORKERS", "8"))
        idempotence = env.get("BENCH_KAFKA_IDEMPOTENCE", "1") not in ("0", "false", "no")
        self.engine = create_async_engine(env["BENCH_DATABASE_URL"], pool_size=10, max_overflow=10)
        self.sessions: Callable[[], AsyncSession] = async_sessionmaker(self.engine, expire_on_commit=False)
        # The same producer durability as choreo's relay: acks from all replicas, idempotent.
        self.broker = KafkaBroker(
            env.get("KAFKA_BOOTSTRAP_SERVERS", "localhost:9092"),
            client_id=f"baseline-{name}",
            acks="all",
            enable_idempotence=idempotence,
            logger=logging.getLogger(f"baseline.{name}"),
        )
        self.timings = Timings(env.get("BENCH_TIMINGS"))

    def topic(self, name: str) -> str:
        return self.prefix + name

    async def publish(self, message: Message, key: str) -> None:
        """Publish after the commit: if this process dies right here, the event is lost."""
        await self.broker.publish(
            message.model_dump(mode="json"), self.topic(message.topic), key=key.encode(), headers=message.headers()
        )

    def subscriber(self, topic: str) -> Callable[[Handler], Handler]:
        # One consumer per worker in the group, each owning whole partitions: per-key order is
        # kept, and an offset is committed only after its message was handled (AckPolicy.ACK).
        subscriber: Callable[[Handler], Handler] = self.broker.subscriber(
            self.topic(topic),
            group_id=f"baseline-{self.name}",
            max_workers=self.workers,
            ack_policy=AckPolicy.ACK,
            auto_offset_reset="earliest",
        )
        return subscriber


def customers(shop: Shop) -> None:
    """order.created -> credit.reserved (or credit.refused), under the customer's row lock."""

    @shop.subscriber("orders")
    async def reserve_credit(body: dict[str, Any], message: KafkaMessage) -> None:
        received = time.time()
        if message.headers.get("type") != OrderCreated.type_name:
            return
        event = OrderCreated.model_validate(body)
        reply: Message
        async with shop.sessions() as session, session.begin():
            customer = await session.get(Customer, event.customer_id, with_for_update=True)
            if customer is None or event.total > customer.available_credit:
                reply = CreditRefused(order_id=event.order_id, reason="no customer or credit")
            else:
                customer.credit_reserved += event.total
                session.add(Reservation(order_id=event.order_id, customer_id=customer.id, amount=event.total))
                reply = CreditReserved(order_id=event.order_id, customer_id=customer.id, amount=event.total)
            emitted = time.time()
        await shop.publish(reply, event.order_id)
        shop.timings.add(event.order_id, "customers", received, emitted)


def payments(shop: Shop) -> None:
    """credit.reserved -> payment.authorized (or payment.declined, by the demo's .13 rule)."""

    @shop.subscriber("customers")
    async def authorize_payment(body: dict[str, Any], message: KafkaMessage) -> None:
        received = time.time()
        if message.headers.get("type") != CreditReserved.type_name:
            return
        event = CreditReserved.model_validate(body)
        declined = cents(event.amount) % 1 == Decimal("0.13")
        payment = Payment(
            id=str(uuid.uuid4()),
            order_id=event.order_id,
            customer_id=event.customer_id,
            amount=event.amount,
            state=PaymentState.DECLINED if declined else PaymentState.AUTHORIZED,
        )
        async with shop.sessions() as session, session.begin():
            session.add(payment)
            emitted = time.time()
        reply: Message
        if declined:
            reply = PaymentDeclined(order_id=event.order_id, reason="card declined")
        else:
            reply = PaymentAuthorized(order_id=event.order_id, payment_id=payment.id, amount=event.amount)
        await shop.publish(reply, event.order_id)
        shop.timings.add(event.order_id, "payments", received, emitted)


def orders(shop: Shop) -> None:
    """payment.authorized -> order.approved; payment.declined -> order.rejected."""

    @shop.subscriber("payments")
    async def decide_order(body: dict[str, Any], message: KafkaMessage) -> None:
        received = time.time()
        kind = message.headers.get("type")
        if kind not in (PaymentAuthorized.type_name, PaymentDeclined.type_name):
            return
        order_id = str(body["order_id"])
        async with shop.sessions() as session, session.begin():
            order = await session.get(Order, order_id, with_for_update=True)
            if order is None or order.state != OrderState.PENDING:
                return
            reply: Message
            if kind == PaymentAuthorized.type_name:
                order.move_to(OrderState.APPROVED)
                reply = OrderApproved(order_id=order_id)
            else:
                order.move_to(OrderState.REJECTED, "payment declined")
                reply = OrderRejected(order_id=order_id, reason="payment declined")
            emitted = time.time()
        await shop.publish(reply, order_id)
        shop.timings.add(order_id, "orders", received, emitted)


def _mark_ready(path: str | None) -> None:
    if path:
        Path(path).write_text("ready\n")


async def serve(name: str, env: dict[str, str]) -> None:
    """Run one service until SIGTERM or SIGINT."""
    shop = Shop(name, env)
    {"orders": orders, "customers": customers, "payments": payments}[name](shop)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await shop.broker.start()
    flusher = asyncio.create_task(shop.timings.run())
    _mark_ready(env.get("BENCH_READY_FILE"))
    try:
        await stop.wait()
    finally:
        await shop.broker.stop()
        flusher.cancel()
        shop.timings.flush()
        await shop.engine.dispose()


def main(name: str) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(name, dict(os.environ)))
