"""The order history service: projects the saga's events into `order_history`; emits nothing.

Its own database and consumer group; the write side (orders, customers, payments) never serves
its query. Rebuild it from the topics with `choreo rebuild demo_shop.order_history.handlers:service`.
"""

from __future__ import annotations

from datetime import datetime

from choreo import Service, Tx
from choreo.database import insert_ignoring_duplicates
from demo_shop.events import (
    CreditLimitExceeded,
    CreditReleased,
    CreditReserved,
    CustomerNotFound,
    OrderApproved,
    OrderCancelled,
    OrderCreated,
    OrderRejected,
    PaymentAuthorized,
    PaymentDeclined,
    PaymentRefunded,
)
from demo_shop.order_history.models import OrderHistory, metadata

service = Service("order_history", metadata=metadata)
"""Configured from the environment when it starts: CHOREO_ORDER_HISTORY_DATABASE_URL or
DATABASE_URL, KAFKA_BOOTSTRAP_SERVERS, CHOREO_KAFKA_* (see choreo.settings)."""

Projected = (
    OrderCreated
    | CreditReserved
    | CreditLimitExceeded
    | CustomerNotFound
    | CreditReleased
    | PaymentAuthorized
    | PaymentDeclined
    | PaymentRefunded
    | OrderApproved
    | OrderRejected
    | OrderCancelled
)


@service.on(
    OrderCreated,
    CreditReserved,
    CreditLimitExceeded,
    CustomerNotFound,
    CreditReleased,
    PaymentAuthorized,
    PaymentDeclined,
    PaymentRefunded,
    OrderApproved,
    OrderRejected,
    OrderCancelled,
)
async def record(event: Projected, tx: Tx) -> None:
    """Write the facts `event` states into its order's row (created by whichever event comes first)."""
    assert tx.cause is not None  # a handler's unit of work always has the consumed envelope
    at: datetime = tx.cause.occurred_at
    # Events of one order come on three topics at once: the insert-or-nothing and the row lock
    # let two of them meet on a new order without a duplicate-key failure or a lost column.
    dialect = tx.session.get_bind().dialect.name
    await tx.session.execute(
        insert_ignoring_duplicates(OrderHistory.__table__, dialect).values(order_id=event.order_id, saga_id=tx.saga_id)
    )
    row = await tx.session.get(OrderHistory, event.order_id, with_for_update=True, populate_existing=True)
    assert row is not None
    match event:
        case OrderCreated():
            row.customer_id, row.total, row.currency, row.placed_at = event.customer_id, event.total, event.currency, at
        case CreditReserved():
            row.customer_id, row.credit_reserved_at = event.customer_id, at
        case CreditLimitExceeded():
            row.credit_refused = f"limit exceeded: {event.requested} requested, {event.available} available"
        case CustomerNotFound():
            row.credit_refused = "customer not found"
        case CreditReleased():
            row.credit_released_at = at
        case PaymentAuthorized():
            row.payment_id, row.paid, row.paid_at = event.payment_id, event.amount, at
        case PaymentDeclined():
            row.payment_declined = event.reason
        case PaymentRefunded():
            row.refunded_at = at
        case OrderApproved():
            row.approved_at = at
        case OrderRejected():
            row.rejected_at, row.rejection_reason = at, event.reason
        case OrderCancelled():
            row.customer_id, row.cancelled_at = event.customer_id, at
