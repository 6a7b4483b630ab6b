"""The customers service's tables (in its own database)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum

from sqlalchemy import MetaData, String
from sqlalchemy.orm import registry
from sqlmodel import Field, SQLModel

from choreo.tables import UtcDateTime
from demo_shop.money import Money


class Base(SQLModel, registry=registry(metadata=MetaData())):
    """Tables of the customers database."""


def now() -> datetime:
    return datetime.now(UTC)


class Customer(Base, table=True):
    """A customer and how much of their credit limit open orders hold.

    `credit_reserved` always equals the sum of the customer's RESERVED reservations; both are
    changed in one transaction that holds the customer's row lock.
    """

    __tablename__ = "customers"

    id: str = Field(primary_key=True, sa_type=String(64))
    name: str = Field(sa_type=String(200))
    credit_limit: Decimal = Field(sa_type=Money)
    credit_reserved: Decimal = Field(default=Decimal("0.00"), sa_type=Money)
    created_at: datetime = Field(default_factory=now, sa_type=UtcDateTime)

    @property
    def available_credit(self) -> Decimal:
        """What new orders may still reserve."""
        return self.credit_limit - self.credit_reserved


class ReservationState(StrEnum):
    """A reservation holds credit until it is released (once, for good)."""

    RESERVED = "RESERVED"
    RELEASED = "RELEASED"


class Reservation(Base, table=True):
    """The credit one order holds; at most one per order."""

    __tablename__ = "reservations"

    order_id: str = Field(primary_key=True, sa_type=String(64))
    customer_id: str = Field(sa_type=String(64), index=True, foreign_key="customers.id")
    amount: Decimal = Field(sa_type=Money)
    state: str = Field(default=ReservationState.RESERVED, sa_type=String(16))
    created_at: datetime = Field(default_factory=now, sa_type=UtcDateTime)
    released_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    release_reason: str | None = Field(default=None, sa_type=String(200))


metadata = Base.metadata
