"""The growth scenario: a hop costs the same with a long history in choreo's tables.

The choreo shop runs twice at the same open-loop rate, then closed loop: once on empty
databases, once after each service's database was given `plan.growth_rows` published outbox
rows and as many inbox rows, i.e. the history a service keeps before retention (7 days by
default) deletes it. The preloaded rows are copies of the shop's own rows (its topics, event
types, headers, payloads and handler names) with fresh random ids, written and published
between a day and an hour ago in id order, so the cleaner leaves them alone during the run.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import asyncpg

from bench import measure
from bench.infra import asyncpg_dsn

if TYPE_CHECKING:
    from bench.run import Env, Plan, Shop

log = logging.getLogger("bench")
TARGET_RATIO = 1.10
"""Hop p50 and CPU per saga with the history may be at most this many times the empty run's."""
CHUNK = 100_000
"""Rows per INSERT: long statements, but not one transaction holding a million rows."""
SERVICES = ("orders", "customers", "payments")

# Copies of the service's own published rows (`templates`), numbered by generate_series: a new
# event id (also in the headers), a new saga id (also the key, where the key was the saga id),
# and instants spread in id order from 24 h to 1 h ago. Volatile functions sit in the inner
# select list, so they are evaluated once per row.
_OUTBOX = """
INSERT INTO choreo_outbox
    (event_id, topic, "key", event_type, event_version, saga_id, headers, payload,
     created_at, available_at, published_at)
SELECT e.id, t.topic, CASE WHEN t."key" = t.saga_id THEN e.saga ELSE t."key" END, t.event_type,
       t.event_version, e.saga,
       jsonb_set(jsonb_set(t.headers::jsonb, '{choreo-event-id}', to_jsonb(e.id)),
                 '{choreo-saga-id}', to_jsonb(e.saga))::json,
       t.payload, e.at, e.at, e.at + interval '5 milliseconds'
FROM (SELECT g, gen_random_uuid()::text AS id, gen_random_uuid()::text AS saga,
             now() - interval '24 hours' + g * (interval '23 hours' / $3) AS at
      FROM generate_series($1::int, $2::int - 1) AS g) AS e
JOIN growth_templates AS t ON t.i = e.g % (SELECT count(*) FROM growth_templates)
ORDER BY e.g
"""
_INBOX = """
INSERT INTO choreo_inbox (consumer, event_id, processed_at)
SELECT c.consumer, e.id, e.at
FROM (SELECT g, gen_random_uuid()::text AS id,
             now() - interval '24 hours' + g * (interval '23 hours' / $3) AS at
      FROM generate_series($1::int, $2::int - 1) AS g) AS e
JOIN growth_consumers AS c ON c.i = e.g % (SELECT count(*) FROM growth_consumers)
"""


async def preload(url: str, rows: int) -> dict[str, Any]:
    """Add `rows` published outbox rows and `rows` inbox rows to one service database."""
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        began = time.time()
        await conn.execute(
            "CREATE TEMP TABLE growth_templates AS SELECT row_number() OVER (ORDER BY id) - 1 AS i,"
            ' topic, "key", event_type, event_version, saga_id, headers, payload FROM choreo_outbox'
            " WHERE published_at IS NOT NULL ORDER BY id LIMIT 500"
        )
        await conn.execute(
            "CREATE TEMP TABLE growth_consumers AS SELECT row_number() OVER (ORDER BY consumer) - 1 AS i,"
            " consumer FROM (SELECT DISTINCT consumer FROM choreo_inbox) AS c"
        )
        templates = await conn.fetchval("SELECT count(*) FROM growth_templates")
        consumers = await conn.fetchval("SELECT count(*) FROM growth_consumers")
        if not templates or not consumers:
            raise RuntimeError(f"growth: nothing to copy in {url} ({templates} outbox, {consumers} inbox rows)")
        for statement in (_OUTBOX, _INBOX):
            for start in range(0, rows, CHUNK):
                await conn.execute(statement, start, min(rows, start + CHUNK), rows)
        inserted = time.time()
        await conn.execute("VACUUM ANALYZE choreo_outbox")
        await conn.execute("VACUUM ANALYZE choreo_inbox")
        return {
            "insert_seconds": round(inserted - began, 1),
            "vacuum_seconds": round(time.time() - inserted, 1),
            "templates": int(templates),
            "consumers": int(consumers),
        }
    finally:
        await conn.close()


async def _checkpoint(url: str) -> float:
    """Write the preload's dirty pages now, not during the measured run; seconds taken."""
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        began = time.time()
        await conn.execute("CHECKPOINT")
        return round(time.time() - began, 1)
    finally:
        await conn.close()


async def _tables(shop: Shop) -> dict[str, Any]:
    return {name: await measure.table_sizes(shop.urls[name]) for name in SERVICES}


def _services_cpu(cpu: dict[str, Any]) -> float | None:
    per = cpu.get("cpu_ms_per_saga", {})
    if not all(name in per for name in SERVICES):
        return None
    return round(float(sum(per[name] for name in SERVICES)), 2)


async def _measure(env: Env, plan: Plan, label: str, rows: int) -> dict[str, Any]:
    from bench.run import Shop, _cpu, _strip, _window, measured_closed

    run: dict[str, Any] = {"preloaded_rows": rows}
    async with Shop(env, plan, "choreo", f"choreo-growth-{label}") as shop:
        await shop.closed(16, 0.0, plan.warmup)  # warm connections and caches; also the templates
        if rows:
            began = time.time()
            loads = await asyncio.gather(*(preload(shop.urls[name], rows) for name in SERVICES))
            checkpoint = await _checkpoint(shop.urls["orders"])
            run["preload"] = {
                "seconds": round(time.time() - began, 1),
                "checkpoint_seconds": checkpoint,
                "databases": dict(zip(SERVICES, loads, strict=True)),
            }
            log.info(
                "growth: preloaded %d outbox and inbox rows per database in %.0f s", rows, run["preload"]["seconds"]
            )
            await asyncio.sleep(2.0)  # let the preload's backends and the checkpointer settle
        run["tables_before"] = await _tables(shop)
        result = await shop.open(plan.growth_rate, plan.step_duration)
        summary = measure.summarize(await shop.times(result["sagas"]))
        cpu = _cpu(env, _window(result), result["start_rate"])
        run["open"] = {
            **_strip(result),
            **summary,
            "cpu": cpu,
            "services_cpu_ms_per_saga": _services_cpu(cpu),
        }
        closed = await measured_closed(shop, plan.concurrency[-1], plan.warmup, plan.duration)
        closed["services_cpu_ms_per_saga"] = _services_cpu(closed["cpu"])
        run["closed"] = closed
        run["tables_after"] = await _tables(shop)
    log.info(
        "growth (%s): hop p50 %s ms at %g/s, services %s CPU ms per saga; closed loop %.1f sagas/s",
        label,
        summary["hop_all_ms"]["p50"],
        plan.growth_rate,
        run["open"]["services_cpu_ms_per_saga"],
        closed["sagas_per_s"],
    )
    return run


def _ratio(new: float | None, old: float | None) -> float | None:
    return round(new / old, 3) if new is not None and old else None


async def run(env: Env, plan: Plan) -> dict[str, Any]:
    """The shop on empty databases, then with `plan.growth_rows` rows of history in each."""
    empty = await _measure(env, plan, "empty", 0)
    preloaded = await _measure(env, plan, "preloaded", plan.growth_rows)
    e, p = empty["open"], preloaded["open"]
    return {
        "rate": plan.growth_rate,
        "rows": plan.growth_rows,
        "concurrency": plan.concurrency[-1],
        "empty": empty,
        "preloaded": preloaded,
        "ratios": {
            "hop_p50": _ratio(p["hop_all_ms"]["p50"], e["hop_all_ms"]["p50"]),
            "hop_p99": _ratio(p["hop_all_ms"]["p99"], e["hop_all_ms"]["p99"]),
            "services_cpu_ms_per_saga": _ratio(p["services_cpu_ms_per_saga"], e["services_cpu_ms_per_saga"]),
            "postgres_cpu_ms_per_saga": _ratio(
                p["cpu"]["cpu_ms_per_saga"].get("postgres"), e["cpu"]["cpu_ms_per_saga"].get("postgres")
            ),
            "closed_sagas_per_s": _ratio(preloaded["closed"]["sagas_per_s"], empty["closed"]["sagas_per_s"]),
            "closed_services_cpu_ms_per_saga": _ratio(
                preloaded["closed"]["services_cpu_ms_per_saga"], empty["closed"]["services_cpu_ms_per_saga"]
            ),
        },
        "target_ratio": TARGET_RATIO,
    }


# -- report ----------------------------------------------------------------------------------


def target_row(scenarios: dict[str, Any]) -> list[Any] | None:
    """The Targets table's row: hop p50 and services' CPU per saga, preloaded against empty."""
    from bench.report import _fmt, _verdict

    g = scenarios.get("growth")
    if not g:
        return None
    ratios, e, p = g["ratios"], g["empty"]["open"], g["preloaded"]["open"]
    hop, cpu = ratios["hop_p50"], ratios["services_cpu_ms_per_saga"]
    met = None if hop is None or cpu is None else hop <= g["target_ratio"] and cpu <= g["target_ratio"]
    return [
        f"with 1,000,000 published outbox and inbox rows, hop p50 and CPU per saga within "
        f"{g['target_ratio'] - 1:.0%} of an empty database",
        f"{g['rows']:,} rows: hop p50 {_fmt(e['hop_all_ms']['p50'])} → {_fmt(p['hop_all_ms']['p50'])} ms "
        f"({_fmt(hop, 2)}x), services {_fmt(e['services_cpu_ms_per_saga'])} → "
        f"{_fmt(p['services_cpu_ms_per_saga'])} CPU ms per saga ({_fmt(cpu, 2)}x) at {g['rate']:g} sagas/s",
        _verdict(met),
    ]


def section(scenarios: dict[str, Any]) -> list[str]:
    """The report's section on the growth scenario (no lines when it was not run)."""
    from bench.report import _fmt, _table

    g = scenarios.get("growth")
    if not g:
        return []
    empty, preloaded, ratios = g["empty"], g["preloaded"], g["ratios"]

    def row(label: str, run: dict[str, Any]) -> list[Any]:
        o, c = run["open"], run["closed"]
        tables = run["tables_before"]["orders"]
        return [
            label,
            f"{tables['choreo_outbox']['rows']:,}",
            f"{tables['choreo_inbox']['rows']:,}",
            _fmt(o["start_rate"]),
            _fmt(o["hop_all_ms"]["p50"]),
            _fmt(o["hop_all_ms"]["p99"]),
            _fmt(o["e2e_ms"]["p50"]),
            _fmt(o["services_cpu_ms_per_saga"]),
            _fmt(o["cpu"]["cpu_ms_per_saga"].get("postgres")),
            _fmt(c["sagas_per_s"]),
            _fmt(c["services_cpu_ms_per_saga"]),
        ]

    ratio_row = [
        "with history / empty",
        "",
        "",
        "",
        _fmt(ratios["hop_p50"], 2),
        _fmt(ratios["hop_p99"], 2),
        "",
        _fmt(ratios["services_cpu_ms_per_saga"], 2),
        _fmt(ratios["postgres_cpu_ms_per_saga"], 2),
        _fmt(ratios["closed_sagas_per_s"], 2),
        _fmt(ratios["closed_services_cpu_ms_per_saga"], 2),
    ]
    load = preloaded["preload"]
    per_db = load["databases"]
    inserts = ", ".join(f"{name} {d['insert_seconds']:.0f} s" for name, d in per_db.items())
    vacuums = ", ".join(f"{d['vacuum_seconds']:.0f}" for d in per_db.values())
    after = preloaded["tables_after"]
    kept = min(t["choreo_outbox"]["rows"] for t in after.values())
    return [
        "## Growth: a hop with a long history",
        "",
        f"The shop twice, each time on fresh databases: open loop at {g['rate']:g} sagas/s, then closed loop "
        f"with {g['concurrency']} in flight; the second time each service database first gets "
        f"{g['rows']:,} published outbox rows and {g['rows']:,} inbox rows, i.e. history retention has not "
        "deleted yet (7 days by default). They are copies of the shop's own rows (topics, event types, headers, "
        "payloads, handler names) with fresh random ids, written and published between a day and an hour ago "
        "in id order (`INSERT … SELECT … FROM generate_series`, then `VACUUM ANALYZE` and a `CHECKPOINT`), so "
        "the cleaner leaves them alone. Hops as in the latency scenario; CPU per saga of the three services "
        "together and of PostgreSQL. Rows below: the orders database at the start of the measured run.",
        "",
        _table(
            [
                "run",
                "outbox rows",
                "inbox rows",
                "started/s",
                "hop p50",
                "hop p99",
                "e2e p50",
                "services CPU ms/saga",
                "PostgreSQL CPU ms/saga",
                "closed loop sagas/s",
                "closed loop services CPU ms/saga",
            ],
            [row("empty", empty), row("with history", preloaded), ratio_row],
        ),
        "",
        f"Preloading the three databases (concurrently) took {load['seconds']:.0f} s: inserts {inserts}; "
        f"`VACUUM ANALYZE` {vacuums} s; `CHECKPOINT` {load['checkpoint_seconds']:.0f} s. At the end of the run "
        f"every database still held at least {kept:,} outbox rows.",
        "",
    ]
