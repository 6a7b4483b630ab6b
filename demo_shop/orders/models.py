"""The orders service's tables (in its own database)."""

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
    """Tables of the orders database."""


class OrderState(StrEnum):
    """Where an order stands: PENDING until the saga decides, then one of the others."""

    PENDING = "PENDING"
    APPROVED = "APPROVED"
    REJECTED = "REJECTED"
    CANCELLED = "CANCELLED"


def now() -> datetime:
    return datetime.now(UTC)


class Order(Base, table=True):
    """An order and the saga that decides it."""

    __tablename__ = "orders"

    id: str = Field(primary_key=True, sa_type=String(64))
    customer_id: str = Field(sa_type=String(64), index=True)
    total: Decimal = Field(sa_type=Money)
    state: str = Field(default=OrderState.PENDING, sa_type=String(16), index=True)
    rejection_reason: str | None = Field(default=None, sa_type=String(500))
    saga_id: str = Field(sa_type=String(64), unique=True)
    created_at: datetime = Field(default_factory=now, sa_type=UtcDateTime)
    updated_at: datetime = Field(default_factory=now, sa_type=UtcDateTime)

    def move_to(self, state: OrderState, reason: str | None = None) -> None:
        """Record a state change (the caller checks it is allowed)."""
        self.state = state
        self.rejection_reason = reason
        self.updated_at = now()


metadata = Base.metadata
