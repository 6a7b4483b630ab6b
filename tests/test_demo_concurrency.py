"""Hundreds of orders for the same few customers at once never over-reserve their credit."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from choreo import KafkaSettings
from choreo.database import create_engine
from demo_shop.customers.models import Reservation, ReservationState
from demo_shop.orders.models import Order, OrderState
from demo_shop.payments.models import Payment, PaymentState
from demo_shop.shop import SERVICES, Shop
from demo_shop.walkthrough import FLOWS, check_hops, saga_hops
from tests.demo_support import api_client, credit_books, dead_letters, engines_of, eventually

ORDERS = 200
LIMITS = {"ada": Decimal("1000.00"), "bob": Decimal("700.00"), "cy": Decimal("400.00")}
FLOW = {flow.key: flow for flow in FLOWS}


def plan_orders(customer_ids: list[str]) -> list[tuple[str, Decimal]]:
    """Totals of 5.00-60.00, every tenth one ending in .13 (declined by payments)."""
    rng = random.Random(20240611)
    plan = []
    for n in range(ORDERS):
        total = Decimal(rng.randint(500, 6000)) / 100
        if n % 10 == 9:
            total = total.quantize(Decimal(1)) + Decimal("0.13")
        plan.append((customer_ids[n % len(customer_ids)], total.quantize(Decimal("0.01"))))
    return plan


async def table(engine: AsyncEngine, model: type[Any], key: str) -> dict[str, Any]:
    """Every row of `model`, by its `key` attribute."""
    async with AsyncSession(engine) as session:
        return {getattr(row, key): row for row in (await session.execute(select(model))).scalars()}


def kind_of(order: Order) -> str:
    """Which flow an order took, from its final state and rejection reason."""
    if order.state == OrderState.APPROVED:
        return "success"
    if order.state == OrderState.REJECTED and (order.rejection_reason or "").startswith("credit limit"):
        return "credit-limit-exceeded"
    if order.state == OrderState.REJECTED and (order.rejection_reason or "").startswith("payment declined"):
        return "payment-declined"
    return f"unexpected {order.state}: {order.rejection_reason}"


async def test_concurrent_orders_never_over_reserve_credit(
    fresh_pg_database: Callable[[str], Awaitable[str]], kafka_settings: KafkaSettings
) -> None:
    urls = {name: await fresh_pg_database(name) for name in SERVICES}
    shop = Shop.build(urls, kafka_settings)
    # A second customers instance in the same consumer group: reservations for one customer
    # now also race between processes, and only the row lock keeps them apart.
    twin = shop.customers.clone(database_url=urls["customers"], kafka=kafka_settings)
    app = shop.create_app()
    # The twin starts after the shop: two instances creating the tables of one fresh database
    # at the same moment collide in PostgreSQL's catalog.
    async with app.router.lifespan_context(app), twin.running(), api_client(shop) as client:
        engines = engines_of(shop)
        customer_ids = []
        for name, limit in LIMITS.items():
            response = await client.post("/customers", json={"name": name, "credit_limit": str(limit)})
            assert response.status_code == 201, response.text
            customer_ids.append(response.json()["id"])
        plan = plan_orders(customer_ids)

        responses = await asyncio.gather(
            *(client.post("/orders", json={"customer_id": c, "total": str(t)}) for c, t in plan)
        )
        assert [r.status_code for r in responses] == [201] * ORDERS
        placed = {r.json()["id"]: r.json() for r in responses}

        async def every_saga_ended() -> bool:
            orders = await table(engines["orders"], Order, "id")
            if any(o.state == OrderState.PENDING for o in orders.values()):
                return False
            reservations = await table(engines["customers"], Reservation, "order_id")
            # Declined orders are rejected while their credit is still being released.
            return not any(
                r.state == ReservationState.RESERVED and orders[r.order_id].state != OrderState.APPROVED
                for r in reservations.values()
            )

        await eventually(every_saga_ended, timeout=120, what=f"all {ORDERS} sagas to end")
        handled = {"first": shop.customers.consumer, "twin": twin.consumer}
        handled_counts = {k: c.stats.handled if c else 0 for k, c in handled.items()}

    # The services are stopped; read each one's database.
    engines = {name: create_engine(url) for name, url in urls.items()}
    try:
        orders = await table(engines["orders"], Order, "id")
        reservations = await table(engines["customers"], Reservation, "order_id")
        payments = await table(engines["payments"], Payment, "order_id")
        assert set(orders) == set(placed)

        kinds = Counter(kind_of(order) for order in orders.values())
        assert set(kinds) == {"success", "credit-limit-exceeded", "payment-declined"}, kinds
        for order in orders.values():
            kind = kind_of(order)
            reservation, payment = reservations.get(order.id), payments.get(order.id)
            if kind == "success":
                assert reservation is not None and reservation.state == ReservationState.RESERVED
                assert reservation.amount == order.total
                assert payment is not None and payment.state == PaymentState.AUTHORIZED
            elif kind == "payment-declined":
                assert order.total % 1 == Decimal("0.13")
                assert reservation is not None and reservation.state == ReservationState.RELEASED
                assert payment is not None and payment.state == PaymentState.DECLINED
            else:
                assert reservation is None and payment is None

        # No over-reservation and no lost update, per customer.
        books = await credit_books(engines["customers"])
        for customer_id, (limit, reserved, held) in books.items():
            approved = sum(
                (o.total for o in orders.values() if o.customer_id == customer_id and o.state == "APPROVED"),
                Decimal("0.00"),
            )
            assert held <= limit, f"{customer_id}: {held} reserved over its limit of {limit}"
            assert reserved == held == approved, f"{customer_id}: column {reserved}, rows {held}, {approved}"

        # Every saga's events, caused in the right order, from the three outboxes.
        sagas = await asyncio.gather(*(saga_hops(engines, o.saga_id) for o in orders.values()))
        for order, hops in zip(orders.values(), sagas, strict=True):
            assert check_hops(FLOW[kind_of(order)], hops) == [], (order.id, [h.event for h in hops])
        assert await dead_letters(engines) == []
    finally:
        for engine in engines.values():
            await engine.dispose()
    print(f"flows: {dict(kinds)}; customers events handled per instance: {handled_counts}")
