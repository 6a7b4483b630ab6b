"""From a consumed record to committed handler transactions, with retries and dead letters.

Every record ends in exactly one of: processed (inbox row + effects committed), a duplicate
(inbox row already there: nothing happens), not for this service (skipped and counted), or a
dead letter. Only then does the transport commit its offset.
"""

from __future__ import annotations

import asyncio
import logging
import random
import traceback
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, Protocol

from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError

from choreo import deadletters, otel
from choreo.database import is_transient
from choreo.envelope import Envelope, check_key, decode_headers, utcnow
from choreo.events import Event, EventRegistry, take_version
from choreo.exceptions import HandlerFailed, RejectedRecord
from choreo.kafka import Record
from choreo.tx import Tx

log = logging.getLogger("choreo.consumer")

Outcome = Literal["handled", "duplicate", "dead-lettered", "skipped"]


@dataclass(frozen=True)
class Handler:
    """A registered handler: `name` (service.function) is also its inbox consumer name."""

    name: str
    func: Callable[[Any, Tx], Awaitable[Any]]
    event_types: tuple[type[Event], ...]
    emits: frozenset[type[Event]]
    max_attempts: int | None = None


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a failing handler is retried."""

    max_attempts: int = 5
    """Attempts of a handler's own failure before its record is dead-lettered."""
    initial_backoff: float = 0.1
    max_backoff: float = 10.0
    max_record_bytes: int = 1024 * 1024
    concurrency: int = 8
    """Keys processed at once by one consumer (each in its own transaction and connection)."""

    def backoff(self, failures: int) -> float:
        """Exponential backoff with jitter for the n-th consecutive failure."""
        # The exponent is capped: transient failures are retried without limit, and 2**n
        # overflows a float after about a thousand of them.
        ceiling = min(self.max_backoff, self.initial_backoff * 2.0 ** min(max(0, failures - 1), 64))
        return random.uniform(ceiling / 2, ceiling)


@dataclass
class ConsumerStats:
    """What the consumer did, by outcome."""

    handled: int = 0
    duplicates: int = 0
    retried: int = 0
    transient_retries: int = 0
    dead_lettered: int = 0
    skipped: int = 0
    unknown: int = 0
    unknown_types: set[str] = field(default_factory=set)


class UnitOfWorkFactory(Protocol):
    """Opens the service's unit of work (see `Service.transaction`)."""

    def __call__(
        self,
        *,
        saga_id: str,
        cause: Envelope | None,
        handler: str | None,
        allowed: frozenset[type[Event]] | None,
        claim: bool = False,
    ) -> AbstractAsyncContextManager[Tx]: ...


class Consumer:
    """Dispatches one service's records to its handlers."""

    def __init__(
        self,
        *,
        service: str,
        handlers: Sequence[Handler],
        registry: EventRegistry,
        unit_of_work: UnitOfWorkFactory,
        policy: RetryPolicy,
    ) -> None:
        self.service = service
        self.registry = registry
        self.policy = policy
        self.stats = ConsumerStats()
        self._unit_of_work = unit_of_work
        self._by_name: dict[str, list[Handler]] = {}
        for handler in handlers:
            for name in {t.event_name for t in handler.event_types}:
                self._by_name.setdefault(name, []).append(handler)

    async def on_record(self, record: Record) -> None:
        """Process `record` to one of its final outcomes; returns only when that is durable."""
        await self.process(record)

    async def on_batch(self, records: list[Record]) -> None:
        """Process a poll's records: one key after another in order, different keys concurrently.

        Records of one key always share a partition, so grouping by (partition, key) keeps
        each key's order while a slow or retried record holds back only its own key. The
        transport commits the batch's offsets after this returns, i.e. after every record
        reached a durable outcome.
        """
        lanes: dict[tuple[str, int, bytes | None], list[Record]] = {}
        for record in records:
            lanes.setdefault((record.topic, record.partition, record.key), []).append(record)
        if len(lanes) == 1:
            for record in records:
                await self.process(record)
            return
        gate = asyncio.Semaphore(self.policy.concurrency)

        async def run(lane: list[Record]) -> None:
            async with gate:
                for record in lane:
                    await self.process(record)

        # A lane that raises (a bug, or a dead letter that cannot be stored) cancels the others,
        # rolling back their open transactions, before the exception reaches the transport: the
        # batch is rewound and delivered again only once none of its records is still running.
        async with asyncio.TaskGroup() as group:
            for lane in lanes.values():
                group.create_task(run(lane))

    async def process(self, record: Record, only: str | None = None) -> list[Outcome]:
        """Process `record` (for handler `only`, if given); one outcome per handler run."""
        try:
            if len(record.value) > self.policy.max_record_bytes:
                raise RejectedRecord(
                    "oversized",
                    f"{len(record.value)} bytes exceeds the limit of {self.policy.max_record_bytes}",
                )
            envelope = Envelope.from_headers(decode_headers(record.headers))
            check_key(record.key)
        except RejectedRecord as rejected:
            return [await self._park(record, self.service, rejected.reason, str(rejected), None, 1, utcnow())]
        handlers = [h for h in self._by_name.get(envelope.event_type, ()) if only in (None, h.name)]
        if not handlers:
            self._skip(envelope)
            return ["skipped"]
        return [await self._dispatch(handler, record, envelope) for handler in handlers]

    def _skip(self, envelope: Envelope) -> None:
        # Topics carry every event of their producer; those this service does not handle
        # are expected. A name it has never heard of is worth a line in the log, once.
        if self.registry.knows_name(envelope.event_type):
            self.stats.skipped += 1
            return
        self.stats.unknown += 1
        if envelope.event_type not in self.stats.unknown_types:
            self.stats.unknown_types.add(envelope.event_type)
            log.info("%s: ignoring unknown event type %r", self.service, envelope.event_type)

    async def _dispatch(self, handler: Handler, record: Record, envelope: Envelope) -> Outcome:
        # Versions: the handler's class for this wire name takes the record directly, or
        # through the upcasters of its older versions (applied to the JSON before validation).
        try:
            event_type = take_version(handler.event_types, envelope.event_type, envelope.event_version)
            if not record.value:
                raise RejectedRecord("empty-value", "the record has no value (a tombstone?)")
            event = event_type.from_wire(record.value, envelope.event_version)
        except RejectedRecord as rejected:
            return await self._park(record, handler.name, rejected.reason, str(rejected), None, 1, utcnow())
        except ValidationError as invalid:
            reason = "invalid-json" if invalid.errors()[0]["type"] == "json_invalid" else "schema-violation"
            return await self._park(record, handler.name, reason, str(invalid), None, 1, utcnow())
        return await self._run_with_retries(handler, event, envelope, record)

    async def _run_with_retries(self, handler: Handler, event: Event, envelope: Envelope, record: Record) -> Outcome:
        limit = handler.max_attempts or self.policy.max_attempts
        attempts = transient = 0
        first_failed_at: datetime | None = None
        while True:
            try:
                processed = await self._run_once(handler, event, envelope)
            except Exception as failure:
                first_failed_at = first_failed_at or utcnow()
                if is_transient(failure):
                    # The infrastructure, not the handler, failed: wait it out, never park.
                    transient += 1
                    self.stats.transient_retries += 1
                    log.warning("%s: transient failure (%s), retrying", handler.name, failure)
                    await asyncio.sleep(self.policy.backoff(transient))
                    continue
                error = failure.error if isinstance(failure, HandlerFailed) else failure
                attempts += 1
                if attempts >= limit:
                    log.error("%s failed %d times, dead-lettering: %r", handler.name, attempts, error)
                    return await self._park(
                        record,
                        handler.name,
                        "handler-error",
                        f"{type(error).__name__}: {error}",
                        "".join(traceback.format_exception(error, limit=-8)),
                        attempts,
                        first_failed_at,
                    )
                self.stats.retried += 1
                log.warning("%s failed (attempt %d of %d): %r", handler.name, attempts, limit, error)
                await asyncio.sleep(self.policy.backoff(attempts))
                continue
            if processed:
                self.stats.handled += 1
                return "handled"
            self.stats.duplicates += 1
            return "duplicate"

    async def _run_once(self, handler: Handler, event: Event, envelope: Envelope) -> bool:
        own: Exception | None = None
        try:
            async with (
                otel.handler_span(self.service, handler.name, envelope),
                self._unit_of_work(
                    saga_id=envelope.saga_id, cause=envelope, handler=handler.name, allowed=handler.emits, claim=True
                ) as tx,
            ):
                if tx.duplicate:
                    return False
                if event.event_version != envelope.event_version:
                    tx.cause_upcast = f"v{envelope.event_version}→v{event.event_version}"  # shown by `choreo trace`
                try:
                    tx.emit_result(await handler.func(event, tx))
                except DBAPIError:
                    raise  # from the handler's session, i.e. choreo's engine: classified by SQLSTATE
                except Exception as error:
                    own = error
                    raise
        except Exception as error:
            # Marked only after the span and the rollback saw the original; a failure of the
            # rollback itself is choreo's own and stays unmarked.
            if error is own:
                raise HandlerFailed(error) from error
            raise
        return True

    async def _park(
        self,
        record: Record,
        consumer: str,
        reason: str,
        error: str,
        trace: str | None,
        attempts: int,
        first_failed_at: datetime,
    ) -> Outcome:
        where = f"{record.topic}/{record.partition}/{record.offset}"
        failures = 0
        minimal = False
        while True:
            try:
                async with self._unit_of_work(saga_id="", cause=None, handler=None, allowed=None) as tx:
                    await deadletters.park(
                        tx.session,
                        record,
                        service=self.service,
                        consumer=consumer,
                        reason=reason,
                        error=error,
                        traceback=trace,
                        attempts=attempts,
                        first_failed_at=first_failed_at,
                        now=utcnow(),
                        minimal=minimal,
                    )
                    tx.wake_relay = not minimal  # the full letter also went into the outbox
            except Exception as failure:
                if is_transient(failure):
                    failures += 1
                    log.warning("%s: cannot store dead letter yet (%s), retrying", consumer, failure)
                    await asyncio.sleep(self.policy.backoff(failures))
                    continue
                # The same insert would fail the same way forever. Store what surely fits (no
                # headers, no topic copy) and say why; if even that fails, the database refuses
                # every letter: raise, so the batch is delivered again rather than dropped.
                if minimal:
                    log.critical("%s: cannot store a dead letter for %s at all: %r", consumer, where, failure)
                    raise
                log.error("%s: cannot store the dead letter for %s (%r); storing it bare", consumer, where, failure)
                error = f"{error}\n\nstored without its headers: {type(failure).__name__}: {str(failure)[:2000]}"
                minimal = True
                continue
            self.stats.dead_lettered += 1
            log.warning("%s: dead-lettered %s (%s)", consumer, where, reason)
            return "dead-lettered"
