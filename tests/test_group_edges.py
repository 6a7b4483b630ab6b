"""Edges of the consumer group: a batch longer than the rebalance drain, a consumer that dies,
where a new group starts, and replaying a letter whose event was processed meanwhile."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from typer.testing import CliRunner

from choreo import Event, KafkaSettings, Service, Tx
from choreo.cli import app
from choreo.exceptions import ConfigurationError
from choreo.health import readiness
from choreo.kafka import KafkaTransport, Record
from choreo.testing import record_of
from tests import dlq_app
from tests.conftest import DatabaseFactory
from tests.test_consumer_group import TOPIC, Member, end_offsets, publish
from tests.test_core_infra import eventually

Offsets = dict[int, list[int]]


class Stalling(Member):
    """A member whose first batch hangs until `release` is set."""

    def __init__(self, settings: KafkaSettings, group_id: str, name: str, seen: Counter[int]) -> None:
        super().__init__(settings, group_id, name, seen)
        self.release = asyncio.Event()
        self.stalled: list[Record] | None = None

    async def on_batch(self, records: list[Record]) -> None:
        if self.stalled is None:
            self.stalled = records
            await self.release.wait()
        await super().on_batch(records)


async def watch_commits(settings: KafkaSettings, group_id: str, history: Offsets) -> None:
    """Append every committed offset the group shows, per partition, until cancelled."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    await admin.start()
    try:
        while True:
            for partition, meta in (await admin.list_consumer_group_offsets(settings.group(group_id))).items():
                seen = history.setdefault(partition.partition, [])
                if meta.offset >= 0 and (not seen or seen[-1] != meta.offset):
                    seen.append(meta.offset)
            await asyncio.sleep(0.02)
    finally:
        await admin.close()


@contextlib.asynccontextmanager
async def publisher(settings: KafkaSettings) -> AsyncIterator[KafkaTransport]:
    """A transport that only publishes, for records that must be there before a member starts."""
    transport = KafkaTransport(settings, client_id="publisher")
    await transport.ensure_topics([TOPIC])
    await transport.start()
    try:
        yield transport
    finally:
        await transport.stop()


def rewound(history: Offsets) -> dict[int, list[int]]:
    return {p: offsets for p, offsets in history.items() if offsets != sorted(offsets)}


async def test_a_batch_outliving_the_rebalance_drain_never_moves_a_committed_offset_back(
    kafka_settings: KafkaSettings, unique_name: str
) -> None:
    settings = replace(kafka_settings, drain_timeout_ms=300, commit_interval_ms=20)
    seen: Counter[int] = Counter()
    first = Stalling(settings, unique_name, "first", seen)
    second = Member(settings, unique_name, "second", seen)
    async with publisher(settings) as transport:  # there before `first` polls: its first batch spans every partition
        await publish(transport, 0, 200)
    history: Offsets = {}
    watcher = asyncio.create_task(watch_commits(settings, unique_name, history))
    await first.transport.start()
    try:
        await eventually(lambda: first.stalled is not None)
        assert first.stalled is not None and {r.partition for r in first.stalled} == {0, 1, 2, 3}
        await publish(first.transport, 200, 200)
        # `second` joins while that batch hangs: the drain gives up and hands over.
        await second.transport.start()
        taken = {tp.partition for tp in second.transport._members[0].consumer.assignment()}  # type: ignore[union-attr]
        assert taken
        ends = await end_offsets(settings)
        await eventually(lambda: all(history.get(p, [-1])[-1] == ends[p] for p in taken))
        # `second` leaves: its partitions come back to `first`, still inside the stale batch.
        await second.transport.stop()
        owner = first.transport._members[0].consumer
        assert owner is not None
        await eventually(lambda: len(owner.assignment()) == 4)
        first.release.set()

        def settled() -> bool:
            return bool(rewound(history)) or all(history.get(p, [-1])[-1] == ends[p] for p in range(4))

        await eventually(settled, timeout=30)
    finally:
        first.release.set()
        await second.transport.stop()
        await first.transport.stop()
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    assert rewound(history) == {}, "a stale batch committed offsets below the group's"
    assert {p: offsets[-1] for p, offsets in history.items()} == ends
    assert set(seen) == set(range(400))


class Ping(Event, name="edges.ping", topic="edges"):
    n: int


class Boom(BaseException):
    """Not an Exception: handler retries and dead letters do not catch it."""


async def test_a_base_exception_escaping_a_handler_fails_readiness_and_is_logged_critically(
    kafka_settings: KafkaSettings, unique_name: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    service = Service(
        "edges", database_url=f"sqlite+aiosqlite:///{tmp_path}/edges.db", kafka=kafka_settings, group_id=unique_name
    )
    service.declare(Ping)

    @service.on(Ping)
    async def explode(event: Ping, tx: Tx) -> None:
        raise Boom(f"ping {event.n}")

    async with service.running():
        assert (await readiness(service))["ready"] is True
        async with service.transaction() as tx:
            tx.emit(Ping(n=1))

        async def dead() -> bool:
            return (await readiness(service))["ready"] is False

        await eventually(dead, timeout=30)
        report = await readiness(service)
        assert report["checks"]["consumer"] == f"{kafka_settings.group(unique_name)} stopped (Boom: ping 1)"
        assert report["checks"]["database"] == "ok"
    (critical,) = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    assert unique_name in critical.getMessage() and "Boom" in critical.getMessage()
    assert critical.exc_info is not None and critical.exc_info[0] is Boom  # the traceback is in the log


def test_auto_offset_reset_is_read_per_service_and_checked() -> None:
    assert KafkaSettings.from_env("orders", {}).auto_offset_reset == "earliest"
    env = {"CHOREO_KAFKA_AUTO_OFFSET_RESET": "earliest", "CHOREO_ORDERS_AUTO_OFFSET_RESET": "x"}
    assert KafkaSettings.from_env("orders", env).auto_offset_reset == "earliest"  # a different setting's name
    env = {"CHOREO_KAFKA_AUTO_OFFSET_RESET": "earliest", "CHOREO_ORDERS_KAFKA_AUTO_OFFSET_RESET": "Latest"}
    assert KafkaSettings.from_env("orders", env).auto_offset_reset == "latest"
    with pytest.raises(ConfigurationError, match="CHOREO_KAFKA_AUTO_OFFSET_RESET='newest': use earliest"):
        KafkaSettings.from_env("orders", {"CHOREO_KAFKA_AUTO_OFFSET_RESET": "newest"})


def start_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "no committed offset" in r.getMessage()]


async def test_a_group_without_committed_offsets_says_where_it_starts(
    kafka_settings: KafkaSettings, unique_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="choreo.kafka")
    topic = kafka_settings.topic_prefix + TOPIC
    seen: Counter[int] = Counter()
    new = Member(kafka_settings, unique_name, "new", seen)
    async with publisher(kafka_settings) as transport:
        await publish(transport, 0, 40)
    await new.transport.start()
    try:
        await eventually(lambda: len(seen) == 40)
    finally:
        await new.transport.stop()
    (line,) = start_lines(caplog)
    assert f"consumer group {kafka_settings.group(unique_name)} has no committed offset for 4 partition(s)" in line
    assert "starting at the earliest offsets" in line and "CHOREO_KAFKA_AUTO_OFFSET_RESET" in line
    assert all(f"{topic}/{p}@0" in line for p in range(4))

    caplog.clear()
    back = Member(kafka_settings, unique_name, "back", Counter())
    await back.transport.start()  # the group has offsets now: nothing to say
    await back.transport.stop()
    assert start_lines(caplog) == [] and back.handled == 0

    late = Member(replace(kafka_settings, auto_offset_reset="latest"), f"{unique_name}-late", "late", Counter())
    ends = await end_offsets(kafka_settings)
    await late.transport.start()
    try:
        consumer = late.transport._members[0].consumer
        assert consumer is not None
        await asyncio.gather(*(consumer.position(tp) for tp in consumer.assignment()))  # positions are set
        await publish(late.transport, 40, 8)
        await eventually(lambda: late.handled == 8)
    finally:
        await late.transport.stop()
    (line,) = start_lines(caplog)
    assert "starting at the latest offsets" in line and all(f"{topic}/{p}@{ends[p]}" in line for p in range(4))
    assert set(late.seen) == set(range(40, 48))


runner = CliRunner()


async def test_replaying_a_letter_whose_event_was_processed_meanwhile_needs_force(database: DatabaseFactory) -> None:
    env = {"CHOREO_LEDGER_DATABASE_URL": await database("ledger"), "COLUMNS": "200"}
    service = dlq_app.ledger.clone(database_url=env["CHOREO_LEDGER_DATABASE_URL"])
    record = record_of(dlq_app.Entry(amount=3), saga_id="saga-three")
    await service.start(kafka=False)
    try:
        assert service.consumer is not None
        assert await service.consumer.process(record) == ["dead-lettered"]
        dlq_app.BROKEN["yes"] = False
        try:  # the same event comes again (a redelivery) and goes through
            assert await service.consumer.process(record) == ["handled"]
        finally:
            dlq_app.BROKEN["yes"] = True
    finally:
        await service.stop()

    def dlq(*args: str) -> tuple[int, str, str]:
        result = runner.invoke(app, ["dlq", *args], env=env)
        return result.exit_code, result.stdout, result.stderr

    spec = "tests.dlq_app:ledger"
    _, listed, _ = await asyncio.to_thread(dlq, "list", spec, "--format", "json")
    (letter,) = json.loads(listed)
    code, out, err = await asyncio.to_thread(dlq, "replay", spec, str(letter["id"]))
    assert code == 1 and f"{letter['id']}: already-processed" in out
    assert f"ledger.book already processed event {letter['event_id']}" in err and "--force" in err
    _, still, _ = await asyncio.to_thread(dlq, "list", spec, "--format", "json")
    assert [parked["id"] for parked in json.loads(still)] == [letter["id"]]

    code, out, _ = await asyncio.to_thread(dlq, "replay", spec, str(letter["id"]), "--force")
    assert code == 0 and f"{letter['id']}: duplicate" in out
    _, after, _ = await asyncio.to_thread(dlq, "list", spec, "--status", "replayed", "--format", "json")
    assert [replayed["id"] for replayed in json.loads(after)] == [letter["id"]]
