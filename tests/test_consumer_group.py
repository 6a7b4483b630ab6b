"""choreo's consumer-group member against a real broker: coalesced commits and rebalance hand-over."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import replace

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from choreo import KafkaSettings
from choreo.kafka import KafkaTransport, Record
from choreo.outbox import OutboxRecord
from tests.test_core_infra import eventually

pytestmark = pytest.mark.infra

TOPIC = "ticks"


async def publish(transport: KafkaTransport, start: int, count: int) -> None:
    records = [OutboxRecord(n, TOPIC, f"key-{n % 16}", {}, str(n).encode()) for n in range(start, start + count)]
    assert all(outcome is None for outcome in await transport.publish(records))


async def committed_offsets(settings: KafkaSettings, group_id: str) -> dict[int, int]:
    """The group's committed offset per partition, as a new member would start from."""
    probe = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers, group_id=settings.group(group_id))
    await probe.start()
    try:
        partitions = [TopicPartition(settings.topic_prefix + TOPIC, p) for p in range(settings.partitions or 1)]
        return {tp.partition: (await probe.committed(tp)) or 0 for tp in partitions}
    finally:
        await probe.stop()


async def end_offsets(settings: KafkaSettings) -> dict[int, int]:
    probe = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers)
    await probe.start()
    try:
        partitions = [TopicPartition(settings.topic_prefix + TOPIC, p) for p in range(settings.partitions or 1)]
        return {tp.partition: offset for tp, offset in (await probe.end_offsets(partitions)).items()}
    finally:
        await probe.stop()


class Member:
    """A transport in the test's group that counts what it was handed."""

    def __init__(self, settings: KafkaSettings, group_id: str, name: str, seen: Counter[int]) -> None:
        self.transport = KafkaTransport(settings, client_id=name)
        self.seen = seen
        self.handled = 0
        self.transport.subscribe_batches([TOPIC], group_id, self.on_batch)

    async def on_batch(self, records: list[Record]) -> None:
        await asyncio.sleep(0.02)  # a batch takes a while, so rebalances find one in hand
        self.seen.update(int(r.value) for r in records)
        self.handled += len(records)


async def test_offsets_are_committed_while_running_not_only_at_stop(
    kafka_settings: KafkaSettings, unique_name: str
) -> None:
    settings = replace(kafka_settings, commit_interval_ms=200)
    seen: Counter[int] = Counter()
    member = Member(settings, unique_name, "solo", seen)
    await member.transport.ensure_topics([TOPIC])
    await member.transport.start()
    try:
        for start in range(0, 300, 30):  # many small batches, fewer commits
            await publish(member.transport, start, 30)
            await asyncio.sleep(0.03)
        await eventually(lambda: len(seen) == 300)
        expected = await end_offsets(settings)

        async def all_committed() -> bool:
            return await committed_offsets(settings, unique_name) == expected

        # Within the commit interval of the last batch, while the member keeps running.
        await eventually(all_committed, timeout=10)
    finally:
        await member.transport.stop()
    assert set(seen.values()) == {1}


async def test_a_joining_member_takes_over_partitions_without_redelivery(
    kafka_settings: KafkaSettings, unique_name: str
) -> None:
    # A long commit interval: only the hand-over on revocation can have committed what the
    # first member processed by the time the second one takes its partitions.
    settings = replace(kafka_settings, commit_interval_ms=60_000)
    seen: Counter[int] = Counter()
    first = Member(settings, unique_name, "first", seen)
    second = Member(settings, unique_name, "second", seen)
    await first.transport.ensure_topics([TOPIC])
    await first.transport.start()
    try:
        await publish(first.transport, 0, 200)
        await eventually(lambda: len(seen) == 200)
        await second.transport.start()
        await eventually(lambda: bool(second.transport._members[0].consumer.assignment()))  # type: ignore[union-attr]
        await publish(first.transport, 200, 200)
        await eventually(lambda: len(seen) == 400)
    finally:
        await second.transport.stop()
        await first.transport.stop()
    duplicates = {value: count for value, count in seen.items() if count > 1}
    assert duplicates == {}
    assert second.handled > 0, "the second member got partitions and records of its own"
    assert first.handled + second.handled == 400
