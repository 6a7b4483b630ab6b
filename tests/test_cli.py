"""`choreo` commands through typer's CliRunner: outputs, filters, exit codes and one-line errors."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from choreo.cli import app, serve
from choreo.envelope import utcnow
from choreo.testing import record_of
from choreo.tracing import SagaDeclaration, TracedEvent, TraceStore
from tests import dlq_app
from tests.test_tracing import Flows, play_flows
from tests.toy3 import project_directory, write_package

runner = CliRunner()


@pytest.fixture(scope="module")
def flows(tmp_path_factory: pytest.TempPathFactory) -> Flows:
    return play_flows(tmp_path_factory.mktemp("flows"))


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    yield from project_directory(tmp_path, monkeypatch)


def invoke(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args), env={"COLUMNS": "200", "CHOREO_DEBUG": ""})
    return result.exit_code, result.stdout, result.stderr


def db(flows: Flows) -> str:
    return flows.store().url


def test_trace_text_is_a_timeline_tree(flows: Flows) -> None:
    code, out, _ = invoke("trace", flows.ids["compensation"], "--db", db(flows))
    assert code == 0
    lines = [line.rstrip() for line in out.splitlines()]
    assert lines[0] == f"saga {flows.ids['compensation']}  ·  purchase  ·  compensated"
    assert lines[1].endswith("· 5 events · orders → stock → payments")
    assert lines[2].split() == ["offset", "by", "event", "hop", "publish"]
    body = lines[3:-1]
    # "+12.3 ms  └─ stock.reserve  t3.stock_reserved ...": the tree, then who emitted what.
    assert [line.split()[2:4] for line in body[:3]] == [
        ["orders", "t3.order_placed"],
        ["└─", "stock.reserve"],
        ["└─", "payments.charge"],
    ]
    assert [line.split()[2] for line in body[3:]] == ["├─", "└─"]  # siblings, in the order they happened
    rejected, released = sorted(body[3:], key=lambda line: line.split()[3])
    assert rejected.split()[3:5] == ["orders.reject", "t3.order_rejected"]
    assert released.split()[3:5] == ["stock.release", "t3.stock_released"]
    assert "▶ starts purchase" in body[0]
    assert "■ ends purchase" in rejected
    assert "↺ undoes t3.stock_reserved" in released
    # Columns line up: every event name starts in the same column.
    assert len({line.index("t3.") for line in body}) == 1
    assert lines[-1].startswith("ended: t3.order_rejected (orders.reject) after ")
    assert lines[-1].endswith(" ms, compensated by t3.stock_released")


def test_trace_text_shows_where_a_failed_saga_stopped(flows: Flows) -> None:
    code, out, _ = invoke("trace", flows.ids["dead-letter"][:8], "--db", db(flows))
    assert code == 0
    lines = [line.rstrip() for line in out.splitlines()]
    assert lines[0].endswith("·  purchase  ·  failed")
    assert "✗ payments.charge" in lines[-2] and "handler-error" in lines[-2]
    assert lines[-2].endswith("✗ RuntimeError: card processor exploded")
    assert lines[-1] == (
        "stopped at: t3.stock_reserved (stock.reserve) ✗ payments.charge: handler-error: "
        "RuntimeError: card processor exploded"
    )


def test_trace_json_is_the_tree(flows: Flows) -> None:
    code, out, _ = invoke("trace", flows.ids["success"], "--db", db(flows), "--format", "json")
    assert code == 0
    document = json.loads(out)
    assert (document["saga"], document["state"], document["ended_by"]) == (
        "purchase",
        "completed",
        "t3.order_confirmed",
    )
    node, chain = document["roots"][0], []
    while True:
        chain.append((node["handler"], node["event_type"]))
        if not node["children"]:
            break
        (node,) = node["children"]
    assert chain == [
        (None, "t3.order_placed"),
        ("stock.reserve", "t3.stock_reserved"),
        ("payments.charge", "t3.payment_captured"),
        ("orders.confirm", "t3.order_confirmed"),
    ]
    assert document["roots"][0]["children"][0]["latency_ms"] >= 0


def test_trace_mermaid_is_a_sequence_diagram(flows: Flows) -> None:
    code, out, _ = invoke("trace", flows.ids["dead-letter"], "--db", db(flows), "-f", "mermaid")
    assert code == 0
    lines = out.splitlines()
    assert lines[:2] == ["```mermaid", "sequenceDiagram"] and lines[-1] == "```"
    assert "    participant orders as orders" in lines
    assert "    orders->>stock: t3.order_placed" in lines
    assert "    stock-xpayments: t3.stock_reserved" in lines
    assert "    Note over payments: ✗ payments.charge: handler-error: RuntimeError: card processor exploded" in lines


def test_trace_of_an_unknown_saga_is_a_one_line_error(flows: Flows, tmp_path: Path) -> None:
    code, out, err = invoke("trace", "no-such-saga", "--db", db(flows))
    assert (code, out) == (2, "")
    assert err == f"error: no saga 'no-such-saga' in the trace database {db(flows)}\n"
    code, _, err = invoke("trace", "abc", "--db", f"sqlite+aiosqlite:///{tmp_path}/missing.db")
    assert code == 2 and err.startswith(f"error: trace database {tmp_path}/missing.db does not exist;")
    assert not (tmp_path / "missing.db").exists()
    code, _, err = invoke("trace", "abc", "--db", "mysql://nope")
    assert code == 2 and err.count("\n") == 1 and "choreo supports PostgreSQL" in err


def test_the_database_defaults_to_the_environment(flows: Flows) -> None:
    result = runner.invoke(app, ["trace", flows.ids["success"]], env={"CHOREO_TRACE_DATABASE_URL": db(flows)})
    assert result.exit_code == 0 and "completed" in result.stdout


def sagas_listed(out: str) -> list[tuple[str, str]]:
    rows = [line.split() for line in out.splitlines()[1:] if line.strip()]
    return [(row[0], row[2]) for row in rows]


def test_sagas_lists_and_filters(flows: Flows) -> None:
    ids = flows.ids
    code, out, _ = invoke("sagas", "--db", db(flows))
    assert code == 0
    assert out.splitlines()[0].split()[:4] == ["saga", "id", "saga", "state"]
    assert sorted(sagas_listed(out)) == sorted(
        [
            (ids["success"], "completed"),
            (ids["compensation"], "compensated"),
            (ids["rejected"], "completed"),
            (ids["dead-letter"], "failed"),
        ]
    )
    code, out, _ = invoke("sagas", "--db", db(flows), "--state", "failed")
    assert code == 0 and sagas_listed(out) == [(ids["dead-letter"], "failed")]
    assert "✗ 1 dead letter(s)" in out
    code, out, _ = invoke("sagas", "--db", db(flows), "--state", "completed", "--limit", "1", "--since", "1d")
    assert code == 0 and len(sagas_listed(out)) == 1
    code, out, _ = invoke("sagas", "--db", db(flows), "--state", "overdue")
    assert (code, out) == (0, "no sagas in state overdue\n")
    code, out, _ = invoke("sagas", "--db", db(flows), "--format", "json", "--state", "compensated")
    assert code == 0
    (document,) = json.loads(out)
    assert document["saga_id"] == ids["compensation"] and "roots" not in document


async def test_sagas_reports_overdue_and_in_flight_ones(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/trace.db"
    now = utcnow()
    async with TraceStore(url) as store:
        await store.save_declarations(
            [SagaDeclaration("order", "o.created", frozenset({"o.done"}), timedelta(minutes=5))]
        )
        for saga_id, age in (("late", timedelta(minutes=30)), ("young", timedelta(seconds=5))):
            await store.add(
                TracedEvent(
                    "event", f"{saga_id}-1", saga_id, "o.created", 1, None, "orders", None, now - age, "o", 0, 0
                )
            )
    code, out, _ = await asyncio.to_thread(invoke, "sagas", "--db", url, "--state", "overdue")
    assert code == 0 and sagas_listed(out) == [("late", "overdue")]
    code, out, _ = await asyncio.to_thread(invoke, "sagas", "--db", url, "--state", "in-flight")
    assert code == 0 and sagas_listed(out) == [("young", "in-flight")]
    _, out, _ = await asyncio.to_thread(invoke, "sagas", "--db", url, "--since", "10m")
    assert sagas_listed(out) == [("young", "in-flight")]
    _, out, _ = await asyncio.to_thread(invoke, "trace", "late", "--db", url)
    assert out.splitlines()[-1].startswith("stopped at: o.created (orders) — overdue by 25.0 min (deadline 5.0 min)")


def test_sagas_without_declarations_can_take_them_from_the_app(flows: Flows, project: Path) -> None:
    write_package(project, "shop_cli_app")
    code, out, _ = invoke("sagas", "--db", db(flows), "--app", "shop_cli_app", "--state", "failed")
    assert code == 0 and sagas_listed(out) == [(flows.ids["dead-letter"], "failed")]
    code, _, err = invoke("sagas", "--db", db(flows), "--app", "no_such_app")
    assert code == 2 and err.startswith("error: no module named 'no_such_app'")


def test_graph_formats(project: Path) -> None:
    write_package(project, "shop_graph")
    code, out, _ = invoke("graph", "shop_graph")
    assert code == 0 and out.startswith("flowchart LR\n") and "e_t3_order_placed --> h_stock_reserve" in out
    code, out, _ = invoke("graph", "shop_graph", "--format", "dot")
    assert code == 0 and out.startswith("digraph choreography {")
    code, out, _ = invoke("graph", "shop_graph/", "-f", "text")
    assert code == 0 and "  payments.charge: on t3.stock_reserved → may emit" in out


def test_check_exit_codes(project: Path) -> None:
    write_package(project, "shop_good")
    code, out, _ = invoke("check", "shop_good")
    assert (code, out) == (0, "✓ choreo check: shop_good (3 services, 6 handlers, 1 saga): no problems\n")
    write_package(project, "shop_bad", broken="uncompensated-step")
    code, out, err = invoke("check", "shop_bad")
    assert code == 1
    assert out.startswith("✗ uncompensated-step: saga 'purchase': t3.stock_reserved (emitted by stock.reserve)")
    assert err == "choreo check: 1 problem(s) in shop_bad (3 services, 6 handlers, 1 saga)\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["graph", "no_such_module"], "error: no module named 'no_such_module'"),
        (["check", "not-a-module"], "error: 'not-a-module' is not a module name"),
        (["collect", "no_such_module"], "error: no module named 'no_such_module'"),
        (["run", "no_such_module:service"], "error: no module named 'no_such_module'"),
        (["relay", "shop_err:nothing"], "error: shop_err:nothing: shop_err has no Service named 'nothing'"),
        (["run", "shop_err"], "error: shop_err: shop_err defines no choreo.Service; use module:attribute"),
    ],
)
def test_bad_input_is_one_line_and_non_zero(project: Path, args: list[str], message: str) -> None:
    write_package(project, "shop_err")
    code, out, err = invoke(*args)
    assert code == 2 and out == ""
    assert err.startswith(message) and err.count("\n") == 1


def test_every_command_has_help() -> None:
    for command in ("trace", "sagas", "graph", "check", "collect", "run", "relay", "dlq list", "dlq replay"):
        result = runner.invoke(app, [*command.split(), "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0 and "Usage: choreo " + command in result.stdout


async def test_serve_stops_cleanly_on_sigterm() -> None:
    calls: list[str] = []

    async def start() -> None:
        calls.append("start")
        asyncio.get_running_loop().call_later(0.05, os.kill, os.getpid(), signal.SIGTERM)

    async def stop() -> None:
        calls.append("stop")

    await asyncio.wait_for(serve(start, stop), 5)
    assert calls == ["start", "stop"]


def test_dlq_commands_list_show_replay_and_discard(tmp_path: Path) -> None:

    env = {"CHOREO_LEDGER_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/ledger.db", "COLUMNS": "200"}

    async def park_two() -> None:
        service = dlq_app.ledger.clone(database_url=env["CHOREO_LEDGER_DATABASE_URL"])
        await service.start(kafka=False)
        try:
            assert service.consumer is not None
            for amount, saga in ((5, "saga-five"), (7, "saga-seven")):
                outcome = await service.consumer.process(record_of(dlq_app.Entry(amount=amount), saga_id=saga))
                assert outcome == ["dead-lettered"]
        finally:
            await service.stop()

    asyncio.run(park_two())
    spec = "tests.dlq_app:ledger"
    listed = runner.invoke(app, ["dlq", "list", spec, "--format", "json"], env=env)
    assert listed.exit_code == 0, listed.output
    letters = {letter["saga_id"]: letter for letter in json.loads(listed.stdout)}
    assert set(letters) == {"saga-five", "saga-seven"}
    assert {letter["reason"] for letter in letters.values()} == {"handler-error"}
    five, seven = letters["saga-five"]["id"], letters["saga-seven"]["id"]

    shown = runner.invoke(app, ["dlq", "show", spec, str(five)], env=env)
    assert json.loads(shown.stdout)["payload"] == '{"amount":5}'
    assert "the ledger is closed" in json.loads(shown.stdout)["traceback"]

    failed_again = runner.invoke(app, ["dlq", "replay", spec, str(five)], env=env)
    assert failed_again.exit_code == 1 and f"{five}: dead-lettered" in failed_again.stdout

    dlq_app.BROKEN["yes"] = False
    try:
        replayed = runner.invoke(app, ["dlq", "replay", spec, "--saga", "saga-seven"], env=env)
    finally:
        dlq_app.BROKEN["yes"] = True
    assert replayed.exit_code == 0 and f"{seven}: handled" in replayed.stdout

    parked = runner.invoke(app, ["dlq", "list", spec, "--format", "json"], env=env)
    (newest,) = json.loads(parked.stdout)  # the second letter of saga-five, from the failed replay
    assert newest["saga_id"] == "saga-five" and newest["id"] not in (five, seven)
    discarded = runner.invoke(app, ["dlq", "discard", spec, "--handler", "ledger.book"], env=env)
    assert discarded.exit_code == 0 and f"discarded 1 letter(s): {newest['id']}" in discarded.stdout
    history = runner.invoke(app, ["dlq", "list", spec, "--status", "all", "--format", "json"], env=env)
    assert sorted(letter["status"] for letter in json.loads(history.stdout)) == ["discarded", "replayed", "replayed"]

    nothing = runner.invoke(app, ["dlq", "replay", spec], env=env)
    assert nothing.exit_code == 2 and "name the letters" in nothing.output
