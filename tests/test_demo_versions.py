"""The demo shop across a version change: `order.created` v2, and v1 records from an older orders release."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from decimal import Decimal

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from choreo import Event, KafkaSettings
from choreo.tables import OutboxRow
from demo_shop.events import OrderCreated
from demo_shop.orders.models import Order, OrderState
from demo_shop.shop import SERVICES, Shop
from tests.conftest import DatabaseFactory
from tests.demo_support import api_client, dead_letters, engines_of, eventually, rows_for

pytestmark = pytest.mark.infra


class OrderCreatedV1(Event, name="order.created", topic="orders"):
    """`order.created` as the orders release before v2 declared it."""

    order_id: str
    customer_id: str
    total: Decimal


@pytest.fixture
async def shop(database: DatabaseFactory, kafka_settings: KafkaSettings) -> AsyncIterator[Shop]:
    """The shop on fresh databases (SQLite or PostgreSQL) and private topics on a real broker."""
    shop = Shop.build({name: await database(name) for name in SERVICES}, kafka_settings)
    app = shop.create_app()
    async with app.router.lifespan_context(app):
        yield shop


async def outbox_headers(shop: Shop, service: str, event_type: str) -> list[dict[str, str]]:
    async with AsyncSession(engines_of(shop)[service]) as session:
        rows = await session.execute(select(OutboxRow).where(OutboxRow.event_type == event_type))  # type: ignore[arg-type]
        return [row.headers for row in rows.scalars()]


async def test_orders_emit_v2_and_a_v1_order_from_an_older_release_still_completes_its_saga(shop: Shop) -> None:
    engines = engines_of(shop)
    async with api_client(shop) as client:
        created = await client.post("/customers", json={"name": "Ada", "credit_limit": "100.00"})
        customer_id = created.json()["id"]

        # An order placed today: orders emit the current version, with its new field.
        placed = (await client.post("/orders", json={"customer_id": customer_id, "total": "10.00"})).json()
        async with AsyncSession(engines["orders"]) as session:
            row = (await session.execute(select(OutboxRow).where(OutboxRow.event_type == "order.created"))).scalar_one()  # type: ignore[arg-type]
        assert row.headers["choreo-event-version"] == "2"
        assert json.loads(row.payload)["currency"] == "EUR"

        # An order placed by the orders release before v2: its row, and order.created v1.
        async with shop.orders.transaction() as tx:
            old = Order(id="order-from-v1", customer_id=customer_id, total=Decimal("25.00"), saga_id=tx.saga_id)
            tx.session.add(old)
            tx.emit(OrderCreatedV1(order_id=old.id, customer_id=customer_id, total=Decimal("25.00")))

        async def both_approved() -> bool:
            states = [(await rows_for(engines, order_id)).order for order_id in (placed["id"], "order-from-v1")]
            return all(order is not None and order.state == OrderState.APPROVED for order in states)

        await eventually(both_approved, 60, "both sagas to end approved")
    rows = await rows_for(engines, "order-from-v1")
    assert rows.reservation is not None and rows.reservation.amount == Decimal("25.00")
    assert rows.payment is not None and rows.payment.amount == Decimal("25.00")
    assert await dead_letters(engines) == []
    # customers took the v1 record upcast to v2, and its follow-up says so for `choreo trace`.
    upcast = [h for h in await outbox_headers(shop, "customers", "credit.reserved") if "choreo-cause-upcast" in h]
    assert [h["choreo-cause-upcast"] for h in upcast] == ["v1→v2"]


def test_the_v1_upcaster_says_orders_were_in_euros() -> None:
    v1 = b'{"order_id": "o1", "customer_id": "c1", "total": "9.90"}'
    assert OrderCreated.from_wire(v1, 1) == OrderCreated(
        order_id="o1", customer_id="c1", total=Decimal("9.90"), currency="EUR"
    )
