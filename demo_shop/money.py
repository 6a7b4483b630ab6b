"""Money: `Decimal` with two decimal places, in pydantic models and in database columns."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, WithJsonSchema
from sqlalchemy import BigInteger, Numeric, TypeDecorator
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeEngine

CENT = Decimal("0.01")


def cents(amount: Decimal) -> Decimal:
    """`amount` rounded to whole cents (`1E+2` becomes `100.00`)."""
    return amount.quantize(CENT)


# Amounts travel as strings: a JSON number is a binary float to most clients, and no JSON Schema
# for numbers can say "at most two decimal places" in a way validators agree on.
AMOUNT_PATTERN = r"^(?:[1-9][0-9]{0,9}(?:\.[0-9]{1,2})?|0\.(?:[1-9][0-9]?|0[1-9]))$"
"""A positive amount with at most 10 digits before the point and 2 after, e.g. "120.00"."""


def _amount_text(value: object) -> object:
    if not isinstance(value, str) or re.fullmatch(AMOUNT_PATTERN, value) is None:
        raise ValueError(
            'an amount is a string like "120.00": positive, at most 10 digits before the point and 2 after'
        )
    return value


PositiveAmount = Annotated[
    Decimal,
    BeforeValidator(_amount_text),
    AfterValidator(cents),
    WithJsonSchema({"type": "string", "pattern": AMOUNT_PATTERN, "examples": ["120.00"]}, mode="validation"),
]
"""A money amount accepted from clients, as a string: positive, at most 10 digits before the point, 2 after."""


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
