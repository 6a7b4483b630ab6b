"""Saga tracing: collect every choreo record by saga id, then rebuild each saga as a causal tree.

    collector = TraceCollector([orders, customers, payments], "sqlite+aiosqlite:///trace.db")
    async with collector.running():
        ...
    store = TraceStore("sqlite+aiosqlite:///trace.db")
    trace = await store.trace(saga_id)      # SagaTrace: roots, state, ended_by, stopped_at

The collector is a consumer group of its own (`choreo-trace`) on the topics of the services it
is given and on their dead-letter topics. It indexes the envelope headers of each record, never
the payload, in a database of its own. The headers suffice: the saga id groups the records, the
causation id links each event to the one its handler consumed, and a dead letter carries the
headers of the event it failed on. `choreo trace`, `choreo sagas` and anything embedding a
`TraceStore` read that index.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    delete,
    func,
    insert,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from choreo import deadletters
from choreo.database import create_engine, insert_ignoring_duplicates, masked_url, normalize_url, require_existing
from choreo.envelope import (
    CAUSATION_ID,
    CAUSE_UPCAST,
    EVENT_ID,
    EVENT_TYPE,
    EVENT_VERSION,
    HANDLER,
    OCCURRED_AT,
    PRODUCER,
    SAGA_ID,
    TRACEPARENT,
    decode_headers,
    utcnow,
)
from choreo.exceptions import ConfigurationError, RejectedRecord
from choreo.kafka import KafkaTransport, Record
from choreo.saga import Saga
from choreo.service import Service, quiet, wait_for_dependency
from choreo.settings import KafkaSettings, start_timeout
from choreo.tables import UtcDateTime

log = logging.getLogger("choreo.tracing")

DATABASE_URL_ENV = "CHOREO_TRACE_DATABASE_URL"
DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///choreo-trace.db"
DEFAULT_GROUP_ID = "choreo-trace"
MIN_PREFIX = 4
"""The fewest characters of a saga id that `choreo trace` looks up as a prefix."""

EVENT = "event"
DEAD_LETTER = "dead-letter"


def default_database_url(env: Mapping[str, str] | None = None) -> str:
    """`$CHOREO_TRACE_DATABASE_URL`, else `sqlite+aiosqlite:///choreo-trace.db`."""
    env = os.environ if env is None else env
    return env.get(DATABASE_URL_ENV, "").strip() or DEFAULT_DATABASE_URL


# -- the index ---------------------------------------------------------------------------------

trace_metadata = MetaData()
"""The trace database's tables: `choreo_trace_event`, `choreo_trace_saga` and the summaries."""

events_table = Table(
    "choreo_trace_event",
    trace_metadata,
    Column("id", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True),
    Column("kind", String(16), nullable=False),
    Column("event_id", String(64), nullable=False),
    # Empty for events; for a dead letter, the handler (or service) that parked it: one event can
    # fail in several consumers, and each failure is a fact of its own.
    Column("consumer", String(255), nullable=False, default=""),
    Column("saga_id", String(64), nullable=False),
    Column("event_type", String(255), nullable=False),
    Column("event_version", Integer, nullable=False),
    Column("causation_id", String(64)),
    Column("producer", String(63), nullable=False),
    Column("handler", String(255)),
    Column("occurred_at", UtcDateTime, nullable=False),
    Column("published_at", UtcDateTime),
    Column("topic", String(249), nullable=False),
    Column("partition", Integer, nullable=False),
    Column("offset", BigInteger, nullable=False),
    Column("compensates", JSON, nullable=False),
    Column("is_compensation", Boolean, nullable=False),
    Column("reason", String(64)),
    Column("error", Text),
    Column("traceparent", String(64)),
    Column("cause_upcast", String(32)),
    Column("recorded_at", UtcDateTime, nullable=False),
    # The dedup key: a record delivered or published twice is indexed once.
    UniqueConstraint("event_id", "kind", "consumer", name="uq_choreo_trace_event"),
    Index("ix_choreo_trace_event_saga", "saga_id", "occurred_at"),
    Index("ix_choreo_trace_event_time", "occurred_at"),
)

sagas_table = Table(
    "choreo_trace_saga",
    trace_metadata,
    Column("name", String(255), primary_key=True),
    Column("service", String(63), nullable=False),
    Column("starts", String(255), nullable=False),
    Column("ends", JSON, nullable=False),
    Column("deadline_seconds", Float),
    Column("timeout_event", String(255)),
)

summaries_table = Table(
    "choreo_trace_summary",
    trace_metadata,
    # One row per saga, rewritten whenever a record of the saga is indexed: lists, filters and
    # counts read this table through its indexes instead of grouping every event.
    Column("saga_id", String(64), primary_key=True),
    Column("saga", String(255), nullable=False),
    Column("state", String(16), nullable=False),
    Column("started_at", UtcDateTime, nullable=False),
    Column("last_at", UtcDateTime, nullable=False),
    Column("ended_at", UtcDateTime),
    # When an unfinished saga becomes overdue: its state is stored as in flight, and a reader
    # compares this with its own clock.
    Column("deadline_at", UtcDateTime),
    Column("services", String(1024), nullable=False),
    Column("hops", Integer, nullable=False),
    Column("compensations", Integer, nullable=False),
    Column("dead_letters", Integer, nullable=False),
    Index("ix_choreo_trace_summary_started", "started_at"),
    Index("ix_choreo_trace_summary_state", "state", "started_at"),
    Index("ix_choreo_trace_summary_saga", "saga", "started_at"),
)

summary_services_table = Table(
    "choreo_trace_summary_service",
    trace_metadata,
    # The summary once per service the saga touched, so "sagas through payments" and their
    # counts per state are read from an index too.
    Column("service", String(63), primary_key=True),
    Column("saga_id", String(64), primary_key=True),
    Column("saga", String(255), nullable=False),
    Column("state", String(16), nullable=False),
    Column("started_at", UtcDateTime, nullable=False),
    Column("deadline_at", UtcDateTime),
    Index("ix_choreo_trace_summary_service_started", "service", "started_at"),
    Index("ix_choreo_trace_summary_service_state", "service", "state", "started_at"),
)


@dataclass(frozen=True)
class TracedEvent:
    """One indexed record: an event, or a dead letter of the event with the same `event_id`."""

    kind: str
    event_id: str
    saga_id: str
    event_type: str
    event_version: int
    causation_id: str | None
    producer: str
    handler: str | None
    occurred_at: datetime
    topic: str
    partition: int
    offset: int
    published_at: datetime | None = None
    compensates: tuple[str, ...] = ()
    consumer: str = ""
    reason: str | None = None
    error: str | None = None
    traceparent: str | None = None
    cause_upcast: str | None = None
    """`v1→v3` when the handler that emitted this event took its cause upcast from an older version."""

    @property
    def is_dead_letter(self) -> bool:
        """True for a dead letter (the failure of `consumer` on event `event_id`)."""
        return self.kind == DEAD_LETTER

    @property
    def is_compensation(self) -> bool:
        """True when the event type undoes another (`compensates=` on its class)."""
        return bool(self.compensates)

    @property
    def by(self) -> str:
        """`service.handler`, or the service alone for events emitted outside handlers."""
        return self.handler or self.producer

    def to_row(self, recorded_at: datetime) -> dict[str, Any]:
        """The row stored in `choreo_trace_event`."""
        return {
            "kind": self.kind,
            "event_id": self.event_id,
            "consumer": self.consumer,
            "saga_id": self.saga_id,
            "event_type": self.event_type,
            "event_version": self.event_version,
            "causation_id": self.causation_id,
            "producer": self.producer,
            "handler": self.handler,
            "occurred_at": self.occurred_at,
            "published_at": self.published_at,
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "compensates": list(self.compensates),
            "is_compensation": self.is_compensation,
            "reason": self.reason,
            "error": self.error,
            "traceparent": self.traceparent,
            "cause_upcast": self.cause_upcast,
            "recorded_at": recorded_at,
        }

    @classmethod
    def from_row(cls, row: Any) -> TracedEvent:
        """Read a `choreo_trace_event` row."""
        return cls(
            kind=row.kind,
            event_id=row.event_id,
            saga_id=row.saga_id,
            event_type=row.event_type,
            event_version=row.event_version,
            causation_id=row.causation_id,
            producer=row.producer,
            handler=row.handler,
            occurred_at=row.occurred_at,
            topic=row.topic,
            partition=row.partition,
            offset=row.offset,
            published_at=row.published_at,
            compensates=tuple(row.compensates or ()),
            consumer=row.consumer,
            reason=row.reason,
            error=row.error,
            traceparent=row.traceparent,
            cause_upcast=row.cause_upcast,
        )


def index_record(record: Record, compensations: Mapping[str, tuple[str, ...]] | None = None) -> TracedEvent | None:
    """What the collector indexes for `record`: None for a record without choreo headers.

    `compensations` maps wire names to the wire names they compensate.
    """
    try:
        headers = decode_headers(record.headers)
    except RejectedRecord:
        return None
    event_id, saga_id, event_type = headers.get(EVENT_ID), headers.get(SAGA_ID), headers.get(EVENT_TYPE)
    if not event_id or not saga_id or not event_type:
        return None
    published_at = datetime.fromtimestamp(record.timestamp_ms / 1000, UTC) if record.timestamp_ms is not None else None
    try:
        occurred_at = datetime.fromisoformat(headers[OCCURRED_AT])
        if occurred_at.tzinfo is None:
            occurred_at = occurred_at.replace(tzinfo=UTC)
    except (KeyError, ValueError):
        occurred_at = published_at or utcnow()
    try:
        version = int(headers.get(EVENT_VERSION, "0"))
    except ValueError:
        version = 0
    letter = deadletters.REASON in headers
    event = TracedEvent(
        kind=DEAD_LETTER if letter else EVENT,
        event_id=event_id,
        saga_id=saga_id,
        event_type=event_type,
        event_version=version,
        causation_id=(headers.get(CAUSATION_ID) or None),
        producer=headers.get(PRODUCER, ""),
        handler=headers.get(HANDLER) or None,
        occurred_at=occurred_at,
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        published_at=published_at,
        compensates=(compensations or {}).get(event_type, ()),
        consumer=headers.get(deadletters.CONSUMER, "unknown") if letter else "",
        reason=headers.get(deadletters.REASON) if letter else None,
        error=headers.get(deadletters.ERROR) if letter else None,
        traceparent=(headers.get(TRACEPARENT) or None),
        cause_upcast=headers.get(CAUSE_UPCAST, "")[:32] or None,
    )
    # Headers come from any producer: a NUL or an over-long value must not make the insert
    # fail, which would stall the collector on that record forever. Cut to fit, cleaned.
    cleaned: dict[str, Any] = {
        name: deadletters.fit(events_table, name, value)
        for name, value in vars(event).items()
        if isinstance(value, str) and name in events_table.c
    }
    return dataclasses.replace(event, **cleaned)


# -- saga declarations, as the trace database keeps them ---------------------------------------


@dataclass(frozen=True)
class SagaDeclaration:
    """What tracing needs of a `Saga`: its wire names and deadline, storable without the classes."""

    name: str
    starts: str
    ends: frozenset[str]
    deadline: timedelta | None = None
    timeout_event: str | None = None
    service: str = ""

    @classmethod
    def of(cls, saga: Saga, service: str = "") -> SagaDeclaration:
        """The declaration of a `Saga` declared by `service`."""
        return cls(
            name=saga.name,
            starts=saga.starts.event_name,
            ends=saga.end_names,
            deadline=saga.deadline,
            timeout_event=saga.timeout_event.event_name if saga.timeout_event else None,
            service=service,
        )


def declarations_of(services: Iterable[Service]) -> list[SagaDeclaration]:
    """The sagas the services declare."""
    return [SagaDeclaration.of(saga, service.name) for service in services for saga in service.sagas]


def compensations_of(services: Iterable[Service]) -> dict[str, tuple[str, ...]]:
    """Wire name -> wire names it compensates, for every compensating event the services know."""
    found: dict[str, set[str]] = {}
    for service in services:
        for event_type in service.registry:
            if event_type.compensates:
                found.setdefault(event_type.event_name, set()).update(t.event_name for t in event_type.compensates)
    return {name: tuple(sorted(undone)) for name, undone in found.items()}


# -- the trace model ---------------------------------------------------------------------------


class SagaState(StrEnum):
    """Where a saga is, judged from its events and its declaration."""

    COMPLETED = "completed"
    """An end event was seen and nothing was compensated."""
    COMPENSATED = "compensated"
    """An end event was seen and compensations occurred."""
    FAILED = "failed"
    """A dead letter stopped it before any end."""
    IN_FLIGHT = "in-flight"
    """No end, no dead letter: it is still going (or waiting on a service that is down)."""
    OVERDUE = "overdue"
    """In flight for longer than its declared deadline."""
    UNKNOWN = "unknown"
    """No declaration says how it ends, and nothing failed or was compensated."""


@dataclass(eq=False)
class Hop:
    """One event in a saga's causal tree, with the dead letters of its consumers."""

    event: TracedEvent
    parent: Hop | None = None
    children: list[Hop] = field(default_factory=list)
    dead_letters: list[TracedEvent] = field(default_factory=list)
    seen: bool = True
    """False when the event itself was not collected and is known only from a dead letter."""

    @property
    def latency(self) -> timedelta | None:
        """Time from the parent event to this one (the consumer's reaction, both commits included)."""
        return None if self.parent is None else self.event.occurred_at - self.parent.event.occurred_at

    @property
    def publish_delay(self) -> timedelta | None:
        """Time from emit to Kafka's timestamp (outbox and relay), when the timestamp is known."""
        if self.event.published_at is None or not self.seen:
            return None
        return self.event.published_at - self.event.occurred_at

    @property
    def depth(self) -> int:
        """0 for a root."""
        return 0 if self.parent is None else self.parent.depth + 1

    def walk(self) -> Iterator[Hop]:
        """This hop and its descendants, depth first, children in time order."""
        yield self
        for child in self.children:
            yield from child.walk()


def _order(event: TracedEvent) -> tuple[Any, ...]:
    return (event.occurred_at, event.published_at or event.occurred_at, event.topic, event.partition, event.offset)


@dataclass(eq=False)
class SagaTrace:
    """A saga rebuilt from its records: a causal tree (a forest, if records are missing) and a state."""

    saga_id: str
    roots: list[Hop]
    state: SagaState
    declaration: SagaDeclaration | None
    started_at: datetime
    last_at: datetime
    ended_by: Hop | None
    now: datetime

    def hops(self) -> Iterator[Hop]:
        """Every hop, depth first, roots and children in time order."""
        for root in self.roots:
            yield from root.walk()

    @property
    def ended_after(self) -> timedelta | None:
        """From the start to the saga's end event; None while no end was seen."""
        return None if self.ended_by is None else self.ended_by.event.occurred_at - self.started_at

    @property
    def settled_after(self) -> timedelta:
        """From the start to the last event seen, compensations and cancellations after the end included."""
        return self.last_at - self.started_at

    @property
    def duration(self) -> timedelta:
        """`ended_after` once the saga ended, else `settled_after` (how long it has been going)."""
        ended = self.ended_after
        return self.settled_after if ended is None else ended

    @property
    def compensations(self) -> list[Hop]:
        """Hops whose event compensates another."""
        return [hop for hop in self.hops() if hop.event.is_compensation]

    @property
    def dead_lettered(self) -> list[Hop]:
        """Hops on which some consumer gave up."""
        return [hop for hop in self.hops() if hop.dead_letters]

    @property
    def stopped_at(self) -> list[Hop]:
        """Where an unfinished saga stands: its dead-lettered hops, else its latest leaves."""
        if self.ended_by is not None:
            return []
        if self.dead_lettered:
            return self.dead_lettered
        leaves = [hop for hop in self.hops() if not hop.children]
        return sorted(leaves, key=lambda hop: _order(hop.event))

    @property
    def services(self) -> list[str]:
        """Services that emitted an event of the saga, in order of first appearance."""
        seen: dict[str, None] = {}
        for hop in sorted(self.hops(), key=lambda h: _order(h.event)):
            seen.setdefault(hop.event.producer, None)
        return list(seen)

    def offset(self, hop: Hop) -> timedelta:
        """When `hop` happened, counted from the saga's first event."""
        return hop.event.occurred_at - self.started_at

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description: state, timing and the causal tree."""

        def ms(delta: timedelta | None) -> float | None:
            return None if delta is None else round(delta.total_seconds() * 1000, 3)

        def node(hop: Hop) -> dict[str, Any]:
            event = hop.event
            return {
                "event_id": event.event_id,
                "event_type": event.event_type,
                "event_version": event.event_version,
                "causation_id": event.causation_id,
                "producer": event.producer,
                "handler": event.handler,
                "occurred_at": event.occurred_at.isoformat(),
                "published_at": event.published_at.isoformat() if event.published_at else None,
                "offset_ms": ms(self.offset(hop)),
                "latency_ms": ms(hop.latency),
                "publish_delay_ms": ms(hop.publish_delay),
                "topic": event.topic if hop.seen else None,
                "partition": event.partition if hop.seen else None,
                "kafka_offset": event.offset if hop.seen else None,
                "compensation": event.is_compensation,
                "compensates": list(event.compensates),
                "seen": hop.seen,
                "traceparent": event.traceparent,
                "cause_upcast": event.cause_upcast,
                "dead_letters": [
                    {
                        "consumer": letter.consumer,
                        "reason": letter.reason,
                        "error": letter.error,
                        "topic": letter.topic,
                        "published_at": letter.published_at.isoformat() if letter.published_at else None,
                    }
                    for letter in hop.dead_letters
                ],
                "children": [node(child) for child in hop.children],
            }

        declaration = self.declaration
        return {
            "saga_id": self.saga_id,
            "saga": declaration.name if declaration else None,
            "state": self.state.value,
            "started_at": self.started_at.isoformat(),
            "last_event_at": self.last_at.isoformat(),
            "duration_ms": ms(self.duration),
            "ended_ms": ms(self.ended_after),
            "settled_ms": ms(self.settled_after),
            "deadline_ms": ms(declaration.deadline) if declaration else None,
            "ended_by": self.ended_by.event.event_type if self.ended_by else None,
            "stopped_at": [
                {
                    "event_id": hop.event.event_id,
                    "event_type": hop.event.event_type,
                    "dead_letters": [letter.consumer for letter in hop.dead_letters],
                }
                for hop in self.stopped_at
            ],
            "services": self.services,
            "events": sum(1 for hop in self.hops() if hop.seen),
            "compensations": [hop.event.event_type for hop in self.compensations],
            "dead_letters": sum(len(hop.dead_letters) for hop in self.hops()),
            "roots": [node(root) for root in self.roots],
        }

    def to_mermaid(self) -> str:
        """A Mermaid `sequenceDiagram` of the saga, fenced for Markdown."""
        lines = ["```mermaid", "sequenceDiagram"]
        participants: dict[str, None] = {}
        for hop in sorted(self.hops(), key=lambda h: _order(h.event)):
            participants.setdefault(hop.event.producer or "unknown", None)
            for letter in hop.dead_letters:
                participants.setdefault(_service_of(letter), None)
        lines += [f"    participant {_mermaid_id(name)} as {_mermaid_text(name)}" for name in participants]
        title = f"saga {self.declaration.name} " if self.declaration else "saga "
        lines.append(f"    Note over {_mermaid_id(next(iter(participants)))}: {_mermaid_text(title + self.saga_id)}")

        def describe(hop: Hop) -> str:
            marks = " ↺" if hop.event.is_compensation else ""
            if hop.event.cause_upcast and hop.parent is not None:
                marks += f" (took {hop.parent.event.event_type} upcast {hop.event.cause_upcast})"
            timing = f" ({_format_ms(hop.latency)})" if hop.latency is not None else ""
            return _mermaid_text(f"{hop.event.by} emits {hop.event.event_type}{marks}{timing}")

        def draw(hop: Hop) -> None:
            here = _mermaid_id(hop.event.producer or "unknown")
            if hop.parent is None:
                lines.append(f"    Note over {here}: {describe(hop)}")
            for letter in hop.dead_letters:
                failed = _mermaid_id(_service_of(letter))
                lines.append(f"    {here}-x{failed}: {_mermaid_text(hop.event.event_type)}")
                lines.append(
                    f"    Note over {failed}: {_mermaid_text(f'✗ {letter.consumer}: {letter.reason}: {letter.error}')}"
                )
            for child in hop.children:
                there = _mermaid_id(child.event.producer or "unknown")
                lines.append(f"    {here}->>{there}: {_mermaid_text(hop.event.event_type)}")
                lines.append(f"    Note over {there}: {describe(child)}")
            for child in hop.children:
                draw(child)

        for root in self.roots:
            draw(root)
        last = _mermaid_id(next(reversed(participants)))
        lines.append(f"    Note over {last}: {_mermaid_text(self.summary())}")
        lines.append("```")
        return "\n".join(lines)

    def summary(self) -> str:
        """The closing line: `ended: <event> ...` or `stopped at: ...`."""
        if self.ended_by is not None:
            hop = self.ended_by
            text = f"ended: {hop.event.event_type} ({hop.event.by}) after {_format_ms(self.duration)}"
            if self.compensations:
                text += f", compensated by {', '.join(h.event.event_type for h in self.compensations)}"
            return text
        places = []
        for hop in self.stopped_at:
            place = f"{hop.event.event_type} ({hop.event.by})"
            for letter in hop.dead_letters:
                place += f" ✗ {letter.consumer}: {letter.reason}: {letter.error}"
            places.append(place)
        text = f"stopped at: {'; '.join(places)}"
        declaration = self.declaration
        if self.state is SagaState.OVERDUE and declaration is not None and declaration.deadline is not None:
            late = self.now - self.started_at - declaration.deadline
            text += f" — overdue by {_format_span(late)} (deadline {_format_span(declaration.deadline)})"
        elif self.state in (SagaState.IN_FLIGHT, SagaState.UNKNOWN):
            text += f" — {self.state.value}, last event {_format_span(self.now - self.last_at)} ago"
        return text


def _service_of(letter: TracedEvent) -> str:
    """The service that parked a dead letter (its topic is `<service>.dead-letters`)."""
    suffix = deadletters.topic_for("")
    if letter.topic.endswith(suffix) and len(letter.topic) > len(suffix):
        return letter.topic[: -len(suffix)]
    return letter.consumer.split(".", 1)[0] or "unknown"


# Words Mermaid's sequence-diagram grammar reserves: a participant must not be called one of them.
_MERMAID_WORDS = frozenset(
    """actor activate alt and autonumber box break create critical deactivate destroy else end left
    link links loop note of opt over par participant rect right title""".split()  # noqa: SIM905
)


def _mermaid_id(name: str) -> str:
    ident = "".join(ch if ch.isalnum() else "_" for ch in name) or "unknown"
    return f"{ident}_" if ident.lower() in _MERMAID_WORDS else ident  # a service may be called "box"


def _mermaid_text(text: str) -> str:
    # Mermaid reads ';' and '#' as syntax and ends a message at a newline.
    cleaned = " ".join(text.split()).replace(";", ",").replace("#", "no. ")
    return cleaned if len(cleaned) <= 160 else cleaned[:157] + "..."


def _format_ms(delta: timedelta | None) -> str:
    if delta is None:
        return "—"
    millis = delta.total_seconds() * 1000
    if abs(millis) >= 10_000:
        return f"{millis / 1000:.1f} s"
    return f"{millis:.1f} ms"


def _format_span(delta: timedelta) -> str:
    seconds = delta.total_seconds()
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def build_trace(
    saga_id: str,
    records: Sequence[TracedEvent],
    declarations: Iterable[SagaDeclaration] = (),
    *,
    now: datetime | None = None,
) -> SagaTrace:
    """Rebuild a saga from its indexed records (in any order) and classify it.

    Each event hangs under the event its causation id names; an event whose cause was not
    collected becomes a root. A dead letter hangs on the event it failed on (same event id);
    if that event was not collected, the letter's headers stand in for it.
    """
    if not records:
        raise ValueError(f"saga {saga_id!r} has no records")
    now = now or utcnow()
    hops: dict[str, Hop] = {}
    for event in sorted((r for r in records if not r.is_dead_letter), key=_order):
        hops.setdefault(event.event_id, Hop(event))
    for letter in sorted((r for r in records if r.is_dead_letter), key=_order):
        hop = hops.get(letter.event_id)
        if hop is None:
            stand_in = TracedEvent(
                kind=EVENT,
                event_id=letter.event_id,
                saga_id=letter.saga_id,
                event_type=letter.event_type,
                event_version=letter.event_version,
                causation_id=letter.causation_id,
                producer=letter.producer,
                handler=letter.handler,
                occurred_at=letter.occurred_at,
                topic=letter.topic,
                partition=letter.partition,
                offset=letter.offset,
                compensates=letter.compensates,
                traceparent=letter.traceparent,
            )
            hop = hops[letter.event_id] = Hop(stand_in, seen=False)
        hop.dead_letters.append(letter)
    roots: list[Hop] = []
    for hop in sorted(hops.values(), key=lambda h: _order(h.event)):
        cause = hops.get(hop.event.causation_id or "")
        if cause is None or cause is hop or _descends_from(cause, hop):
            roots.append(hop)  # no collected cause (or a corrupt cycle): start a tree here
        else:
            hop.parent = cause
            cause.children.append(hop)
    everything = list(hops.values())
    started_at = min(h.event.occurred_at for h in everything)
    last_at = max(h.event.occurred_at for h in everything)
    declaration, start = _declaration_for(roots, everything, list(declarations))
    if start is not None:
        started_at = start.event.occurred_at
    ended_by = None
    if declaration is not None:
        ends = [h for h in everything if h.seen and h.event.event_type in declaration.ends]
        ended_by = min(ends, key=lambda h: _order(h.event)) if ends else None
    state = _classify(declaration, ended_by, everything, started_at, now)
    return SagaTrace(saga_id, roots, state, declaration, started_at, last_at, ended_by, now)


def _descends_from(hop: Hop, ancestor: Hop) -> bool:
    node: Hop | None = hop
    while node is not None:
        if node is ancestor:
            return True
        node = node.parent
    return False


def _declaration_for(
    roots: list[Hop], everything: list[Hop], declarations: list[SagaDeclaration]
) -> tuple[SagaDeclaration | None, Hop | None]:
    by_start = {d.starts: d for d in declarations}
    for hop in [*roots, *sorted(everything, key=lambda h: _order(h.event))]:
        if hop.event.event_type in by_start:
            return by_start[hop.event.event_type], hop
    # The start was not collected (yet): an end event still tells which saga this is.
    for declaration in declarations:
        if any(h.event.event_type in declaration.ends for h in everything):
            return declaration, None
    return None, None


def _classify(
    declaration: SagaDeclaration | None,
    ended_by: Hop | None,
    hops: list[Hop],
    started_at: datetime,
    now: datetime,
) -> SagaState:
    compensated = any(h.event.is_compensation for h in hops if h.seen)
    failed = any(h.dead_letters for h in hops)
    if declaration is None:
        if failed:
            return SagaState.FAILED
        return SagaState.COMPENSATED if compensated else SagaState.UNKNOWN
    if ended_by is not None:
        return SagaState.COMPENSATED if compensated else SagaState.COMPLETED
    if failed:
        return SagaState.FAILED
    if declaration.deadline is not None and now - started_at > declaration.deadline:
        return SagaState.OVERDUE
    return SagaState.IN_FLIGHT


# -- the store ---------------------------------------------------------------------------------


def _add_new_columns(conn: Connection) -> None:
    # The trace database is an index that outlives choreo upgrades (the demo keeps its file):
    # a nullable column added in a later release is added to an older table, empty.
    present = {column["name"] for column in inspect(conn).get_columns(events_table.name)}
    for column in events_table.columns:
        if column.name not in present and column.nullable:
            name, kind = conn.dialect.identifier_preparer.quote(column.name), column.type.compile(dialect=conn.dialect)
            conn.execute(text(f"ALTER TABLE {events_table.name} ADD COLUMN {name} {kind}"))


class TraceStore:
    """The trace database: written by the collector, read by `choreo trace` and `choreo sagas`."""

    def __init__(self, database_url: str | None = None) -> None:
        self.url = normalize_url(database_url or default_database_url())
        self._engine: AsyncEngine | None = None

    def __repr__(self) -> str:
        return f"TraceStore({masked_url(self.url)!r})"

    @property
    def engine(self) -> AsyncEngine:
        """The database engine (after `open()`)."""
        if self._engine is None:
            raise ConfigurationError("the trace store is not open: call `await store.open()` first")
        return self._engine

    async def open(self, *, create: bool = True) -> None:
        """Connect and create the tables. `create=False` refuses a SQLite file that does not exist."""
        if self._engine is not None:
            return
        if not create:
            require_existing(
                self.url,
                "trace database",
                f"run `choreo collect <app>` to fill it, or pass --db / set {DATABASE_URL_ENV}",
            )
        self._engine = create_engine(self.url)
        async with self._engine.begin() as conn:
            await conn.run_sync(trace_metadata.create_all)
            await conn.run_sync(_add_new_columns)

    async def close(self) -> None:
        """Close connections. Safe to call twice."""
        if self._engine is not None:
            await self._engine.dispose()
            self._engine = None

    async def __aenter__(self) -> TraceStore:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def add(self, event: TracedEvent) -> bool:
        """Index `event`; False when it was indexed before (same event id, kind and consumer)."""
        return (await self.add_all([event]))[0]

    async def add_all(self, events: Sequence[TracedEvent]) -> list[bool]:
        """Index several events in one transaction; per event, False when it was indexed before."""
        added: list[bool] = []
        if not events:
            return added
        now = utcnow()
        async with self.engine.begin() as conn:
            statement = insert_ignoring_duplicates(events_table, conn.dialect.name)
            for event in events:
                # One statement per row: its rowcount tells a new row from a duplicate.
                result = await conn.execute(statement.values(**event.to_row(now)))
                added.append(bool(result.rowcount))
            await self._summarize(conn, {event.saga_id for event in events})
        return added

    async def save_declarations(self, declarations: Iterable[SagaDeclaration]) -> None:
        """Store saga declarations, replacing those of the same names."""
        rows = [
            {
                "name": d.name,
                "service": d.service,
                "starts": d.starts,
                "ends": sorted(d.ends),
                "deadline_seconds": d.deadline.total_seconds() if d.deadline else None,
                "timeout_event": d.timeout_event,
            }
            for d in declarations
        ]
        if not rows:
            return
        async with self.engine.begin() as conn:
            await conn.execute(delete(sagas_table).where(sagas_table.c.name.in_([r["name"] for r in rows])))
            await conn.execute(insert(sagas_table), rows)

    async def declarations(self) -> list[SagaDeclaration]:
        """The saga declarations the collector stored."""
        async with self.engine.connect() as conn:
            result = await conn.execute(select(sagas_table).order_by(sagas_table.c.name))
            return [
                SagaDeclaration(
                    name=row.name,
                    starts=row.starts,
                    ends=frozenset(row.ends),
                    deadline=timedelta(seconds=row.deadline_seconds) if row.deadline_seconds is not None else None,
                    timeout_event=row.timeout_event,
                    service=row.service,
                )
                for row in result
            ]

    async def records(self, saga_id: str) -> list[TracedEvent]:
        """Every indexed record of a saga."""
        return (await self.records_of([saga_id])).get(saga_id, [])

    async def records_of(self, saga_ids: Sequence[str]) -> dict[str, list[TracedEvent]]:
        """Indexed records of several sagas, by saga id."""
        found: dict[str, list[TracedEvent]] = {}
        if not saga_ids:
            return found
        async with self.engine.connect() as conn:
            result = await conn.execute(
                select(events_table).where(events_table.c.saga_id.in_(list(saga_ids))).order_by(events_table.c.id)
            )
            for row in result:
                found.setdefault(row.saga_id, []).append(TracedEvent.from_row(row))
        return found

    async def resolve(self, saga_id: str) -> str | None:
        """The full saga id for an id or a unique prefix of one (`MIN_PREFIX`+ characters); None if unknown.

        Raises ConfigurationError when the prefix is ambiguous.
        """
        async with self.engine.connect() as conn:
            exact = await conn.scalar(select(events_table.c.saga_id).where(events_table.c.saga_id == saga_id).limit(1))
            if exact is not None or len(saga_id) < MIN_PREFIX:
                return exact
            pattern = saga_id.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            result = await conn.execute(
                select(events_table.c.saga_id)
                .where(events_table.c.saga_id.like(pattern, escape="\\"))
                .distinct()
                .limit(5)
            )
            candidates = sorted(result.scalars())
        if len(candidates) > 1:
            raise ConfigurationError(
                f"saga id prefix {saga_id!r} is ambiguous: {', '.join(candidates)}; give more characters"
            )
        return candidates[0] if candidates else None

    async def trace(
        self,
        saga_id: str,
        declarations: Iterable[SagaDeclaration] | None = None,
        *,
        now: datetime | None = None,
    ) -> SagaTrace | None:
        """The trace of one saga, or None when nothing of it was collected.

        `declarations` default to those the collector stored.
        """
        records = await self.records(saga_id)
        if not records:
            return None
        known = await self.declarations() if declarations is None else list(declarations)
        return build_trace(saga_id, records, known, now=now)

    async def sagas(
        self,
        *,
        declarations: Iterable[SagaDeclaration] | None = None,
        state: SagaState | None = None,
        since: datetime | None = None,
        limit: int = 20,
        now: datetime | None = None,
    ) -> list[SagaTrace]:
        """The most recently started sagas (newest first), optionally only those in `state`."""
        known = await self.declarations() if declarations is None else list(declarations)
        now = now or utcnow()
        started = func.min(events_table.c.occurred_at).label("started")
        query = select(events_table.c.saga_id, started).group_by(events_table.c.saga_id)
        if since is not None:
            query = query.having(started >= since)
        query = query.order_by(started.desc(), events_table.c.saga_id)
        found: list[SagaTrace] = []
        page, offset = max(limit, 50), 0
        while len(found) < limit:
            async with self.engine.connect() as conn:
                ids = list((await conn.execute(query.limit(page).offset(offset))).scalars())
            if not ids:
                break
            records = await self.records_of(ids)
            for saga_id in ids:
                trace = build_trace(saga_id, records[saga_id], known, now=now)
                if state is None or trace.state is state:
                    found.append(trace)
                    if len(found) == limit:
                        break
            offset += page
        return found

    # -- summaries: what lists, filters and counts read ----------------------------------------

    async def _summarize(self, conn: AsyncConnection, saga_ids: Iterable[str]) -> None:
        ids = sorted(set(saga_ids))
        if not ids:
            return
        known = [_declaration_of(row) for row in await conn.execute(select(sagas_table))]
        records: dict[str, list[TracedEvent]] = {}
        for row in await conn.execute(select(events_table).where(events_table.c.saga_id.in_(ids))):
            records.setdefault(row.saga_id, []).append(TracedEvent.from_row(row))
        rows = [_summary_row(build_trace(saga_id, found, known)) for saga_id, found in records.items()]
        per_service = [
            {key: row[key] for key in ("saga_id", "saga", "state", "started_at", "deadline_at")} | {"service": service}
            for row in rows
            for service in row["services"].split(",")
            if service
        ]
        await conn.execute(delete(summaries_table).where(summaries_table.c.saga_id.in_(ids)))
        await conn.execute(delete(summary_services_table).where(summary_services_table.c.saga_id.in_(ids)))
        if rows:
            await conn.execute(insert(summaries_table), rows)
        if per_service:
            await conn.execute(insert(summary_services_table), per_service)

    async def summarize_missing(self, batch: int = 1000) -> int:
        """Summarize sagas indexed before summaries existed; returns how many.

        Walks the saga ids in index order, so a database of any size is read once.
        """
        async with self.engine.connect() as conn:
            summarized = await conn.scalar(select(func.count()).select_from(summaries_table))
            indexed = await conn.scalar(select(func.count(events_table.c.saga_id.distinct())))
        if summarized == indexed:
            return 0
        done, last = 0, ""
        while True:
            async with self.engine.begin() as conn:
                ids = list(
                    (
                        await conn.execute(
                            select(events_table.c.saga_id)
                            .where(events_table.c.saga_id > last)
                            .distinct()
                            .order_by(events_table.c.saga_id)
                            .limit(batch)
                        )
                    ).scalars()
                )
                if not ids:
                    return done
                last = ids[-1]
                known = select(summaries_table.c.saga_id).where(summaries_table.c.saga_id.in_(ids))
                have = set((await conn.execute(known)).scalars())
                missing = [saga_id for saga_id in ids if saga_id not in have]
                await self._summarize(conn, missing)
            done += len(missing)

    def _filtered(
        self,
        query: Any,
        now: datetime,
        *,
        state: SagaState | None = None,
        saga: str | None = None,
        service: str | None = None,
        since: datetime | None = None,
    ) -> Any:
        # With a service, the per-service rows carry every filtered column.
        c = summaries_table.c if service is None else summary_services_table.c
        if service is not None:
            query = query.where(c.service == service)
        if state is SagaState.OVERDUE:
            query = query.where(c.state == SagaState.IN_FLIGHT.value, c.deadline_at <= now)
        elif state is SagaState.IN_FLIGHT:
            query = query.where(c.state == state.value, (c.deadline_at.is_(None)) | (c.deadline_at > now))
        elif state is not None:
            query = query.where(c.state == state.value)
        if saga is not None:
            query = query.where(c.saga == saga)
        if since is not None:
            query = query.where(c.started_at >= since)
        return query

    async def summaries(
        self,
        *,
        state: SagaState | None = None,
        saga: str | None = None,
        service: str | None = None,
        since: datetime | None = None,
        limit: int = 50,
        now: datetime | None = None,
    ) -> list[SagaSummary]:
        """The most recently started sagas (newest first), filtered, read from the summary index."""
        now = now or utcnow()
        query = select(summaries_table)
        c = summaries_table.c
        if service is not None:
            c = summary_services_table.c
            query = query.join(summary_services_table, c.saga_id == summaries_table.c.saga_id)
        query = self._filtered(query, now, state=state, saga=saga, service=service, since=since)
        query = query.order_by(c.started_at.desc(), c.saga_id.desc()).limit(limit)
        async with self.engine.connect() as conn:
            return [SagaSummary.from_row(row, now) for row in await conn.execute(query)]

    async def state_counts(
        self,
        *,
        saga: str | None = None,
        service: str | None = None,
        since: datetime | None = None,
        now: datetime | None = None,
    ) -> dict[SagaState, int]:
        """How many sagas are in each state (overdue apart from in flight), filtered like `summaries`."""
        now = now or utcnow()
        table = summaries_table if service is None else summary_services_table
        # Two queries, so each reads an index alone: the states (state, started_at), then the
        # few unfinished sagas past their deadline.
        by_state = select(table.c.state, func.count()).group_by(table.c.state)
        by_state = self._filtered(by_state, now, saga=saga, service=service, since=since)
        overdue = select(func.count()).select_from(table)
        overdue = self._filtered(overdue, now, state=SagaState.OVERDUE, saga=saga, service=service, since=since)
        counts = dict.fromkeys(SagaState, 0)
        async with self.engine.connect() as conn:
            for state, count in await conn.execute(by_state):
                counts[SagaState(state)] = count
            counts[SagaState.OVERDUE] = int(await conn.scalar(overdue) or 0)
        counts[SagaState.IN_FLIGHT] -= counts[SagaState.OVERDUE]
        return counts

    async def hop_latencies(self, since: datetime, limit: int = 20_000) -> list[tuple[str, str, str, float]]:
        """(cause type, handler, effect type, seconds) of the latest hops since `since`, newest first."""
        child, parent = events_table.alias("child"), events_table.alias("parent")
        query = (
            select(parent.c.event_type, child.c.handler, child.c.event_type, child.c.occurred_at, parent.c.occurred_at)
            .join(parent, (parent.c.event_id == child.c.causation_id) & (parent.c.kind == EVENT))
            .where(child.c.kind == EVENT, child.c.occurred_at >= since)
            .order_by(child.c.occurred_at.desc())
            .limit(limit)
        )
        async with self.engine.connect() as conn:
            return [
                (cause, handler or "", effect, (at - cause_at).total_seconds())
                for cause, handler, effect, at, cause_at in await conn.execute(query)
            ]

    async def dead_letter_counts(self, since: datetime) -> dict[tuple[str, str], int]:
        """Dead letters since `since`, by (event type, consumer)."""
        c = events_table.c
        query = (
            select(c.event_type, c.consumer, func.count())
            .where(c.kind == DEAD_LETTER, c.occurred_at >= since)
            .group_by(c.event_type, c.consumer)
        )
        async with self.engine.connect() as conn:
            return {(event_type, consumer): n for event_type, consumer, n in await conn.execute(query)}


@dataclass(frozen=True)
class SagaSummary:
    """One line of the saga list: a saga's state and timing, without its tree."""

    saga_id: str
    saga: str | None
    state: SagaState
    started_at: datetime
    last_at: datetime
    ended_at: datetime | None
    services: tuple[str, ...]
    hops: int
    compensations: int
    dead_letters: int

    @property
    def to_end(self) -> timedelta | None:
        """From the start to the end event (None while it has not ended)."""
        return None if self.ended_at is None else self.ended_at - self.started_at

    @property
    def to_settle(self) -> timedelta:
        """From the start to the last event seen (compensations after the end included)."""
        return self.last_at - self.started_at

    @classmethod
    def from_row(cls, row: Any, now: datetime) -> SagaSummary:
        """Read a `choreo_trace_summary` row, judging overdue by `now`."""
        state = SagaState(row.state)
        if state is SagaState.IN_FLIGHT and row.deadline_at is not None and row.deadline_at <= now:
            state = SagaState.OVERDUE
        return cls(
            saga_id=row.saga_id,
            saga=row.saga or None,
            state=state,
            started_at=row.started_at,
            last_at=row.last_at,
            ended_at=row.ended_at,
            services=tuple(s for s in row.services.split(",") if s),
            hops=row.hops,
            compensations=row.compensations,
            dead_letters=row.dead_letters,
        )


def _summary_row(trace: SagaTrace) -> dict[str, Any]:
    declaration = trace.declaration
    state = SagaState.IN_FLIGHT if trace.state is SagaState.OVERDUE else trace.state
    deadline = declaration.deadline if declaration is not None else None
    services = dict.fromkeys(trace.services)
    for hop in trace.dead_lettered:
        services.update(dict.fromkeys(_service_of(letter) for letter in hop.dead_letters))
    return {
        "saga_id": trace.saga_id,
        "saga": declaration.name if declaration else "",
        "state": state.value,
        "started_at": trace.started_at,
        "last_at": trace.last_at,
        "ended_at": trace.ended_by.event.occurred_at if trace.ended_by else None,
        "deadline_at": trace.started_at + deadline if deadline is not None and state is SagaState.IN_FLIGHT else None,
        "services": "," + ",".join(services)[:1000] + ",",
        "hops": sum(1 for hop in trace.hops() if hop.seen),
        "compensations": len(trace.compensations),
        "dead_letters": sum(len(hop.dead_letters) for hop in trace.hops()),
    }


def _declaration_of(row: Any) -> SagaDeclaration:
    return SagaDeclaration(
        name=row.name,
        starts=row.starts,
        ends=frozenset(row.ends),
        deadline=timedelta(seconds=row.deadline_seconds) if row.deadline_seconds is not None else None,
        timeout_event=row.timeout_event,
        service=row.service,
    )


# -- the collector -----------------------------------------------------------------------------


@dataclass
class CollectorStats:
    """What the collector did with the records it read."""

    indexed: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    ignored: int = 0
    """Records without choreo headers (event id, event type, saga id)."""
    retries: int = 0
    """Failed writes to the trace database, retried."""


class TraceCollector:
    """A consumer group that indexes the records of `services` by saga id in a database of its own.

    collector = TraceCollector(shop.services, "sqlite+aiosqlite:///trace.db", kafka=settings)
    await collector.start()
    ...
    await collector.stop()
    """

    def __init__(
        self,
        services: Iterable[Service],
        database_url: str | None = None,
        *,
        kafka: KafkaSettings | str | None = None,
        group_id: str = DEFAULT_GROUP_ID,
        max_backoff: float = 5.0,
    ) -> None:
        self.services = list(services)
        if not self.services:
            raise ConfigurationError("a trace collector needs at least one service to follow")
        self.group_id = group_id
        self.store = TraceStore(database_url)
        self.stats = CollectorStats()
        self.max_backoff = max_backoff
        self._kafka = kafka
        self._compensations = compensations_of(self.services)
        self._transport: KafkaTransport | None = None
        self._started = False

    def __repr__(self) -> str:
        return f"TraceCollector({[s.name for s in self.services]!r}, {self.store!r})"

    @property
    def topics(self) -> list[str]:
        """Every topic the services consume or emit on, their dead-letter topics included."""
        return sorted({t for s in self.services for t in (*s.subscribed_topics, *s.emitted_topics)})

    @property
    def transport(self) -> KafkaTransport:
        """The collector's Kafka connection (after `open()`)."""
        if self._transport is None:
            raise ConfigurationError("the collector has not started: call `await collector.start()` first")
        return self._transport

    def kafka_settings(self) -> KafkaSettings:
        """The Kafka settings in use: the argument, else `CHOREO_TRACE_KAFKA_*` / `CHOREO_KAFKA_*`."""
        if isinstance(self._kafka, KafkaSettings):
            self._kafka.validate()
            return self._kafka
        settings = KafkaSettings.from_env("trace")
        if isinstance(self._kafka, str):
            settings = KafkaSettings(**{**vars(settings), "bootstrap_servers": self._kafka})
            settings.validate()
        return settings

    async def open(self, *, ensure_topics: bool = True) -> KafkaTransport:
        """Open the database and subscribe, without connecting yet (`start()` does both)."""
        if self._transport is not None:
            return self._transport
        kafka = self.kafka_settings()
        deadline = time.monotonic() + start_timeout("trace")
        where = masked_url(self.store.url)
        await wait_for_dependency("trace collector", "the trace database", where, "--db", self.store.open, deadline)
        await self.store.save_declarations(declarations_of(self.services))
        transport = self._transport = KafkaTransport(kafka, client_id=self.group_id)
        if ensure_topics:
            setting = "--bootstrap-servers (or CHOREO_KAFKA_BOOTSTRAP_SERVERS)"
            with quiet("aiokafka"):  # an ERROR per refused connection: we log one line per attempt
                await wait_for_dependency(
                    "trace collector",
                    "Kafka",
                    kafka.bootstrap_servers,
                    setting,
                    lambda: transport.ensure_topics(self.topics),
                    deadline,
                )
        transport.subscribe_batches(self.topics, self.group_id, self.on_batch)
        return self._transport

    async def start(self) -> None:
        """Open the database, then consume from the earliest record the group has not seen."""
        if self._started:
            return
        try:
            transport = await self.open()
            await transport.start()
        except BaseException:
            await self.stop()  # close what was opened: the caller has no collector to stop
            raise
        self._started = True
        log.info("trace collector consuming %s into %r", ", ".join(self.topics), self.store)

    async def stop(self) -> None:
        """Stop consuming and close the database. Safe to call twice."""
        if self._transport is not None:
            await self._transport.stop()
            self._transport = None
        await self.store.close()
        self._started = False

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[TraceCollector]:
        """`async with collector.running():` start, and stop on exit."""
        await self.start()
        try:
            yield self
        finally:
            await self.stop()

    async def on_record(self, record: Record) -> None:
        """Index one record; returns once it is stored (so its offset may be committed)."""
        await self.on_batch([record])

    async def on_batch(self, records: Sequence[Record]) -> None:
        """Index a poll's records in one transaction; returns once they are stored."""
        events = []
        for record in records:
            event = index_record(record, self._compensations)
            if event is None:
                self.stats.ignored += 1
            else:
                events.append(event)
        failures = 0
        while True:
            try:
                added = await self.store.add_all(events)
            except Exception as error:  # a trace is worth waiting for: retry until the database is back
                failures += 1
                self.stats.retries += 1
                log.warning("trace collector cannot store %d records yet (%s), retrying", len(events), error)
                await asyncio.sleep(min(self.max_backoff, 0.05 * 2**failures))
                continue
            break
        for event, new in zip(events, added, strict=True):
            if not new:
                self.stats.duplicates += 1
            elif event.is_dead_letter:
                self.stats.dead_letters += 1
            else:
                self.stats.indexed += 1
