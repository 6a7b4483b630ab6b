"""Three toy services playing a `purchase` saga with a compensation, for the tracing tests.

    orders:   places orders (outside handlers); confirms on t3.payment_captured; rejects on
              t3.out_of_stock or t3.payment_failed; on the deadline, rejects if still open
    stock:    reserves on t3.order_placed; releases (compensation) on t3.payment_failed
    payments: captures on t3.stock_reserved: fails above 100, raises for order ids "boom-..."

`make_toy3(..., broken=...)` builds a deliberately broken variant for `choreo check`.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from faststream.kafka import TestKafkaBroker

from choreo import Event, KafkaSettings, RetryPolicy, Service, Tx
from choreo.saga import Saga
from choreo.tracing import TraceCollector

FAST = RetryPolicy(max_attempts=2, initial_backoff=0.001, max_backoff=0.002)


class OrderPlaced(Event, name="t3.order_placed", topic="t3-orders"):
    order_id: str
    amount: int


class OrderConfirmed(Event, name="t3.order_confirmed", topic="t3-orders"):
    order_id: str


class OrderRejected(Event, name="t3.order_rejected", topic="t3-orders"):
    order_id: str
    reason: str


class OrderExpired(Event, name="t3.order_expired", topic="t3-orders"):
    order_id: str


class StockReserved(Event, name="t3.stock_reserved", topic="t3-stock"):
    order_id: str
    amount: int


class OutOfStock(Event, name="t3.out_of_stock", topic="t3-stock"):
    order_id: str


class StockReleased(Event, name="t3.stock_released", topic="t3-stock", compensates=StockReserved):
    order_id: str


class PaymentCaptured(Event, name="t3.payment_captured", topic="t3-payments"):
    order_id: str


class PaymentFailed(Event, name="t3.payment_failed", topic="t3-payments"):
    order_id: str


# Events of the broken variants only.


class PaymentAudited(Event, name="t3.payment_audited", topic="t3-payments"):
    order_id: str


class RefundRequested(Event, name="t3.refund_requested", topic="t3-orders"):
    order_id: str


class FraudSuspected(Event, name="t3.fraud_suspected", topic="t3-payments"):
    order_id: str


BROKEN_VARIANTS = ("unhandled-event", "unreachable-handler", "saga-without-end", "uncompensated-step")


@dataclass
class Toy3:
    orders: Service
    stock: Service
    payments: Service
    saga: Saga

    @property
    def services(self) -> tuple[Service, Service, Service]:
        return (self.orders, self.stock, self.payments)


def make_toy3(
    orders_db: str | None = None,
    stock_db: str | None = None,
    payments_db: str | None = None,
    kafka: KafkaSettings | None = None,
    *,
    broken: str | None = None,
    deadline: timedelta = timedelta(minutes=5),
) -> Toy3:
    """Fresh services for one test; `broken` names one of BROKEN_VARIANTS."""
    assert broken is None or broken in BROKEN_VARIANTS, broken
    orders = Service("orders", database_url=orders_db, kafka=kafka, retry=FAST)
    stock = Service("stock", database_url=stock_db, kafka=kafka, retry=FAST)
    payments = Service("payments", database_url=payments_db, kafka=kafka, retry=FAST)
    saga = orders.saga(
        "purchase",
        starts=OrderPlaced,
        ends={OrderConfirmed, OrderRejected},
        deadline=deadline,
        on_deadline=lambda placed: OrderExpired(order_id=placed.order_id),
        timeout_event=OrderExpired,
    )

    @orders.on(PaymentCaptured)
    async def confirm(event: PaymentCaptured, tx: Tx) -> OrderConfirmed:
        return OrderConfirmed(order_id=event.order_id)

    if broken == "saga-without-end":
        # Forgets to reject: an order out of stock never ends its saga.
        @orders.on(OutOfStock)
        async def note_out_of_stock(event: OutOfStock, tx: Tx) -> None:
            return None

        @orders.on(PaymentFailed)
        async def reject(event: PaymentFailed, tx: Tx) -> OrderRejected:
            return OrderRejected(order_id=event.order_id, reason="payment failed")

    elif broken == "uncompensated-step":

        @orders.on(OutOfStock, PaymentFailed, FraudSuspected)
        async def reject(event: OutOfStock | PaymentFailed | FraudSuspected, tx: Tx) -> OrderRejected:
            return OrderRejected(order_id=event.order_id, reason=type(event).__name__)

    else:

        @orders.on(OutOfStock, PaymentFailed)
        async def reject(event: OutOfStock | PaymentFailed, tx: Tx) -> OrderRejected:
            return OrderRejected(order_id=event.order_id, reason=type(event).__name__)

    @orders.on(OrderExpired)
    async def expire(event: OrderExpired, tx: Tx) -> OrderRejected | None:
        return None  # the toy keeps no order rows: a real service would reject a pending order here

    if broken == "unreachable-handler":

        @orders.on(RefundRequested)
        async def refund(event: RefundRequested, tx: Tx) -> None:
            return None

    @stock.on(OrderPlaced)
    async def reserve(event: OrderPlaced, tx: Tx) -> StockReserved | OutOfStock:
        if event.order_id.startswith("none-"):
            return OutOfStock(order_id=event.order_id)
        return StockReserved(order_id=event.order_id, amount=event.amount)

    @stock.on(PaymentFailed)
    async def release(event: PaymentFailed, tx: Tx) -> StockReleased:
        return StockReleased(order_id=event.order_id)

    if broken == "unhandled-event":
        # Emits an event nobody consumes and no saga ends with.
        @payments.on(PaymentCaptured)
        async def audit(event: PaymentCaptured, tx: Tx) -> PaymentAudited:
            return PaymentAudited(order_id=event.order_id)

    if broken == "uncompensated-step":

        @payments.on(StockReserved)
        async def charge(event: StockReserved, tx: Tx) -> PaymentCaptured | PaymentFailed | FraudSuspected:
            return PaymentCaptured(order_id=event.order_id)

    else:

        @payments.on(StockReserved)
        async def charge(event: StockReserved, tx: Tx) -> PaymentCaptured | PaymentFailed:
            if event.order_id.startswith("boom-"):
                raise RuntimeError("card processor exploded")
            if event.amount > 100:
                return PaymentFailed(order_id=event.order_id)
            return PaymentCaptured(order_id=event.order_id)

    return Toy3(orders, stock, payments, saga)


async def place(orders: Service, order_id: str, amount: int) -> str:
    """Start a purchase saga the way an HTTP endpoint would; returns the saga id."""
    async with orders.transaction() as tx:
        tx.emit(OrderPlaced(order_id=order_id, amount=amount))
        return tx.saga_id


@asynccontextmanager
async def traced_in_memory(collector: TraceCollector, *services: Service) -> AsyncIterator[TraceCollector]:
    """Like `choreo.testing.in_memory`, with `collector` consuming the same in-memory Kafka."""
    brokers = [(await service._open(ensure_topics=False)).route_in_memory() for service in services]
    brokers.append((await collector.open(ensure_topics=False)).route_in_memory())
    try:
        async with TestKafkaBroker(*brokers):
            for service in services:
                await service._launch(start_transport=False, relay=None)
            yield collector
    finally:
        for service in services:
            await service.stop()
        await collector.stop()


def write_package(root: Path, name: str, broken: str | None = None) -> None:
    """A package laid out like demo_shop: one sub-package per service, services in handlers.py."""
    package = root / name
    package.mkdir()
    (package / "__init__.py").write_text('"""A shop."""\n')
    variant = repr(broken)
    (package / "toy.py").write_text(f"from tests.toy3 import make_toy3\n\nTOY = make_toy3(broken={variant})\n")
    (package / "__main__.py").write_text("raise SystemExit('never imported by discovery')\n")
    for service in ("orders", "stock", "payments"):
        (package / service).mkdir()
        (package / service / "__init__.py").write_text("")
        (package / service / "handlers.py").write_text(f"from {name}.toy import TOY\n\nservice = TOY.{service}\n")


def project_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A project directory, current and on sys.path, whose modules are forgotten afterwards."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        del sys.modules[name]
