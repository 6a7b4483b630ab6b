"""The payments service: charges the order once its credit is reserved; refunds on cancel.

- `credit.reserved` -> `payment.authorized` or `payment.declined`
- `order.cancelled` -> `payment.refunded`, only if the payment is still AUTHORIZED

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
async def authorize_payment(event: CreditReserved, tx: Tx) -> PaymentAuthorized | PaymentDeclined:
    """Charge the reserved amount, or decline it by the demo rule."""
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


@service.on(OrderCancelled)
async def refund_payment(event: OrderCancelled, tx: Tx) -> PaymentRefunded | None:
    """Pay an authorized charge back, once."""
    payment = (
        await tx.session.execute(select(Payment).where(col(Payment.order_id) == event.order_id).with_for_update())
    ).scalar_one_or_none()
    if payment is None or payment.state != PaymentState.AUTHORIZED:
        return None  # nothing charged, or already refunded
    payment.state = PaymentState.REFUNDED
    payment.refunded_at = now()
    return PaymentRefunded(order_id=event.order_id, payment_id=payment.id, amount=payment.amount)
