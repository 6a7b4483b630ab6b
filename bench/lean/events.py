"""The lean services' messages: JSON bodies with a `type` header, as the FastStream baseline sends.

Amounts travel as strings ("12.34"), as pydantic's JSON mode writes the baseline's Decimals.
"""

from __future__ import annotations

import json
from typing import Any

TOPICS = {
    "order.created": "orders",
    "order.approved": "orders",
    "order.rejected": "orders",
    "credit.reserved": "customers",
    "credit.refused": "customers",
    "payment.authorized": "payments",
    "payment.declined": "payments",
}
"""The topic (without the run's prefix) each event type is published on."""

Headers = list[tuple[str, bytes]]


def encode(type_name: str, body: dict[str, str]) -> tuple[bytes, Headers]:
    """A record's value and headers."""
    return json.dumps(body).encode(), [("type", type_name.encode()), ("content-type", b"application/json")]


def decode(value: bytes | None, headers: Any) -> tuple[str | None, dict[str, Any]]:
    """The `type` header (None when missing) and the JSON body of a consumed record."""
    kind = next((v.decode() for k, v in headers if k == "type"), None)
    return kind, json.loads(value) if value else {}
