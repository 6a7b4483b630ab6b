"""The demo shop plus a shipping service from another package: one choreography over several apps,
an integration event published for the outside, and a cancellation after the saga ended."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from choreo import Event, SetupError
from choreo.cli import app
from choreo.exceptions import ConfigurationError
from choreo.graph import UNCANCELLED_STEP, Choreography, configured_apps, discover
from choreo.saga import Saga
from tests.toy3 import project_directory

SHIPPING = '''"""Ships approved orders; the warehouse, outside this codebase, consumes its events."""

from choreo import Event, Service, Tx
from demo_shop.events import OrderApproved, OrderCancelled


class ShipmentScheduled(Event, name="shipment.scheduled", topic="shipping", external={external}):
    order_id: str


class ShipmentCancelled(
    Event, name="shipment.cancelled", topic="shipping", compensates=ShipmentScheduled, external={external}
):
    order_id: str


service = Service("shipping")


@service.on(OrderApproved)
async def schedule_shipment(event: OrderApproved, tx: Tx) -> ShipmentScheduled:
    return ShipmentScheduled(order_id=event.order_id)
'''

CANCEL_HANDLER = """

@service.on(OrderCancelled)
async def cancel_shipment(event: OrderCancelled, tx: Tx) -> ShipmentCancelled:
    return ShipmentCancelled(order_id=event.order_id)
"""

MISSING_CANCEL = (
    "✗ uncancelled-step: saga 'order' can be cancelled after it ended with order.cancelled (emitted by orders "
    "(outside handlers)), but shipping does not handle it, so its step shipping.schedule_shipment "
    "(on order.approved → shipment.scheduled) stays done when the saga is cancelled (e.g. on the run "
    "order.created → credit.reserved → payment.authorized → order.approved → shipment.scheduled); give shipping "
    "a handler of OrderCancelled that undoes it (emitting a compensation if others must know)\n"
)

CLEAN = "✓ choreo check: demo_shop, shipping_svc (5 services, 11 handlers, 1 saga): no problems\n"

runner = CliRunner()


def invoke(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args), env={"COLUMNS": "200", "CHOREO_DEBUG": ""})
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    yield from project_directory(tmp_path, monkeypatch)


def write_shipping(root: Path, name: str = "shipping_svc", *, cancel: bool = True, external: bool = True) -> None:
    """A shipping service in its own package, beside (not inside) demo_shop."""
    (root / name).mkdir()
    (root / name / "__init__.py").write_text("")
    code = SHIPPING.format(external=external) + (CANCEL_HANDLER if cancel else "")
    (root / name / "handlers.py").write_text(code)


# -- several apps, one choreography ------------------------------------------------------------


def test_check_takes_several_apps(project: Path) -> None:
    write_shipping(project)
    code, out, err = invoke("check", "demo_shop", "shipping_svc")
    assert (code, err) == (0, "")
    assert out == CLEAN
    code, out, _ = invoke("check", "demo_shop/", "shipping_svc.handlers:service")
    assert code == 0 and "demo_shop, shipping_svc.handlers:service (5 services" in out


def test_graph_and_collect_take_several_apps(project: Path) -> None:
    write_shipping(project)
    code, out, _ = invoke("graph", "demo_shop", "shipping_svc", "-f", "text")
    assert code == 0 and "  shipping.schedule_shipment: on order.approved → may emit shipment.scheduled" in out
    assert "  customers.reserve_credit: on order.created" in out
    # collect resolves every target before it connects anywhere
    code, out, err = invoke("collect", "demo_shop", "shipping_svc", "no_such_app")
    assert (code, out) == (2, "")
    assert err.startswith("error: no module named 'no_such_app'")


def test_apps_come_from_pyproject_when_none_is_named(project: Path) -> None:
    write_shipping(project)
    code, _, err = invoke("check")
    assert code == 2 and err.startswith("error: no app given and no pyproject.toml in ")
    (project / "pyproject.toml").write_text('[project]\nname = "shop"\n')
    code, _, err = invoke("graph")
    assert code == 2 and "has no [tool.choreo] apps; name the apps" in err
    (project / "pyproject.toml").write_text('[tool.choreo]\napps = "demo_shop"\n')
    with pytest.raises(ConfigurationError, match=r"apps must be a non-empty list of module names, got 'demo_shop'"):
        configured_apps()
    (project / "pyproject.toml").write_text('[tool.choreo]\napps = ["demo_shop", "shipping_svc"]\n')
    assert configured_apps() == ["demo_shop", "shipping_svc"]
    code, out, _ = invoke("check")
    assert (code, out) == (0, CLEAN)
    code, out, _ = invoke("graph", "-f", "text")
    assert code == 0 and "shipping.cancel_shipment" in out


def test_two_different_services_of_one_name_are_refused(project: Path) -> None:
    write_shipping(project, "shipping_a")
    write_shipping(project, "shipping_b", cancel=False)
    assert [s.name for s in discover("shipping_a", "shipping_a/handlers.py")] == ["shipping"]  # the same one twice
    with pytest.raises(ConfigurationError, match=r"^two different services are named 'shipping': one in shipping_a"):
        discover("shipping_a", "shipping_b")


# -- integration events ------------------------------------------------------------------------


def test_an_external_event_needs_no_handler_and_is_drawn_leaving(project: Path) -> None:
    write_shipping(project, "shipping_internal", external=False)
    code, out, _ = invoke("check", "demo_shop", "shipping_internal")
    assert code == 1
    assert out.startswith("✗ unhandled-event: shipment.scheduled is emitted by shipping.schedule_shipment")
    write_shipping(project)
    services = discover("demo_shop", "shipping_svc")
    graph = Choreography(services)
    assert graph.check().ok
    assert [e.event_name for e in graph.external] == ["shipment.cancelled", "shipment.scheduled"]
    mermaid = graph.to_mermaid()
    assert '    outside{{"outside this system"}}:::outside' in mermaid
    assert "    e_shipment_scheduled --> outside" in mermaid
    assert "    e_shipment_cancelled --> outside" in mermaid
    assert "e_order_approved --> outside" not in mermaid
    dot = graph.to_dot()
    assert '    "outside this system" [shape=doubleoctagon, style=filled, fillcolor="#eeeeee"];' in dot
    assert '    "shipment.scheduled" -> "outside this system";' in dot
    assert "published outside this system: shipment.cancelled, shipment.scheduled" in graph.to_text()


def test_external_must_be_a_bool() -> None:
    with pytest.raises(SetupError, match=r"external= must be True or False, got 'yes'"):

        class Odd(Event, name="odd.thing", topic="odd", external="yes"):  # type: ignore[call-arg]
            pass


# -- cancellation after the saga ended ---------------------------------------------------------


def test_a_service_that_forgets_the_cancellation_is_reported(project: Path) -> None:
    write_shipping(project, "shipping_svc")
    write_shipping(project, "shipping_forgetful", cancel=False)
    assert invoke("check", "demo_shop", "shipping_svc")[0] == 0
    code, out, err = invoke("check", "demo_shop", "shipping_forgetful")
    assert code == 1
    assert out == MISSING_CANCEL
    assert err == "choreo check: 1 problem(s) in demo_shop, shipping_forgetful (5 services, 10 handlers, 1 saga)\n"
    (problem,) = Choreography(discover("demo_shop", "shipping_forgetful")).check().problems
    assert (problem.kind, problem.subject) == (UNCANCELLED_STEP, "shipping/order.cancelled")


def test_every_step_on_the_way_to_a_good_end_must_handle_the_cancellation(project: Path) -> None:
    import demo_shop.payments.handlers as payments

    services = discover("demo_shop")
    assert Choreography(services).check().ok
    # payments without its refund on cancel: authorize_payment's step stays done
    forgetful = payments.service.clone()
    forgetful.handlers = [h for h in forgetful.handlers if h.name != "payments.refund_payment"]
    report = Choreography([s if s.name != "payments" else forgetful for s in services]).check()
    assert [(p.kind, p.subject) for p in report.problems] == [(UNCANCELLED_STEP, "payments/order.cancelled")]
    assert "its step payments.authorize_payment (on credit.reserved → payment.authorized) stays done" in (
        report.problems[0].message
    )
    # the canceller itself (orders approved the order) and failure runs (payment.declined) are not asked


def test_a_cancellation_is_no_start_or_end() -> None:
    from demo_shop.events import OrderApproved, OrderCancelled, OrderCreated

    with pytest.raises(SetupError, match=r"cannot both cancel it and start or end it"):
        Saga("order", OrderCreated, frozenset({OrderApproved}), cancelled_by=frozenset({OrderApproved}))
    saga = Saga("order", OrderCreated, frozenset({OrderApproved}), cancelled_by=frozenset({OrderCancelled}))
    assert saga.cancelled_by == {OrderCancelled}


def test_without_cancelled_by_nothing_is_asked(project: Path) -> None:
    write_shipping(project, "shipping_forgetful", cancel=False)
    services = discover("demo_shop", "shipping_forgetful")
    orders = next(s for s in services if s.name == "orders")
    (saga,) = orders.sagas
    undeclared = orders.clone()
    undeclared.sagas = [Saga(saga.name, saga.starts, saga.ends, saga.deadline, saga.on_deadline, saga.timeout_event)]
    report = Choreography([undeclared if s is orders else s for s in services]).check()
    assert report.ok, report.problems
