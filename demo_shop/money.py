"""Money: `Decimal` with two decimal places, in pydantic models and in database columns."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any

from pydantic import AfterValidator, Field
from sqlalchemy import BigInteger, Numeric, TypeDecorator
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeEngine

CENT = Decimal("0.01")


def cents(amount: Decimal) -> Decimal:
    """`amount` rounded to whole cents (`1E+2` becomes `100.00`)."""
    return amount.quantize(CENT)


PositiveAmount = Annotated[
    Decimal,
    Field(gt=0, max_digits=12, decimal_places=2, examples=["120.00"]),
    AfterValidator(cents),
]
"""A money amount accepted from clients: positive, at most 10 digits before the point, 2 after."""


class Money(TypeDecorator[Decimal]):
    """NUMERIC(14, 2) on PostgreSQL; whole cents in an INTEGER on SQLite.

    SQLite has no decimal type (SQLAlchemy would round-trip through float), so it stores cents.
    """

    impl = Numeric(14, 2)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(BigInteger())
        return dialect.type_descriptor(Numeric(14, 2))

    def process_bind_param(self, value: Decimal | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        value = cents(Decimal(value))
        return int(value.scaleb(2)) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        if value is None:
            return None
        if dialect.name == "sqlite":
            return cents(Decimal(value).scaleb(-2))
        return cents(Decimal(value))
