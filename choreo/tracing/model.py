"""The trace model: traced events, saga declarations, and each saga rebuilt as a causal tree."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from choreo import deadletters
from choreo.envelope import (
    utcnow,
)
from choreo.saga import Saga
from choreo.service import Service

EVENT = "event"
DEAD_LETTER = "dead-letter"


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
                participants.setdefault(service_of(letter), None)
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
                failed = _mermaid_id(service_of(letter))
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


def service_of(letter: TracedEvent) -> str:
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
