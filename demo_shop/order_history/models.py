"""The order history's one table (in its own database), filled only from events."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from sqlalchemy import MetaData, String
from sqlalchemy.orm import registry
from sqlmodel import Field, SQLModel

from choreo.tables import UtcDateTime
from demo_shop.money import Money

metadata = MetaData()


class Base(SQLModel, registry=registry(metadata=metadata)):
    """Tables of the order history database."""


class OrderHistory(Base, table=True):
    """What the events said about one order, one column per fact.

    Events of one order arrive on three topics, so in no fixed order across them: each event
    sets only its own columns, and the state is derived from which facts are known. The
    projection is then the same whatever the order of arrival, which is what makes a rebuild
    equal to the live table.
    """

    __tablename__ = "order_history"

    order_id: str = Field(primary_key=True, sa_type=String(64))
    saga_id: str = Field(sa_type=String(64))
    customer_id: str | None = Field(default=None, sa_type=String(64), index=True)
    total: Decimal | None = Field(default=None, sa_type=Money)
    currency: str | None = Field(default=None, sa_type=String(3))
    placed_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    credit_reserved_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    credit_refused: str | None = Field(default=None, sa_type=String(500))
    credit_released_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    payment_id: str | None = Field(default=None, sa_type=String(64))
    paid: Decimal | None = Field(default=None, sa_type=Money)
    paid_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    payment_declined: str | None = Field(default=None, sa_type=String(500))
    refunded_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    approved_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    rejected_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    rejection_reason: str | None = Field(default=None, sa_type=String(500))
    cancelled_at: datetime | None = Field(default=None, sa_type=UtcDateTime)

    @property
    def state(self) -> str:
        """PENDING, APPROVED, REJECTED or CANCELLED, from the facts known."""
        if self.cancelled_at is not None:
            return "CANCELLED"
        if self.rejected_at is not None:
            return "REJECTED"
        return "APPROVED" if self.approved_at is not None else "PENDING"

    @property
    def payment(self) -> str | None:
        """AUTHORIZED, DECLINED, REFUNDED, or None before payments decided."""
        if self.refunded_at is not None:
            return "REFUNDED"
        if self.paid_at is not None:
            return "AUTHORIZED"
        return "DECLINED" if self.payment_declined is not None else None
