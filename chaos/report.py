"""A soak's result as text for the terminal, and as the "Chaos soak" section of docs/reliability.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

BEGIN, END = "<!-- chaos:begin (written by python -m chaos) -->", "<!-- chaos:end -->"


def summary(result: dict[str, Any]) -> str:
    """Plain text: sagas by flow, faults with times, timings, each invariant and its violations."""
    lines = [
        f"== {result['run']}: {result['sagas']} sagas placed ({result.get('attempts')} attempts), "
        f"{result['replicas']} process(es) per service"
    ]
    for flow, ends in result["flows"].items():
        lines.append(f"  {flow:24} " + ", ".join(f"{n} {state}" for state, n in sorted(ends.items())))
    http = result["http"]
    lines.append(
        f"  HTTP: {http['requests']} requests, {http['refused_connects_retried']} refused connects retried, "
        f"{http['lost_responses']} lost responses {http['unknown_outcomes']}, {http['http_5xx']} answered 5xx"
    )
    lines.append("  faults:")
    for f in result["faults"]:
        lines.append(f"    at {f['at']:6.1f}s ({f['seconds']}s) {f['kind']} {f['target']}: {f['detail']}")
    t = result["timings"]
    lines.append(
        f"  time: startup {t.get('startup')}s, load+faults {t.get('load_and_faults')}s, "
        f"quiesce {t.get('quiesce')}s, checks {t.get('checks')}s, total {t.get('total')}s"
    )
    for label, counts in result.get("relay_kills", {}).items():
        lines.append(
            f"  relay kill of {label}: {counts['unmarked']} rows unmarked, of which {counts['on_topic_twice']} "
            f"were on the topic twice (published before the kill and again after)"
        )
    for name, outcome in result["invariants"].items():
        lines.append(f"  {'PASS' if outcome['ok'] else f'FAIL ({count(outcome)})'} {name}")
        lines += [f"       - {v}" for v in outcome["violations"]]
    return "\n".join(lines)


def count(outcome: dict[str, Any]) -> int:
    """How many violations an invariant had (older results kept only the first few, and a tally)."""
    if "count" in outcome:
        return int(outcome["count"])
    found = outcome["violations"]
    if found and found[-1].startswith("... and "):
        return len(found) - 1 + int(found[-1].split()[2])
    return len(found)


def _table(results: list[dict[str, Any]]) -> list[str]:
    head = "| | " + " | ".join(r["run"] for r in results) + " |"
    rows = [head, "|---" * (len(results) + 1) + "|"]

    def row(label: str, cell: Any) -> None:
        rows.append(f"| {label} | " + " | ".join(str(cell(r)) for r in results) + " |")

    row("date, commit", lambda r: f"{r['date']}, {r['commit']}")
    row("processes per service", lambda r: r["replicas"])
    row("sagas placed (attempts; per s)", lambda r: f"{r['sagas']} ({r.get('attempts')}; {r['offered_rate']:g})")
    for flow in results[0]["flows"]:
        row(f"{flow}", lambda r, f=flow: ", ".join(f"{n} {s}" for s, n in sorted(r["flows"][f].items())))
    kinds = sorted({k for r in results for k in r["faults_by_kind"]})
    for kind in kinds:
        row(f"fault: {kind}", lambda r, k=kind: r["faults_by_kind"].get(k, 0))
    row("refused connects retried", lambda r: r["http"]["refused_connects_retried"])
    row("lost responses", lambda r: r["http"]["lost_responses"])
    row(
        "unknown outcomes (lost, 5xx, refused), settled",
        lambda r: ", ".join(f"{n} {k}" for k, n in sorted(r["http"]["unknown_outcomes"].items())),
    )
    row("load + faults", lambda r: f"{r['timings']['load_and_faults']} s")
    row(
        "time to quiesce",
        lambda r: f"{r['timings']['quiesce']} s" if r["timings"]["quiesce"] is not None else "not quiet",
    )
    row("whole run", lambda r: f"{r['timings']['total']} s")
    for name in results[0]["invariants"]:
        row(name, lambda r, n=name: "pass" if r["invariants"][n]["ok"] else f"**FAIL** ({count(r['invariants'][n])})")
    return rows


def render_docs(results_dir: Path, doc: Path) -> None:
    """Rewrite the chaos section of `doc` (between its markers) from the results on disk."""
    results = [json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"))]
    results.sort(key=lambda r: (r["run"].startswith("short"), r["run"]))
    section = [BEGIN, "## Chaos soak", "", SECTION_TEXT.strip(), ""]
    if results:
        section += ["### Latest runs", "", *_table(results), ""]
        for r in results:
            failed = {n: o["violations"] for n, o in r["invariants"].items() if not o["ok"]}
            section.append(f"**{r['run']}** fault schedule (seconds from the first order):")
            section.append("")
            section += [f"- {f['at']} s, {f['kind']} {f['target']}: {f['detail']}" for f in r["faults"]]
            section += [
                f"- relay kill of {label}: {c['unmarked']} rows unmarked in the outbox, "
                f"{c['on_topic_twice']} of them on the topic twice (published before the kill and again after)"
                for label, c in r.get("relay_kills", {}).items()
            ]
            after = r["http"].get("http_5xx_after")
            if after:
                section.append(
                    "- HTTP 5xx answers, by the fault they followed: "
                    + "; ".join(f"{n} after {k}" for k, n in after.items())
                )
            section.append("")
            if failed:
                section.append(f"Violations in {r['run']}:")
                section.append("")
                for name, found in failed.items():
                    section.append(f"- {name}:")
                    section += [f"  - `{v[:300]}`" for v in found]
                section.append("")
    section.append(END)
    text = doc.read_text() if doc.exists() else "# Reliability\n\n"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + "\n".join(section) + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip("\n") + "\n\n" + "\n".join(section) + "\n"
    doc.write_text(text)


SECTION_TEXT = """
`make chaos` (or `python -m chaos`) runs the demo shop as separate processes (`python -m
demo_shop.<service>`, as compose.yaml does) on PostgreSQL and an Apache Kafka broker of its own
(4 partitions per topic, a fresh topic prefix and fresh databases per run), drives at least
2,000 sagas of every flow through the HTTP API at 10 per second, and injects faults meanwhile.
Once the shop is quiet (every order terminal, every outbox drained, the inboxes no longer
growing for 2 s; at most 120 s) it checks the invariants below straight from the three databases
and the topics, prints each violation, and exits non-zero on any. It runs with one process per
service, then with two (`--replicas 2` alone): with two, the standby relay takes over and
partitions move while the faults land. Each full run takes 3-4 minutes on a quiet 2-core host
(8-12 minutes when other jobs load it). `python -m chaos --short` (about 300 sagas, eight faults,
two processes per service, about 1.5 minutes) runs in CI after the tests. Results:
`chaos/results/<run>.json`; service logs: `chaos/logs/<run>/`.

Flows, as shares of the load: success 35 %, credit limit exceeded 15 %, unknown customer 10 %,
payment declined 15 %, cancel after approval 25 % (approved, then `POST /orders/{id}/cancel`).
The deadline flow is not driven: the order deadline is a fixed 30 s and the demo has no hook to
hold one payment back; a saga a fault keeps past its deadline ends that way, and the checks
accept a deadline rejection for any flow.

Faults, one every 5 s (3 s in the short run) while the load goes on:

- `kill`: SIGKILL one process of a service (round robin over its replicas), restarted 1 s later;
  each service three times;
- `relay-kill`: SIGKILL the process holding the service's relay lock (found through `pg_locks`
  and the holder's client port) right after a burst of 60 orders, while rows wait in its outbox:
  the broker is frozen for 1 s first, so the relay's batch in flight waits unread in the broker's
  socket; the leader is killed, then the broker resumes and appends that batch, which nobody
  will mark: killed between publish and mark. The rows unmarked at the kill, and how many of them
  reached the topic twice (from the dead leader, then from the next), are recorded;
- `kafka-pause`: SIGSTOP the broker for 10 s, then SIGCONT;
- `kafka-restart`: stop the broker and start it on the same ports and log directory;
- `pg-terminate`: `pg_terminate_backend` on every connection to each service's database;
- `blackhole`: the orders processes reach PostgreSQL through the harness's asyncio TCP proxy,
  which stops forwarding bytes without closing a socket for 20 s (10 s in the short run), on the
  replica that leads the orders relay.

The HTTP driver retries only requests that surely never left (connection refused), and cancels
(a second cancel answers 409). `POST /orders` takes no client-chosen id or idempotency key, so a
request whose response was lost (or answered 5xx) is not retried: its outcome is settled at the
end by finding the order in the orders database (each saga's total is unique). That is a gap in
the API: a client cannot safely retry placing an order.

Invariants: every order terminal; each saga ends as its flow says (or by its deadline), and no
order exists that no saga placed; each customer's credit held equals both its RESERVED
reservations and the totals of its APPROVED orders; exactly one `payment.authorized` per
approved or cancelled order, its payment AUTHORIZED or REFUNDED, and one `payment.refunded` per
cancelled order; nothing charged for a rejected order (no AUTHORIZED payment, every
authorization refunded, no authorization at all for a declined one); every outbox row published,
and on its topic; every event on a topic in the inbox of each handler that handles its type;
per key, the first occurrence of each event on its topic in the producer's outbox id order
(duplicates allowed, an inversion never; scheduled deadline rows excepted, they are due later);
no dead letters (table or topic); no HTTP 5xx answered by the shop; no service process exiting
on its own.
"""
