"""docs/benchmarks.md and docs/benchmarks-latency.png, rendered from results.json.

The analysis of where the time goes is kept beside this module in `notes.md` and inserted
as written; everything else is computed from the results.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.infra import ROOT

DOC = ROOT / "docs" / "benchmarks.md"
PLOT = ROOT / "docs" / "benchmarks-latency.png"
NOTES = Path(__file__).resolve().parent / "notes.md"

TARGETS = {
    "throughput": 300.0,
    "hop_p50_ms": 5.0,
    "e2e_p99_ms_at_100": 100.0,
    "baseline_ratio": 0.7,
    "rss_mb": 150.0,
}
LEAN = "lean baseline (asyncpg + aiokafka)"
LEAN_TARGETS = {"throughput_ratio": 0.9, "cpu_ratio": 1.3, "hop_ratio": 1.2, "e2e_p99_ms": 100.0, "rate": 50.0}
"""choreo against the lean baseline: ratios to lean's figures, and lean's own e2e p99 bound at `rate`."""
SERVICE_NAMES = ("orders", "customers", "payments")
FLAT_MB_PER_10K = 1.0
"""RSS counts as flat when it grows less than this over the second half of the long run."""
COMPONENTS = ("orders", "customers", "payments", "driver", "postgres", "kafka", "bench", "other processes")


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("**met**" if ok else "**missed**")


def _step_at(steps: list[dict[str, Any]], rate: float) -> dict[str, Any] | None:
    return next((s for s in steps if s["offered"] == rate), None)


def _component_rows(runs: list[tuple[str, dict[str, Any]]]) -> list[list[Any]]:
    rows = []
    for label, run in runs:
        cpu = run.get("cpu", {})
        per = cpu.get("cpu_ms_per_saga", {})
        cores = cpu.get("cores", {})
        rows.append(
            [label, _fmt(run.get("sagas_per_s")), _fmt(cpu.get("total_cores"), 2)]
            + [f"{_fmt(cores.get(c), 2)} / {_fmt(per.get(c))}" if c in cores else "-" for c in COMPONENTS]
            + [_fmt(cpu.get("stolen_cores"), 2)]
        )
    return rows


def targets(results: dict[str, Any]) -> list[list[Any]]:
    """Each target, what was measured, and whether it was met."""
    sc = results["scenarios"]
    rows: list[list[Any]] = []
    best = sc.get("throughput", {}).get("best")
    rows.append(
        [
            f"sustained throughput ≥ {TARGETS['throughput']:.0f} sagas/s",
            f"{_fmt(best)} sagas/s" if best is not None else "not run",
            _verdict(None if best is None else best >= TARGETS["throughput"]),
        ]
    )
    steps = sc.get("latency", {}).get("steps", [])
    light = steps[0] if steps else None
    at100 = _step_at(steps, 100)
    if light is not None:
        hop = light["hop_all_ms"]["p50"]
        rows.append(
            [
                f"hop p50 ≤ {TARGETS['hop_p50_ms']:.0f} ms",
                f"{_fmt(hop)} ms at {light['offered']:g} sagas/s"
                + "".join(
                    f", {_fmt(s['hop_all_ms']['p50'])} ms at {s['offered']:g} sagas/s"
                    for s in steps[1:]
                    if s["offered"] in (25, 100) and not s["saturated"]
                ),
                _verdict(hop is not None and hop <= TARGETS["hop_p50_ms"]),
            ]
        )
        if at100 is not None and not at100["saturated"]:
            p99 = at100["e2e_ms"]["p99"]
            rows.append(
                [
                    f"e2e p99 ≤ {TARGETS['e2e_p99_ms_at_100']:.0f} ms at 100 sagas/s",
                    f"{_fmt(p99)} ms",
                    _verdict(p99 is not None and p99 <= TARGETS["e2e_p99_ms_at_100"]),
                ]
            )
        else:
            last = steps[-1]
            reason = (
                f"saturated at {last['offered']:g} sagas/s ({last['saturated']})" if last["saturated"] else "not run"
            )
            rows.append([f"e2e p99 ≤ {TARGETS['e2e_p99_ms_at_100']:.0f} ms at 100 sagas/s", reason, _verdict(False)])
    base = sc.get("baseline", {}).get("throughput", {}).get("best")
    if best and base:
        ratio = best / base
        rows.append(
            [
                f"throughput ≥ {TARGETS['baseline_ratio']}x the FastStream baseline",
                f"{ratio:.2f}x ({_fmt(best)} vs {_fmt(base)} sagas/s)",
                _verdict(ratio >= TARGETS["baseline_ratio"]),
            ]
        )
    rows += lean_targets(sc)
    memory = sc.get("memory")
    if memory:
        peak = max(s["rss_mb_peak"] or 0 for s in memory["services"].values())
        slope = max(abs(s["slope_mb_per_10k_sagas_second_half"] or 0) for s in memory["services"].values())
        flat = slope <= FLAT_MB_PER_10K
        rows.append(
            [
                f"service RSS ≤ {TARGETS['rss_mb']:.0f} MB and flat",
                f"peak {peak:.0f} MB; steepest second-half slope {slope:.2f} MB per 10k sagas "
                f"over {memory['sagas']:,} sagas",
                _verdict(peak <= TARGETS["rss_mb"] and flat),
            ]
        )
    for scenario in _scenario_modules():
        row = scenario.target_row(sc)
        if row is not None:
            rows.append(row)
    return rows


def _lean(sc: dict[str, Any]) -> dict[str, Any]:
    """The lean baseline's results (inside the baseline scenario's), or {} before it existed."""
    lean: dict[str, Any] = (sc.get("baseline") or {}).get("lean") or {}
    return lean


def _best_run(throughput: dict[str, Any]) -> dict[str, Any] | None:
    return max(throughput.get("runs", []), key=lambda r: r["sagas_per_s"], default=None)


def _service_cpu(run: dict[str, Any] | None) -> dict[str, float]:
    """CPU ms per saga of each service process; one handled event per saga on the success flow."""
    per = (run or {}).get("cpu", {}).get("cpu_ms_per_saga", {})
    return {name: per[name] for name in SERVICE_NAMES if per.get(name) is not None}


def _cpu_ratio_row(label: str, ours: dict[str, Any] | None, lean: dict[str, Any] | None) -> list[Any]:
    limit = LEAN_TARGETS["cpu_ratio"]
    target = f"a service's CPU per handled event ≤ {limit}x the {LEAN}'s, {label}"
    mine, theirs = _service_cpu(ours), _service_cpu(lean)
    names = [n for n in SERVICE_NAMES if n in mine and theirs.get(n)]
    if not names:
        return [target, "not run", _verdict(None)]
    ratios = {n: mine[n] / theirs[n] for n in names}
    measured = ", ".join(f"{n} {_fmt(mine[n])} vs {_fmt(theirs[n])} ms ({ratios[n]:.2f}x)" for n in names)
    if ours and ours.get("saturated"):
        measured += " (choreo saturated here)"
    return [target, measured, _verdict(max(ratios.values()) <= limit)]


def lean_targets(sc: dict[str, Any]) -> list[list[Any]]:
    """choreo against the lean baseline: throughput, each service's CPU per handled event, hops, e2e."""
    lean = _lean(sc)
    if not lean:
        return []
    rows: list[list[Any]] = []
    best, lean_best = sc.get("throughput", {}).get("best"), lean.get("throughput", {}).get("best")
    target = f"throughput ≥ {LEAN_TARGETS['throughput_ratio']}x the {LEAN}"
    if best and lean_best:
        ratio = best / lean_best
        measured = f"{ratio:.2f}x ({_fmt(best)} vs {_fmt(lean_best)} sagas/s)"
        rows.append([target, measured, _verdict(ratio >= LEAN_TARGETS["throughput_ratio"])])
    else:
        rows.append([target, "not run", _verdict(None)])
    rate = LEAN_TARGETS["rate"]
    steps, lean_steps = sc.get("latency", {}).get("steps", []), lean.get("latency", {}).get("steps", [])
    rows.append(_cpu_ratio_row(f"at {rate:g} sagas/s", _step_at(steps, rate), _step_at(lean_steps, rate)))
    rows.append(
        _cpu_ratio_row(
            "at saturation (best closed-loop run)",
            _best_run(sc.get("throughput", {})),
            _best_run(lean.get("throughput", {})),
        )
    )
    parts, ok = [], []
    for offered in (10.0, rate):
        ours, theirs = _step_at(steps, offered), _step_at(lean_steps, offered)
        if ours is None or theirs is None or not theirs["hop_all_ms"]["p50"]:
            parts.append(f"{offered:g}/s not run")
            continue
        mine, base = ours["hop_all_ms"]["p50"], theirs["hop_all_ms"]["p50"]
        parts.append(f"{_fmt(mine)} vs {_fmt(base)} ms at {offered:g}/s ({mine / base:.2f}x)")
        ok.append(mine <= LEAN_TARGETS["hop_ratio"] * base)
    rows.append(
        [
            f"hop p50 ≤ {LEAN_TARGETS['hop_ratio']}x the {LEAN}'s at 10 and {rate:g} sagas/s",
            "; ".join(parts),
            _verdict(all(ok) if len(ok) == 2 or not all(ok) else None),
        ]
    )
    ours, theirs = _step_at(steps, rate), _step_at(lean_steps, rate)
    bound = LEAN_TARGETS["e2e_p99_ms"]
    target = f"e2e p99 < {bound:.0f} ms at {rate:g} sagas/s, as long as the {LEAN}'s is"
    if ours is None or theirs is None:
        rows.append([target, "not run", _verdict(None)])
    else:
        mine, base = ours["e2e_ms"]["p99"], theirs["e2e_ms"]["p99"]
        applies = base is not None and base < bound
        measured = f"{_fmt(mine)} ms; lean {_fmt(base)} ms" + ("" if applies else " (lean's is not, so no bound)")
        rows.append([target, measured, _verdict(mine is not None and mine < bound if applies else None)])
    return rows


def lean_cpu_rows(sc: dict[str, Any]) -> list[list[Any]]:
    """Each system's service CPU ms per saga at the lean targets' rate and at its best closed-loop run."""
    systems = (
        ("choreo", sc.get("throughput", {}), sc.get("latency", {})),
        (LEAN, _lean(sc).get("throughput", {}), _lean(sc).get("latency", {})),
        (
            "FastStream + ORM baseline",
            sc.get("baseline", {}).get("throughput", {}),
            sc.get("baseline", {}).get("latency", {}),
        ),
    )
    rows = []
    rate = LEAN_TARGETS["rate"]
    for label, throughput, latency in systems:
        for load, run in (
            (f"open loop, {rate:g} sagas/s", _step_at(latency.get("steps", []), rate)),
            ("best closed loop", _best_run(throughput)),
        ):
            if run is None:
                continue
            per = _service_cpu(run)
            sagas = run.get("sagas_per_s", run.get("start_rate"))
            load_text = f"{load} ({_fmt(sagas)} sagas/s)" + (" - saturated" if run.get("saturated") else "")
            rows.append([label, load_text, *[_fmt(per.get(n)) for n in SERVICE_NAMES], _fmt(sum(per.values()))])
    return rows


def _scenario_modules() -> tuple[Any, ...]:
    """Scenarios that render their own target row and section (imported late: they import this module)."""
    from bench import floor, growth, recovery

    return (floor, recovery, growth)


def _latency_rows(steps: list[dict[str, Any]], system: str) -> list[list[Any]]:
    rows = []
    for s in steps:
        e2e, hop = s["e2e_ms"], s["hop_all_ms"]
        rows.append(
            [
                system,
                f"{s['offered']:g}",
                _fmt(s["start_rate"]),
                s["sagas"],
                _fmt(e2e["p50"]),
                _fmt(e2e["p95"]),
                _fmt(e2e["p99"]),
                _fmt(hop["p50"]),
                _fmt(hop["p95"]),
                _fmt(hop["p99"]),
                " / ".join(_fmt(s["handler_ms"][k]["p50"]) for k in ("customers", "payments", "orders")),
                _fmt(s["cpu"].get("total_cores"), 2),
                _fmt(s["cpu"].get("cores", {}).get("other processes"), 2),
                _fmt(s["cpu"].get("stolen_cores"), 2),
                s["saturated"] or "no",
            ]
        )
    return rows


def _hop_rows(steps: list[dict[str, Any]], system: str) -> list[list[Any]]:
    rows = []
    for s in steps:
        if s["saturated"]:
            continue
        rows.append(
            [system, f"{s['offered']:g}"] + [f"{_fmt(h['p50'])} / {_fmt(h['p99'])}" for h in s["hop_ms"].values()]
        )
    return rows


def plot(results: dict[str, Any], path: Path = PLOT) -> bool:
    """Latency percentiles against offered load; False when there is nothing to plot."""
    sc = results["scenarios"]
    series = {
        "choreo": sc.get("latency", {}).get("steps", []),
        "FastStream baseline": sc.get("baseline", {}).get("latency", {}).get("steps", []),
        "lean baseline": _lean(sc).get("latency", {}).get("steps", []),
    }
    if not any(series.values()):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (e2e_ax, hop_ax) = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = {"choreo": "tab:blue", "FastStream baseline": "tab:orange", "lean baseline": "tab:green"}
    styles = {"p50": "-", "p95": "--", "p99": ":"}
    for name, steps in series.items():
        if not steps:
            continue
        x = [s["offered"] for s in steps]
        for q, style in styles.items():
            e2e_ax.plot(x, [s["e2e_ms"][q] for s in steps], style, marker="o", color=colors[name], label=f"{name} {q}")
            hop_ax.plot(
                x, [s["hop_all_ms"][q] for s in steps], style, marker="o", color=colors[name], label=f"{name} {q}"
            )
        for ax, key in ((e2e_ax, "e2e_ms"), (hop_ax, "hop_all_ms")):
            saturated = [s for s in steps if s["saturated"]]
            ax.scatter(
                [s["offered"] for s in saturated],
                [s[key]["p99"] for s in saturated],
                marker="x",
                s=120,
                color="red",
                zorder=5,
                label="saturated" if name == "choreo" else None,
            )
    for ax, title in (
        (e2e_ax, "end to end: order.created → order.approved"),
        (hop_ax, "one hop: commit → handler start"),
    ):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("offered load (sagas/s, open loop)")
        ax.set_ylabel("latency (ms)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    e2e_ax.legend(fontsize=7)
    machine = results["meta"]["machine"]
    fig.suptitle(
        f"demo shop order saga on {machine['nproc']} cores ({machine['cpu_model']}), PostgreSQL + Apache Kafka"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def render(results: dict[str, Any]) -> str:
    """The Markdown document."""
    rows: list[list[Any]]
    meta, sc = results["meta"], results["scenarios"]
    machine = meta["machine"]
    out: list[str] = []
    add = out.append
    add("# Benchmarks")
    add("")
    add(
        "The demo shop's success flow — `order.created` → `credit.reserved` → `payment.authorized` → "
        "`order.approved` — with each service (orders, customers, payments) in its own OS process, "
        "its own PostgreSQL database and its own consumer group, on a single-node Apache Kafka. "
        "A separate driver process starts sagas the way an application does: it opens the orders "
        "service's database without Kafka (`service.start(kafka=False)`) and calls the demo's "
        "`place_order`; the outbox row and PostgreSQL's `NOTIFY` wake the orders process's relay."
    )
    add("")
    add(f"Measured {meta['started_at']}; the run took {meta['seconds'] / 60:.1f} minutes. Reproduce with:")
    add("")
    add("```sh")
    add("sudo bash infra/postgres.sh      # PostgreSQL on 127.0.0.1:5432 (postgres/postgres)")
    add("python infra/kafka.py fetch      # Apache Kafka jars from Maven Central, once")
    add(f"{meta['command']:<32} # this run; `make bench` = the full run, `--quick` ≈ 3 minutes")
    add("```")
    if meta.get("only"):
        # A partial run keeps the other scenarios' results from earlier runs: say which is which.
        when = ", ".join(
            f"{name} {data['measured_at']}"
            for name, data in results["scenarios"].items()
            if isinstance(data, dict) and data.get("measured_at")
        )
        add("")
        add(f"That run measured {', '.join(meta['only'])}; each scenario below was measured at: {when}.")
    add("")
    add(
        "Raw numbers: [`bench/results/results.json`](../bench/results/results.json); "
        "the harness: [`bench/`](../bench/)."
    )
    add("")
    add("## Targets")
    add("")
    add(_table(["target", "measured", ""], targets(results)))
    add("")
    add("## Machine")
    add("")
    packages = ", ".join(f"{k} {v}" for k, v in machine["packages"].items())
    add(
        _table(
            ["", ""],
            [
                ["CPU", f"{machine['nproc']} x {machine['cpu_model']} (nproc = {machine['nproc']})"],
                ["RAM", f"{machine['ram_gb']} GB"],
                ["kernel", machine["kernel"]],
                ["Python", machine["python"]],
                ["Kafka", machine["kafka"]],
                ["PostgreSQL", f"{machine['postgresql']} (Debian package, default settings, fsync on)"],
                ["packages", packages],
                ["commit", machine["commit"]],
            ],
        )
    )
    add("")
    add(
        "Everything shares the two cores: the three services, the driver, PostgreSQL and the Kafka "
        "JVM. The tables below show, for each run, the cores each component used and its CPU "
        "milliseconds per completed saga (sampled with psutil once a second); *other processes* is "
        "what the machine did besides them — other work on this shared host, and the kernel's "
        "loopback networking; *stolen* is time the hypervisor gave this VM's cores to someone else "
        "(recorded from the second full run on). Two full runs an hour apart differed by up to 20% "
        "in choreo's throughput: read differences below that as noise."
    )
    add("")

    if "throughput" in sc or sc.get("baseline", {}).get("throughput"):  # lean runs with the baseline
        add("## Throughput (closed loop)")
        add("")
        add(
            "Each worker starts a saga and waits for its order to leave PENDING, then starts the next; "
            f"{meta['plan']['warmup']:g} s of warm-up, then completions are counted for "
            f"{meta['plan']['duration']:g} s. Per component: cores used / CPU ms per saga."
        )
        add("")
        runs: list[tuple[str, dict[str, Any]]] = []
        for system, label in (("throughput", "choreo"), ("baseline", "baseline")):
            data = sc.get(system) or {}
            if system == "baseline":
                data = data.get("throughput") or {}
            for run in data.get("runs", []):
                runs.append((f"{label}, {run['concurrency']} in flight", run))
        runs += [
            (f"lean, {run['concurrency']} in flight", run) for run in _lean(sc).get("throughput", {}).get("runs", [])
        ]
        add(_table(["run", "sagas/s", "cores", *COMPONENTS, "stolen"], _component_rows(runs)))
        add("")
        add("Database work per saga (from `pg_stat_database`, all three databases, the driver's polling excluded):")
        add("")
        db_rows = []
        for label, run in runs:
            all_dbs = run.get("database_per_saga", {}).get("all")
            if all_dbs:
                db_rows.append(
                    [
                        label,
                        _fmt(all_dbs["xact_commit"]),
                        _fmt(all_dbs["xact_rollback"]),
                        _fmt(all_dbs["tup_inserted"]),
                        _fmt(all_dbs["tup_updated"]),
                        _fmt(all_dbs["tup_fetched"]),
                        _fmt(all_dbs["tup_returned"]),
                    ]
                )
        add(
            _table(
                ["run", "transactions", "rollbacks", "rows inserted", "rows updated", "rows fetched", "rows returned"],
                db_rows,
            )
        )
        add("")

    if "ceiling" in sc:
        add("## The ceiling: the same commits with bare asyncpg")
        add("")
        add(
            "Per saga, the four transactions the success flow must make durable — insert the order; lock "
            "the customer, update its credit and insert the reservation; insert the payment; lock and "
            "approve the order — run one after the other with bare asyncpg on the same three databases "
            "and tables, with no messaging at all. No implementation of this choreography can commit less."
        )
        add("")
        rows = [
            [
                f"{r['processes']} process(es), {r['concurrency']} in flight",
                _fmt(r["sagas_per_s"]),
                _fmt(r["saga_ms"]["p50"]),
                _fmt(r["cpu"]["cores"].get("driver"), 2),
                _fmt(r["cpu"]["cores"].get("postgres"), 2),
                _fmt(r["cpu"]["cpu_ms_per_saga"].get("postgres")),
            ]
            for r in sc["ceiling"]["runs"]
        ]
        add(
            _table(
                ["run", "sagas/s", "saga p50 ms", "client cores", "PostgreSQL cores", "PostgreSQL CPU ms/saga"], rows
            )
        )
        add("")
        best = sc.get("throughput", {}).get("best")
        base = sc.get("baseline", {}).get("throughput", {}).get("best")
        ceiling = sc["ceiling"]["best"]
        lines = []
        if best:
            lines.append(
                f"choreo reaches **{best / ceiling:.0%}** of the ceiling ({_fmt(best)} of {_fmt(ceiling)} sagas/s)"
            )
        if base:
            lines.append(f"the FastStream baseline **{base / ceiling:.0%}** ({_fmt(base)} sagas/s)")
        lean_best = _lean(sc).get("throughput", {}).get("best")
        if lean_best:
            lines.append(f"the lean baseline **{lean_best / ceiling:.0%}** ({_fmt(lean_best)} sagas/s)")
        if lines:
            add("; ".join(lines) + ".")
            add("")

    baseline_steps = sc.get("baseline", {}).get("latency", {}).get("steps", [])
    if "latency" in sc or baseline_steps or _lean(sc).get("latency"):
        add("## Latency (open loop)")
        add("")
        add(
            f"Sagas are started on a fixed schedule at each offered rate for {meta['plan']['step_duration']:g} s, "
            "rising until a rate saturates (the driver cannot start them on time, they do not finish within "
            f"{meta['plan']['drain_timeout']:g} s, or the e2e p99 passes 1 s). Instants come from what the "
            "systems record themselves: for choreo, each outbox row's `created_at` (taken just before its "
            "transaction commits, in the emitting service's database) and each inbox row's `processed_at` "
            "(taken when the reacting handler starts, in the consumer's database), joined by event id. "
            "**e2e** = `order.approved`'s `created_at` - `order.created`'s; a **hop** = the emitting "
            "transaction's `created_at` → the reacting handler's start; **handler** = handler start → "
            "its own outbox row (customers / payments / orders). The baselines (FastStream + ORM, and "
            "lean) note the same two instants in their handlers."
        )
        add("")
        rows = _latency_rows(sc.get("latency", {}).get("steps", []), "choreo")
        rows += _latency_rows(baseline_steps, "baseline")
        rows += _latency_rows(_lean(sc).get("latency", {}).get("steps", []), "lean")
        add(
            _table(
                [
                    "system",
                    "offered/s",
                    "started/s",
                    "sagas",
                    "e2e p50",
                    "e2e p95",
                    "e2e p99",
                    "hop p50",
                    "hop p95",
                    "hop p99",
                    "handler p50 (c/p/o)",
                    "cores",
                    "other",
                    "stolen",
                    "saturated",
                ],
                rows,
            )
        )
        add("")
        split = [s for s in sc.get("latency", {}).get("steps", []) if s.get("hop_to_kafka_ms") and not s["saturated"]]
        if split:
            add(
                "choreo's hops split at the relay's mark (`published_at`, written after Kafka acknowledged): "
                "commit → published (relay wake-up, read, produce with acks=all) and published → handler "
                "start (consumer fetch, dispatch, transaction start), p50 / p99 ms:"
            )
            add("")
            add(
                _table(
                    ["offered/s", "commit → published", "published → handler start", "whole hop"],
                    [
                        [
                            f"{s['offered']:g}",
                            f"{_fmt(s['hop_to_kafka_ms']['p50'])} / {_fmt(s['hop_to_kafka_ms']['p99'])}",
                            f"{_fmt(s['hop_from_kafka_ms']['p50'])} / {_fmt(s['hop_from_kafka_ms']['p99'])}",
                            f"{_fmt(s['hop_all_ms']['p50'])} / {_fmt(s['hop_all_ms']['p99'])}",
                        ]
                        for s in split
                    ],
                )
            )
            add("")
        add("Milliseconds. Per hop, p50 / p99 (ms), for the loads that did not saturate:")
        add("")
        hop_rows = _hop_rows(sc.get("latency", {}).get("steps", []), "choreo")
        hop_rows += _hop_rows(baseline_steps, "baseline")
        hop_rows += _hop_rows(_lean(sc).get("latency", {}).get("steps", []), "lean")
        add(
            _table(["system", "offered/s", "orders → customers", "customers → payments", "payments → orders"], hop_rows)
        )
        add("")
        if PLOT.exists():
            add("![latency percentiles against offered load](benchmarks-latency.png)")
            add("")

    cpu_rows = lean_cpu_rows(sc) if _lean(sc) else []
    if cpu_rows:
        add("## Service CPU per handled event")
        add("")
        add(
            "CPU milliseconds per saga of each service process, from the runs above: the open-loop step at "
            f"{LEAN_TARGETS['rate']:g} sagas/s and each system's best closed-loop run. On the success flow "
            "each service handles one event per saga, so this is its CPU per handled event."
        )
        add("")
        add(_table(["system", "load", *SERVICE_NAMES, "all three"], cpu_rows))
        add("")

    if "memory" in sc:
        m = sc["memory"]
        add("## Memory over a long run")
        add("")
        add(
            f"{m['sagas']:,} sagas (of {m['requested']:,} requested) in {m['load_seconds']:.0f} s, closed loop with "
            f"{m['concurrency']} in flight ({_fmt(m['sagas_per_s'])} sagas/s), with `CHOREO_OUTBOX_RETENTION="
            f"{m['outbox_retention']}` (the cleaner runs once a minute); inbox retention: {m['inbox_retention']}. "
            "RSS of each service process, sampled every second; the slope is a least-squares fit over "
            f"the second half of the run, and counts as flat below {FLAT_MB_PER_10K:g} MB per 10k sagas."
        )
        add("")
        rows = [
            [
                name,
                _fmt(s["rss_mb_start"]),
                _fmt(s["rss_mb_peak"]),
                _fmt(s["rss_mb_end_of_load"]),
                _fmt(s["slope_mb_per_min_second_half"], 2),
                _fmt(s["slope_mb_per_10k_sagas_second_half"], 2),
            ]
            for name, s in m["services"].items()
        ]
        add(_table(["service", "RSS start MB", "peak MB", "end MB", "slope MB/min", "slope MB/10k sagas"], rows))
        add("")
        rows = []
        for name, tables in m["tables_at_end_of_load"].items():
            o, i = tables["choreo_outbox"], tables["choreo_inbox"]
            rows.append(
                [
                    name,
                    o["rows"],
                    o.get("unpublished"),
                    f"{o['bytes'] / 2**20:.1f}",
                    i["rows"],
                    f"{i['bytes'] / 2**20:.1f}",
                ]
            )
        add("Tables at the end of the run:")
        add("")
        add(_table(["database", "outbox rows", "unpublished", "outbox MB", "inbox rows", "inbox MB"], rows))
        add("")

    if "scale" in sc:
        add("## Scale-out: one and two processes per service")
        add("")
        add(
            "The second process of each service runs with the same environment: it joins the same "
            "consumer group (Kafka splits the partitions between the two) and stands by as relay while "
            "the first holds the database's advisory lock. Closed loop, "
            f"{meta['plan']['scale_concurrency']} in flight."
        )
        add("")
        rows = []
        for run in sc["scale"]["runs"]:
            leaders = sum(1 for p in run["per_process"].values() if p["relay_leader"])
            handled = ", ".join(f"{n} {_fmt(p['handled'])}" for n, p in run["per_process"].items())
            rows.append(
                [run["replicas"], _fmt(run["sagas_per_s"]), _fmt(run["cpu"]["total_cores"], 2), leaders, handled]
            )
        add(
            _table(
                [
                    "processes per service",
                    "sagas/s",
                    "cores",
                    "relay leaders (of all processes)",
                    "records handled per process",
                ],
                rows,
            )
        )
        add("")

    for scenario in _scenario_modules():
        out.extend(scenario.section(sc))

    loads = (sc.get("profile") or {}).get("loads") or []
    if loads:
        add("## Profile of the services")
        add("")
        add(
            f"py-spy (`--gil --nonblocking`, 200 Hz) on each choreo service for {sc['profile']['seconds']} s at "
            "two loads, counting only samples that held the GIL (Python running). Layers are exclusive, "
            "matched from the top of the stack: SQLAlchemy runs its work in greenlets, whose stacks do not "
            "show the choreo function that called it, so the handlers' transactions and the relay's "
            "statements share the first layer."
        )
        add("")
        names = [(i, name) for i, load in enumerate(loads) for name in load["services"]]
        layers: list[str] = []
        for load in loads:
            for summary in load["services"].values():
                layers += [k for k in summary.get("layers_pct", {}) if k not in layers]
        header = ["% of samples", *[f"{name} @ {'light' if i == 0 else 'full'}" for i, name in names]]
        rows = [
            [layer, *[_fmt(loads[i]["services"][name].get("layers_pct", {}).get(layer)) for i, name in names]]
            for layer in layers
        ]
        rows.append(["samples", *[loads[i]["services"][name].get("samples") for i, name in names]])
        add(_table(header, rows))
        add("")
        for load in loads:
            cpu = load["cpu"]["cpu_ms_per_saga"]
            add(
                f"- {load['load']} ({_fmt(load['sagas_per_s'])} sagas/s): CPU ms per saga "
                + ", ".join(f"{k} {_fmt(v)}" for k, v in cpu.items())
            )
        add("")
        for i, name in names:
            summary = loads[i]["services"][name]
            top = "; ".join(f"{k} {v}%" for k, v in list(summary.get("self_top_functions_pct", {}).items())[:6])
            add(f"- {name} @ {'light' if i == 0 else 'full'}, top self time: {top}")
        add("")

    if NOTES.exists():
        add(NOTES.read_text().strip())
        add("")
    add("## Method notes")
    add("")
    add(
        "- Fresh databases (`bench_orders`, `bench_customers`, `bench_payments`, dropped and created) and a "
        "fresh topic prefix per scenario; topics have "
        f"{meta['plan']['partitions']} partitions; 1,000 customers with a large credit limit; order totals "
        "10.00-99.99, never ending in .13 (the demo's payments decline those)."
    )
    add(
        "- The demo's orders service schedules a 30 s deadline with every order (a second outbox row, "
        "written with the start); approving the order withdraws it (deletes the unpublished row) in the "
        "same transaction. A choreo saga is therefore four events and three handler transactions, plus "
        "a scheduled row written and deleted; the baseline and the ceiling have no deadline."
    )
    add(
        "- Before anything is measured, a throwaway shop runs sagas for "
        f"{meta['plan']['kafka_warmup']:g} s: a fresh Kafka JVM spends its first minute compiling, which "
        "otherwise doubles its CPU per saga in whichever scenario comes first."
    )
    add(
        "- Database connections are plain TCP (`ssl=disable`) for every system: asyncpg's default "
        "negotiates TLS whenever the server offers it (Debian's PostgreSQL does, even on 127.0.0.1), which "
        "costs ~80% more client CPU per transaction here; the compose deployment has no TLS either."
    )
    add(
        "- The driver watches for ends by polling the orders table (`id = ANY(in-flight ids)`): every "
        "20 ms in closed loops, every 100 ms in open loops, the same query for every system. Latencies "
        "never come from the driver."
    )
    add(
        "- The baseline (`bench/baseline/`): three FastStream services with the demo's own SQLAlchemy models "
        "and row locks; each handler commits, then `broker.publish`es (acks=all, idempotent producer, like "
        "choreo's relay). Its subscribers use `max_workers=8` with `AckPolicy.ACK`: eight consumers per "
        "group, each owning whole partitions, committing the offset after each message — per-key order and "
        "commit-after-processing, as choreo gives. No outbox, inbox, dead letters or retries: an event is "
        "lost when a process dies between commit and publish."
    )
    add(
        f"- The {LEAN}, `bench/lean/`: the same three services written the leanest way without choreo — "
        "an `AIOKafkaConsumer` per service (auto-commit off) and an `AIOKafkaProducer` (acks=all, "
        "idempotent), hand-written SQL on an asyncpg pool (prepared and cached per connection by asyncpg; "
        "the pool's reset query on every release skipped, as the handlers leave no session state), no ORM. "
        "The demo's tables and row locks (the customer `FOR UPDATE` when reserving credit, the order when "
        "approving it); the same JSON bodies and `type` header as the FastStream baseline. Each "
        "poll's records are handled partition by partition in order, partitions side by side (8 pool "
        "connections); each handler commits, then sends its reply; the offsets are committed once the "
        "batch's replies are acknowledged. The driver inserts the order with one asyncpg statement and "
        "publishes `order.created` itself. No outbox, inbox or retries: an event is lost when a process "
        "dies between commit and publish, and nothing recognizes a redelivered event (the tables' "
        "unique keys reject a second reservation or payment)."
    )
    add(
        "- Service CPU per handled event = a service process's CPU ms per saga: on the success flow "
        "each service handles exactly one event per saga (customers `order.created`, payments "
        "`credit.reserved`, orders `payment.authorized`). The driver's order insert is the driver's, "
        "not the orders service's; choreo's orders process does relay the driver's `order.created` "
        "(its relay runs there), which both baselines' drivers publish themselves."
    )
    add(
        "- The ceiling, the driver, the services, PostgreSQL and Kafka all compete for the same cores, so "
        "the absolute numbers are this machine's; the ratios are the portable part."
    )
    add("")
    return "\n".join(out)


def write(results: dict[str, Any]) -> None:
    """Write the plot and the document."""
    plot(results)
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(render(results))
