"""The published language of the demo shop: the events its three services exchange.

Wire names and topics are contracts between the services: fields may be added, never change
meaning. Each service emits on its own topic, keyed by saga id (choreo's default key).

| topic       | event                                        | emitted by, in reaction to            |
|-------------|----------------------------------------------|---------------------------------------|
| `orders`    | `order.created`                              | orders, on `POST /orders`             |
| `orders`    | `order.approved` / `order.rejected`          | orders, on the outcome of the saga    |
| `orders`    | `order.cancelled`                            | orders, on `POST /orders/{id}/cancel` |
| `customers` | `credit.reserved` / `credit.limit_exceeded`  | customers, on `order.created`         |
|             | / `customer.not_found`                       |                                       |
| `customers` | `credit.released` (compensation)             | customers, on `payment.declined`,     |
|             |                                              | `order.cancelled`, `order.rejected`   |
| `payments`  | `payment.authorized` / `payment.declined`    | payments, on `credit.reserved`        |
| `payments`  | `payment.refunded` (compensation)            | payments, on `order.cancelled`        |

Money is `Decimal` with two decimal places; it travels as a JSON string ("113.13").

Versions: `order.created` is at v2 (it gained `currency`); its upcaster turns a v1 record, from an
older orders release or still on the topic, into v2 for the handlers. `contracts.json` beside
this module is the contract of the last release: `choreo contract check demo_shop --against
demo_shop/contracts.json` must pass before a release (see "Changing an event" in the README).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from pydantic import Field

from choreo import Event

ORDERS = "orders"
CUSTOMERS = "customers"
PAYMENTS = "payments"


# -- orders ------------------------------------------------------------------------------------


class OrderCreated(Event, name="order.created", topic=ORDERS, version=2):
    """A customer placed an order: starts the `order` saga.

    v2 added `currency`. It has a default, yet it is a new version: it changes what `total`
    means, and a consumer still on v1 must dead-letter a v2 record rather than misread a total
    in another currency. v1 orders were all in euros, which is what the upcaster says.
    """

    order_id: str
    customer_id: str
    total: Decimal
    currency: str = Field(default="EUR", pattern=r"^[A-Z]{3}$")
    """ISO 4217 code of `total`."""


@OrderCreated.upcaster(from_version=1)
def order_created_in_euros(payload: dict[str, Any]) -> dict[str, Any]:
    """v1 → v2: every v1 order was in euros. Keep until no v1 record is left on `orders`."""
    return {**payload, "currency": "EUR"}


class OrderApproved(Event, name="order.approved", topic=ORDERS):
    """Credit is reserved and the payment authorized: the saga completed."""

    order_id: str


class OrderRejected(Event, name="order.rejected", topic=ORDERS):
    """The order cannot be fulfilled; `reason` says why, for people."""

    order_id: str
    reason: str
    deadline_passed: bool = False
    """Rejected by the saga's deadline: steps may still be under way and must be undone."""


class OrderDeadlinePassed(Event, name="order.deadline_passed", topic=ORDERS):
    """The `order` saga's deadline: orders schedules it when the saga starts, for itself."""

    order_id: str


class OrderCancelled(Event, name="order.cancelled", topic=ORDERS):
    """An approved order was cancelled: its payment is refunded and its credit released."""

    order_id: str
    customer_id: str


# -- customers ---------------------------------------------------------------------------------


class CreditReserved(Event, name="credit.reserved", topic=CUSTOMERS):
    """`amount` of the customer's credit is held for the order."""

    order_id: str
    customer_id: str
    amount: Decimal


class CreditLimitExceeded(Event, name="credit.limit_exceeded", topic=CUSTOMERS):
    """The order total is more than the customer's available credit."""

    order_id: str
    customer_id: str
    requested: Decimal
    available: Decimal


class CustomerNotFound(Event, name="customer.not_found", topic=CUSTOMERS):
    """The order names a customer the customers service does not know."""

    order_id: str
    customer_id: str


class CreditReleased(Event, name="credit.released", topic=CUSTOMERS, compensates=CreditReserved):
    """The credit held for the order is available again (undoes `credit.reserved`)."""

    order_id: str
    customer_id: str
    amount: Decimal
    reason: str


# -- payments ----------------------------------------------------------------------------------


class PaymentAuthorized(Event, name="payment.authorized", topic=PAYMENTS):
    """The order's total was charged."""

    order_id: str
    payment_id: str
    amount: Decimal


class PaymentDeclined(Event, name="payment.declined", topic=PAYMENTS):
    """The charge was refused; `reason` says why."""

    order_id: str
    amount: Decimal
    reason: str


class PaymentRefunded(Event, name="payment.refunded", topic=PAYMENTS, compensates=PaymentAuthorized):
    """The charge was paid back (undoes `payment.authorized`)."""

    order_id: str
    payment_id: str
    amount: Decimal
