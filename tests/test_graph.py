"""The static choreography: drawing it, and `check` finding each kind of problem with its reason."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from choreo.exceptions import ConfigurationError
from choreo.graph import (
    PROBLEM_KINDS,
    SAGA_WITHOUT_END,
    UNCANCELLED_STEP,
    UNCOMPENSATED_STEP,
    UNHANDLED_EVENT,
    UNREACHABLE_HANDLER,
    Choreography,
    discover,
    module_name,
)
from tests.toy3 import BROKEN_VARIANTS, make_toy3, project_directory, write_package


def choreography(broken: str | None = None) -> Choreography:
    return Choreography(make_toy3(broken=broken).services)


def test_a_correct_choreography_passes() -> None:
    report = choreography().check()
    assert report.ok, report.problems
    assert report.notes == []


def test_runs_follow_every_alternative_and_every_reacting_handler() -> None:
    toy = make_toy3()
    runs = list(Choreography(toy.services).runs(toy.saga))
    as_names = sorted(sorted(e.event_name for e in run.events) for run in runs)
    assert as_names == [
        ["t3.order_confirmed", "t3.order_placed", "t3.payment_captured", "t3.stock_reserved"],
        ["t3.order_placed", "t3.order_rejected", "t3.out_of_stock"],
        ["t3.order_placed", "t3.order_rejected", "t3.payment_failed", "t3.stock_released", "t3.stock_reserved"],
    ]
    failed = next(run for run in runs if any(e.event_name == "t3.stock_released" for e in run.events))
    (released,) = (e for e in failed.events if e.event_name == "t3.stock_released")
    assert [e.event_name for e in failed.path_to(released)] == [
        "t3.order_placed",
        "t3.stock_reserved",
        "t3.payment_failed",
        "t3.stock_released",
    ]


def test_problem_kinds_match_the_broken_variants() -> None:
    # The toy has no cancellation; tests/test_check_choreography.py breaks one.
    assert set(PROBLEM_KINDS) == {*BROKEN_VARIANTS, UNCANCELLED_STEP}


def test_an_event_nobody_handles_is_reported() -> None:
    report = choreography("unhandled-event").check()
    (problem,) = report.problems
    assert problem.kind == UNHANDLED_EVENT and problem.subject == "t3.payment_audited"
    assert problem.message == (
        "t3.payment_audited is emitted by payments.audit, but no handler reacts to it and it ends no saga; "
        "handle it, add it to a saga's ends=, mark it external=True if it is published for consumers outside "
        "these services, or stop emitting it"
    )


def test_a_handler_whose_event_is_never_emitted_is_reported() -> None:
    report = choreography("unreachable-handler").check()
    (problem,) = report.problems
    assert problem.kind == UNREACHABLE_HANDLER and problem.subject == "orders.refund"
    assert problem.message.startswith("orders.refund reacts to t3.refund_requested, which nothing emits")


def test_a_saga_run_that_reaches_no_end_is_reported() -> None:
    report = choreography("saga-without-end").check()
    (problem,) = report.problems
    assert problem.kind == SAGA_WITHOUT_END and problem.subject == "purchase"
    assert problem.message == (
        "saga 'purchase' (declared by orders) can stall: on the run t3.order_placed → t3.out_of_stock nothing "
        "emits an end (t3.order_confirmed or t3.order_rejected); orders.note_out_of_stock reacts to "
        "t3.out_of_stock but emits nothing"
    )


def test_a_failure_that_leaves_a_step_uncompensated_is_reported() -> None:
    report = choreography("uncompensated-step").check()
    (problem,) = report.problems
    assert problem.kind == UNCOMPENSATED_STEP and problem.subject == "t3.stock_reserved"
    assert problem.message.startswith(
        "saga 'purchase': t3.stock_reserved (emitted by stock.reserve) is left uncompensated when the saga "
        "fails with t3.order_rejected on the run t3.order_placed → t3.stock_reserved → t3.fraud_suspected → "
        "t3.order_rejected; nothing on that run emits t3.stock_released, which compensates it."
    )


def test_compensations_are_terminal_and_deadlines_are_emitters() -> None:
    graph = choreography()
    labels = {e.event_name: [x.label for x in es] for e, es in graph.emitters.items()}
    assert labels["t3.order_expired"] == ["orders (deadline of saga 'purchase')"]
    assert labels["t3.order_placed"] == ["orders (outside handlers)"]
    assert labels["t3.stock_released"] == ["stock.release"]
    assert "t3.stock_released" not in {e.event_name for e in graph.consumers}  # and yet no problem


def test_drawings_show_every_reaction() -> None:
    graph = choreography()
    mermaid = graph.to_mermaid()
    assert mermaid.startswith("flowchart LR\n")
    assert "    e_t3_order_placed --> h_stock_reserve" in mermaid
    assert "    h_stock_release -.-> e_t3_stock_released" in mermaid
    assert "    out_orders -. deadline .-> e_t3_order_expired" in mermaid
    assert 'subgraph svc_payments["payments"]' in mermaid
    assert "classDef end" not in mermaid  # `end` closes a subgraph in Mermaid
    dot = graph.to_dot()
    assert dot.startswith("digraph choreography {") and dot.endswith("}")
    assert '    "t3.stock_reserved" -> "payments.charge";' in dot
    assert '    "stock.release" -> "t3.stock_released" [style=dashed];' in dot
    text = graph.to_text()
    assert "  stock.reserve: on t3.order_placed → may emit t3.out_of_stock, t3.stock_reserved" in text
    assert "  purchase (orders): starts t3.order_placed, ends t3.order_confirmed | t3.order_rejected" in text
    assert "  t3.stock_released ↺ undoes t3.stock_reserved" in text


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    yield from project_directory(tmp_path, monkeypatch)


def test_discovery_walks_sub_packages(project: Path) -> None:
    write_package(project, "shop_ok")
    services = discover("shop_ok")
    assert sorted(s.name for s in services) == ["orders", "payments", "stock"]
    assert Choreography(services).check().ok
    assert [s.name for s in discover("shop_ok/orders")] == ["orders"]
    assert [s.name for s in discover("shop_ok/stock/handlers.py")] == ["stock"]


def test_discovery_errors_are_one_clear_line(project: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"^no module named 'nowhere' \(run choreo from the project"):
        discover("nowhere")
    (project / "plain.py").write_text("X = 1\n")
    with pytest.raises(ConfigurationError, match=r"^plain defines no choreo.Service at module level"):
        discover("plain")
    (project / "shaky").mkdir()
    (project / "shaky" / "__init__.py").write_text("")
    (project / "shaky" / "bad.py").write_text("import not_installed_anywhere\n")
    with pytest.raises(ConfigurationError, match=r"^importing shaky.bad failed: No module named 'not_installed"):
        discover("shaky")
    (project / "boom.py").write_text("raise RuntimeError('config missing')\n")
    with pytest.raises(ConfigurationError, match=r"^importing boom failed: RuntimeError: config missing$"):
        discover("boom")
    with pytest.raises(ConfigurationError, match="is not a module name"):
        module_name("demo-shop")
    with pytest.raises(ConfigurationError, match="is not a module path"):
        module_name("../elsewhere/app.py")


def test_a_broken_sub_package_is_named_with_its_error(project: Path) -> None:
    (project / "layered" / "orders").mkdir(parents=True)
    (project / "layered" / "__init__.py").write_text("")
    (project / "layered" / "orders" / "__init__.py").write_text("raise ImportError('orders needs a licence key')\n")
    expected = r"^importing layered.orders failed: ImportError: orders needs a licence key$"
    with pytest.raises(ConfigurationError, match=expected):
        discover("layered")
