"""The orders service: starts the `order` saga and records how it ends.

- `POST /orders` -> `order.created`: the saga starts, the order is PENDING
- `payment.authorized` -> `order.approved`: APPROVED
- `credit.limit_exceeded`, `customer.not_found`, `payment.declined` -> `order.rejected`: REJECTED,
  with the reason
- `POST /orders/{id}/cancel` -> `order.cancelled`: APPROVED becomes CANCELLED
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from decimal import Decimal

from choreo import Service, Tx
from demo_shop.events import (
    CreditLimitExceeded,
    CustomerNotFound,
    OrderApproved,
    OrderCancelled,
    OrderCreated,
    OrderDeadlinePassed,
    OrderRejected,
    PaymentAuthorized,
    PaymentDeclined,
)
from demo_shop.orders.models import Order, OrderState, metadata

service = Service("orders", metadata=metadata)
"""Configured from the environment when it starts: CHOREO_ORDERS_DATABASE_URL or DATABASE_URL,
KAFKA_BOOTSTRAP_SERVERS, CHOREO_KAFKA_* (see choreo.settings)."""

# Emitted from the HTTP endpoints below, outside any handler.
service.declare(OrderCreated, OrderCancelled)

ORDER_DEADLINE = timedelta(seconds=30)

order_saga = service.saga(
    "order",
    starts=OrderCreated,
    ends={OrderApproved, OrderRejected},
    deadline=ORDER_DEADLINE,
    on_deadline=lambda started: OrderDeadlinePassed(order_id=started.order_id),
    timeout_event=OrderDeadlinePassed,
    cancelled_by=OrderCancelled,
)
"""The saga every order starts; metadata for tracing and checks, never a coordinator. If it has
not ended by its deadline, `expire_order` rejects the order and the compensations follow. After
it is approved, `POST /orders/{id}/cancel` may undo it with `order.cancelled`: `choreo check`
verifies that every service that did a step of it handles that event."""


class OrderNotFound(LookupError):
    """No order has this id."""

    def __init__(self, order_id: str) -> None:
        super().__init__(f"order {order_id!r} not found")
        self.order_id = order_id


class OrderConflict(Exception):
    """The order is not in a state that allows the request."""


async def place_order(orders: Service, customer_id: str, total: Decimal) -> Order:
    """Insert a PENDING order and emit `order.created` in one transaction: the saga starts."""

    async def start(tx: Tx) -> Order:
        order = Order(id=str(uuid.uuid4()), customer_id=customer_id, total=total, saga_id=tx.saga_id)
        tx.session.add(order)
        tx.emit(OrderCreated(order_id=order.id, customer_id=customer_id, total=total))
        return order

    # Run again on a fresh connection if the database drops this one before the commit.
    return await orders.run_transaction(start)


async def cancel_order(orders: Service, order_id: str) -> Order:
    """Cancel an APPROVED order; `order.cancelled` joins the order's saga to undo its steps."""
    found = await orders.run_transaction(lambda tx: tx.session.get(Order, order_id))
    if found is None:
        raise OrderNotFound(order_id)

    async def cancel(tx: Tx) -> Order:
        # Locked, then checked: two concurrent cancels cannot both emit order.cancelled.
        order = await tx.session.get(Order, order_id, with_for_update=True)
        assert order is not None  # orders are never deleted
        if order.state != OrderState.APPROVED:
            raise OrderConflict(f"order {order_id!r} is {order.state}; only an APPROVED order can be cancelled")
        order.move_to(OrderState.CANCELLED)
        tx.emit(OrderCancelled(order_id=order.id, customer_id=order.customer_id))
        return order

    return await orders.run_transaction(cancel, saga_id=found.saga_id)


async def _pending_order(tx: Tx, order_id: str) -> Order | None:
    """The order, locked, if it still waits for the saga's outcome; None if already decided."""
    order = await tx.session.get(Order, order_id, with_for_update=True)
    if order is None:
        # Raising parks the event as a dead letter, where `choreo trace` shows it.
        raise OrderNotFound(order_id)
    return order if order.state == OrderState.PENDING else None


@service.on(PaymentAuthorized)
async def approve_order(event: PaymentAuthorized, tx: Tx) -> OrderApproved | None:
    """Credit reserved and payment authorized: the order is approved."""
    order = await _pending_order(tx, event.order_id)
    if order is None:
        return None
    order.move_to(OrderState.APPROVED)
    return OrderApproved(order_id=order.id)


@service.on(CreditLimitExceeded, CustomerNotFound, PaymentDeclined)
async def reject_order(event: CreditLimitExceeded | CustomerNotFound | PaymentDeclined, tx: Tx) -> OrderRejected | None:
    """A step of the saga failed: the order is rejected, saying why."""
    order = await _pending_order(tx, event.order_id)
    if order is None:
        return None
    reason = rejection_reason(event)
    order.move_to(OrderState.REJECTED, reason)
    return OrderRejected(order_id=order.id, reason=reason)


@service.on(OrderDeadlinePassed)
async def expire_order(event: OrderDeadlinePassed, tx: Tx) -> OrderRejected | None:
    """The saga's deadline passed: a still pending order is rejected (and so its credit released)."""
    order = await _pending_order(tx, event.order_id)
    if order is None:
        return None  # the saga ended in time; its timeout changes nothing
    reason = "no answer in time: the order saga passed its deadline"
    order.move_to(OrderState.REJECTED, reason)
    return OrderRejected(order_id=order.id, reason=reason, deadline_passed=True)


def rejection_reason(event: CreditLimitExceeded | CustomerNotFound | PaymentDeclined) -> str:
    """What a person reading the order should learn from the failed step."""
    if isinstance(event, CreditLimitExceeded):
        return f"credit limit exceeded: total {event.requested} > available credit {event.available}"
    if isinstance(event, CustomerNotFound):
        return f"customer {event.customer_id!r} not found"
    return f"payment declined: {event.reason}"
