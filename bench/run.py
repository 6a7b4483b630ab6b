"""Scenarios: each sets up fresh databases, topics and service processes, drives load, measures.

`run_all(env, plan, only)` runs the selected scenarios and returns their results (the content
of `results.json`'s "scenarios"); `bench.__main__` wraps it with Kafka, PostgreSQL and reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench import growth, measure, recovery
from bench.infra import (
    OTHER,
    ROOT,
    STOLEN,
    DatabaseFactory,
    Proc,
    Procs,
    Sampler,
    clean_env,
    create_tables,
    create_topics,
    free_port,
    wait_ready,
    without_tls,
)
from bench.infra import health as service_health

log = logging.getLogger("bench")

SERVICES = ("orders", "customers", "payments")
SCENARIOS = ("throughput", "latency", "ceiling", "baseline", "floor", "memory", "scale", "recovery", "growth")
OPTIONAL = ("profile",)
"""Run only when asked for (`--profile` or `--only profile`)."""
DRIVER_GROUP = "driver"


@dataclass
class Plan:
    """How long and how hard each scenario runs (`full()` by default, `quick()` for development)."""

    concurrency: list[int] = field(default_factory=lambda: [4, 16, 64])
    """Closed-loop concurrency levels of the throughput scenarios; the best level counts."""
    warmup: float = 5.0
    duration: float = 20.0
    rates: list[float] = field(default_factory=lambda: [10, 25, 50, 100, 200, 300, 400, 600, 800, 1000])
    """Offered loads of the latency scenarios, in sagas/s, run in order until one saturates."""
    step_duration: float = 20.0
    drain_timeout: float = 30.0
    ceiling: list[tuple[int, int]] = field(default_factory=lambda: [(1, 8), (1, 32), (2, 32)])
    """(processes, total concurrency) combinations for the ceiling; the best one counts."""
    long: int = 20_000
    long_concurrency: int = 64
    long_max_seconds: float = 900.0
    idle_tail: float = 0.0
    scale_concurrency: int = 64
    scale_duration: float = 20.0
    kafka_warmup: float = 60.0
    """Seconds of saga traffic before any measurement: the broker's JVM compiles its hot paths."""
    floor_chains: list[int] = field(default_factory=lambda: [1, 32])
    """Events in flight in the null-handler loop: one (nothing batches) and many (saturation)."""
    floor_micro_events: int = 2000
    """Events per step when the null-handler loop's steps are timed one by one."""
    customers: int = 1000
    partitions: int = 8
    saga_timeout: float = 60.0
    recovery_rows: int = 100_000
    """Outbox rows written while Kafka is down, for the relay to drain once it is back."""
    growth_rows: int = 1_000_000
    """Published outbox rows and inbox rows preloaded into each service database."""
    growth_rate: float = 25.0
    """Offered load (sagas/s) of the growth scenario's open-loop runs."""

    @classmethod
    def full(cls, long: int | None = None) -> Plan:
        return cls(long=long or 20_000)

    @classmethod
    def quick(cls, long: int | None = None) -> Plan:
        return cls(
            concurrency=[16],
            warmup=2.0,
            duration=6.0,
            rates=[10, 25, 50, 100, 200],
            step_duration=5.0,
            drain_timeout=20.0,
            ceiling=[(1, 16)],
            long=long or 1_000,
            long_max_seconds=60.0,
            scale_concurrency=16,
            scale_duration=6.0,
            kafka_warmup=5.0,
            floor_micro_events=300,
            customers=200,
            recovery_rows=10_000,
            growth_rows=50_000,
        )


@dataclass
class Env:
    """Where a run's infrastructure is, and where it keeps its files."""

    kafka: str
    make_db: DatabaseFactory
    work: Path
    sampler: Sampler
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    tansu: bool = False
    """A tansu broker (tests only): no idempotent producer, fetches not woken by new data."""

    databases: set[str] = field(default_factory=set)
    """Names of the databases made so far (their backends count as PostgreSQL's CPU)."""

    def prefix(self, scenario: str) -> str:
        return f"bench-{self.run_id}-{scenario}."

    async def database(self, service: str) -> str:
        """A fresh, empty database for `service`, reached without TLS."""
        url = without_tls(await self.make_db(service))
        self.databases.add(urlsplit(url).path.lstrip("/"))
        return url

    def quiet(self) -> float:
        """Cores other processes used over the last few seconds."""
        now = time.time()
        return self.sampler.cpu_between(now - 4, now).get(OTHER, 0.0)


# -- running the driver and the ceiling as processes -----------------------------------------


async def run_json_process(env: Env, module: str, name: str, spec: dict[str, Any], timeout: float) -> Any:
    """Run `python -m <module> spec.json out.json` (tracked by the sampler); its JSON output."""
    directory = env.work / "specs"
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"{name}-{uuid.uuid4().hex[:6]}"
    spec_file, out_file, log_file = (directory / f"{stem}{suffix}" for suffix in (".json", ".out.json", ".log"))
    spec_file.write_text(json.dumps(spec))
    with open(log_file, "wb") as out:  # noqa: ASYNC230
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            module,
            str(spec_file),
            str(out_file),
            env=clean_env(),
            cwd=str(ROOT),
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
        )
    group = f"{DRIVER_GROUP}:{stem}"
    env.sampler.track(group, [process.pid])
    try:
        code = await asyncio.wait_for(process.wait(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise RuntimeError(f"{name} did not finish in {timeout:.0f}s; see {log_file}") from None
    finally:
        env.sampler.untrack(group)
    if code != 0:
        raise RuntimeError(f"{name} exited with {code}:\n{log_file.read_text(errors='replace')[-3000:]}")
    return json.loads(out_file.read_text())


# -- the systems under test ------------------------------------------------------------------


class Shop:
    """The demo shop's three services as processes (choreo, baseline or lean), with customers to order for."""

    def __init__(self, env: Env, plan: Plan, system: str, scenario: str, *, replicas: int = 1, **extra_env: str):
        self.env, self.plan, self.system, self.scenario = env, plan, system, scenario
        self.replicas = replicas
        self.extra_env = extra_env
        self.prefix = env.prefix(scenario)
        self.urls: dict[str, str] = {}
        self.procs = Procs(env.work / "logs" / scenario)
        self.timing_files: list[Path] = []
        self.customers_file = env.work / f"customers-{scenario}.json"

    async def __aenter__(self) -> Shop:
        for name in SERVICES:
            self.urls[name] = await self.env.database(name)
        try:
            if self.system == "choreo":
                self._start_choreo()
            else:
                await self._start_baseline()
            await wait_ready(self.procs.running, timeout=90)
            for proc in self.procs.running:
                self.env.sampler.track(proc.name, [proc.pid])
            result = await self.driver({"action": "customers", "count": self.plan.customers}, timeout=120)
            self.customers_file.write_text(json.dumps(result["customers"]))
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *_: object) -> None:
        names = [proc.name for proc in self.procs.running]
        self.procs.stop()
        for name in names:  # after stopping: their shutdown is theirs, not "other processes"
            self.env.sampler.untrack(name)

    def _kafka_env(self) -> dict[str, str]:
        env = {
            "KAFKA_BOOTSTRAP_SERVERS": self.env.kafka,
            "CHOREO_KAFKA_TOPIC_PREFIX": self.prefix,
            "CHOREO_KAFKA_PARTITIONS": str(self.plan.partitions),
        }
        if self.env.tansu:
            env |= {"CHOREO_KAFKA_IDEMPOTENCE": "0", "CHOREO_KAFKA_FETCH_MAX_WAIT_MS": "5"}
        return env

    def _start_choreo(self) -> None:
        for replica in range(1, self.replicas + 1):
            for name in SERVICES:
                port = free_port()
                env = clean_env(
                    **{f"CHOREO_{name.upper()}_DATABASE_URL": self.urls[name]},
                    **self._kafka_env(),
                    HOST="127.0.0.1",
                    PORT=str(port),
                    LOG_LEVEL="warning",
                    **self.extra_env,
                )
                label = name if replica == 1 else f"{name}#{replica}"
                self.procs.start(label, ["-m", f"demo_shop.{name}"], env, port=port)

    async def _start_baseline(self) -> None:
        """The FastStream baseline (`bench.baseline`) or the lean one (`bench.lean`): same tables, same env."""
        from demo_shop.customers.models import metadata as customers_tables
        from demo_shop.orders.models import metadata as orders_tables
        from demo_shop.payments.models import metadata as payments_tables

        tables = {"orders": orders_tables, "customers": customers_tables, "payments": payments_tables}
        for name in SERVICES:
            await create_tables(self.urls[name], tables[name])
        await create_topics(self.env.kafka, [self.prefix + name for name in SERVICES], self.plan.partitions)
        run_dir = self.env.work / self.system / self.scenario
        run_dir.mkdir(parents=True, exist_ok=True)
        for name in SERVICES:
            timings, ready = run_dir / f"{name}.timings", run_dir / f"{name}.ready"
            for path in (timings, ready):
                path.unlink(missing_ok=True)
            self.timing_files.append(timings)
            env = clean_env(
                BENCH_DATABASE_URL=self.urls[name],
                KAFKA_BOOTSTRAP_SERVERS=self.env.kafka,
                BENCH_TOPIC_PREFIX=self.prefix,
                BENCH_TIMINGS=str(timings),
                BENCH_READY_FILE=str(ready),
                BENCH_KAFKA_IDEMPOTENCE="0" if self.env.tansu else "1",
            )
            self.procs.start(name, ["-m", f"bench.{self.system}", name], env, ready_file=ready)

    async def driver(self, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
        full = {
            "system": self.system,
            "orders_url": self.urls["orders"],
            "customers_url": self.urls["customers"],
            "customers_file": str(self.customers_file),
            "kafka": self.env.kafka,
            "topic_prefix": self.prefix,
            "idempotence": not self.env.tansu,
            "saga_timeout": self.plan.saga_timeout,
            **spec,
        }
        result: dict[str, Any] = await run_json_process(
            self.env, "bench.driver", f"driver-{self.scenario}", full, timeout
        )
        return result

    async def closed(self, concurrency: int, warmup: float, duration: float, **extra: Any) -> dict[str, Any]:
        # Ends are watched every 20 ms: a closed loop's workers wait for them.
        spec = {
            "action": "closed",
            "concurrency": concurrency,
            "warmup": warmup,
            "duration": duration,
            "poll_interval": 0.02,
            **extra,
        }
        return await self.driver(spec, timeout=warmup + duration + self.plan.saga_timeout + 90)

    async def open(self, rate: float, duration: float, **extra: Any) -> dict[str, Any]:
        # Latencies come from the systems' own records; the driver only needs to see the ends.
        spec = {
            "action": "open",
            "rate": rate,
            "duration": duration,
            "drain_timeout": self.plan.drain_timeout,
            "poll_interval": 0.1,
            **extra,
        }
        return await self.driver(spec, timeout=duration * 3 + self.plan.drain_timeout + 90)

    async def times(self, sagas: list[list[Any]]) -> list[measure.SagaTimes]:
        """Success-flow instants of the given driver rows, from the system's own records."""
        if self.system == "choreo":
            return await measure.choreo_times(self.urls, [row[1] for row in sagas if row[4] is not None])
        await asyncio.sleep(1.5)  # the baselines' handlers append their timestamps once a second
        return measure.baseline_times(self.timing_files, sagas)

    async def health(self) -> dict[str, Any]:
        return {proc.name: await service_health(proc) for proc in self.procs.running if proc.port}

    @property
    def service_procs(self) -> list[Proc]:
        return list(self.procs.running)


def _cpu(env: Env, window: tuple[float, float], throughput: float) -> dict[str, Any]:
    """Cores used per component in `window`, and CPU milliseconds per completed saga."""
    cores = env.sampler.cpu_between(*window)
    stolen = cores.pop(STOLEN, 0.0)
    merged: dict[str, float] = {}
    for name, value in cores.items():
        key = DRIVER_GROUP if name.startswith(DRIVER_GROUP) else name
        merged[key] = round(merged.get(key, 0.0) + value, 3)
    total = round(sum(merged.values()), 3)
    per_saga = {k: round(v / throughput * 1000, 2) for k, v in merged.items()} if throughput else {}
    return {"cores": merged, "total_cores": total, "cpu_ms_per_saga": per_saga, "stolen_cores": round(stolen, 3)}


def _window(result: dict[str, Any]) -> tuple[float, float]:
    start, end = result["window"]
    return float(start), float(end)


def _strip(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k != "sagas"}


# -- scenarios -------------------------------------------------------------------------------


async def measured_closed(shop: Shop, concurrency: int, warmup: float, duration: float, **extra: Any) -> dict[str, Any]:
    """A closed-loop driver run, with CPU per component and database work per saga."""
    before = await measure.database_stats(shop.urls)
    result = await shop.closed(concurrency, warmup, duration, **extra)
    await asyncio.sleep(1.5)  # let PostgreSQL publish the backends' counters
    after = await measure.database_stats(shop.urls)
    # The driver's own polling of the orders table is not the system's work.
    after["orders"]["xact_commit"] -= result.get("watch_queries", 0)
    run = _strip(result)
    run["cpu"] = _cpu(shop.env, _window(result), result["sagas_per_s"])
    run["database_per_saga"] = measure.per_saga(before, after, result["completed"])
    return run


async def throughput(env: Env, plan: Plan, system: str = "choreo") -> dict[str, Any]:
    """Closed loop at rising concurrency; the best sustained rate counts."""
    runs = []
    async with Shop(env, plan, system, f"{system}-throughput") as shop:
        for concurrency in plan.concurrency:
            run = await measured_closed(shop, concurrency, plan.warmup, plan.duration)
            runs.append(run)
            log.info("%s throughput at concurrency %d: %.1f sagas/s", system, concurrency, run["sagas_per_s"])
    best = max(runs, key=lambda r: r["sagas_per_s"])
    return {
        "system": system,
        "runs": runs,
        "best": best["sagas_per_s"],
        "best_concurrency": best["concurrency"],
    }


async def warmup(env: Env, plan: Plan) -> dict[str, Any]:
    """Saga traffic on a throwaway shop, so the broker is warm before anything is measured."""
    async with Shop(env, plan, "choreo", "warmup") as shop:
        result = await shop.closed(16, 0.0, plan.kafka_warmup)
    return {"seconds": plan.kafka_warmup, "sagas": result["completed"]}


def _saturated(plan: Plan, rate: float, result: dict[str, Any], summary: dict[str, Any]) -> str | None:
    if result["start_rate"] < 0.9 * rate:
        return f"the driver started only {result['start_rate']:.0f}/s"
    if result["completed"] < result["started"]:
        return (
            f"{result['started'] - result['completed']} sagas unfinished {plan.drain_timeout:.0f}s after the last start"
        )
    p99 = summary["e2e_ms"]["p99"]
    if p99 is not None and p99 > 1000:
        return f"e2e p99 {p99:.0f} ms: a queue is building"
    return None


async def latency(env: Env, plan: Plan, system: str = "choreo") -> dict[str, Any]:
    """Open loop at each offered rate until the system saturates; latencies from recorded instants."""
    steps = []
    async with Shop(env, plan, system, f"{system}-latency") as shop:
        await shop.closed(16, 0.0, plan.warmup)  # warm connections, Kafka metadata and caches
        for rate in plan.rates:
            result = await shop.open(rate, plan.step_duration)
            times = await shop.times(result["sagas"])
            summary = measure.summarize(times)
            reason = _saturated(plan, rate, result, summary)
            step = {
                "offered": rate,
                **_strip(result),
                **summary,
                "cpu": _cpu(env, _window(result), result["start_rate"]),
                "saturated": reason,
            }
            steps.append(step)
            log.info(
                "%s latency at %g/s: e2e p50 %s p99 %s ms, hop p50 %s ms%s",
                system,
                rate,
                summary["e2e_ms"]["p50"],
                summary["e2e_ms"]["p99"],
                summary["hop_all_ms"]["p50"],
                f" (saturated: {reason})" if reason else "",
            )
            if reason:
                break
            await asyncio.sleep(1.0)
    return {"system": system, "steps": steps}


async def ceiling(env: Env, plan: Plan) -> dict[str, Any]:
    """The four commits per saga with bare asyncpg, no messaging."""
    from demo_shop.customers.models import metadata as customers_tables
    from demo_shop.orders.models import metadata as orders_tables
    from demo_shop.payments.models import metadata as payments_tables

    tables = {"orders": orders_tables, "customers": customers_tables, "payments": payments_tables}
    urls = {name: await env.database(name) for name in SERVICES}
    for name in SERVICES:
        await create_tables(urls[name], tables[name])
    customers_file = env.work / "customers-ceiling.json"
    seeded = await run_json_process(
        env,
        "bench.driver",
        "ceiling-customers",
        {"action": "customers", "system": "baseline", "customers_url": urls["customers"], "count": plan.customers},
        timeout=120,
    )
    customers_file.write_text(json.dumps(seeded["customers"]))
    runs = []
    for processes, concurrency in plan.ceiling:
        spec = {
            "urls": urls,
            "customers_file": str(customers_file),
            "concurrency": max(1, concurrency // processes),
            "warmup": plan.warmup,
            "duration": plan.duration,
        }
        timeout = plan.warmup + plan.duration + 90
        parts = await asyncio.gather(
            *(
                run_json_process(env, "bench.ceiling", f"ceiling-{p}", {**spec, "seed": p}, timeout)
                for p in range(processes)
            )
        )
        rate = round(sum(p["sagas_per_s"] for p in parts), 2)
        window = (max(p["window"][0] for p in parts), min(p["window"][1] for p in parts))
        runs.append(
            {
                "processes": processes,
                "concurrency": concurrency,
                "sagas_per_s": rate,
                "saga_ms": parts[0]["saga_ms"],
                "cpu": _cpu(env, window, rate),
            }
        )
        log.info("ceiling with %d process(es), concurrency %d: %.1f sagas/s", processes, concurrency, rate)
    best = max(runs, key=lambda r: r["sagas_per_s"])
    return {"runs": runs, "best": best["sagas_per_s"]}


async def baseline(env: Env, plan: Plan) -> dict[str, Any]:
    """The hand-written choreographies: throughput and latency, as for choreo.

    The FastStream + ORM baseline's results are at the top level; the lean one's (bare asyncpg
    and aiokafka) under "lean".
    """
    result: dict[str, Any] = {
        "throughput": await throughput(env, plan, "baseline"),
        "latency": await latency(env, plan, "baseline"),
    }
    result["lean"] = {"throughput": await throughput(env, plan, "lean"), "latency": await latency(env, plan, "lean")}
    return result


async def floor(env: Env, plan: Plan) -> dict[str, Any]:
    """choreo's own CPU per event with a null handler, the same loop without guarantees, and
    the loop's steps one by one (`bench/floor.py`)."""
    spec = {
        "kafka": env.kafka,
        "urls": {"a": await env.database("floor_a"), "b": await env.database("floor_b")},
        "topic_prefix": env.prefix("floor"),
        "idempotence": not env.tansu,
        "chains": plan.floor_chains,
        "warmup": plan.warmup,
        "duration": plan.duration,
        "micro_events": plan.floor_micro_events,
    }
    timeout = len(plan.floor_chains) * 2 * (plan.warmup + plan.duration + 60) + 300
    result: dict[str, Any] = await run_json_process(env, "bench.floor", "floor", spec, timeout)
    for chains, loop in result["choreo"].items():
        log.info(
            "floor, %s chain(s): choreo %.0f µs/event (%.0f events/s), no guarantees %.0f µs/event",
            chains,
            loop["us_per_event"],
            loop["events_per_s"],
            result["bare"][chains]["us_per_event"],
        )
    return result


def _slope(series: list[tuple[float, float]]) -> float:
    """Least-squares slope of (x, y) points (0 for fewer than two)."""
    if len(series) < 2:
        return 0.0
    n = len(series)
    mx = sum(x for x, _ in series) / n
    my = sum(y for _, y in series) / n
    var = sum((x - mx) ** 2 for x, _ in series)
    return sum((x - mx) * (y - my) for x, y in series) / var if var else 0.0


async def memory(env: Env, plan: Plan) -> dict[str, Any]:
    """A long closed-loop run with short outbox retention: RSS over time, table sizes at the end."""
    retention = "30s"
    async with Shop(env, plan, "choreo", "choreo-memory", CHOREO_OUTBOX_RETENTION=retention) as shop:
        began = time.time()
        result = await shop.closed(
            plan.long_concurrency, 0.0, plan.long_max_seconds, max_sagas=plan.long, saga_timeout=plan.saga_timeout
        )
        load_end = time.time()
        sizes_at_end = {name: await measure.table_sizes(shop.urls[name]) for name in SERVICES}
        if plan.idle_tail:
            await asyncio.sleep(plan.idle_tail)
        idle_end = time.time()
        sizes_after_idle = {name: await measure.table_sizes(shop.urls[name]) for name in SERVICES}
        health = await shop.health()
        window = (result["window"][0], load_end)
        services = {}
        for proc in shop.service_procs:
            series = env.sampler.rss_series(proc.name, began, idle_end)
            during = [(t, b / 2**20) for t, b in series if window[0] <= t <= load_end]
            half = (window[0] + load_end) / 2
            slope = _slope([(t, mb) for t, mb in during if t >= half])  # MB per second
            rate = result["completed"] / max(1e-9, load_end - window[0])
            services[proc.name] = {
                "rss_mb_start": round(during[0][1], 1) if during else None,
                "rss_mb_peak": round(max(b for _, b in series) / 2**20, 1) if series else None,
                "rss_mb_end_of_load": round(during[-1][1], 1) if during else None,
                "rss_mb_final": round(series[-1][1] / 2**20, 1) if series else None,
                "slope_mb_per_min_second_half": round(slope * 60, 3),
                "slope_mb_per_10k_sagas_second_half": round(slope / rate * 10_000, 3) if rate else None,
                "series": [(round(t - began, 1), round(b / 2**20, 1)) for t, b in series[::5]],
            }
    return {
        "sagas": result["completed"],
        "requested": plan.long,
        "concurrency": plan.long_concurrency,
        "load_seconds": round(load_end - window[0], 1),
        "sagas_per_s": round(result["completed"] / max(1e-9, load_end - window[0]), 2),
        "idle_tail_seconds": plan.idle_tail,
        "outbox_retention": retention,
        "inbox_retention": "7 days (the default; choreo refuses less than 1 hour)",
        "services": services,
        "tables_at_end_of_load": sizes_at_end,
        "tables_after_idle": sizes_after_idle if plan.idle_tail else None,
        "health": health,
        "errors": result["errors"],
        "cpu": _cpu(env, window, result["completed"] / max(1e-9, load_end - window[0])),
    }


async def scale(env: Env, plan: Plan) -> dict[str, Any]:
    """One against two processes per service: same consumer groups, one relay leader per database."""
    runs = []
    for replicas in (1, 2):
        async with Shop(env, plan, "choreo", f"choreo-scale{replicas}", replicas=replicas) as shop:
            result = await measured_closed(shop, plan.scale_concurrency, plan.warmup, plan.scale_duration)
            health = await shop.health()
        replicas_report = {}
        for name, report in health.items():
            metrics = report.get("metrics", {})
            replicas_report[name] = {
                "relay_leader": bool(metrics["choreo_relay_leader"]) if "choreo_relay_leader" in metrics else None,
                "relay_published": metrics.get("choreo_relay_published_total"),
                "handled": metrics.get("choreo_handled_total"),
            }
        runs.append(
            {
                "replicas": replicas,
                "concurrency": plan.scale_concurrency,
                "sagas_per_s": result["sagas_per_s"],
                "completed": result["completed"],
                "per_process": replicas_report,
                "cpu": result["cpu"],
                "database_per_saga": result["database_per_saga"],
            }
        )
        log.info("scale with %d replica(s): %.1f sagas/s", replicas, result["sagas_per_s"])
    return {"runs": runs}


# -- profiling -------------------------------------------------------------------------------


async def _record(shop: Shop, py_spy: str, seconds: int, tag: str) -> dict[str, Any]:
    """py-spy every service process of `shop` for `seconds`; summaries by process name."""
    from bench.profile import summarize_raw

    out_dir = ROOT / "bench" / "results" / "profiles"
    out_dir.mkdir(parents=True, exist_ok=True)
    recorders = []
    for proc in shop.service_procs:
        out = out_dir / f"{tag}-{proc.name}.txt"
        # --gil: only samples holding the GIL, i.e. Python running, not waiting in a system
        # call or for a core; --nonblocking: the process is never paused.
        argv = ["record", "--pid", str(proc.pid), "--duration", str(seconds), "--rate", "200"]
        argv += ["--gil", "--nonblocking", "--format", "raw", "--output", str(out)]
        recorder = await asyncio.create_subprocess_exec(
            py_spy, *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )
        recorders.append((proc.name, out, recorder))
    summaries = {}
    for name, out, recorder in recorders:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(recorder.wait(), seconds + 30)
        if out.exists():
            summaries[name] = summarize_raw(out)
    return summaries


async def profile(env: Env, plan: Plan) -> dict[str, Any]:
    """choreo's services recorded with py-spy, at a light open-loop rate and at full load."""
    import shutil

    py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if py_spy is None:
        log.warning("py-spy is not installed (pip install py-spy): no profile")
        return {"skipped": "py-spy is not installed"}
    seconds = max(5, int(plan.duration) + 10)
    loads = []
    async with Shop(env, plan, "choreo", "choreo-profile") as shop:
        await shop.closed(16, 0.0, plan.warmup)
        light_rate = plan.rates[0]
        light = asyncio.create_task(shop.open(light_rate, seconds + 6))
        await asyncio.sleep(3)
        services = await _record(shop, py_spy, seconds, "light")
        result = await light
        loads.append(
            {
                "load": f"open loop, {light_rate:g} sagas/s",
                "sagas_per_s": result["start_rate"],
                "cpu": _cpu(env, _window(result), result["start_rate"]),
                "services": services,
            }
        )
        concurrency = plan.concurrency[-1]
        full = asyncio.create_task(shop.closed(concurrency, 3.0, seconds + 3))
        await asyncio.sleep(4)
        services = await _record(shop, py_spy, seconds, "full")
        result = await full
        loads.append(
            {
                "load": f"closed loop, {concurrency} in flight",
                "sagas_per_s": result["sagas_per_s"],
                "cpu": _cpu(env, _window(result), result["sagas_per_s"]),
                "services": services,
            }
        )
    return {"seconds": seconds, "loads": loads}


RUNNERS: dict[str, Callable[[Env, Plan], Any]] = {
    "throughput": throughput,
    "latency": latency,
    "ceiling": ceiling,
    "baseline": baseline,
    "floor": floor,
    "memory": memory,
    "scale": scale,
    "profile": profile,
    "recovery": recovery.run,
    "growth": growth.run,
}


async def _wait_for_quiet(env: Env, limit: float = 0.25, patience: float = 60.0) -> None:
    """Wait (a bounded while) until other work on the machine leaves the cores to us."""
    deadline = time.time() + patience
    await asyncio.sleep(2.5)
    while (busy := env.quiet()) > limit and time.time() < deadline:
        log.warning("other processes use %.2f cores; waiting for them to finish", busy)
        await asyncio.sleep(5)


async def run_all(env: Env, plan: Plan, only: list[str]) -> dict[str, Any]:
    """Run the `only` scenarios in the canonical order; results by scenario name."""
    results: dict[str, Any] = {}
    if set(only) - {"ceiling"}:
        log.info("warming the broker up for %.0f s", plan.kafka_warmup)
        results["warmup"] = await warmup(env, plan)
    for name in SCENARIOS + OPTIONAL:
        if name in only:
            await _wait_for_quiet(env)
            began = time.time()
            log.info("scenario %s", name)
            results[name] = await RUNNERS[name](env, plan)
            results[name]["seconds"] = round(time.time() - began, 1)
            results[name]["measured_at"] = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(began))
    return results


def plan_dict(plan: Plan) -> dict[str, Any]:
    return asdict(plan)


@asynccontextmanager
async def sampling(env: Env) -> AsyncIterator[None]:
    env.sampler.start()
    try:
        yield
    finally:
        env.sampler.stop()
