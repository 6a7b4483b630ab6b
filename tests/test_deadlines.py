"""Saga deadlines: the start and its timeout commit together; the timeout fires only when due."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from choreo import Event, Service, SetupError, Tx
from choreo.tables import outbox_table
from choreo.testing import in_memory, settle
from tests.test_core_infra import eventually
from tests.toy import OrderConfirmed, OrderPlaced, ToyOrder, order_status, place_order, shop_metadata


class OrderExpired(Event, name="toy.order_expired", topic="toy-orders"):
    order_id: str


def shop_with_deadline(tmp_path: Path, deadline: timedelta) -> Service:
    shop = Service("shop", database_url=f"sqlite+aiosqlite:///{tmp_path}/shop.db", metadata=shop_metadata)
    shop.saga(
        "order",
        starts=OrderPlaced,
        ends={OrderConfirmed, OrderExpired},
        deadline=deadline,
        on_deadline=lambda started: OrderExpired(order_id=started.order_id),
        timeout_event=OrderExpired,
    )

    @shop.on(OrderExpired)
    async def expire(event: OrderExpired, tx: Tx) -> None:
        order = await tx.session.get(ToyOrder, event.order_id)
        if order is not None and order.status == "PENDING":  # a finished saga ignores its timeout
            order.status = "EXPIRED"

    return shop


async def test_a_saga_nobody_answers_times_out_at_its_deadline(tmp_path: Path) -> None:
    shop = shop_with_deadline(tmp_path, timedelta(milliseconds=600))
    async with in_memory(shop):
        await place_order(shop, "lonely", "apple", 1)
        assert await order_status(shop, "lonely") == "PENDING"  # not before the deadline

        async def expired() -> bool:
            return await order_status(shop, "lonely") == "EXPIRED"

        await eventually(expired, timeout=10)


async def test_a_finished_saga_ignores_its_timeout(tmp_path: Path) -> None:
    shop = shop_with_deadline(tmp_path, timedelta(milliseconds=300))
    async with in_memory(shop):
        await place_order(shop, "quick", "apple", 1)
        async with shop.transaction() as tx:
            order = await tx.session.get(ToyOrder, "quick")
            assert order is not None
            order.status = "CONFIRMED"
        assert shop.consumer is not None
        consumer = shop.consumer

        async def timeout_handled() -> bool:
            return consumer.stats.handled >= 1

        await eventually(timeout_handled, timeout=10)
        assert await order_status(shop, "quick") == "CONFIRMED"


async def test_a_saga_ended_by_its_starting_service_withdraws_its_timeout(tmp_path: Path) -> None:
    shop = shop_with_deadline(tmp_path, timedelta(milliseconds=300))
    async with in_memory(shop):
        saga_id = await place_order(shop, "quick", "apple", 1)
        assert await scheduled_timeouts(shop) == 1
        async with shop.transaction(saga_id) as tx:
            order = await tx.session.get(ToyOrder, "quick")
            assert order is not None
            order.status = "CONFIRMED"
            tx.emit(OrderConfirmed(order_id="quick"))
        assert await scheduled_timeouts(shop) == 0
        await asyncio.sleep(0.6)  # past the deadline: nothing fires
        await settle(shop)
        assert shop.consumer is not None
        assert shop.consumer.stats.handled == 0
        assert await order_status(shop, "quick") == "CONFIRMED"


async def test_an_end_in_another_saga_leaves_the_timeout_alone(tmp_path: Path) -> None:
    shop = shop_with_deadline(tmp_path, timedelta(minutes=5))
    async with in_memory(shop):
        await place_order(shop, "one", "apple", 1)
        async with shop.transaction() as tx:  # a different saga id
            tx.emit(OrderConfirmed(order_id="one"))
        assert await scheduled_timeouts(shop) == 1


async def test_a_saga_started_again_under_its_id_keeps_its_first_timeout(tmp_path: Path) -> None:
    shop = shop_with_deadline(tmp_path, timedelta(minutes=5))
    async with in_memory(shop):
        saga_id = await place_order(shop, "first", "apple", 1)
        async with shop.transaction(saga_id) as tx:  # e.g. a retry flow starting over
            tx.session.add(ToyOrder(id="again"))
            tx.emit(OrderPlaced(order_id="again", sku="apple", quantity=1))
        assert await scheduled_timeouts(shop) == 1


async def scheduled_timeouts(shop: Service) -> int:
    rows = outbox_table.c
    async with shop.engine.connect() as conn:
        query = select(func.count()).where(rows.event_type == OrderExpired.event_name, rows.published_at.is_(None))
        return int(await conn.scalar(query) or 0)


def test_saga_declarations_are_checked() -> None:
    shop = Service("shop")
    with pytest.raises(SetupError, match="deadline= and on_deadline= go together"):
        shop.saga("order", starts=OrderPlaced, ends={OrderConfirmed}, deadline=timedelta(seconds=1))
    with pytest.raises(SetupError, match="cannot both start and end it"):
        shop.saga("order", starts=OrderPlaced, ends={OrderPlaced})
    with pytest.raises(SetupError, match="must name at least one event"):
        shop.saga("order", starts=OrderPlaced, ends=set())
