"""The payments service: charges the order once its credit is reserved; refunds on cancel.

- `credit.reserved` -> `payment.authorized` or `payment.declined`
- `order.cancelled` -> `payment.refunded`, only if the payment is still AUTHORIZED
- `order.rejected` (e.g. at the saga's deadline, when payments answered too late) ->
  `payment.refunded` if a charge went through; if none was made yet, the order is marked VOID
  so that a late `credit.reserved` is declined instead of charged

The demo's card network is one deterministic rule (see `decline_reason`): a total whose cents
are .13 (13.13, 113.13, ...) is declined; every other total is authorized.
"""

from __future__ import annotations

import uuid
from decimal import Decimal

from sqlmodel import col, select

from choreo import Service, Tx
from demo_shop.events import (
    CreditReserved,
    OrderCancelled,
    OrderRejected,
    PaymentAuthorized,
    PaymentDeclined,
    PaymentRefunded,
)
from demo_shop.money import cents
from demo_shop.payments.models import Payment, PaymentState, metadata, now

service = Service("payments", metadata=metadata)
"""Configured from the environment when it starts: CHOREO_PAYMENTS_DATABASE_URL or DATABASE_URL,
KAFKA_BOOTSTRAP_SERVERS, CHOREO_KAFKA_* (see choreo.settings)."""

UNLUCKY_CENTS = Decimal("0.13")


def decline_reason(amount: Decimal) -> str | None:
    """Why the demo card network refuses `amount`, or None when it accepts it."""
    if cents(amount) % 1 == UNLUCKY_CENTS:
        return f"card declined: totals ending in .13 are always declined (total {cents(amount)})"
    return None


@service.on(CreditReserved)
async def authorize_payment(event: CreditReserved, tx: Tx) -> PaymentAuthorized | PaymentDeclined | None:
    """Charge the reserved amount, or decline it by the demo rule."""
    earlier = await _payment_of(tx, event.order_id)
    if earlier is not None:
        if earlier.state != PaymentState.VOID:
            return None  # already answered
        # The order was rejected before its credit reservation reached us: do not charge.
        late = "order already rejected"
        earlier.state, earlier.amount, earlier.decline_reason = PaymentState.DECLINED, event.amount, late
        return PaymentDeclined(order_id=event.order_id, amount=event.amount, reason=late)
    reason = decline_reason(event.amount)
    payment = Payment(
        id=str(uuid.uuid4()),
        order_id=event.order_id,
        customer_id=event.customer_id,
        amount=event.amount,
        state=PaymentState.DECLINED if reason else PaymentState.AUTHORIZED,
        decline_reason=reason,
    )
    tx.session.add(payment)
    if reason is not None:
        return PaymentDeclined(order_id=event.order_id, amount=event.amount, reason=reason)
    return PaymentAuthorized(order_id=event.order_id, payment_id=payment.id, amount=event.amount)


async def _payment_of(tx: Tx, order_id: str) -> Payment | None:
    query = select(Payment).where(col(Payment.order_id) == order_id).with_for_update()
    return (await tx.session.execute(query)).scalar_one_or_none()


@service.on(OrderRejected)
async def void_payment(event: OrderRejected, tx: Tx) -> PaymentRefunded | None:
    """A rejected order is never charged: refund a charge that got through, or refuse a late one."""
    payment = await _payment_of(tx, event.order_id)
    if payment is None:
        if not event.deadline_passed:
            return None  # rejected before credit was reserved: no charge can follow
        tx.session.add(
            Payment(
                id=str(uuid.uuid4()),
                order_id=event.order_id,
                customer_id="",
                amount=Decimal(0),
                state=PaymentState.VOID,
                decline_reason=f"order rejected: {event.reason}",
            )
        )
        return None
    return _refund(payment, event.order_id)


@service.on(OrderCancelled)
async def refund_payment(event: OrderCancelled, tx: Tx) -> PaymentRefunded | None:
    """Pay an authorized charge back, once."""
    payment = await _payment_of(tx, event.order_id)
    return None if payment is None else _refund(payment, event.order_id)


def _refund(payment: Payment, order_id: str) -> PaymentRefunded | None:
    if payment.state != PaymentState.AUTHORIZED:
        return None  # nothing charged, or already refunded
    payment.state = PaymentState.REFUNDED
    payment.refunded_at = now()
    return PaymentRefunded(order_id=order_id, payment_id=payment.id, amount=payment.amount)
