"""The benchmark harness runs end to end on a tiny load: results come out, sagas complete.

No timing is asserted: these runs share the machine with the rest of the suite.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from bench import report
from bench.__main__ import parse_args
from bench.infra import Sampler, postgres_pids
from bench.run import Env, Plan, latency, sampling

SAGAS = 20
RECORDED = Path(__file__).parent / "data" / "bench-recovery-growth.json"  # see data/README.md


def tiny_plan() -> Plan:
    return Plan(
        warmup=1.0,
        rates=[10],
        step_duration=SAGAS / 10,
        drain_timeout=60.0,
        customers=20,
        partitions=2,
        saga_timeout=60.0,
    )


async def run_latency(
    system: str, kafka_bootstrap: str, kafka_kind: str, make_db: Callable[[str], Awaitable[str]], tmp_path: Path
) -> dict[str, Any]:
    sampler = Sampler(interval=0.5)
    env = Env(kafka=kafka_bootstrap, make_db=make_db, work=tmp_path, sampler=sampler, tansu=kafka_kind == "tansu")
    sampler.track("postgres", lambda: postgres_pids(env.databases))
    async with sampling(env):
        return await latency(env, tiny_plan(), system)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("system", ["choreo", "baseline", "lean"])
async def test_latency_scenario_completes_sagas_and_measures_them(
    system: str,
    kafka_bootstrap: str,
    kafka_kind: str,
    fresh_pg_database: Callable[[str], Awaitable[str]],
    tmp_path: Path,
) -> None:
    result = await run_latency(system, kafka_bootstrap, kafka_kind, fresh_pg_database, tmp_path)

    (step,) = result["steps"]
    assert step["started"] == SAGAS
    assert step["completed"] == step["approved"] == SAGAS, step["errors"]
    assert step["sagas"] == SAGAS  # every saga's instants were found in the system's own records
    assert step["e2e_ms"]["count"] == SAGAS and step["e2e_ms"]["p50"] > 0
    assert set(step["hop_ms"]) == {"orders→customers", "customers→payments", "payments→orders"}
    assert step["cpu"]["cores"], "the sampler saw the processes"

    scenarios = {
        "choreo": {"latency": result},
        "baseline": {"baseline": {"latency": result}},
        "lean": {"baseline": {"lean": {"latency": result}}},
    }[system]
    document = report.render(results(scenarios))
    assert "## Latency (open loop)" in document
    assert f"| {system} | 10 |" in document


def results(scenarios: dict[str, Any]) -> dict[str, Any]:
    """`scenarios` as results.json holds them, with made-up metadata."""
    machine = {"nproc": 2, "cpu_model": "cpu", "ram_gb": 1, "kernel": "k", "python": "3", "kafka": "k"}
    machine |= {"postgresql": "p", "packages": {}, "commit": "c"}
    meta = {"started_at": "now", "seconds": 1.0, "command": "pytest", "plan": vars(tiny_plan()), "machine": machine}
    return {"meta": meta, "scenarios": scenarios}


def test_recovery_and_growth_have_targets_and_sections() -> None:
    document = report.render(results(json.loads(RECORDED.read_text())))

    assert "## Recovery: draining an outage's backlog" in document
    assert "**Per-key order holds.**" in document
    assert "## Growth: a hop with a long history" in document
    targets = [row[0] for row in report.targets(results(json.loads(RECORDED.read_text())))]
    assert any(t.startswith("relay drains an outage's backlog") for t in targets)
    assert any(t.startswith("with 1,000,000 published outbox and inbox rows") for t in targets)


def test_cli_names_unknown_scenarios() -> None:
    assert parse_args(["--quick", "--only", "throughput,scale"]).only == ["throughput", "scale"]
    with pytest.raises(SystemExit):
        parse_args(["--only", "everything"])
