"""Saga declarations: metadata for tracing, checking and deadlines, never a coordinator.

    order_saga = orders.saga(
        "order",
        starts=OrderCreated,
        ends={OrderApproved, OrderRejected},
        deadline=timedelta(seconds=30),
        on_deadline=lambda started: OrderExpired(order_id=started.order_id),
    )

When a transaction emits the `starts` event, the same transaction schedules the event
returned by `on_deadline` in the starting service's outbox, due at the deadline. The relay
publishes it then like any other event; the service's own handler for it decides whether the
saga is still open (e.g. reject a pending order) or long finished (do nothing). When the
starting service itself emits one of `ends` first, that transaction withdraws the timeout
(deletes it from the outbox unless it is already published), so a finished saga usually costs
no timeout at all; the handler must still tolerate one that was already on its way. A saga
started again under the same saga id keeps the timeout it was given first.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from choreo.events import Event, describe, is_event_type
from choreo.exceptions import SetupError

_SAGA_NAME = re.compile(r"^[a-z][a-z0-9_.-]*$")
_TIMEOUT_IDS = uuid.UUID("5f0c1f9e-7d3a-4c57-9a0e-2f6b1d8c4e21")
"""Namespace of the timeouts' event ids, derived from saga name and saga id."""


@dataclass(frozen=True)
class Saga:
    """A business transaction that starts with one event and ends with one of several."""

    name: str
    starts: type[Event]
    ends: frozenset[type[Event]]
    deadline: timedelta | None = None
    on_deadline: Callable[[Any], Event] | None = field(default=None, compare=False)
    timeout_event: type[Event] | None = None
    cancelled_by: frozenset[type[Event]] = frozenset()
    """Events that undo the saga after it ended well; whoever cancels emits them under its saga id."""

    def __post_init__(self) -> None:
        where = f"saga {self.name!r}"
        if not _SAGA_NAME.match(self.name):
            raise SetupError(f"{where}: name must be lowercase, e.g. 'order'")
        for event_type in (self.starts, *self.ends):
            if not is_event_type(event_type):
                raise SetupError(f"{where}: {event_type!r} is not a concrete choreo.Event")
        if not self.ends:
            raise SetupError(f"{where}: ends= must name at least one event that finishes it")
        if self.starts in self.ends:
            raise SetupError(f"{where}: {describe(self.starts)} cannot both start and end it")
        for event_type in self.cancelled_by:
            if not is_event_type(event_type):
                raise SetupError(f"{where}: cancelled_by= names {event_type!r}, which is not a concrete choreo.Event")
            if event_type is self.starts or event_type in self.ends:
                raise SetupError(f"{where}: {describe(event_type)} cannot both cancel it and start or end it")
        if (self.deadline is None) != (self.on_deadline is None):
            raise SetupError(
                f"{where}: deadline= and on_deadline= go together (on_deadline builds the "
                "timeout event from the starting event)"
            )
        if self.deadline is not None and self.deadline <= timedelta(0):
            raise SetupError(f"{where}: deadline must be positive")
        if self.on_deadline is not None and self.timeout_event is None:
            raise SetupError(f"{where}: name the timeout event's class with timeout_event=")

    def timeout_id(self, saga_id: str) -> str:
        """The event id of this saga's timeout for one saga instance, known without a lookup."""
        return str(uuid.uuid5(_TIMEOUT_IDS, f"{self.name}/{saga_id}"))

    @property
    def end_names(self) -> frozenset[str]:
        """Wire names of the ending events."""
        return frozenset(t.event_name for t in self.ends)


@dataclass(frozen=True)
class SagaIndex:
    """A service's sagas by the events that start and end them, built once when it starts."""

    started_by: dict[type[Event], Saga] = field(default_factory=dict)
    ended_by: dict[type[Event], tuple[Saga, ...]] = field(default_factory=dict)
    """Only sagas with a deadline: their ends withdraw the pending timeout."""

    @classmethod
    def of(cls, sagas: Iterable[Saga]) -> SagaIndex:
        sagas = list(sagas)
        ended_by: dict[type[Event], tuple[Saga, ...]] = {}
        for saga in sagas:
            if saga.deadline is not None:
                for end in saga.ends:
                    ended_by[end] = (*ended_by.get(end, ()), saga)
        return cls({saga.starts: saga for saga in sagas}, ended_by)
