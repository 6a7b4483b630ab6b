"""The customers service: reserves credit for new orders and releases it when the saga undoes.

- `order.created` -> `credit.reserved`, `credit.limit_exceeded` or `customer.not_found`
- `payment.declined`, `order.cancelled`, `order.rejected` -> `credit.released`, only if the
  order still holds credit (the first of them releases it, the others change nothing)
"""

from __future__ import annotations

import uuid
from decimal import Decimal

from sqlmodel import select

from choreo import Service, Tx
from demo_shop.customers.models import Customer, Reservation, ReservationState, metadata, now
from demo_shop.events import (
    CreditLimitExceeded,
    CreditReleased,
    CreditReserved,
    CustomerNotFound,
    OrderCancelled,
    OrderCreated,
    OrderRejected,
    PaymentDeclined,
)

service = Service("customers", metadata=metadata)
"""Configured from the environment when it starts: CHOREO_CUSTOMERS_DATABASE_URL or DATABASE_URL,
KAFKA_BOOTSTRAP_SERVERS, CHOREO_KAFKA_* (see choreo.settings)."""


async def add_customer(customers: Service, name: str, credit_limit: Decimal) -> Customer:
    """Create a customer with an unused credit limit."""

    async def add(tx: Tx) -> Customer:
        customer = Customer(id=str(uuid.uuid4()), name=name, credit_limit=credit_limit)
        tx.session.add(customer)
        return customer

    return await customers.run_transaction(add)


@service.on(OrderCreated)
async def reserve_credit(event: OrderCreated, tx: Tx) -> CreditReserved | CreditLimitExceeded | CustomerNotFound:
    """Hold the order's total against the customer's credit limit, if it fits."""
    # The row lock serializes every reservation and release of one customer, across handlers
    # and service instances: the check below and the update commit without a lost update.
    # (SQLite has no row locks; choreo begins its transactions IMMEDIATE there instead.)
    customer = await tx.session.get(Customer, event.customer_id, with_for_update=True)
    if customer is None:
        return CustomerNotFound(order_id=event.order_id, customer_id=event.customer_id)
    if event.total > customer.available_credit:
        return CreditLimitExceeded(
            order_id=event.order_id,
            customer_id=customer.id,
            requested=event.total,
            available=customer.available_credit,
        )
    customer.credit_reserved += event.total
    tx.session.add(Reservation(order_id=event.order_id, customer_id=customer.id, amount=event.total))
    return CreditReserved(order_id=event.order_id, customer_id=customer.id, amount=event.total)


@service.on(PaymentDeclined, OrderCancelled, OrderRejected)
async def release_credit(event: PaymentDeclined | OrderCancelled | OrderRejected, tx: Tx) -> CreditReleased | None:
    """Give the order's credit back, once: later triggers for the same order change nothing."""
    customer_id = await tx.session.scalar(select(Reservation.customer_id).where(Reservation.order_id == event.order_id))
    if customer_id is None:
        return None  # nothing was reserved (limit exceeded, unknown customer)
    # Same lock order as reserve_credit (customer, then reservation): no deadlock between them.
    customer = await tx.session.get(Customer, customer_id, with_for_update=True)
    reservation = await tx.session.get(Reservation, event.order_id, with_for_update=True)
    assert customer is not None and reservation is not None  # neither is ever deleted
    if reservation.state != ReservationState.RESERVED:
        return None  # already released by an earlier trigger of this saga
    reason = {
        PaymentDeclined: "payment declined",
        OrderCancelled: "order cancelled",
        OrderRejected: "order rejected",
    }[type(event)]
    reservation.state = ReservationState.RELEASED
    reservation.released_at = now()
    reservation.release_reason = reason
    customer.credit_reserved -= reservation.amount
    return CreditReleased(order_id=event.order_id, customer_id=customer.id, amount=reservation.amount, reason=reason)
