"""The floor: what choreo itself costs per event, with a handler that does nothing.

`python -m bench.floor <spec.json> <out.json>` runs, in this one process:

1. **The null-handler loop.** Two choreo services on their own PostgreSQL databases pass
   `chains` events back and forth through Kafka: consume → unit of work whose handler only
   returns the next event (inbox claim, outbox write, commit) → relay (read, produce, mark) →
   the other service. CPU per event = this process's CPU / events handled.
2. **The same loop with no guarantees.** Two aiokafka consumers and one producer pass the same
   records back and forth: consume → produce the next → commit offsets. No database at all.
3. **The breakdown.** Each step of choreo's loop timed alone, one event at a time (nothing
   batches): consume, inbox claim, outbox write, commit, relay read, produce, mark, offset
   commit. Their sum is compared with the loop's figure at one chain.

CPU is `time.process_time()`: every thread of this process, nothing else.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from choreo import Event, Service, Tx, hotpath
from choreo.envelope import Envelope, new_id, utcnow
from choreo.kafka import Record
from choreo.outbox import OutboxRecord


class Ping(Event, name="floor.ping", topic="floor-a"):
    n: int


class Pong(Event, name="floor.pong", topic="floor-b"):
    n: int


def _services(urls: dict[str, str]) -> tuple[Service, Service]:
    a = Service("floor-a", database_url=urls["a"])
    b = Service("floor-b", database_url=urls["b"])

    @a.on(Pong)
    async def ping(event: Pong, tx: Tx) -> Ping:
        return Ping(n=event.n + 1)

    @b.on(Ping)
    async def pong(event: Ping, tx: Tx) -> Pong:
        return Pong(n=event.n + 1)

    return a, b


async def _measure(count: Callable[[], int], warmup: float, duration: float) -> dict[str, float]:
    await asyncio.sleep(warmup)
    n0, c0, t0 = count(), time.process_time(), time.perf_counter()
    await asyncio.sleep(duration)
    n1, c1, t1 = count(), time.process_time(), time.perf_counter()
    events = n1 - n0
    return {
        "events": events,
        "events_per_s": round(events / (t1 - t0), 1),
        "cores": round((c1 - c0) / (t1 - t0), 3),
        "us_per_event": round((c1 - c0) / max(1, events) * 1e6, 1),
    }


async def choreo_loop(spec: dict[str, Any], chains: int) -> dict[str, float]:
    os.environ["CHOREO_KAFKA_TOPIC_PREFIX"] = f"{spec['topic_prefix']}{chains}-"  # fresh topics and groups
    a, b = _services(spec["urls"])
    await a.start()
    await b.start()
    try:
        for _ in range(chains):
            async with a.transaction() as tx:
                tx.emit(Ping(n=0))

        def handled() -> int:
            return sum(s.consumer.stats.handled for s in (a, b) if s.consumer is not None)

        return await _measure(handled, spec["warmup"], spec["duration"])
    finally:
        await b.stop()
        await a.stop()


async def bare_loop(spec: dict[str, Any], chains: int) -> dict[str, float]:
    """consume → produce the next → commit offsets, with aiokafka alone."""
    prefix, servers = spec["topic_prefix"], spec["kafka"]
    topics = (f"{prefix}bare-a", f"{prefix}bare-b")
    producer = AIOKafkaProducer(bootstrap_servers=servers, acks="all", enable_idempotence=spec["idempotence"])
    await producer.start()
    handled = 0

    async def serve(source: str, target: str) -> None:
        nonlocal handled
        consumer = AIOKafkaConsumer(
            source,
            bootstrap_servers=servers,
            group_id=f"{source}-group",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        await consumer.start()
        try:
            while True:
                batches = await consumer.getmany(timeout_ms=1000)
                sent = [
                    await producer.send(target, record.value, key=record.key, headers=record.headers)
                    for records in batches.values()
                    for record in records
                ]
                for ack in sent:
                    await ack
                handled += len(sent)
                if sent:
                    await consumer.commit()
        finally:
            await consumer.stop()

    tasks = [asyncio.create_task(serve(topics[0], topics[1])), asyncio.create_task(serve(topics[1], topics[0]))]
    try:
        await asyncio.sleep(3)  # both consumers joined their groups
        for i in range(chains):
            await producer.send_and_wait(topics[0], b'{"n":0}', key=f"chain-{i}".encode())
        return await _measure(lambda: handled, spec["warmup"], spec["duration"])
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await producer.stop()


async def _per_call(n: int, step: Callable[[int], Awaitable[Any]]) -> float:
    """Microseconds of CPU per call of `step(i)`, after a warm-up of n/10 calls."""
    for i in range(n // 10):
        await step(i)
    c0 = time.process_time()
    for i in range(n):
        await step(n + i)
    return (time.process_time() - c0) / n * 1e6


def _record(topic: str, i: int) -> Record:
    envelope = Envelope(
        event_type="floor.ping",
        event_version=1,
        saga_id=new_id(),
        producer="floor-a",
        causation_id=None,
        handler=None,
        occurred_at=utcnow(),
        traceparent=None,
        event_id=new_id(),
    )
    headers = tuple((k, v.encode()) for k, v in envelope.to_headers().items())
    return Record(topic, 0, i, f"chain-{i}".encode(), Ping(n=i).model_dump_json().encode(), headers)


async def breakdown(spec: dict[str, Any]) -> dict[str, float]:
    """Each step of the loop alone, one event at a time (µs of CPU per event)."""
    n = int(spec["micro_events"])
    _, b = _services(spec["urls"])
    await b.start()  # consumes: the steps below run beside its idle loops
    steps: dict[str, float] = {}
    try:
        # The relay would publish each row the steps below write, inside their measurement.
        relay = b.relay
        assert relay is not None
        await relay.stop()
        uow = b._unit_of_work
        records = [_record(Ping.event_topic, i) for i in range(2 * n)]
        envelopes = [Envelope.from_headers({k: v.decode() for k, v in r.headers}) for r in records]

        async def empty(i: int) -> None:
            async with uow(saga_id=envelopes[i].saga_id, cause=None, handler=None, allowed=None):
                pass

        async def claim(i: int) -> None:
            async with uow(saga_id="s", cause=envelopes[i], handler="floor-b.claim", allowed=None, claim=True):
                pass

        async def emit(i: int) -> None:
            async with uow(saga_id=envelopes[i].saga_id, cause=None, handler=None, allowed=None) as tx:
                tx.emit(Pong(n=i))

        commit = await _per_call(n, empty)
        steps["commit (BEGIN, COMMIT, connection)"] = commit
        steps["inbox claim"] = await _per_call(n, claim) - commit
        steps["outbox write (incl. emit)"] = await _per_call(n, emit) - commit

        # The relay's statements and the producer, one row at a time.
        async with b.engine.connect() as conn:
            driver = await hotpath.asyncpg_driver(conn)
            for i in range(n + 1):
                async with uow(saga_id="s", cause=None, handler=None, allowed=None) as tx:
                    tx.emit(Pong(n=i))
            # Each read finds the same oldest row until it is marked: read n times, then mark.
            await hotpath.fetch_due(driver, utcnow(), 1)
            c0 = time.process_time()
            for _ in range(n):
                await hotpath.fetch_due(driver, utcnow(), 1)
            steps["relay read"] = (time.process_time() - c0) / n * 1e6
            rows = await hotpath.fetch_due(driver, utcnow(), n + 1)
            await hotpath.mark_published(driver, [rows[0].id], utcnow())
            c0 = time.process_time()
            for row in rows[1:]:
                await hotpath.mark_published(driver, [row.id], utcnow())
            steps["relay mark"] = (time.process_time() - c0) / len(rows[1:]) * 1e6
        produced = [
            OutboxRecord(0, Pong.event_topic, f"k{i}", {"event_type": "floor.pong"}, b"{}") for i in range(2 * n)
        ]
        steps["produce (until acknowledged)"] = await _per_call(n, lambda i: b.transport.publish([produced[i]]))

        # Consuming and committing offsets, with aiokafka as choreo's transport uses it.
        # A topic of its own: records no service consumes.
        await b.transport.ensure_topics(["floor-micro"])
        await b.transport.publish([OutboxRecord(0, "floor-micro", f"k{i}", {}, b"{}") for i in range(n)])
        topic = b.transport.settings.topic_prefix + "floor-micro"
        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=spec["kafka"],
            group_id=f"floor-micro-{new_id()}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        await consumer.start()
        try:
            got = 0
            c0 = time.process_time()
            while got < n:
                for fetched in (await consumer.getmany(timeout_ms=1000, max_records=1)).values():
                    got += len(fetched)
            steps["consume (one record per fetch)"] = (time.process_time() - c0) / n * 1e6
            tp = next(iter(consumer.assignment()))
            steps["offset commit"] = await _per_call(n, lambda i: consumer.commit({tp: i + 1}))
        finally:
            await consumer.stop()
    finally:
        await b.stop()
    return {name: round(value, 1) for name, value in steps.items()}


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    os.environ["KAFKA_BOOTSTRAP_SERVERS"] = spec["kafka"]
    os.environ.setdefault("LOG_LEVEL", "warning")
    result: dict[str, Any] = {"choreo": {}, "bare": {}}
    for chains in spec["chains"]:
        result["choreo"][str(chains)] = await choreo_loop(spec, chains)
        result["bare"][str(chains)] = await bare_loop(
            {**spec, "topic_prefix": f"{spec['topic_prefix']}{chains}-"}, chains
        )
    os.environ["CHOREO_KAFKA_TOPIC_PREFIX"] = f"{spec['topic_prefix']}micro-"
    result["breakdown"] = await breakdown(spec)
    return result


TARGET_US = 600.0
"""choreo's own CPU per event with a null handler, at most (µs)."""


def target_row(scenarios: dict[str, Any]) -> list[Any] | None:
    """The Targets table's row: the null-handler loop's CPU per event."""
    from bench.report import _fmt, _verdict

    floor = scenarios.get("floor")
    if not floor:
        return None
    loops = floor["choreo"]
    measured = "; ".join(
        f"{_fmt(loop['us_per_event'], 0)} µs at {chains} in flight ({_fmt(loop['events_per_s'], 0)} events/s; "
        f"no guarantees: {_fmt(floor['bare'][chains]['us_per_event'], 0)} µs)"
        for chains, loop in loops.items()
    )
    return [
        f"choreo's own CPU per event (null handler) ≤ {TARGET_US:.0f} µs",
        measured,
        _verdict(all(loop["us_per_event"] <= TARGET_US for loop in loops.values())),
    ]


def section(scenarios: dict[str, Any]) -> list[str]:
    """The report's section on the null-handler loop (no lines when it was not run)."""
    from bench.report import _fmt, _table

    floor = scenarios.get("floor")
    if not floor:
        return []
    rows = []
    for chains, loop in floor["choreo"].items():
        for name, result in (("choreo", loop), ("no guarantees", floor["bare"][chains])):
            rate, cores, cpu = result["events_per_s"], result["cores"], result["us_per_event"]
            rows.append([name, chains, _fmt(rate, 0), _fmt(cores, 2), _fmt(cpu, 0)])
    steps = floor["breakdown"]
    one = floor["choreo"].get("1")
    breakdown = [[name, _fmt(value, 0)] for name, value in steps.items()]
    breakdown.append(["**sum**", _fmt(sum(steps.values()), 0)])
    return [
        "## The floor: choreo's own cost per event",
        "",
        "Two choreo services whose handlers do nothing but return the next event pass events back "
        "and forth through Kafka, each on its own PostgreSQL database, in one process "
        "(`bench/floor.py`): consume → unit of work (inbox claim, outbox write, commit) → relay "
        "(read, produce with acks=all, mark) → the other service. *No guarantees* is the same loop "
        "with aiokafka alone: consume, produce the next record, commit the offsets; no database. CPU "
        "is the process's own (user + system, every thread), per event handled; *in flight* is how "
        "many events circulate at once (1: nothing batches; 32: batches form).",
        "",
        _table(["loop", "in flight", "events/s", "cores", "µs CPU per event"], rows),
        "",
        "The loop's steps, each timed alone one event at a time in the same process (µs of CPU per "
        "event; *commit* is a unit of work that writes nothing: checkout, BEGIN, COMMIT, return; "
        "*inbox claim* and *outbox write* are what a claim or one emitted event add to it; the outbox "
        "write also sends a NOTIFY, since no relay leads in that process while it is measured). "
        "On this VM each socket write costs about 27 µs of system time (profiled), and every round "
        "trip adds event-loop wake-ups: the number of round trips per event decides the figure."
        + (f" The loop at one event in flight costs {_fmt(one['us_per_event'], 0)} µs per event." if one else ""),
        "",
        _table(["step", "µs CPU per event"], breakdown),
        "",
    ]


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit("usage: python -m bench.floor <spec.json> <out.json>")
    spec = json.loads(Path(sys.argv[1]).read_text())
    Path(sys.argv[2]).write_text(json.dumps(asyncio.run(run(spec))))


if __name__ == "__main__":
    main()
