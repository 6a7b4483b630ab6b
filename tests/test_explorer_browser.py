"""The saga explorer in a real browser (Debian's Chromium through Playwright), over real demo-shop sagas.

Every assertion reads a value the page shows: counts, states, lanes, hop labels, marks. The
screenshots land in `$CHOREO_ARTIFACTS` (default `build/artifacts`); docs/ui.md shows copies.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.explorer_support import LiveShop, eventually
from tests.infra import require_infra

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("CHOREO_ARTIFACTS", "build/artifacts"))
HOP = re.compile(r"^\d+\.\d ms$|^\d+\.\d\d s$")

try:
    from playwright.sync_api import Browser, Page, sync_playwright
except ImportError:  # pragma: no cover - the dev extra installs it
    sync_playwright = None


def _browser_missing() -> str | None:
    if sync_playwright is None:
        return "playwright is not installed (pip install -e '.[dev]')"
    if not CHROMIUM.exists() or shutil.which(str(CHROMIUM)) is None:
        return f"no Chromium at {CHROMIUM} (apt-get install -y chromium)"
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    missing = _browser_missing()
    if missing is not None:
        if require_infra():
            pytest.fail(f"CHOREO_REQUIRE_INFRA=1 but {missing}")
        pytest.skip(missing)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, browser: Browser) -> Iterator[LiveShop]:
    shop = LiveShop.start(tmp_path_factory.mktemp("explorer"))
    shop.wait_overdue()
    yield shop
    shop.stop()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    yield page
    context.close()


def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"ui-{name}.png"), full_page=True)


def counts(page: Page) -> dict[str, int]:
    found = page.eval_on_selector_all(
        "#counts .count", "els => els.map(e => [e.dataset.state, e.querySelector('.n').textContent])"
    )
    return {state: int(n) for state, n in found}


def rows(page: Page) -> dict[str, str]:
    """Saga id -> state, as the list shows them."""
    found = page.eval_on_selector_all(
        "#rows tr[data-saga-id]",
        "els => els.map(e => [e.dataset.sagaId, e.querySelector('.state').textContent])",
    )
    return dict(found)


def attrs(page: Page, selector: str, *names: str) -> list[Any]:
    script = "(els, names) => els.map(e => names.map(n => n === 'text' ? e.textContent : e.getAttribute(n)))"
    return [tuple(values) for values in page.eval_on_selector_all(selector, script, list(names))]


def test_the_list_counts_states_and_filters(live: LiveShop, page: Page) -> None:
    ids = live.ids
    page.goto(f"{live.url}/?window=all")
    assert counts(page) == {"completed": 2, "compensated": 1, "failed": 1, "in-flight": 0, "overdue": 1}
    assert rows(page) == {
        ids["dead-letter"]: "failed",
        ids["compensated"]: "compensated",
        ids["credit-limit"]: "completed",
        ids["success"]: "completed",
        ids["overdue"]: "overdue",
    }
    success = page.locator(f"tr[data-saga-id='{ids['success']}']")
    assert success.locator(".services").text_content() == "orders → customers → payments"
    assert success.locator(".hops").text_content() == "4"
    assert HOP.match(success.locator("td.num").nth(0).text_content() or "")
    shot(page, "list")
    page.select_option("select[name=state]", "compensated")  # submits the filter form
    page.wait_for_url(re.compile(r"state=compensated"))
    assert rows(page) == {ids["compensated"]: "compensated"}
    page.goto(f"{live.url}/?window=all&service=payments")
    assert set(rows(page)) == {ids["success"], ids["compensated"], ids["dead-letter"]}
    assert counts(page)["overdue"] == 0  # payments never saw the overdue saga
    page.goto(f"{live.url}/?window=15m&saga=order&state=overdue")
    assert rows(page) == {ids["overdue"]: "overdue"}


def test_lookup_by_prefix_and_by_order_id(live: LiveShop, page: Page) -> None:
    page.goto(live.url)
    page.fill("input[name=q]", live.ids["compensated"][:8])
    page.press("input[name=q]", "Enter")
    page.wait_for_url(f"{live.url}/sagas/{live.ids['compensated']}")
    page.fill("input[name=q]", live.orders["success"])
    page.press("input[name=q]", "Enter")
    page.wait_for_url(f"{live.url}/sagas/{live.ids['success']}")
    assert page.text_content("#saga-state") == "completed"


def test_a_compensated_saga_on_its_timeline(live: LiveShop, page: Page) -> None:
    page.goto(f"{live.url}/sagas/{live.ids['compensated']}")
    assert page.text_content("#saga-state") == "compensated"
    assert page.get_attribute("#permalink", "href") == f"/sagas/{live.ids['compensated']}"
    assert [lane for (lane,) in attrs(page, ".timeline .lane", "data-lane")] == ["orders", "customers", "payments"]
    marks = attrs(page, ".timeline .mark", "data-lane", "data-event", "data-compensation")
    assert sorted(marks) == sorted(
        [
            ("orders", "order.created", "false"),
            ("customers", "credit.reserved", "false"),
            ("payments", "payment.declined", "false"),
            ("orders", "order.rejected", "false"),
            ("customers", "credit.released", "true"),
        ]
    )
    assert [event for (event,) in attrs(page, ".timeline .mark.compensation", "data-event")] == ["credit.released"]
    hops = attrs(page, ".timeline .hop", "data-from", "data-to", "text")
    edges = {(cause, effect) for cause, effect, _ in hops}
    assert {
        ("order.created", "credit.reserved"),
        ("credit.reserved", "payment.declined"),
        ("payment.declined", "order.rejected"),
    } <= edges
    assert len(hops) == 4 and all(HOP.match(label) for _, _, label in hops), hops
    released = next(effect for cause, effect, _ in hops if effect == "credit.released")
    assert page.locator(f".timeline .hop.compensation[data-to='{released}']").count() == 1
    # The causal tree below, as `choreo trace` prints it.
    tree = attrs(page, "#tree details", "data-by", "data-event")
    assert tree[:3] == [
        ("orders", "order.created"),
        ("customers.reserve_credit", "credit.reserved"),
        ("payments.authorize_payment", "payment.declined"),
    ]
    assert page.text_content("#summary").startswith("ended: order.rejected (orders.reject_order) after ")
    # An event opens to its headers and payload, as stored.
    page.click(".timeline .mark[data-event='credit.reserved'] a")
    opened = page.locator("#tree details[data-event='credit.reserved']")
    assert opened.get_attribute("open") is not None
    assert '"amount": "113.13"' in (opened.locator(".payload").text_content() or "")
    shot(page, "saga")


def test_a_failed_saga_shows_its_dead_letter_inline(live: LiveShop, page: Page) -> None:
    page.goto(f"{live.url}/sagas/{live.ids['dead-letter']}")
    assert page.text_content("#saga-state") == "failed"
    letter = attrs(page, ".timeline .dead-letter", "data-consumer", "data-reason")
    assert letter == [("payments.authorize_payment", "handler-error")]
    assert page.locator(".timeline .mark.stopped").get_attribute("data-event") == "credit.reserved"
    assert page.text_content("#summary") == (
        "stopped at: credit.reserved (customers.reserve_credit) ✗ payments.authorize_payment: "
        "handler-error: RuntimeError: card processor unreachable"
    )


def test_an_overdue_saga_shows_who_should_react_next(live: LiveShop, page: Page) -> None:
    page.goto(f"{live.url}/sagas/{live.ids['overdue']}")
    assert page.text_content("#saga-state") == "overdue"
    assert page.text_content(".timeline .waiting-label") == "waits for payments.authorize_payment"
    assert page.text_content("#waiting").strip() == "should react next: payments.authorize_payment"
    paths = page.eval_on_selector_all("#remaining li", "els => els.map(e => e.textContent)")
    assert "credit.reserved → payment.authorized → order.approved" in paths
    assert "credit.reserved → payment.declined → credit.released" in paths
    shot(page, "overdue")


def test_the_graph_carries_live_traffic_and_failures(live: LiveShop, page: Page) -> None:
    page.goto(f"{live.url}/graph?window=15m")
    edge = page.locator("g.edge.emits[data-from='customers.reserve_credit'][data-to='credit.reserved']")
    assert edge.get_attribute("data-count") == "4"  # success, declined, dead letter, overdue
    p50, p99 = edge.get_attribute("data-p50") or "", edge.get_attribute("data-p99") or ""
    assert HOP.match(p50) and HOP.match(p99)
    label = page.locator(".edge-label[data-from='customers.reserve_credit'][data-to='credit.reserved']")
    assert label.text_content() == f"0.3/minp50 {p50} · p99 {p99}"  # two lines: rate, then latencies
    failing = page.locator("g.edge.consumes[data-from='credit.reserved'][data-to='payments.authorize_payment']")
    assert failing.get_attribute("data-failures") == "1"
    label = page.locator(".edge-label[data-from='credit.reserved'][data-to='payments.authorize_payment']")
    assert label.text_content() == "✗ 1 failed"
    quiet = page.locator("g.edge.emits[data-from='payments.refund_payment'][data-to='payment.refunded']")
    assert quiet.get_attribute("data-count") == "0"
    assert page.text_content("#check") == "no problems"
    page.set_viewport_size({"width": 2500, "height": 700})  # the whole graph in the picture
    shot(page, "graph")


def test_replaying_the_dead_letter_completes_the_saga_in_the_open_list(live: LiveShop, page: Page) -> None:
    saga = live.ids["dead-letter"]
    page.goto(f"{live.url}/?window=all")
    assert rows(page)[saga] == "failed"
    page.evaluate("window.notReloaded = true")
    actions = page.context.new_page()
    actions.goto(f"{live.url}/dead-letters")
    letters = attrs(actions, "#letters-payments tr[data-letter-id]", "data-status")
    assert letters == [("parked",)]
    actions.click("#letters-payments tr[data-letter-id] a")
    assert actions.text_content("#letter-saga") == saga
    shot(actions, "dead-letter")
    dialogs: list[str] = []
    actions.once("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.accept()))
    actions.click("button.replay")
    actions.wait_for_selector("#done")
    assert dialogs and dialogs[0].startswith("replay dead letter payments #")
    assert actions.text_content("#done") == "replay:handled"
    assert actions.text_content("#letter-status") == "replayed"
    assert eventually(lambda: rows(page).get(saga) == "completed", timeout=15), rows(page)
    assert page.evaluate("window.notReloaded") is True
    assert counts(page)["failed"] == 0 and counts(page)["completed"] == 3
