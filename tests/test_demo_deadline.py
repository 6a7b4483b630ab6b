"""The order saga's deadline: when payments does not answer in time, the order is rejected, the
credit released, and a payment answer that comes later is refused instead of charged."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select

from choreo.testing import in_memory, record_of, settle
from demo_shop.customers.handlers import add_customer
from demo_shop.customers.models import Customer, Reservation, ReservationState
from demo_shop.events import CreditReserved, OrderRejected
from demo_shop.orders.handlers import place_order
from demo_shop.orders.models import Order, OrderState
from demo_shop.payments.models import Payment, PaymentState
from demo_shop.shop import Shop
from tests.test_core_infra import eventually


async def test_payments_silent_past_the_deadline_rejects_the_order_and_releases_credit(tmp_path: Path) -> None:
    shop = Shop.in_directory(tmp_path, order_deadline=timedelta(seconds=1))
    async with in_memory(shop.orders, shop.customers):  # payments is down
        customer = await add_customer(shop.customers, "Ada", Decimal("500.00"))
        order = await place_order(shop.orders, customer.id, Decimal("120.00"))

        async def rejected() -> bool:
            async with AsyncSession(shop.orders.engine) as session:
                found = await session.get(Order, order.id)
                return found is not None and found.state == OrderState.REJECTED

        await eventually(rejected, timeout=15)
        await settle(shop.orders, shop.customers)
        async with AsyncSession(shop.orders.engine) as session:
            found = await session.get(Order, order.id)
            assert found is not None and "deadline" in (found.rejection_reason or "")
        async with AsyncSession(shop.customers.engine) as session:
            reservation = await session.get(Reservation, order.id)
            holder = await session.get(Customer, customer.id)
        assert reservation is not None and reservation.state == ReservationState.RELEASED
        assert holder is not None and holder.credit_reserved == 0


async def test_a_payment_answer_after_the_deadline_is_refused(tmp_path: Path) -> None:
    shop = Shop.in_directory(tmp_path)
    async with in_memory(shop.payments):
        assert shop.payments.consumer is not None
        process = shop.payments.consumer.process
        saga = "late-saga"
        rejected = OrderRejected(order_id="o-late", reason="deadline", deadline_passed=True)
        reserved = CreditReserved(order_id="o-late", customer_id="c1", amount=Decimal("80.00"))
        assert await process(record_of(rejected, saga_id=saga)) == ["handled"]
        assert await process(record_of(reserved, saga_id=saga)) == ["handled"]
        async with AsyncSession(shop.payments.engine) as session:
            query = select(Payment).where(col(Payment.order_id) == "o-late")
            payment = (await session.execute(query)).scalar_one()
        assert payment.state == PaymentState.DECLINED
        assert payment.decline_reason == "order already rejected"
