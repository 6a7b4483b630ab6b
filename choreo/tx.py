"""The unit of work: one local transaction holding business rows, the inbox mark and the
events to publish. Handlers receive it as `tx`; scripts and HTTP endpoints open one with
`service.transaction()`."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import Session

from choreo import otel
from choreo.envelope import ID_LENGTH, NAME_LENGTH, Envelope, new_id, utcnow
from choreo.events import Event, describe, is_event_type
from choreo.exceptions import EventTooLarge, UndeclaredEmitError, UnitOfWorkError
from choreo.kafka import DEFAULT_MAX_REQUEST_SIZE, record_size
from choreo.outbox import PendingEvent
from choreo.saga import SagaIndex

_OUTBOX_LENGTHS = {"key": NAME_LENGTH, "saga id": ID_LENGTH}
"""The outbox's columns for them (the consumer checks incoming records against the same)."""


class Tx:
    """One local transaction: `session` for business rows, `emit()` for events."""

    def __init__(
        self,
        connection: AsyncConnection,
        *,
        service: str,
        saga_id: str,
        cause: Envelope | None = None,
        handler: str | None = None,
        allowed: frozenset[type[Event]] | None = None,
        sagas: SagaIndex | None = None,
        max_record_size: int = DEFAULT_MAX_REQUEST_SIZE,
    ) -> None:
        self.connection = connection
        """The transaction's connection; `session` runs on it."""
        self._session: AsyncSession | None = None
        self.service = service
        self.saga_id = saga_id
        self.cause = cause
        self.handler = handler
        self._allowed = allowed
        self._sagas = sagas or SagaIndex()
        self._max_record_size = max_record_size
        self.withdrawn: list[str] = []
        """Event ids of scheduled timeouts this transaction makes moot (their sagas ended)."""
        self._pending: list[PendingEvent] = []
        self.committing = False
        """Set once everything is written and the commit is under way: a failure from then on
        may have committed."""
        self.wake_relay = False
        """Set when outbox rows were written besides `emit()`, so the relay is woken on commit."""
        self.cause_upcast: str | None = None
        """`v1→v3` when the consumer upcast the cause for the handler; copied onto every emitted event."""
        self.duplicate = False
        """Set when the inbox already had the cause for this handler: the handler must not run."""

    @property
    def session(self) -> AsyncSession:
        """The SQLAlchemy session for business rows, in this transaction (opened on first use)."""
        if self._session is None:
            # Joined to the connection's transaction: the unit of work, not the session, ends it.
            self._session = AsyncSession(
                bind=self.connection, expire_on_commit=False, sync_session_class=UnitOfWorkSession
            )
        return self._session

    async def flush(self) -> None:
        """Write the session's pending changes (before the events; the commit follows)."""
        if self._session is not None:
            await self._session.flush()

    async def close(self) -> None:
        """Release the session (the connection and its transaction stay the unit of work's)."""
        if self._session is not None:
            await self._session.close()

    @property
    def pending(self) -> list[PendingEvent]:
        """The events emitted so far, in emit order."""
        return list(self._pending)

    def emit(
        self,
        event: Event,
        *,
        key: str | None = None,
        at: datetime | None = None,
        delay: timedelta | None = None,
    ) -> str:
        """Queue `event` for publication when this transaction commits; returns its event id.

        `key` overrides the Kafka key (default: the event's key field, else the saga id).
        `at` or `delay` schedule it: the relay publishes it no earlier than that.
        Raises `EventTooLarge` if Kafka's producer would refuse the record.
        """
        event_type = type(event)
        if not is_event_type(event_type):
            raise TypeError(f"emit() takes an instance of a choreo.Event subclass with name= and topic=, got {event!r}")
        if self._allowed is not None and event_type not in self._allowed:
            declared = ", ".join(sorted(describe(t) for t in self._allowed)) or "nothing"
            raise UndeclaredEmitError(
                f"handler {self.handler} emitted {describe(event_type)} but declares only "
                f"{declared}; add it to the return annotation or emits="
            )
        if at is not None and delay is not None:
            raise ValueError("emit() takes at= or delay=, not both")
        if at is not None and at.tzinfo is None:
            raise ValueError("emit(at=...) needs a timezone-aware datetime")
        now = utcnow()
        available_at = at if at is not None else (now + delay if delay else None)
        event_id = self._queue(event, key=key, available_at=available_at, now=now)
        saga = self._sagas.started_by.get(event_type)
        if saga is not None and saga.deadline is not None and saga.on_deadline is not None:
            # The deadline travels in the same transaction as the start: a saga can never
            # start without its timeout being scheduled.
            timeout = saga.on_deadline(event)
            if not isinstance(timeout, saga.timeout_event or Event):
                raise TypeError(f"saga {saga.name!r}: on_deadline returned {timeout!r}, not a {saga.timeout_event!r}")
            self._allowed = None if self._allowed is None else self._allowed | {type(timeout)}
            try:
                self._queue(timeout, available_at=now + saga.deadline, now=now, event_id=saga.timeout_id(self.saga_id))
            except EventTooLarge:
                self._pending.pop()  # the start: a saga never starts without its timeout
                raise
        for ended in self._sagas.ended_by.get(event_type, ()):
            # The saga ended here, in the service that scheduled its timeout: the timeout
            # would find nothing to do, so it is withdrawn in this same transaction.
            self.withdrawn.append(ended.timeout_id(self.saga_id))
        return event_id

    def _queue(
        self,
        event: Event,
        *,
        available_at: datetime | None,
        now: datetime,
        key: str | None = None,
        event_id: str | None = None,
    ) -> str:
        event_type = type(event)
        envelope = Envelope(
            event_type=event_type.event_name,
            event_version=event_type.event_version,
            saga_id=self.saga_id,
            producer=self.service,
            causation_id=self.cause.event_id if self.cause else None,
            handler=self.handler,
            occurred_at=now,
            traceparent=otel.current_traceparent(),
            event_id=event_id or new_id(),
            cause_upcast=self.cause_upcast,
        )
        key = key if key is not None else event.kafka_key(self.saga_id)
        for name, value in (("key", key), ("saga id", self.saga_id)):
            # Refused here, not by PostgreSQL at the outbox insert (SQLite would store it whole).
            limit = _OUTBOX_LENGTHS[name]
            if len(value) > limit:
                raise ValueError(
                    f"{describe(event_type)}: its {name} is {len(value)} characters long; the outbox stores "
                    f"at most {limit} (use a shorter {name}, e.g. an id or a hash of it)"
                )
        headers = envelope.to_headers()
        payload = event.model_dump_json().encode()
        # Refused here, where the author can still act, rather than by the producer later, when
        # the row is committed and can only be parked as a dead letter. Counted exactly as the
        # producer counts it (value, key, headers and record overhead).
        size = record_size(key, payload, headers)
        if size > self._max_record_size:
            raise EventTooLarge(
                f"{describe(event_type)} is {size} bytes as a Kafka record ({len(payload)} of JSON), over "
                f"the producer's max_request_size of {self._max_record_size}; emit less data (e.g. a "
                "reference to it) or raise max_request_size in the service's Kafka client_options"
            )
        self._pending.append(
            PendingEvent(
                event=event,
                envelope=envelope,
                topic=event_type.event_topic,
                key=key,
                available_at=available_at,
                headers=headers,
                payload=payload,
            )
        )
        return envelope.event_id

    def emit_result(self, result: object) -> None:
        """Emit what a handler returned: None, one event, or an iterable of events."""
        if result is None:
            return
        if isinstance(result, Event):
            self.emit(result)
            return
        if isinstance(result, Iterable) and not isinstance(result, (str, bytes)):
            for item in result:
                if not isinstance(item, Event):
                    raise TypeError(f"handler {self.handler} returned {item!r} among its events")
                self.emit(item)
            return
        raise TypeError(f"handler {self.handler} returned {result!r}; return None, an event or a list of events")


class UnitOfWorkSession(Session):
    """The session of a unit of work: only the unit of work ends its transaction.

    A `commit()` in the middle would make the business rows and the inbox mark durable
    without the events (written last), and a retry would then see the inbox mark and call the
    record a duplicate: the events would be lost without a trace. Refused before anything is
    sent. The unit of work itself commits through its transaction object, not these methods.
    """

    def commit(self) -> None:
        """Refused: the unit of work commits when the handler returns or the block ends."""
        raise UnitOfWorkError(
            "session.commit() inside a unit of work: choreo commits the business rows, the inbox "
            "mark and the emitted events together when the handler returns (or the "
            "`async with service.transaction()` block ends); remove the commit() call"
        )

    def rollback(self) -> None:
        """Refused: raise an exception out of the unit of work to roll it back."""
        raise UnitOfWorkError(
            "session.rollback() inside a unit of work: raise an exception instead; the whole "
            "unit of work (business rows, inbox mark, events) then rolls back together"
        )
