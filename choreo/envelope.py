"""The envelope: what travels in Kafka-native headers beside an event's JSON value.

Header names are part of the wire contract; any Kafka tool can read them.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from choreo.exceptions import RejectedRecord

EVENT_ID = "choreo-event-id"
EVENT_TYPE = "choreo-event-type"
EVENT_VERSION = "choreo-event-version"
SAGA_ID = "choreo-saga-id"
CAUSATION_ID = "choreo-causation-id"
PRODUCER = "choreo-producer"
HANDLER = "choreo-handler"
OCCURRED_AT = "choreo-occurred-at"
TRACEPARENT = "traceparent"
CAUSE_UPCAST = "choreo-cause-upcast"

# What reaches a column must fit it (choreo/tables.py): ids are String(64), event types and
# keys String(255); PostgreSQL rejects NUL in text and enforces the lengths SQLite ignores.
# choreo mints ids as uuid strings; others may supply their own, within this charset.
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
ID_LENGTH = 64
NAME_LENGTH = 255


def new_id() -> str:
    """A fresh event or saga id."""
    return str(uuid.uuid4())


def utcnow() -> datetime:
    """The current time, timezone-aware in UTC."""
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Envelope:
    """Identity, correlation and provenance of one event on the wire."""

    event_type: str
    event_version: int
    saga_id: str
    producer: str
    event_id: str = field(default_factory=new_id)
    causation_id: str | None = None
    handler: str | None = None
    occurred_at: datetime = field(default_factory=utcnow)
    traceparent: str | None = None
    cause_upcast: str | None = None
    """`v1→v3` when the handler that emitted this event took its cause upcast from an older version."""

    def to_headers(self) -> dict[str, str]:
        """The envelope as Kafka headers (absent values are left out)."""
        headers = {
            EVENT_ID: self.event_id,
            EVENT_TYPE: self.event_type,
            EVENT_VERSION: str(self.event_version),
            SAGA_ID: self.saga_id,
            PRODUCER: self.producer,
            OCCURRED_AT: self.occurred_at.isoformat(),
        }
        if self.causation_id is not None:
            headers[CAUSATION_ID] = self.causation_id
        if self.handler is not None:
            headers[HANDLER] = self.handler
        if self.traceparent is not None:
            headers[TRACEPARENT] = self.traceparent
        if self.cause_upcast is not None:
            headers[CAUSE_UPCAST] = self.cause_upcast
        return headers

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> Envelope:
        """Parse headers; a missing or malformed required header rejects the record."""
        missing = [h for h in (EVENT_ID, EVENT_TYPE, EVENT_VERSION, SAGA_ID) if not headers.get(h)]
        if missing:
            raise RejectedRecord("missing-header", f"record lacks header(s) {', '.join(missing)}")
        try:
            version = int(headers[EVENT_VERSION])
        except ValueError:
            raise RejectedRecord(
                "bad-header", f"{EVENT_VERSION}={headers[EVENT_VERSION]!r} is not an integer"
            ) from None
        _check_id(EVENT_ID, headers[EVENT_ID])
        if headers.get(CAUSATION_ID):
            _check_id(CAUSATION_ID, headers[CAUSATION_ID])
        _check_text(SAGA_ID, headers[SAGA_ID], ID_LENGTH)
        _check_text(EVENT_TYPE, headers[EVENT_TYPE], NAME_LENGTH)
        occurred = headers.get(OCCURRED_AT)
        try:
            occurred_at = datetime.fromisoformat(occurred) if occurred else utcnow()
        except ValueError:
            raise RejectedRecord("bad-header", f"{OCCURRED_AT}={occurred!r} is not ISO 8601") from None
        return cls(
            event_id=headers[EVENT_ID],
            event_type=headers[EVENT_TYPE],
            event_version=version,
            saga_id=headers[SAGA_ID],
            causation_id=headers.get(CAUSATION_ID),
            producer=headers.get(PRODUCER, ""),
            handler=headers.get(HANDLER),
            occurred_at=occurred_at,
            traceparent=headers.get(TRACEPARENT),
            cause_upcast=headers.get(CAUSE_UPCAST),
        )


def _check_id(name: str, value: str) -> None:
    if not _ID.fullmatch(value):
        raise RejectedRecord(
            "bad-header", f"{name}={value[:80]!r} is not an id (1 to {ID_LENGTH} letters, digits, '.', '_', ':', '-')"
        )


def _check_text(name: str, value: str, limit: int) -> None:
    if len(value) > limit:
        raise RejectedRecord("bad-header", f"{name} is {len(value)} characters long, more than {limit}")
    if _CONTROL.search(value):
        raise RejectedRecord("bad-header", f"{name}={value[:80]!r} contains control characters")


def check_key(key: bytes | None) -> None:
    """Reject a record key choreo could not store again (as an outbox key, e.g. for a dead letter)."""
    if key is None:
        return
    try:
        text = key.decode()
    except UnicodeDecodeError:
        raise RejectedRecord("bad-key", f"key {key[:80]!r} is not UTF-8") from None
    if len(text) > NAME_LENGTH:
        raise RejectedRecord("bad-key", f"key is {len(text)} characters long, more than {NAME_LENGTH}")
    if _CONTROL.search(text):
        raise RejectedRecord("bad-key", f"key {text[:80]!r} contains control characters")


def decode_headers(raw: Iterable[tuple[str, bytes | None]]) -> dict[str, str]:
    """Kafka's (name, bytes) header pairs as a str dict; undecodable values reject the record."""
    headers: dict[str, str] = {}
    for name, value in raw:
        if value is None:
            continue
        try:
            headers[name] = value.decode()
        except UnicodeDecodeError:
            raise RejectedRecord("bad-header", f"header {name!r} is not UTF-8") from None
    return headers
