"""`python -m chaos`: the chaos soak of the demo shop on PostgreSQL and Apache Kafka.

    python -m chaos                 # full: 2,000 sagas, full fault schedule, 1 then 2 replicas
    python -m chaos --replicas 2    # full, two processes per service only
    python -m chaos --short         # ~300 sagas, a few faults, 2 replicas (CI, < 4 minutes)

Needs PostgreSQL (infra/postgres.sh; CHOREO_CHAOS_POSTGRES_URL overrides the URL) and the Apache
Kafka jars (infra/kafka.py fetch); it starts its own broker. Exits non-zero on any violation.
Writes chaos/results/<run>.json and the "Chaos soak" section of docs/reliability.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import asyncpg

from bench.infra import DEFAULT_POSTGRES_URL, ROOT
from chaos import faults
from chaos.driver import FLOWS, Driver
from chaos.invariants import (
    Evidence,
    Record,
    check,
    dead_letter_topics,
    handler_map,
    read_databases,
    read_topics,
    reconcile,
)
from chaos.report import render_docs, summary
from chaos.shop import SERVICES, Shop

RESULTS = ROOT / "chaos" / "results"


async def quiesce(shop: Shop, timeout: float) -> float | None:
    """Seconds until every order is terminal, every outbox drained and the inboxes stop growing."""
    began = time.monotonic()
    previous: list[tuple[int, ...]] = []
    while time.monotonic() - began < timeout:
        await asyncio.sleep(1)
        try:
            state: dict[str, int] = {}
            for service in SERVICES:
                conn = await shop.connect(shop.urls[service])
                try:
                    row = await conn.fetchrow(
                        """SELECT (SELECT count(*) FROM choreo_outbox
                                   WHERE published_at IS NULL AND available_at <= now()) AS backlog,
                                  (SELECT count(*) FROM choreo_outbox) AS outbox,
                                  (SELECT count(*) FROM choreo_inbox) AS inbox"""
                    )
                    state.update({f"{service} {k}": v for k, v in row.items()})
                    if service == "orders":
                        state["pending"] = await conn.fetchval("SELECT count(*) FROM orders WHERE state = 'PENDING'")
                finally:
                    await conn.close()
        except (OSError, asyncpg.PostgresError):
            continue  # the harness's own reads may meet a fault too
        previous = [*previous[-2:], tuple(state.values())]
        backlog = sum(v for k, v in state.items() if k.endswith("backlog"))
        if state["pending"] == 0 and backlog == 0 and len(previous) == 3 and len(set(previous)) == 1:
            return round(time.monotonic() - began, 1)
    return None


async def watch(shop: Shop, crashes: list[str], stop: asyncio.Event) -> None:
    """Restart any replica that died without being killed on purpose, recording the crash."""
    while not stop.is_set():
        for replica in shop.replicas:
            if not replica.alive() and not replica.killed and replica.popen is not None:
                crashes.append(f"{replica.name} exited with {replica.popen.returncode}: {replica.tail(5)}")
                replica.start()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1)


async def progress(driver: Driver, stop: asyncio.Event) -> None:
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 15)
        placed = sum(1 for s in driver.sagas if s.placed != "not yet")
        print(
            f"  {time.monotonic() - driver.started:6.1f}s: {len(driver.sagas)} sagas started, {placed} answered, "
            f"{driver.refused} refused connects, {driver.lost} lost responses, {len(driver.http_5xx)} HTTP 5xx",
            flush=True,
        )


async def soak(
    run: str, replicas: int, sagas: int, rate: float, schedule: list[faults.Fault], gap: float, quiet_timeout: float
) -> dict[str, Any]:
    postgres_url = os.environ.get("CHOREO_CHAOS_POSTGRES_URL", DEFAULT_POSTGRES_URL)
    log_dir = ROOT / "chaos" / "logs" / run
    shop = Shop(run, replicas, log_dir, postgres_url)
    timings: dict[str, float | None] = {}
    began = time.monotonic()
    print(
        f"== {run}: {sagas} sagas at {rate}/s, {replicas} process(es) per service, {len(schedule)} faults", flush=True
    )
    driver: Driver | None = None
    crashes: list[str] = []
    stop = asyncio.Event()
    try:
        await shop.open()
        timings["startup"] = round(time.monotonic() - began, 1)
        driver = Driver(shop, sagas, rate)
        await driver.setup_customers()
        driver.started = time.monotonic()
        injector = faults.Injector(shop, driver, gap)
        faults_done = asyncio.Event()
        helpers = [asyncio.create_task(watch(shop, crashes, stop)), asyncio.create_task(progress(driver, stop))]
        fault_task = asyncio.create_task(injector.run(schedule, faults_done))
        await driver.run(faults_done)
        await fault_task
        timings["load_and_faults"] = round(time.monotonic() - driver.started, 1)
        timings["quiesce"] = await quiesce(shop, quiet_timeout)
        stop.set()
        await asyncio.gather(*helpers)
        checked = time.monotonic()
        handlers, topics_of = handler_map()
        found = await read_databases(shop.connect, shop.urls)
        records = await read_topics(shop.kafka.bootstrap, shop.topic_prefix, [*SERVICES, *dead_letter_topics(SERVICES)])
        evidence = Evidence(
            **found,
            records=records,
            handlers=handlers,
            topics_of=topics_of,
            sagas=driver.sagas,
            http_5xx=driver.http_5xx,
            crashes=crashes,
        )
        reconciled = reconcile(evidence)
        relay_kills = relay_kill_evidence(injector.unmarked, records)
        invariants = check(evidence)
        if timings["quiesce"] is None:
            invariants["quiet within the timeout"] = [f"not quiet after {quiet_timeout:.0f}s"]
        timings["checks"] = round(time.monotonic() - checked, 1)
    finally:
        stop.set()
        if driver is not None:
            await driver.close()
        await shop.close()
    timings["total"] = round(time.monotonic() - began, 1)
    states: dict[str, Counter[str]] = {flow: Counter() for flow in FLOWS}
    by_id = {o["id"]: o for o in evidence.orders}
    for saga in driver.sagas:
        order = by_id.get(saga.order_id or "")
        if order is None:
            states[saga.flow]["not placed"] += 1
        elif "deadline" in (order["rejection_reason"] or ""):
            states[saga.flow]["REJECTED by deadline"] += 1
        else:
            states[saga.flow][order["state"]] += 1
    return {
        "run": run,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": _commit(),
        "replicas": replicas,
        "sagas": sum(1 for saga in driver.sagas if saga.order_id is not None),
        "attempts": len(driver.sagas),
        "offered_rate": rate,
        "flows": {flow: dict(counter) for flow, counter in states.items()},
        "http": {
            "requests": driver.requests,
            "refused_connects_retried": driver.refused,
            "lost_responses": driver.lost,
            "http_5xx": len(driver.http_5xx),
            "unknown_outcomes": reconciled,
            "driver_errors": driver.errors[:20],
            "http_5xx_after": after_which_fault(driver.http_5xx, injector.records),
        },
        "exceptions_in_service_logs": errors_in_logs(shop),
        "faults": injector.records,
        "faults_by_kind": dict(Counter(f["kind"] for f in injector.records)),
        "relay_kills": relay_kills,
        "timings": timings,
        "records_on_topics": {topic: len(rs) for topic, rs in records.items()},
        "invariants": {
            name: {"ok": not found, "count": len(found), "violations": shown(found)}
            for name, found in invariants.items()
        },
        "shop": shop.describe(),
    }


def shown(found: list[str], limit: int = 8) -> list[str]:
    return found if len(found) <= limit else [*found[:limit], f"... and {len(found) - limit} more"]


def relay_kill_evidence(
    unmarked: dict[str, list[tuple[str, str]]], records: dict[str, list[Record]]
) -> dict[str, dict[str, int]]:
    """Per relay kill: its unmarked rows, and how many of them reached the topic twice.

    Twice means published before the kill (unmarked) and again by the next leader: the kill
    landed between publish and mark.
    """
    seen = Counter((topic, r.event_id) for topic, rs in records.items() for r in rs)
    return {
        label: {
            "unmarked": len(rows),
            "on_topic_twice": sum(1 for row in rows if seen[row] >= 2),
            "on_topic_once": sum(1 for row in rows if seen[row] == 1),
        }
        for label, rows in unmarked.items()
    }


def after_which_fault(http_5xx: list[dict[str, Any]], records: list[dict[str, Any]]) -> dict[str, int]:
    """How many 5xx answers came after each fault (before the next one)."""
    counts: Counter[str] = Counter()
    for answer in http_5xx:
        before = [f"{f['kind']} {f['target']} at {f['at']}s" for f in records if f["at"] <= answer["at"]]
        counts[before[-1] if before else "before any fault"] += 1
    return dict(counts)


ERROR_LINE = re.compile(r"^((?:sqlalchemy|asyncpg|aiokafka)[\w.]*(?:Error|Exception|Timeout)\w*):? ?(.{0,90})")


def errors_in_logs(shop: Shop) -> dict[str, dict[str, int]]:
    """Per replica, the final exception lines of the tracebacks in its log, counted."""
    found: dict[str, dict[str, int]] = {}
    for replica in shop.replicas:
        counts: Counter[str] = Counter()
        with contextlib.suppress(OSError):
            for line in replica.log.read_text(errors="replace").splitlines():
                match = ERROR_LINE.match(line)
                if match and not line.startswith("sqlalchemy.dialects"):
                    counts[f"{match[1]}: {match[2]}"] += 1
        found[replica.name] = dict(counts.most_common(6))
    return found


def _commit() -> str:
    with contextlib.suppress(Exception):
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    return "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chaos", description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true", help="~300 sagas and a few faults (CI)")
    parser.add_argument("--replicas", type=int, action="append", help="processes per service (repeatable)")
    parser.add_argument("--sagas", type=int, help="sagas per run (default 2000, short 300)")
    parser.add_argument("--rate", type=float, help="offered sagas per second (default 10, short 3.5)")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/reliability.md")
    args = parser.parse_args(argv)

    if args.short:
        mode, schedule, gap, quiet = "short", faults.SHORT, 3.0, 60.0
        replica_counts, sagas, rate = args.replicas or [2], args.sagas or 300, args.rate or 3.5
    else:
        mode, schedule, gap, quiet = "full", faults.FULL, 5.0, 120.0
        replica_counts, sagas, rate = args.replicas or [1, 2], args.sagas or 2000, args.rate or 10.0
    RESULTS.mkdir(parents=True, exist_ok=True)
    failed = False
    for replicas in replica_counts:
        run = f"{mode}-replicas-{replicas}"
        result = asyncio.run(soak(run, replicas, sagas, rate, schedule, gap, quiet))
        (RESULTS / f"{run}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(summary(result), flush=True)
        failed |= not all(i["ok"] for i in result["invariants"].values())
    if not args.no_docs:
        render_docs(RESULTS, ROOT / "docs" / "reliability.md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
