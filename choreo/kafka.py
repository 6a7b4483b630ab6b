"""The Kafka transport: the only module that talks to FastStream and aiokafka.

Everything else in choreo sees `Record` (a consumed record) and `KafkaTransport.publish`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from faststream import AckPolicy
from faststream.kafka import KafkaBroker
from faststream.kafka.annotations import KafkaMessage
from faststream.kafka.security import parse_security
from faststream.security import BaseSecurity, SASLPlaintext, SASLScram256, SASLScram512

from choreo.outbox import OutboxRecord
from choreo.settings import KafkaSettings

log = logging.getLogger("choreo.kafka")


@dataclass(frozen=True, slots=True)
class Record:
    """A consumed Kafka record, as choreo's consumer sees it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...]
    timestamp_ms: int | None = None
    """The record's Kafka timestamp (milliseconds since the epoch), when the broker gave one."""


OnRecord = Callable[[Record], Awaitable[None]]
OnBatch = Callable[[list[Record]], Awaitable[None]]


def security_for(settings: KafkaSettings) -> BaseSecurity | None:
    """FastStream's security object for the configured protocol."""
    use_ssl = settings.security_protocol.endswith("SSL")
    context = ssl.create_default_context() if use_ssl else None
    if settings.security_protocol.startswith("SASL"):
        credentials = {"username": settings.sasl_username or "", "password": settings.sasl_password or ""}
        sasl = {"PLAIN": SASLPlaintext, "SCRAM-SHA-256": SASLScram256, "SCRAM-SHA-512": SASLScram512}
        return sasl[settings.sasl_mechanism or "PLAIN"](ssl_context=context, use_ssl=use_ssl, **credentials)
    if use_ssl:
        return BaseSecurity(ssl_context=context, use_ssl=True)
    return None


class KafkaTransport:
    """One service's connection to Kafka: its consumer group and its producer."""

    def __init__(self, settings: KafkaSettings, *, client_id: str) -> None:
        self.settings = settings
        self._security = security_for(settings)
        options: dict[str, Any] = {
            "client_id": client_id,
            "enable_idempotence": settings.idempotence,
            "acks": "all",
            "logger": logging.getLogger("choreo.kafka.faststream"),
        }
        options.update(settings.client_options)
        self.broker = KafkaBroker(settings.bootstrap_servers, security=self._security, **options)

    def subscribe(self, topic: str, group_id: str, on_record: OnRecord) -> None:
        """Deliver `topic`'s records to `on_record` one at a time (see `subscribe_batches`)."""
        self.subscribe_topics([topic], group_id, on_record)

    def subscribe_topics(self, topics: Sequence[str], group_id: str, on_record: OnRecord) -> None:
        """Like `subscribe`, with one consumer for several topics (e.g. the trace collector's)."""

        async def one_by_one(records: list[Record]) -> None:
            for record in records:
                await on_record(record)

        self.subscribe_batches(topics, group_id, one_by_one)

    def subscribe_batches(self, topics: Sequence[str], group_id: str, on_batch: OnBatch) -> None:
        """Deliver what each poll returns to `on_batch`; commit the offsets after it returns.

        `on_batch` must not raise for a record it could not process (it dead-letters it):
        offsets are committed only after it returns, and with a manual ack policy a raised
        exception would let the next batch's commit skip past these records. One commit per
        batch rather than per record is what lets a consumer keep up with its database.
        """
        subscriber = self.broker.subscriber(
            *[self.settings.topic_prefix + topic for topic in topics],
            group_id=group_id,
            batch=True,
            max_records=self.settings.max_poll_records,
            ack_policy=AckPolicy.MANUAL,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=self.settings.fetch_max_wait_ms,
        )

        @subscriber
        async def consume(message: KafkaMessage) -> None:
            raw: Any = message.raw_message
            try:
                await on_batch([self._record(r) for r in (raw if isinstance(raw, tuple | list) else (raw,))])
            except Exception:
                # Only a bug gets here (records that fail are dead-lettered). Rewind to the
                # batch's first offsets so it comes again, instead of letting the next
                # commit skip it; the inbox absorbs the records that did commit.
                log.exception("consumer of %s failed; the batch will be delivered again", ", ".join(topics))
                await message.nack()
                raise
            await message.ack()

    async def lag(self) -> dict[str, int]:
        """Records not yet consumed, per assigned partition (`topic/partition`), as last fetched."""
        lags: dict[str, int] = {}
        for subscriber in self.broker.subscribers:
            consumer: Any = getattr(subscriber, "consumer", None)
            if consumer is None or not hasattr(consumer, "assignment"):
                continue  # not started, or an in-memory test consumer
            for partition in consumer.assignment():
                highwater = consumer.highwater(partition)
                if highwater is None:
                    continue  # nothing fetched from this partition yet
                try:
                    position = await asyncio.wait_for(consumer.position(partition), 0.5)
                except (TimeoutError, KafkaError):
                    continue  # being reassigned
                topic = partition.topic.removeprefix(self.settings.topic_prefix)
                lags[f"{topic}/{partition.partition}"] = max(0, highwater - position)
        return lags

    def _record(self, raw: Any) -> Record:
        return Record(
            topic=raw.topic.removeprefix(self.settings.topic_prefix),
            partition=raw.partition,
            offset=raw.offset,
            key=raw.key,
            value=raw.value if raw.value is not None else b"",
            headers=tuple(raw.headers or ()),
            timestamp_ms=raw.timestamp if isinstance(raw.timestamp, int) and raw.timestamp >= 0 else None,
        )

    async def ensure_topics(self, topics: Iterable[str]) -> None:
        """Create missing topics, so consumers see them at once rather than after a metadata refresh."""
        names = sorted({self.settings.topic_prefix + topic for topic in topics})
        if not names:
            return
        admin = AIOKafkaAdminClient(bootstrap_servers=self.settings.bootstrap_servers, **parse_security(self._security))
        await admin.start()
        try:
            existing = set(await admin.list_topics())
            missing = [name for name in names if name not in existing]
            if missing:
                # -1 asks the broker for its defaults (num.partitions, default.replication.factor);
                # aiokafka accepts -1 only beside an (empty) replica assignment.
                partitions = self.settings.partitions or -1
                topics = [NewTopic(name, partitions, -1, replica_assignments={}) for name in missing]
                with contextlib.suppress(TopicAlreadyExistsError):  # another service was quicker
                    await admin.create_topics(topics)
        finally:
            await admin.close()

    async def start(self) -> None:
        """Connect the producer and start the consumers."""
        await self.broker.start()

    async def stop(self) -> None:
        """Stop consuming and flush the producer."""
        await self.broker.stop()

    async def publish(self, records: Sequence[OutboxRecord]) -> list[BaseException | None]:
        """Send `records` in order; per record, None when Kafka acknowledged it, else the error.

        All records are handed to the producer before any acknowledgement is awaited, so a
        batch costs about one round trip; the producer keeps per-partition order.
        """
        pending: list[Any] = []
        for record in records:
            try:
                pending.append(
                    await self.broker.publish(
                        record.payload,
                        self.settings.topic_prefix + record.topic,
                        key=record.key.encode() if record.key is not None else None,
                        headers=record.headers,
                        no_confirm=True,
                    )
                )
            except Exception as error:
                pending.append(error)
        outcomes: list[BaseException | None] = []
        for item in pending:
            if isinstance(item, BaseException):
                outcomes.append(item)
            elif isinstance(item, asyncio.Future):
                try:
                    await item
                    outcomes.append(None)
                except Exception as error:
                    outcomes.append(error)
            else:
                outcomes.append(None)  # an in-memory test broker delivers synchronously
        return outcomes
