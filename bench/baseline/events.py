"""The baseline's messages: plain pydantic models, dispatched on a `type` header."""

from __future__ import annotations

from decimal import Decimal
from typing import ClassVar

from pydantic import BaseModel


class Message(BaseModel):
    """A message with a wire name in the `type` header."""

    type_name: ClassVar[str]
    topic: ClassVar[str]

    def headers(self) -> dict[str, str]:
        return {"type": self.type_name}


class OrderCreated(Message):
    type_name = "order.created"
    topic = "orders"
    order_id: str
    customer_id: str
    total: Decimal


class OrderApproved(Message):
    type_name = "order.approved"
    topic = "orders"
    order_id: str


class OrderRejected(Message):
    type_name = "order.rejected"
    topic = "orders"
    order_id: str
    reason: str


class CreditReserved(Message):
    type_name = "credit.reserved"
    topic = "customers"
    order_id: str
    customer_id: str
    amount: Decimal


class CreditRefused(Message):
    type_name = "credit.refused"
    topic = "customers"
    order_id: str
    reason: str


class PaymentAuthorized(Message):
    type_name = "payment.authorized"
    topic = "payments"
    order_id: str
    payment_id: str
    amount: Decimal


class PaymentDeclined(Message):
    type_name = "payment.declined"
    topic = "payments"
    order_id: str
    reason: str
