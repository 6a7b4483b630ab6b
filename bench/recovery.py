"""The recovery scenario: a relay drains the backlog an outage of Kafka left in its outbox.

A service of its own (`service` below: one event type, no handlers) runs only its relay, in its
own process (`choreo relay bench.recovery:service`), against a broker of this scenario's own,
which it can stop without disturbing the run's broker. The bench writes the backlog the way an
application does (units of work through `service.transaction()`, many events each, 1,000 keys
with a per-key sequence number) while Kafka is down and the relay fails to publish; then Kafka
comes back and the drain is timed from the moment the broker accepts connections to the last
row's `published_at`. A second phase writes the same backlog with Kafka up and the relay
stopped, then starts the relay. Finally the whole topic is read back and each key's sequence
numbers are checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import psutil

from bench.infra import Proc, Procs, asyncpg_dsn, clean_env, drop_databases
from choreo import Event, Service
from choreo.envelope import EVENT_ID
from choreo.relay import Relay

if TYPE_CHECKING:
    from bench.run import Env, Plan
    from infra.kafka import ApacheKafka

log = logging.getLogger("bench")

KEYS = 1000
EVENTS_PER_TRANSACTION = 500
MIN_OUTAGE = 30.0
"""Seconds Kafka stays down at least: long enough for the relay's sends to fail and back off,
as in a real outage, rather than sit in the producer's buffer until the broker returns."""
DRAIN_TIMEOUT = 600.0
TARGET_EVENTS_PER_S = 5000.0
DRAIN_GROUPS = ("relay", "kafka (recovery)", "postgres", "other processes")
"""The sampler's groups reported for a drain."""


class Tick(Event, name="bench.tick", topic="bench-ticks", key="key"):
    """One step of a key's sequence; the key is the Kafka key."""

    key: str
    seq: int


service = Service("recovery")
"""The relay's service: it emits ticks and consumes nothing."""
service.declare(Tick)

_UNPUBLISHED = (
    "SELECT count(*) FROM choreo_outbox WHERE published_at IS NULL AND available_at <= created_at AND id >= $1"
)


def _key(index: int) -> str:
    return f"key-{index:04d}"


async def _write(writer: Service, first_seq: int, per_key: int) -> dict[str, Any]:
    """`per_key` ticks for every key, in sequence order, EVENTS_PER_TRANSACTION per unit of work."""
    ticks = [Tick(key=_key(k), seq=seq) for seq in range(first_seq, first_seq + per_key) for k in range(KEYS)]
    began = time.time()
    for start in range(0, len(ticks), EVENTS_PER_TRANSACTION):
        async with writer.transaction() as tx:
            for tick in ticks[start : start + EVENTS_PER_TRANSACTION]:
                tx.emit(tick)
    seconds = time.time() - began
    return {"rows": len(ticks), "seconds": round(seconds, 2), "rows_per_s": round(len(ticks) / seconds, 1)}


def _relay_argv() -> list[str]:
    return ["-m", "choreo.cli", "relay", f"{__name__}:service"]


def _cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


async def _first_accept(port: int) -> float:
    """The wall time at which 127.0.0.1:`port` first accepts a TCP connection."""
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.02)
            continue
        accepted = time.time()
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return accepted


async def _drain(conn: asyncpg.Connection, first_id: int, relay: Proc) -> dict[str, Any]:
    """Poll until every row from `first_id` on is published; what the relay recorded, and its CPU."""
    total = int(await conn.fetchval("SELECT count(*) FROM choreo_outbox WHERE id >= $1", first_id))
    deadline = time.time() + DRAIN_TIMEOUT
    seen: tuple[float, float, int] | None = None  # first poll that saw progress: time, relay CPU, rows left
    while True:
        left = int(await conn.fetchval(_UNPUBLISHED, first_id))
        now = time.time()
        if seen is None and left < total:
            seen = (now, _cpu_seconds(relay.pid), left)
        if left == 0:
            break
        if not relay.alive():
            raise RuntimeError(f"recovery: the relay exited with {relay.popen.returncode}:\n{relay.tail()}")
        if now > deadline:
            raise RuntimeError(f"recovery: {left:,} of {total:,} rows still unpublished after {DRAIN_TIMEOUT:.0f}s")
        await asyncio.sleep(0.1)
    ended, cpu_end = time.time(), _cpu_seconds(relay.pid)
    assert seen is not None
    first, last = await conn.fetchrow(
        "SELECT min(published_at), max(published_at) FROM choreo_outbox WHERE id >= $1", first_id
    )
    cpu = cpu_end - seen[1]
    return {
        "rows": total,
        "first_mark": first.timestamp(),
        "last_mark": last.timestamp(),
        "polled_progress_at": seen[0],
        "polled_end_at": ended,
        # From the first poll that saw progress to the end, the relay's CPU per 1,000 rows it
        # marked meanwhile (the process's start-up and its idle wait are left out).
        "relay_cpu_s": round(cpu, 3),
        "relay_cpu_ms_per_1000_events": round(cpu / max(1, seen[2]) * 1e6, 1),
        "relay_cores": round(cpu / max(1e-9, ended - seen[0]), 3),
    }


async def _series(conn: asyncpg.Connection, first_id: int, origin: float) -> list[list[int]]:
    """Rows marked published in each second after `origin`: [second, rows]."""
    rows = await conn.fetch(
        "SELECT floor(extract(epoch FROM published_at) - $2)::int AS s, count(*) AS n FROM choreo_outbox"
        " WHERE id >= $1 GROUP BY 1 ORDER BY 1",
        first_id,
        origin,
    )
    return [[int(r["s"]), int(r["n"])] for r in rows]


def _figures(drained: dict[str, Any], origin: float) -> dict[str, Any]:
    """Rates and durations of a drain measured from `origin` (Kafka's return, or the relay's start)."""
    rows, first, last = drained["rows"], drained["first_mark"], drained["last_mark"]
    seconds = last - origin
    return {
        "rows": rows,
        "seconds": round(seconds, 2),
        "events_per_s": round(rows / seconds, 1),
        "first_mark_after_s": round(first - origin, 2),
        "marking_seconds": round(last - first, 2),
        "marking_events_per_s": round(rows / max(1e-9, last - first), 1),
        "relay_cpu_ms_per_1000_events": drained["relay_cpu_ms_per_1000_events"],
        "relay_cores": drained["relay_cores"],
    }


def _relaunch(broker: ApacheKafka) -> float:
    """Start the halted broker; the wall time at which it answered metadata requests again."""
    broker.relaunch()
    return time.time()


def _cores(env: Env, t0: float, t1: float) -> dict[str, float]:
    """Cores the drain's participants used between `t0` and `t1` ({} for a window under two samples)."""
    cores = env.sampler.cpu_between(t0, t1)
    return {name: cores[name] for name in DRAIN_GROUPS if name in cores}


async def _max_id(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT coalesce(max(id), 0) FROM choreo_outbox"))


async def verify(bootstrap: str, topic: str, partitions: int, expected_per_key: int) -> dict[str, Any]:
    """Read `topic` from the start: per key, sequence numbers must come 0, 1, 2, ... with none missing.

    A record whose sequence number its key already had is a duplicate: allowed (the relay
    publishes again what it could not mark), counted, and it must repeat the first copy exactly
    (same event id and payload).
    """
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        assigned = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(assigned)
        await consumer.seek_to_beginning(*assigned)
        ends = await consumer.end_offsets(assigned)
        first: dict[str, dict[int, tuple[str, bytes]]] = defaultdict(dict)
        next_seq: dict[str, int] = defaultdict(int)
        records = duplicates = inexact = out_of_order = 0
        while any([await consumer.position(p) < ends[p] for p in assigned]):
            batches = await consumer.getmany(timeout_ms=1000, max_records=10_000)
            for batch in batches.values():
                for record in batch:
                    records += 1
                    key = record.key.decode()
                    seq = int(json.loads(record.value)["seq"])
                    copy = (dict(record.headers)[EVENT_ID].decode(), bytes(record.value))
                    if seq in first[key]:
                        duplicates += 1
                        inexact += first[key][seq] != copy
                        continue
                    first[key][seq] = copy
                    if seq != next_seq[key]:
                        out_of_order += 1  # a gap, or an overtaking record
                    next_seq[key] = max(next_seq[key], seq + 1)
    finally:
        await consumer.stop()
    missing = sum(expected_per_key - len(first.get(_key(k), {})) for k in range(KEYS))
    unexpected = sum(1 for key, seqs in first.items() for seq in seqs if seq >= expected_per_key or key >= _key(KEYS))
    return {
        "records": records,
        "keys": len(first),
        "expected_per_key": expected_per_key,
        "duplicates": duplicates,
        "inexact_duplicates": inexact,
        "out_of_order": out_of_order,
        "missing": missing,
        "unexpected": unexpected,
        "ok": not (inexact or out_of_order or missing or unexpected),
    }


def relay_settings() -> dict[str, Any]:
    """The relay's and its producer's settings in use: choreo's and aiokafka's defaults."""
    from aiokafka import AIOKafkaProducer

    relay = inspect.signature(Relay.__init__).parameters
    producer = inspect.signature(AIOKafkaProducer.__init__).parameters
    return {
        "batch_size": relay["batch_size"].default,
        "linger_s": relay["linger"].default,
        "max_backoff_s": relay["max_backoff"].default,
        "producer": {
            "acks": "all",
            "idempotence": True,
            **{name: producer[name].default for name in ("linger_ms", "max_batch_size", "request_timeout_ms")},
        },
    }


async def run(env: Env, plan: Plan) -> dict[str, Any]:
    """The backlog of an outage drained once Kafka is back, and the same backlog with Kafka up."""
    from infra.kafka import ApacheKafka

    per_key = max(1, plan.recovery_rows // KEYS)
    # The scenario's own broker, so stopping it leaves the run's broker alone. It is started from
    # a worker thread (the relaunch must not block the loop that times it), so it cannot be tied
    # to the thread's life; it is stopped in `finally`.
    broker = ApacheKafka(num_partitions=plan.partitions, heap="1g", die_with_parent=False)
    procs = Procs(env.work / "logs" / "recovery")
    url: str | None = None
    writer: Service | None = None
    conn: asyncpg.Connection | None = None
    try:
        await asyncio.to_thread(broker.start)
        url = await env.database("recovery")
        writer = service.clone(database_url=url, kafka=broker.bootstrap)
        env.sampler.track("kafka (recovery)", lambda: [broker.pid] if broker.pid else [])
        relay_env = clean_env(
            CHOREO_RECOVERY_DATABASE_URL=url,
            KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap,
            CHOREO_KAFKA_TOPIC_PREFIX=env.prefix("recovery"),
            CHOREO_KAFKA_PARTITIONS=str(plan.partitions),
            LOG_LEVEL="warning",
        )
        await writer.start(kafka=False)  # creates the tables; events wait for the relay
        conn = await asyncpg.connect(asyncpg_dsn(url))
        relay = procs.start("relay", _relay_argv(), relay_env)
        env.sampler.track("relay", [relay.pid])

        # Normal operation first: one tick per key, published, so the relay's producer knows
        # the topic and its partitions as it would when an outage strikes.
        await _write(writer, 0, 1)
        await _drain(conn, 1, relay)

        # The outage: Kafka stops, the application goes on writing, the relay fails to publish.
        first_id = await _max_id(conn) + 1
        await asyncio.to_thread(broker.halt)
        down_at = time.time()
        log.info("recovery: Kafka stopped; writing %d rows", per_key * KEYS)
        written = await _write(writer, 1, per_key)
        await asyncio.sleep(max(0.0, MIN_OUTAGE - (time.time() - down_at)))
        pending = int(await conn.fetchval(_UNPUBLISHED, first_id))
        outage_log = relay.log.read_text(errors="replace").count("\n")

        assert broker.port is not None
        accepting = asyncio.create_task(_first_accept(broker.port))
        relaunched_at = time.time()
        relaunch = asyncio.create_task(asyncio.to_thread(_relaunch, broker))
        drained = await _drain(conn, first_id, relay)
        accepted_at = await accepting
        ready_at = await relaunch
        outage = {
            "seconds": round(accepted_at - down_at, 1),
            "rows_written": written,
            "unpublished_when_kafka_returned": pending,
            "relay_log_lines": outage_log,
            "jvm_start_to_accepting_s": round(accepted_at - relaunched_at, 2),
            "accepting_to_ready_s": round(ready_at - accepted_at, 2),
        }
        after_outage = _figures(drained, accepted_at)
        after_outage["series"] = await _series(conn, first_id, accepted_at)
        window = (accepted_at, drained["polled_end_at"])
        after_outage["cores"] = _cores(env, *window)
        log.info(
            "recovery: %d rows drained in %.1f s after Kafka's return (%.0f events/s)",
            drained["rows"],
            after_outage["seconds"],
            after_outage["events_per_s"],
        )

        # The same backlog with Kafka up and the relay stopped, then the relay started.
        procs.stop()
        env.sampler.untrack("relay")
        first_id = await _max_id(conn) + 1
        written_up = await _write(writer, 1 + per_key, per_key)
        started_at = time.time()
        relay = procs.start("relay-up", _relay_argv(), relay_env)
        env.sampler.track("relay", [relay.pid])
        drained_up = await _drain(conn, first_id, relay)
        kafka_up = _figures(drained_up, started_at)
        kafka_up["rows_written"] = written_up
        kafka_up["cores"] = _cores(env, drained_up["first_mark"], drained_up["polled_end_at"])
        log.info(
            "recovery with Kafka up: %d rows marked in %.1f s (%.0f events/s)",
            drained_up["rows"],
            kafka_up["marking_seconds"],
            kafka_up["marking_events_per_s"],
        )

        topic = env.prefix("recovery") + Tick.event_topic
        order = await verify(broker.bootstrap, topic, plan.partitions, 1 + 2 * per_key)
        log.info("recovery: per-key order %s (%s)", "holds" if order["ok"] else "BROKEN", order)
    finally:
        procs.stop()
        env.sampler.untrack("relay")
        env.sampler.untrack("kafka (recovery)")
        if conn is not None:
            await conn.close()
        if writer is not None:
            await writer.stop()
        await asyncio.to_thread(broker.stop)
        if url is not None:
            await drop_databases(urlunsplit(urlsplit(url)._replace(path="/postgres")), [url])
    return {
        "keys": KEYS,
        "events_per_transaction": EVENTS_PER_TRANSACTION,
        "rows": per_key * KEYS,
        "relay": relay_settings(),
        "outage": outage,
        "after_outage": after_outage,
        "kafka_up": kafka_up,
        "order": order,
        "target_events_per_s": TARGET_EVENTS_PER_S,
    }


# -- report ----------------------------------------------------------------------------------

PEER = (
    "For context: faststream-outbox, the closest Python peer, is reported to drain about 3,700 "
    "events/s on this machine at best and about 600/s with its defaults (reported figures, not "
    "measured by this harness)."
)


def target_row(scenarios: dict[str, Any]) -> list[Any] | None:
    """The Targets table's row: drain rate after the outage, and per-key order."""
    from bench.report import _fmt, _verdict

    r = scenarios.get("recovery")
    if not r:
        return None
    after, order = r["after_outage"], r["order"]
    met = after["events_per_s"] >= r["target_events_per_s"] and order["ok"]
    return [
        f"relay drains an outage's backlog of 100,000 rows at ≥ {r['target_events_per_s']:,.0f} events/s, "
        "per-key order kept",
        f"{_fmt(after['events_per_s'], 0)} events/s ({r['rows']:,} rows in {_fmt(after['seconds'])} s); "
        + ("order kept" if order["ok"] else "**order broken**"),
        _verdict(met),
    ]


def section(scenarios: dict[str, Any]) -> list[str]:
    """The report's section on the recovery scenario (no lines when it was not run)."""
    from bench.report import _fmt, _table

    r = scenarios.get("recovery")
    if not r:
        return []
    outage, after, up, order, relay = r["outage"], r["after_outage"], r["kafka_up"], r["order"], r["relay"]
    written = outage["rows_written"]
    producer = relay["producer"]
    lines = [
        "## Recovery: draining an outage's backlog",
        "",
        f"A service's relay runs alone in its own process (`choreo relay`) on a broker of this scenario's "
        f"own. With the relay running and Kafka stopped, the bench writes {r['rows']:,} due outbox rows the "
        f"way an application does: {r['events_per_transaction']} events per unit of work "
        f"(`service.transaction()`), {r['keys']:,} keys, a sequence number per key in each payload "
        f"({written['seconds']:.1f} s, {_fmt(written['rows_per_s'], 0)} rows/s); the relay's sends fail "
        f"meanwhile. Kafka stays down {outage['seconds']:.0f} s, then starts again on the same port and log "
        f"directory (its JVM took {outage['jvm_start_to_accepting_s']:.1f} s to accept connections). The drain "
        "is timed from the moment the broker accepts connections to the last row's `published_at`, which "
        "the relay writes after Kafka acknowledged the row. The second run writes the same backlog with Kafka "
        "up and the relay stopped, then starts the relay process: timed from the process's start (imports, "
        "connections and election included). Relay settings are choreo's defaults: batches of "
        f"{relay['batch_size']} rows, {relay['linger_s'] * 1000:g} ms linger under load, backoff up to "
        f"{relay['max_backoff_s']:g} s; producer acks={producer['acks']}, idempotent, aiokafka's "
        f"linger_ms={producer['linger_ms']} and max_batch_size={producer['max_batch_size']:,}.",
        "",
        _table(
            [
                "run",
                "rows",
                "seconds to drain",
                "events/s",
                "first row marked after (s)",
                "first to last mark: events/s",
                "relay CPU ms per 1,000 events",
                "relay cores",
            ],
            [
                [
                    label,
                    f"{d['rows']:,}",
                    _fmt(d["seconds"], 2),
                    _fmt(d["events_per_s"], 0),
                    _fmt(d["first_mark_after_s"], 2),
                    _fmt(d["marking_events_per_s"], 0),
                    _fmt(d["relay_cpu_ms_per_1000_events"]),
                    _fmt(d["relay_cores"], 2),
                ]
                for label, d in (
                    ("after the outage, from Kafka accepting connections", after),
                    ("Kafka up, from the relay process's start", up),
                )
            ],
        ),
        "",
        "Rows marked published in each second after Kafka's return: "
        + ", ".join(f"{n:,}" for _, n in after.get("series", []))
        + "."
        + "".join(
            f" Cores used while {label}: "
            + ", ".join(f"{name} {d['cores'][name]:.2f}" for name in DRAIN_GROUPS if name in d["cores"])
            + "."
            for label, d in (("draining after the outage", after), ("draining with Kafka up", up))
            if d.get("cores")
        ),
        "",
        f"**Per-key order {'holds' if order['ok'] else 'is broken'}.** The topic read back from the start: "
        f"{order['records']:,} records, {order['keys']:,} keys x {order['expected_per_key']} sequence numbers "
        f"(the runs above and one row per key published before the outage); {order['missing']:,} missing, "
        f"{order['out_of_order']:,} out of order, {order['duplicates']:,} duplicates "
        f"({order['inexact_duplicates']:,} of them not exact repeats). A duplicate is a row Kafka acknowledged "
        "but the relay could not mark (its database session ends when a publish outlasts the leader's lease, "
        "here while Kafka was down), published again; consumers' inboxes absorb it.",
        "",
        PEER,
        "",
    ]
    return lines
