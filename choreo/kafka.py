"""The Kafka transport: the only module that talks to FastStream, and with `choreo.security` to aiokafka.

Everything else in choreo sees `Record` (a consumed record) and `KafkaTransport.publish`.

Against a broker, choreo drives aiokafka's producer and consumer itself: the relay hands over
whole batches and the consumer needs raw records, control over offset commits and a hand-over
on rebalance, so FastStream's per-message pipeline would only add cost (twice the CPU and three
times the latency per published batch, measured). FastStream provides, for tests, its
in-memory broker (`route_in_memory`).

Every client choreo creates (producer, consumers, admin) is built and started through
`choreo.security`: the same TLS and SASL options for all, and one line naming the fix when the
broker refuses them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    ConsumerStoppedError,
    IllegalStateError,
    InvalidTopicError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
    TopicAlreadyExistsError,
    TopicAuthorizationFailedError,
)
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from faststream.kafka import KafkaBroker
from faststream.kafka.annotations import KafkaMessage

from choreo.exceptions import NotSent, SetupError, Unpublishable
from choreo.outbox import OutboxRecord
from choreo.security import check_client_options, options_for, security_for, start_client
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


DEFAULT_MAX_REQUEST_SIZE = 1048576
"""aiokafka's default `max_request_size`: the producer refuses a larger record."""

# Errors that sending the same record again cannot cure: it is too large for the producer or the
# broker, or its topic is malformed or forbidden to this service. A topic that does not exist
# (UnknownTopicOrPartition) is not among them: it may yet be created (`ensure_topics`).
_PERMANENT = (
    MessageSizeTooLargeError,
    RecordTooLargeError,
    RecordListTooLargeError,
    InvalidTopicError,
    TopicAuthorizationFailedError,
)


def _classified(error: BaseException) -> BaseException:
    if not isinstance(error, _PERMANENT):
        return error
    unpublishable = Unpublishable(f"{type(error).__name__}: {error}")
    unpublishable.__cause__ = error
    return unpublishable


def record_size(key: str | None, payload: bytes, headers: dict[str, str]) -> int:
    """The size the producer counts for a record, checked against its `max_request_size`."""
    encoded = [(name, value.encode()) for name, value in headers.items()]
    size: int = DefaultRecordBatchBuilder.estimate_size_in_bytes(
        key.encode() if key is not None else None, payload, encoded
    )
    return size


OnRecord = Callable[[Record], Awaitable[None]]
OnBatch = Callable[[list[Record]], Awaitable[None]]


class KafkaTransport:
    """One service's connection to Kafka: its consumer group and its producer."""

    def __init__(self, settings: KafkaSettings, *, client_id: str) -> None:
        check_client_options(settings)
        self.settings = settings
        self._security = security_for(settings)
        self.client_id = client_id
        self._producer: AIOKafkaProducer | None = None
        self._in_memory: KafkaBroker | None = None
        self._members: list[_GroupMember] = []

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
        """Deliver what each poll returns to `on_batch`, as one member of `group_id`.

        Offsets are committed only after `on_batch` returns, so it must not raise for a record
        it could not process (it dead-letters it); if it raises anyway (a bug), the batch is
        delivered again. Takes effect at `start()`.
        """
        topics = tuple(self.settings.topic_prefix + topic for topic in topics)
        self._members.append(_GroupMember(self, topics, self.settings.group(group_id), on_batch))

    def route_in_memory(self) -> KafkaBroker:
        """Deliver this transport's publishes to FastStream subscribers, for `TestKafkaBroker`.

        In memory there is no fetching, committing or rebalancing: each subscription becomes a
        FastStream batch subscriber that hands records to the same `on_batch`.
        """
        broker = KafkaBroker(self.settings.bootstrap_servers, logger=logging.getLogger("choreo.kafka.faststream"))
        for member in self._members:
            broker.subscriber(*member.topics, group_id=member.group_id, batch=True)(self._deliverer(member.on_batch))
        self._members.clear()
        self._in_memory = broker
        return broker

    def _deliverer(self, on_batch: OnBatch) -> Callable[[KafkaMessage], Awaitable[None]]:
        async def deliver(message: KafkaMessage) -> None:
            raw: Any = message.raw_message
            await on_batch([self._record(r) for r in (raw if isinstance(raw, tuple | list) else (raw,))])

        return deliver

    async def lag(self) -> dict[str, int]:
        """Records not yet consumed, per assigned partition (`topic/partition`), as last fetched."""
        lags: dict[str, int] = {}
        for member in self._members:
            consumer = member.consumer
            if consumer is None:
                continue  # not started
            for partition in consumer.assignment():
                highwater = consumer.highwater(partition)
                if highwater is None:
                    continue  # nothing fetched from this partition yet
                try:
                    async with asyncio.timeout(0.5):
                        position = await consumer.position(partition)
                except (TimeoutError, KafkaError):
                    continue  # being reassigned
                topic = partition.topic.removeprefix(self.settings.topic_prefix)
                lags[f"{topic}/{partition.partition}"] = max(0, highwater - position)
        return lags

    def dead_consumers(self) -> dict[str, str]:
        """Per consumer group, what stopped its member other than `stop()` (empty when all run)."""
        return {m.group_id: f"{type(m.failure).__name__}: {m.failure}" for m in self._members if m.failure is not None}

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
        options = {"client_id": self.client_id, **options_for(AIOKafkaAdminClient, self.settings, self._security)}
        admin = AIOKafkaAdminClient(**options)
        await start_client(admin, self.settings, options)
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

    async def group_lag(self, group_id: str, topics: Iterable[str], timeout: float = 3.0) -> dict[str, int]:
        """Records of `topics` that group `group_id` has not committed, per `topic/partition`, from the broker.

        Read from outside the group (committed offsets against end offsets), so a tool can
        ask without joining it and causing a rebalance.
        """
        admin = AIOKafkaAdminClient(**options_for(AIOKafkaAdminClient, self.settings, self._security))
        reader = AIOKafkaConsumer(
            enable_auto_commit=False, **options_for(AIOKafkaConsumer, self.settings, self._security)
        )
        lags: dict[str, int] = {}
        try:
            async with asyncio.timeout(timeout):
                await admin.start()
                await reader.start()
                names = sorted(self.settings.topic_prefix + topic for topic in set(topics))
                described = await admin.describe_topics(names)
                partitions = [
                    TopicPartition(topic["topic"], part["partition"])
                    for topic in described
                    if topic["error_code"] == 0  # an unknown topic has no lag
                    for part in topic["partitions"]
                ]
                committed = await admin.list_consumer_group_offsets(self.settings.group(group_id))
                ends = await reader.end_offsets(partitions)
                starts = await reader.beginning_offsets(partitions)
        finally:
            await reader.stop()
            await admin.close()
        for partition in partitions:
            done = committed.get(partition)
            position = done.offset if done is not None and done.offset >= 0 else starts[partition]
            topic = partition.topic.removeprefix(self.settings.topic_prefix)
            lags[f"{topic}/{partition.partition}"] = max(0, ends[partition] - position)
        return lags

    producer_type: Callable[..., AIOKafkaProducer] = AIOKafkaProducer
    """What builds the producer: a test may put a fault-injecting subclass here."""

    def _make_producer(self) -> tuple[AIOKafkaProducer, dict[str, Any]]:
        options = options_for(AIOKafkaProducer, self.settings, self._security)
        producer = self.producer_type(
            client_id=self.client_id, enable_idempotence=self.settings.idempotence, acks="all", **options
        )
        return producer, options

    async def start(self) -> None:
        """Connect the producer and start the consumers."""
        producer, options = self._make_producer()
        await start_client(producer, self.settings, options)
        self._producer = producer
        for member in self._members:
            await member.start()

    async def stop(self) -> None:
        """Stop consuming (committing what was processed) and flush the producer."""
        for member in self._members:
            await member.stop()
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    @property
    def max_record_size(self) -> int:
        """The largest record the producer accepts, in bytes as `record_size` counts them."""
        return int(self.settings.client_options.get("max_request_size", DEFAULT_MAX_REQUEST_SIZE))

    async def publish(self, records: Sequence[OutboxRecord]) -> list[BaseException | None]:
        """Send `records` in order; per record, None when Kafka acknowledged it, else the error.

        All records are handed to the producer before any acknowledgement is awaited, so a
        batch costs about one round trip; the producer keeps per-partition order. Once a send
        of a key fails, no later record of that key is handed over: its outcome is `NotSent`.
        """
        if self._in_memory is not None:
            return await self._publish_in_memory(self._in_memory, records)
        if self._producer is None:
            raise RuntimeError("the Kafka transport is not started")
        # What the producer can and cannot take back (aiokafka 0.12, producer/*.py, and what
        # the broker was seen to do):
        # - Records of one partition are appended to that partition's open batch; a batch is
        #   delivered or failed as a whole (MessageBatch.failure fails every record in it).
        # - One batch per partition is in flight at a time (the sender mutes the partition), and
        #   a retriable error puts the batch back at the head of its partition's queue, so
        #   retries keep order. With idempotence (choreo's default) an in-flight batch is retried
        #   until it succeeds; without it, a batch retried past request_timeout_ms fails.
        # - A batch can still fail for good while later batches of its partition wait: it expired
        #   waiting for a leader (drain_by_nodes), or the broker refused it (e.g. too large for
        #   the topic). Without idempotence the next batch is then sent and may be accepted. With
        #   idempotence the failed batch leaves a gap in the sequence numbers, and the broker
        #   refuses the later batches (OutOfOrderSequenceNumber) -- except when the failed batch
        #   was this producer's first to the partition: then a later one was seen accepted.
        # So a record of a key handed over after one that fails asynchronously may reach Kafka
        # first; a record handed over cannot be recalled. What can be done is done: nothing
        # later of a key is handed over once a send of it failed synchronously (here); the relay
        # then sends that key one record at a time, each acknowledged before the next, until
        # one succeeds (relay.py); and a producer whose sequence has a gap is replaced.
        pending: list[asyncio.Future[Any] | BaseException] = []
        failed: set[str] = set()
        for record in records:
            if record.key is not None and record.key in failed:
                pending.append(NotSent(f"not sent: an earlier record of key {record.key!r} failed"))
                continue
            try:
                pending.append(
                    await self._producer.send(
                        self.settings.topic_prefix + record.topic,
                        record.payload,
                        key=record.key.encode() if record.key is not None else None,
                        headers=[(name, value.encode()) for name, value in record.headers.items()],
                    )
                )
            except Exception as error:  # e.g. too large, or no metadata for the topic in time
                pending.append(error)
                if record.key is not None:
                    failed.add(record.key)
        outcomes: list[BaseException | None] = []
        delivery_failed = False
        for item in pending:
            if isinstance(item, BaseException):
                outcomes.append(_classified(item))
                continue
            try:
                await item
                outcomes.append(None)
            except Exception as error:
                outcomes.append(_classified(error))
                delivery_failed = True
        if delivery_failed and self.settings.idempotence:
            await self._renew_producer()
        return outcomes

    async def _renew_producer(self) -> None:
        # The idempotent producer numbers each partition's batches when it takes them to send;
        # a batch that then fails for good (the broker refused it, or it expired) leaves a gap
        # in those numbers, and the broker answers every later batch of that partition with
        # OutOfOrderSequenceNumber, for as long as this producer lives (aiokafka does not reset
        # its sequences as the Java client does). A new producer gets a new producer id and
        # starts its numbers afresh. Every delivery of this call is settled: nothing is lost.
        assert self._producer is not None
        log.warning("a delivery failed: starting a new Kafka producer, whose sequence numbers have no gap")
        old, self._producer = self._producer, None
        with contextlib.suppress(Exception):
            await old.stop()
        producer, options = self._make_producer()
        await start_client(producer, self.settings, options)
        self._producer = producer

    async def _publish_in_memory(
        self, broker: KafkaBroker, records: Sequence[OutboxRecord]
    ) -> list[BaseException | None]:
        outcomes: list[BaseException | None] = []
        failed: set[str] = set()
        for record in records:
            if record.key is not None and record.key in failed:
                outcomes.append(NotSent(f"not sent: an earlier record of key {record.key!r} failed"))
                continue
            try:
                await broker.publish(
                    record.payload,
                    self.settings.topic_prefix + record.topic,
                    key=record.key.encode() if record.key is not None else None,
                    headers=record.headers,
                )
                outcomes.append(None)
            except Exception as error:
                outcomes.append(error)
                if record.key is not None:
                    failed.add(record.key)
        return outcomes


class _GroupMember(ConsumerRebalanceListener):  # type: ignore[misc]
    """One consumer-group member: fetches, hands each poll to `on_batch`, commits what it processed.

    choreo drives aiokafka itself here rather than through a FastStream subscriber: it needs
    raw records, control over when offsets are committed, and a hand-over on rebalance.
    Commits are coalesced to at most one per `commit_interval_ms`, in the background: with a
    commit after every small batch, OffsetCommit requests were a large share of the broker's
    CPU at light load. A commit still covers only records whose outcome is durable; what a
    crash leaves uncommitted is delivered again and absorbed by the inbox.
    """

    def __init__(self, transport: KafkaTransport, topics: tuple[str, ...], group_id: str, on_batch: OnBatch) -> None:
        self.transport = transport
        self.topics = topics
        self.group_id = group_id
        self.on_batch = on_batch
        self.consumer: AIOKafkaConsumer | None = None
        self.failure: BaseException | None = None
        """What ended the consuming task, if anything but `stop()` did: the member is dead."""
        self._processed: dict[TopicPartition, int] = {}
        """Per partition, the offset after the last record with a durable outcome."""
        self._committed: dict[TopicPartition, int] = {}
        """Per partition, the group's committed offset as this member knows it: commits only go up."""
        self._generation = 0
        """Bumped at every revocation and assignment; a batch records offsets only in its own."""
        self._announced: set[frozenset[TopicPartition]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._last_commit = 0.0
        self._task: asyncio.Task[None] | None = None
        self._committer: asyncio.Task[None] | None = None

    @property
    def _drain_timeout(self) -> float:
        return self.transport.settings.drain_timeout_ms / 1000

    async def start(self) -> None:
        settings = self.transport.settings
        options = options_for(AIOKafkaConsumer, settings, self.transport._security)
        consumer = AIOKafkaConsumer(
            group_id=self.group_id,
            client_id=self.transport.client_id,
            enable_auto_commit=False,
            auto_offset_reset=settings.auto_offset_reset,
            fetch_max_wait_ms=settings.fetch_max_wait_ms,
            **options,
        )
        consumer.subscribe(list(self.topics), listener=self)
        # `start()` returns only once the group assigned partitions, so the listener needs
        # the consumer before that.
        self.consumer = consumer
        try:
            await start_client(consumer, settings, options)
        except BaseException:
            self.consumer = None
            raise
        self._task = asyncio.create_task(self._run(consumer), name=f"choreo-consumer-{self.group_id}")

    async def stop(self) -> None:
        if self._task is not None:
            # Let the batch in hand finish rather than roll its transactions back.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._drain_timeout):
                    await self._idle.wait()
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._committer is not None:
            self._committer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._committer
            self._committer = None
        if self.consumer is not None:
            # Without a reachable broker the final commit is skipped after a while: those
            # records are then delivered again and recognized by the inbox.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._drain_timeout):
                    await self._commit()
            await self.consumer.stop()
            self.consumer = None

    async def _run(self, consumer: AIOKafkaConsumer) -> None:
        try:
            await self._consume(consumer)
        except BaseException as error:
            task = asyncio.current_task()
            if isinstance(error, asyncio.CancelledError) and task is not None and task.cancelling():
                raise  # stop() cancelled it
            # A BaseException from handler code (or a CancelledError nobody asked for) ends
            # consuming: say so loudly, and let readiness fail rather than sit there "ready".
            self.failure = error
            log.critical(
                "consumer %s stopped: %r escaped the batch; it consumes nothing until restarted",
                self.group_id,
                error,
                exc_info=error,
            )
            if isinstance(error, KeyboardInterrupt | SystemExit):
                raise

    async def _consume(self, consumer: AIOKafkaConsumer) -> None:
        settings = self.transport.settings
        failures = 0
        while True:
            try:
                polled = await consumer.getmany(timeout_ms=_POLL_TIMEOUT_MS, max_records=settings.max_poll_records)
            except ConsumerStoppedError:
                return
            except KafkaError as error:
                log.warning("consumer %s cannot fetch (%s); retrying", self.group_id, error)
                await asyncio.sleep(1.0)
                continue
            if not polled:
                continue
            # Read with no await since the poll: these records belong to this assignment.
            generation = self._generation
            self._idle.clear()
            try:
                await self.on_batch([self.transport._record(r) for records in polled.values() for r in records])
            except Exception:
                # Only a bug gets here (records that fail are dead-lettered). Rewind to the
                # batch's first offsets so it comes again; the inbox absorbs what did commit.
                failures += 1
                log.exception("consumer %s failed; the batch will be delivered again", self.group_id)
                if generation == self._generation:  # else the new assignment's positions stand
                    for partition, records in polled.items():
                        with contextlib.suppress(IllegalStateError):  # revoked meanwhile
                            consumer.seek(partition, records[0].offset)
            else:
                failures = 0
                self._record_processed(generation, polled)
            finally:
                self._idle.set()
            if failures:
                await asyncio.sleep(min(5.0, 0.1 * 2**failures))

    def _record_processed(self, generation: int, polled: dict[TopicPartition, list[Any]]) -> None:
        if generation != self._generation:
            # The batch outlived the rebalance drain: its partitions were handed over (and
            # may have come back) meanwhile. Recording its offsets now could commit them
            # below what the next owner committed, rewinding the group; the records are
            # delivered again instead, and the inbox absorbs them.
            log.warning(
                "consumer %s: a batch outlasted the rebalance drain (%.1f s); its offsets are not committed",
                self.group_id,
                self._drain_timeout,
            )
            return
        for partition, records in polled.items():
            self._processed[partition] = records[-1].offset + 1
        if self._committer is None or self._committer.done():
            self._committer = asyncio.create_task(self._commit_soon())

    async def _commit_soon(self) -> None:
        interval = self.transport.settings.commit_interval_ms / 1000
        loop = asyncio.get_running_loop()
        while self._uncommitted():
            await asyncio.sleep(max(0.0, self._last_commit + interval - loop.time()))
            await self._commit()

    def _uncommitted(self) -> dict[TopicPartition, int]:
        assigned = self.consumer.assignment() if self.consumer is not None else set()
        return {
            partition: offset
            for partition, offset in self._processed.items()
            if partition in assigned and offset > self._committed.get(partition, -1)
        }

    async def _commit(self) -> None:
        offsets = self._uncommitted()
        if not offsets or self.consumer is None:
            return
        self._last_commit = asyncio.get_running_loop().time()
        try:
            await self.consumer.commit(offsets)
        except KafkaError as error:
            # A rebalance or a coordinator move: these records will be delivered again
            # (to whichever member owns them now) and the inbox will recognize them.
            log.info("consumer %s could not commit offsets (%s); they will be retried", self.group_id, error)
            return
        self._committed.update(offsets)

    async def on_partitions_revoked(self, revoked: Collection[TopicPartition]) -> None:
        # Hand over cleanly: finish the batch in hand and commit it, so the next owner
        # starts after it instead of processing it again beside us.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._drain_timeout):
                await self._idle.wait()
        # From here on a batch still running belongs to the old assignment.
        self._generation += 1
        await self._commit()
        for partition in revoked:
            self._processed.pop(partition, None)
            self._committed.pop(partition, None)

    async def on_partitions_assigned(self, assigned: Collection[TopicPartition]) -> None:
        # Start the new assignment from what the group committed: nothing processed under an
        # older one counts, and no commit may go below the committed offsets.
        self._generation += 1
        self._processed.clear()
        self._committed.clear()
        consumer = self.consumer
        if consumer is None or not assigned:
            return
        partitions = sorted(assigned)
        try:
            async with asyncio.timeout(_ASSIGN_TIMEOUT):
                committed = await asyncio.gather(*(consumer.committed(tp) for tp in partitions))
                self._committed = {
                    tp: offset for tp, offset in zip(partitions, committed, strict=True) if offset is not None
                }
                await self._announce_start([tp for tp in partitions if tp not in self._committed])
        except (TimeoutError, KafkaError) as error:
            # Only the guard against rewinding is weaker: offsets recorded in this
            # generation still come from records fetched from the committed positions.
            log.info("consumer %s could not read its committed offsets (%s)", self.group_id, error)

    async def _announce_start(self, fresh: list[TopicPartition]) -> None:
        # A group without committed offsets starts at `auto_offset_reset`: on a new group
        # (or a changed group id) that replays the topic from its start, or skips its past.
        if not fresh or frozenset(fresh) in self._announced or self.consumer is None:
            return
        self._announced.add(frozenset(fresh))
        reset = self.transport.settings.auto_offset_reset
        starts = await (self.consumer.beginning_offsets if reset == "earliest" else self.consumer.end_offsets)(fresh)
        log.warning(
            "consumer group %s has no committed offset for %d partition(s); starting at the %s offsets "
            "(CHOREO_KAFKA_AUTO_OFFSET_RESET): %s",
            self.group_id,
            len(fresh),
            reset,
            ", ".join(f"{tp.topic}/{tp.partition}@{starts[tp]}" for tp in fresh),
        )


_POLL_TIMEOUT_MS = 1000
"""How long one poll waits for records; it returns as soon as any arrive."""
_ASSIGN_TIMEOUT = 5.0
"""How long an assignment waits for the group's committed offsets before going on without them."""


async def rewind_group(settings: KafkaSettings, group_id: str, topics: Sequence[str]) -> dict[str, int]:
    """Commit the start of every partition of `topics` as `group_id`'s offsets; returns the partitions per topic.

    Kafka accepts these commits only while the group has no members, so a running consumer of
    the group makes this fail (SetupError) instead of being rewound under its feet.
    """
    security = security_for(settings)
    # The producer's partitions_for() waits for a topic's metadata; the consumer's does not.
    producer_options = options_for(AIOKafkaProducer, settings, security)
    producer = AIOKafkaProducer(**producer_options)
    await start_client(producer, settings, producer_options)
    try:
        partitions = [
            TopicPartition(settings.topic_prefix + topic, partition)
            for topic in topics
            for partition in sorted(await producer.partitions_for(settings.topic_prefix + topic))
        ]
    finally:
        await producer.stop()
    consumer_options = options_for(AIOKafkaConsumer, settings, security)
    consumer = AIOKafkaConsumer(group_id=settings.group(group_id), enable_auto_commit=False, **consumer_options)
    await start_client(consumer, settings, consumer_options)
    try:
        consumer.assign(partitions)
        starts = await consumer.beginning_offsets(partitions)
        try:
            await consumer.commit(dict(starts))
        except KafkaError as error:
            raise SetupError(
                f"cannot rewind consumer group {settings.group(group_id)!r} ({type(error).__name__}): "
                "stop every instance of the service first"
            ) from error
    finally:
        await consumer.stop()
    return {topic: sum(1 for tp in partitions if tp.topic == settings.topic_prefix + topic) for topic in topics}
