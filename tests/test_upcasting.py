"""Event versions and upcasters: an older record reaches a newer handler, upcast before validation."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from pydantic import ValidationError
from rich.console import Console
from sqlalchemy import select, text

from choreo import Event, KafkaSettings, RetryPolicy, Service, Tx
from choreo.cli import render_trace
from choreo.database import create_engine
from choreo.events import take_version
from choreo.exceptions import RejectedRecord, SetupError
from choreo.kafka import Record
from choreo.tables import DeadLetter, OutboxRow
from choreo.testing import in_memory, record_of
from choreo.tracing import TraceStore, build_trace, index_record, trace_metadata
from tests.conftest import DatabaseFactory
from tests.test_core_infra import eventually, records_on

FAST = RetryPolicy(max_attempts=2, initial_backoff=0.001, max_backoff=0.005)


class ParcelV1(Event, name="evo.parcel", topic="evo-parcels"):
    """What an older release of the sender still emits."""

    parcel_id: str
    weight: int


class Parcel(Event, name="evo.parcel", topic="evo-parcels", version=3):
    """v2 renamed `weight` to `weight_grams`; v3 added the required `carrier`."""

    parcel_id: str
    weight_grams: int
    carrier: str


@Parcel.upcaster(from_version=1)
def rename_weight(payload: dict[str, Any]) -> dict[str, Any]:
    rest = {k: v for k, v in payload.items() if k != "weight"}
    return {**rest, "weight_grams": payload["weight"]}


@Parcel.upcaster(from_version=2)
def add_carrier(payload: dict[str, Any]) -> dict[str, Any]:
    return {**payload, "carrier": "post"}


class CrateV1(Event, name="evo.crate", topic="evo-parcels"):
    crate_id: str


class Crate(Event, name="evo.crate", topic="evo-parcels", version=3):
    """Only the v2 → v3 upcaster exists: a v1 record has no path."""

    crate_id: str
    size: str


@Crate.upcaster(from_version=2)
def add_size(payload: dict[str, Any]) -> dict[str, Any]:
    return {**payload, "size": "M"}


class Routed(Event, name="evo.routed", topic="evo-routes"):
    parcel_id: str
    weight_grams: int
    carrier: str


def sorter(database_url: str, kafka: KafkaSettings | None = None) -> tuple[Service, list[Event]]:
    """A service handling the current versions; `received` collects what its handlers were given."""
    service = Service("sorter", database_url=database_url, kafka=kafka, retry=FAST)
    received: list[Event] = []

    @service.on(Parcel)
    async def route(event: Parcel, tx: Tx) -> Routed:
        received.append(event)
        return Routed(parcel_id=event.parcel_id, weight_grams=event.weight_grams, carrier=event.carrier)

    @service.on(Crate)
    async def stack(event: Crate, tx: Tx) -> None:
        received.append(event)

    return service, received


async def dead_letters(service: Service) -> list[DeadLetter]:
    async with service.transaction() as tx:
        return list((await tx.session.execute(select(DeadLetter).order_by(DeadLetter.id))).scalars())  # type: ignore[arg-type]


def as_version(record: Record, version: int) -> Record:
    """`record` with its version header rewritten, as a release that declared `version` sent it."""
    headers = tuple(
        (name, str(version).encode() if name == "choreo-event-version" else value) for name, value in record.headers
    )
    return Record(record.topic, record.partition, record.offset, record.key, record.value, headers)


# -- the rules, without a broker ------------------------------------------------------------------


def test_upcasters_chain_from_any_older_version_before_validation() -> None:
    assert Parcel.from_wire(b'{"parcel_id": "p1", "weight": 1200}', 1) == Parcel(
        parcel_id="p1", weight_grams=1200, carrier="post"
    )
    assert Parcel.from_wire(b'{"parcel_id": "p1", "weight_grams": 5}', 2).carrier == "post"
    assert Parcel.from_wire(b'{"parcel_id": "p1", "weight_grams": 5, "carrier": "ups"}', 3).carrier == "ups"
    with pytest.raises(ValidationError, match="json_invalid|Invalid JSON"):
        Parcel.from_wire(b"{not json", 1)


def test_take_version_prefers_an_exact_class_and_names_a_missing_upcaster() -> None:
    assert take_version([Parcel], "evo.parcel", 1) is Parcel
    assert take_version([ParcelV1, Parcel], "evo.parcel", 1) is ParcelV1
    with pytest.raises(RejectedRecord) as missing:
        take_version([Crate], "evo.crate", 1)
    assert missing.value.reason == "unknown-version"
    assert "no upcaster lifts v1 to v2" in str(missing.value)
    assert "@Crate.upcaster(from_version=1)" in str(missing.value)
    with pytest.raises(RejectedRecord, match=r"evo.parcel v4; the handler takes version\(s\) \[3\]: a producer"):
        take_version([Parcel], "evo.parcel", 4)
    with pytest.raises(RejectedRecord, match=r"evo.parcel v0; the handler takes version\(s\) \[3\]$"):
        take_version([Parcel], "evo.parcel", 0)


def test_upcasters_are_declared_on_the_newer_version_once() -> None:
    with pytest.raises(SetupError, match="older version of this event, 1 to 2"):
        Parcel.upcaster(from_version=3)
    with pytest.raises(SetupError, match="two upcasters from v1"):
        Parcel.upcaster(from_version=1)(lambda payload: payload)
    with pytest.raises(SetupError, match="1 to 0"):
        ParcelV1.upcaster(from_version=1)


async def test_a_failing_upcaster_dead_letters_the_record_at_once(tmp_path: Path) -> None:
    service, received = sorter(f"sqlite+aiosqlite:///{tmp_path}/s.db")
    async with in_memory(service):
        consumer = service.consumer
        assert consumer is not None
        # A v1 payload without `weight`: the v1 → v2 upcaster raises KeyError.
        record = record_of(ParcelV1(parcel_id="p9", weight=1))
        broken = Record(record.topic, 0, 0, record.key, b'{"parcel_id": "p9"}', record.headers)
        assert await consumer.process(broken) == ["dead-lettered"]
        (letter,) = await dead_letters(service)
        assert (letter.reason, letter.consumer, letter.attempts) == ("upcast-error", "sorter.route", 1)
        assert "evo.parcel upcaster v1→v2 failed: KeyError" in letter.error
        assert received == []


# -- on a real broker, SQLite and PostgreSQL ----------------------------------------------------------


async def send_raw(settings: KafkaSettings, record: Record) -> None:
    """Produce `record` with plain aiokafka, as another (older) release of a producer would."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers)
    await producer.start()
    try:
        await producer.send_and_wait(
            settings.topic_prefix + record.topic, record.value, key=record.key, headers=list(record.headers)
        )
    finally:
        await producer.stop()


async def test_a_v1_record_on_kafka_reaches_a_v3_handler_and_the_trace_shows_the_upcast(
    database: DatabaseFactory, kafka_settings: KafkaSettings
) -> None:
    service, received = sorter(await database("sorter"), kafka_settings)
    async with service.running():
        old = record_of(ParcelV1(parcel_id="p1", weight=1200), saga_id="saga-upcast-1", event_id="ev-v1")
        await send_raw(kafka_settings, old)
        await eventually(lambda: len(received) == 1)
        assert received == [Parcel(parcel_id="p1", weight_grams=1200, carrier="post")]
        assert type(received[0]) is Parcel
        (routed,) = await records_on(kafka_settings, "evo-routes", 1)
        async with service.engine.connect() as conn:
            row = (await conn.execute(select(OutboxRow.__table__))).one()
    assert row.headers["choreo-cause-upcast"] == "v1→v3"
    assert row.headers["choreo-event-version"] == "1"  # Routed's own, current version

    indexed = [index_record(old), index_record(routed)]
    assert indexed[1] is not None and indexed[1].cause_upcast == "v1→v3"
    trace = build_trace("saga-upcast-1", [e for e in indexed if e is not None])
    assert trace.to_dict()["roots"][0]["children"][0]["cause_upcast"] == "v1→v3"
    out = io.StringIO()
    render_trace(trace, Console(file=out, width=200))
    assert "⇡ took evo.parcel upcast v1→v3" in out.getvalue()


async def test_a_v1_record_without_an_upcaster_path_is_dead_lettered_naming_the_missing_one(
    database: DatabaseFactory, kafka_settings: KafkaSettings
) -> None:
    service, received = sorter(await database("sorter"), kafka_settings)
    async with service.running():
        await send_raw(kafka_settings, record_of(CrateV1(crate_id="c1"), saga_id="saga-crate-1"))
        # A v2 record on the same key after it still goes through: the letter blocks nothing.
        await send_raw(kafka_settings, as_version(record_of(CrateV1(crate_id="c2"), saga_id="saga-crate-1"), 2))
        await eventually(lambda: len(received) == 1)
        assert received == [Crate(crate_id="c2", size="M")]
        (letter,) = await dead_letters(service)
    assert (letter.reason, letter.consumer, letter.attempts) == ("unknown-version", "sorter.stack", 1)
    assert "evo.crate v1" in letter.error
    assert "no upcaster lifts v1 to v2: register one with @Crate.upcaster(from_version=1)" in letter.error


async def test_a_trace_database_from_before_upcasts_gains_the_column_and_keeps_its_records(
    database: DatabaseFactory,
) -> None:
    url = await database("trace")
    engine = create_engine(url)
    async with engine.begin() as conn:  # the table as the release before upcasts created it
        await conn.run_sync(trace_metadata.create_all)
        await conn.execute(text("ALTER TABLE choreo_trace_event DROP COLUMN cause_upcast"))
    await engine.dispose()
    old = index_record(record_of(ParcelV1(parcel_id="p1", weight=1), saga_id="saga-old-db", event_id="e-old"))
    routed = record_of(Routed(parcel_id="p1", weight_grams=1, carrier="post"), saga_id="saga-old-db")
    headers = (*routed.headers, ("choreo-cause-upcast", "v1→v3".encode()), ("choreo-causation-id", b"e-old"))
    new = index_record(Record(routed.topic, 0, 1, routed.key, routed.value, headers))
    assert old is not None and new is not None
    async with TraceStore(url) as store:
        assert await store.add_all([old, new]) == [True, True]
        records = {r.event_id: r for r in await store.records("saga-old-db")}
    assert records[new.event_id].cause_upcast == "v1→v3"
    assert records["e-old"].cause_upcast is None
