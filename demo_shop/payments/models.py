"""The payments service's tables (in its own database)."""

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
    """Tables of the payments database."""


def now() -> datetime:
    return datetime.now(UTC)


class PaymentState(StrEnum):
    """AUTHORIZED may later become REFUNDED; DECLINED is final; VOID (the order was rejected
    before any charge) becomes DECLINED if the credit reservation still arrives."""

    AUTHORIZED = "AUTHORIZED"
    DECLINED = "DECLINED"
    REFUNDED = "REFUNDED"
    VOID = "VOID"


class Payment(Base, table=True):
    """The one payment attempt of an order."""

    __tablename__ = "payments"

    id: str = Field(primary_key=True, sa_type=String(64))
    order_id: str = Field(sa_type=String(64), unique=True)
    customer_id: str = Field(sa_type=String(64), index=True)
    amount: Decimal = Field(sa_type=Money)
    state: str = Field(sa_type=String(16))
    decline_reason: str | None = Field(default=None, sa_type=String(200))
    created_at: datetime = Field(default_factory=now, sa_type=UtcDateTime)
    refunded_at: datetime | None = Field(default=None, sa_type=UtcDateTime)


metadata = Base.metadata
