"""`python -m bench`: measure the demo shop's order saga on PostgreSQL and Apache Kafka.

Starts a throwaway Apache Kafka broker (infra/kafka.py), uses the PostgreSQL on 127.0.0.1:5432
(infra/postgres.sh; override with BENCH_POSTGRES_URL; its databases are named
`$BENCH_DATABASE_PREFIX_<service>`, `bench_<service>` by default), runs the scenarios and writes
bench/results/results.json, docs/benchmarks.md and docs/benchmarks-latency.png.

choreo is compared with two hand-written versions of the same services, without choreo's
guarantees: `bench/baseline/` (FastStream + SQLAlchemy ORM) and `bench/lean/` (bare asyncpg and
aiokafka); the `baseline` scenario measures both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import time
from typing import Any

from bench import report
from bench.infra import DEFAULT_POSTGRES_URL, ROOT, Sampler, named_databases, postgres_pids, server_version
from bench.run import OPTIONAL, SCENARIOS, Env, Plan, plan_dict, run_all, sampling

RESULTS = ROOT / "bench" / "results" / "results.json"
DATABASE_PREFIX = os.environ.get("BENCH_DATABASE_PREFIX", "bench")
"""Lets two runs share one PostgreSQL server without dropping each other's databases."""
log = logging.getLogger("bench")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=(
            "Benchmark the demo shop's success flow (order.created -> credit.reserved -> "
            "payment.authorized -> order.approved) with every service in its own process, on "
            "PostgreSQL and a throwaway Apache Kafka broker. Scenarios: "
            "throughput (closed loop), latency (open loop at rising rates until saturation), "
            "ceiling (the same commits with bare asyncpg), baseline (the same choreography by hand, "
            "twice: on FastStream with the SQLAlchemy ORM, and lean on bare asyncpg and aiokafka), "
            "floor (choreo's own CPU per event with a null handler, against the same loop without "
            "guarantees), memory (a long run with RSS sampling), scale (1 vs 2 processes per service), "
            "recovery (a relay draining the outbox backlog of a Kafka outage), growth (the shop with and "
            "without a long history in choreo's tables)."
        ),
    )
    parser.add_argument("--quick", action="store_true", help="a short run (about 3 minutes) for development")
    parser.add_argument("--long", type=int, metavar="N", help="sagas in the memory run (default 20000; quick 1000)")
    parser.add_argument(
        "--only",
        metavar="LIST",
        help=f"comma-separated scenarios to run (default all: {','.join(SCENARIOS)}); "
        "results of the others are kept from the previous results.json",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also profile each choreo service with py-spy under closed-loop load (same as adding 'profile' to --only)",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="only rewrite docs/benchmarks.md and the plot from results.json"
    )
    parser.add_argument("--keep-databases", action="store_true", help="keep the last scenario's bench_* databases")
    args = parser.parse_args(argv)
    if args.only:
        args.only = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = sorted(set(args.only) - set(SCENARIOS + OPTIONAL))
        if unknown:
            parser.error(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS + OPTIONAL)}")
    else:
        args.only = list(SCENARIOS)
    if args.profile and "profile" not in args.only:
        args.only.append("profile")
    if args.long is not None and args.long < 1:
        parser.error("--long must be a positive number of sagas")
    return args


def machine(postgres_version: str, kafka_version: str) -> dict[str, Any]:
    import psutil

    cpu_model = "unknown"
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    versions = {}
    for package in ("faststream", "aiokafka", "sqlalchemy", "asyncpg", "pydantic", "fastapi", "uvicorn"):
        try:
            from importlib.metadata import version

            versions[package] = version(package)
        except Exception:
            versions[package] = "?"

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD")
    # Only changes to what is measured count (bench/ and docs/ are this harness and its output).
    dirty = [line[3:] for line in git("status", "--porcelain", "--", "choreo", "demo_shop").splitlines()]
    return {
        "nproc": os.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "cpu_model": cpu_model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "kafka": f"Apache Kafka {kafka_version} (single KRaft node, JVM -Xmx1g)",
        "postgresql": postgres_version,
        "packages": versions,
        "commit": commit + (f" plus uncommitted changes to {', '.join(dirty)}" if dirty else ""),
    }


async def main_async(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(ROOT))
    from infra.kafka import KAFKA_VERSION, ApacheKafka

    plan = Plan.quick(args.long) if args.quick else Plan.full(args.long)
    postgres_url = os.environ.get("BENCH_POSTGRES_URL", DEFAULT_POSTGRES_URL)
    began = time.time()
    pg_version = await server_version(postgres_url)
    work = ROOT / "bench" / "results" / "work"
    work.mkdir(parents=True, exist_ok=True)
    log.info("starting Apache Kafka %s", KAFKA_VERSION)
    kafka = ApacheKafka(num_partitions=plan.partitions, heap="1g")
    kafka.start()
    try:
        sampler = Sampler(interval=1.0)
        make_db = named_databases(postgres_url, DATABASE_PREFIX)
        env = Env(kafka=kafka.bootstrap, make_db=make_db, work=work, sampler=sampler)
        sampler.track("postgres", lambda: postgres_pids(env.databases))
        if kafka.pid:
            sampler.track("kafka", [kafka.pid])
        sampler.track("bench", [os.getpid()])
        async with sampling(env):
            scenarios = await run_all(env, plan, args.only)
    finally:
        kafka.stop()
    if not args.keep_databases:
        from bench.infra import drop_databases

        await drop_databases(
            postgres_url, [f"postgresql:///{DATABASE_PREFIX}_{name}" for name in ("orders", "customers", "payments")]
        )
    previous: dict[str, Any] = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    merged = previous.get("scenarios", {}) if not set(SCENARIOS) <= set(args.only) else {}
    merged.update(scenarios)
    command = "make bench" if not sys.argv[1:] else "python -m bench " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    results = {
        "meta": {
            "started_at": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(began)),
            "seconds": round(time.time() - began, 1),
            "command": command,
            "quick": args.quick,
            "only": args.only,
            "plan": plan_dict(plan),
            "machine": machine(pg_version, KAFKA_VERSION),
        },
        "scenarios": merged,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    report.write(results)
    log.info("done in %.0f s: %s, %s", time.time() - began, RESULTS.relative_to(ROOT), report.DOC.relative_to(ROOT))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.report_only:
        report.write(json.loads(RESULTS.read_text()))
        return 0
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
