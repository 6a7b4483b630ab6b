"""The trace collector: a consumer group of its own that indexes every choreo record it reads."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from choreo import deadletters
from choreo.database import masked_url
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
from choreo.service import Service, quiet, wait_for_dependency
from choreo.settings import KafkaSettings, start_timeout
from choreo.tracing.model import DEAD_LETTER, EVENT, TracedEvent, compensations_of, declarations_of
from choreo.tracing.store import TraceStore, events_table

log = logging.getLogger("choreo.tracing")

DEFAULT_GROUP_ID = "choreo-trace"
"""The consumer group of `choreo collect`, unless told otherwise."""


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
