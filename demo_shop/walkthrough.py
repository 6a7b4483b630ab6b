"""Every flow of the order saga, driven through the HTTP API and checked against its hops.

The same flows back `demo-shop` and the tests: each says what should happen (final order state,
the events of its saga and what caused each), and `run_flow` says what did.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

import httpx
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from choreo.deadletters import topic_for
from choreo.envelope import CAUSATION_ID, EVENT_ID, HANDLER, OCCURRED_AT, utcnow
from choreo.tables import outbox_table as outbox
from demo_shop.customers.models import ReservationState
from demo_shop.orders.models import OrderState
from demo_shop.payments.models import PaymentState


@dataclass(frozen=True)
class Step:
    """An event the saga must emit, and the event types that may have caused it (none: a request)."""

    event: str
    after: tuple[str, ...] = ()


@dataclass(frozen=True)
class Flow:
    """One way the order saga can go, and how it must end."""

    key: str
    title: str
    customer: str
    """"ada" or "bob" (created by `create_customers`), or a customer id nobody has."""
    total: Decimal
    final_state: OrderState
    steps: tuple[Step, ...]
    reservation: ReservationState | None
    """State of the order's credit reservation at the end (None: nothing was reserved)."""
    payment: PaymentState | None
    """State of the order's payment at the end (None: no payment attempted)."""
    story: str
    cancel: bool = False
    """Cancel the order once it is APPROVED."""

    @property
    def events(self) -> list[str]:
        return [step.event for step in self.steps]


CUSTOMERS: dict[str, tuple[str, Decimal]] = {
    "ada": ("Ada Lovelace", Decimal("500.00")),
    "bob": ("Bob Bobbins", Decimal("50.00")),
}
UNKNOWN_CUSTOMER = "no-such-customer"

_CREATED = Step("order.created")

FLOWS: tuple[Flow, ...] = (
    Flow(
        key="success",
        title="success",
        customer="ada",
        total=Decimal("120.00"),
        final_state=OrderState.APPROVED,
        steps=(
            _CREATED,
            Step("credit.reserved", ("order.created",)),
            Step("payment.authorized", ("credit.reserved",)),
            Step("order.approved", ("payment.authorized",)),
        ),
        reservation=ReservationState.RESERVED,
        payment=PaymentState.AUTHORIZED,
        story="Ada (credit 500.00) orders 120.00: credit reserved, payment authorized, order approved",
    ),
    Flow(
        key="credit-limit-exceeded",
        title="credit limit exceeded",
        customer="bob",
        total=Decimal("75.00"),
        final_state=OrderState.REJECTED,
        steps=(
            _CREATED,
            Step("credit.limit_exceeded", ("order.created",)),
            Step("order.rejected", ("credit.limit_exceeded",)),
        ),
        reservation=None,
        payment=None,
        story="Bob (credit 50.00) orders 75.00: the customers service refuses, the order is rejected",
    ),
    Flow(
        key="unknown-customer",
        title="unknown customer",
        customer=UNKNOWN_CUSTOMER,
        total=Decimal("20.00"),
        final_state=OrderState.REJECTED,
        steps=(
            _CREATED,
            Step("customer.not_found", ("order.created",)),
            Step("order.rejected", ("customer.not_found",)),
        ),
        reservation=None,
        payment=None,
        story=f"customer {UNKNOWN_CUSTOMER!r} orders 20.00: nobody knows them, the order is rejected",
    ),
    Flow(
        key="payment-declined",
        title="payment declined (compensation)",
        customer="ada",
        total=Decimal("113.13"),
        final_state=OrderState.REJECTED,
        steps=(
            _CREATED,
            Step("credit.reserved", ("order.created",)),
            Step("payment.declined", ("credit.reserved",)),
            # Customers releases on whichever of the two reaches it first; the other is a no-op.
            Step("credit.released", ("payment.declined", "order.rejected")),
            Step("order.rejected", ("payment.declined",)),
        ),
        reservation=ReservationState.RELEASED,
        payment=PaymentState.DECLINED,
        story="Ada orders 113.13 (totals ending in .13 are declined): credit reserved, payment "
        "declined, credit released again, order rejected",
    ),
    Flow(
        key="cancel-after-approval",
        title="cancel after approval (compensation chain)",
        customer="ada",
        total=Decimal("80.00"),
        final_state=OrderState.CANCELLED,
        steps=(
            _CREATED,
            Step("credit.reserved", ("order.created",)),
            Step("payment.authorized", ("credit.reserved",)),
            Step("order.approved", ("payment.authorized",)),
            Step("order.cancelled"),
            Step("payment.refunded", ("order.cancelled",)),
            Step("credit.released", ("order.cancelled",)),
        ),
        reservation=ReservationState.RELEASED,
        payment=PaymentState.REFUNDED,
        story="Ada orders 80.00, it is approved, then cancelled: payment refunded, credit released",
        cancel=True,
    ),
)


@dataclass(frozen=True)
class Hop:
    """One event of a saga, as its producer's outbox recorded it."""

    service: str
    event: str
    handler: str | None
    """The handler that emitted it; None when a request started it (e.g. POST /orders)."""
    occurred_at: datetime
    event_id: str
    cause_id: str | None
    dead_letter: bool = False


async def saga_hops(engines: Mapping[str, AsyncEngine], saga_id: str) -> list[Hop]:
    """The events of one saga, oldest first, read from each service's `choreo_outbox`.

    The flow checks read what each service committed, independently of the trace collector
    (whose view the walkthrough prints).
    """
    hops: list[Hop] = []
    for service, engine in engines.items():
        async with engine.connect() as conn:
            rows = await conn.execute(
                select(outbox.c.topic, outbox.c.event_type, outbox.c.headers).where(
                    outbox.c.saga_id == saga_id,
                    outbox.c.available_at <= utcnow(),  # a scheduled event (the deadline) has not happened yet
                )
            )
            for topic, event_type, headers in rows:
                hops.append(
                    Hop(
                        service=service,
                        event=event_type,
                        handler=headers.get(HANDLER),
                        occurred_at=datetime.fromisoformat(headers[OCCURRED_AT]),
                        event_id=headers[EVENT_ID],
                        cause_id=headers.get(CAUSATION_ID),
                        dead_letter=topic == topic_for(service),
                    )
                )
    return sorted(hops, key=lambda hop: hop.occurred_at)


HopReader = Callable[[str], Awaitable[list[Hop]]]


def hop_reader(engines: Mapping[str, AsyncEngine]) -> HopReader:
    """`saga_hops` bound to the given engines."""

    async def read(saga_id: str) -> list[Hop]:
        return await saga_hops(engines, saga_id)

    return read


def check_hops(flow: Flow, hops: Sequence[Hop]) -> list[str]:
    """What is wrong with a saga's hops for `flow` (empty when nothing is)."""
    problems = [f"dead letter at {hop.service}: {hop.event}" for hop in hops if hop.dead_letter]
    events = [hop for hop in hops if not hop.dead_letter]
    missing = Counter(flow.events) - Counter(hop.event for hop in events)
    unexpected = Counter(hop.event for hop in events) - Counter(flow.events)
    if missing:
        problems.append(f"missing events: {', '.join(sorted(missing.elements()))}")
    if unexpected:
        problems.append(f"unexpected events: {', '.join(sorted(unexpected.elements()))}")
    by_id = {hop.event_id: hop for hop in events}
    causes = {step.event: step.after for step in flow.steps}
    for hop in events:
        allowed = causes.get(hop.event)
        if allowed is None:
            continue  # already reported as unexpected
        cause = by_id.get(hop.cause_id) if hop.cause_id else None
        if not allowed:
            if hop.cause_id is not None:
                problems.append(f"{hop.event} should start from a request, but was caused by an event")
        elif cause is None:
            problems.append(f"{hop.event} should follow {' or '.join(allowed)}, but its cause is unknown")
        elif cause.event not in allowed:
            problems.append(f"{hop.event} should follow {' or '.join(allowed)}, not {cause.event}")
        elif cause.occurred_at > hop.occurred_at:
            problems.append(f"{hop.event} occurred before its cause {cause.event}")
    return problems


@dataclass
class FlowResult:
    """What happened to one flow's order."""

    flow: Flow
    order_id: str | None = None
    saga_id: str | None = None
    state: str | None = None
    reason: str | None = None
    reservation: str | None = None
    hops: list[Hop] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems


class WalkthroughError(Exception):
    """The API answered something the walkthrough cannot go on from."""


def _json(response: httpx.Response, expected_status: int) -> Any:
    if response.status_code != expected_status:
        raise WalkthroughError(
            f"{response.request.method} {response.request.url.path} answered "
            f"{response.status_code} (expected {expected_status}): {response.text[:300]}"
        )
    return response.json()


async def create_customers(client: httpx.AsyncClient) -> dict[str, str]:
    """Create the walkthrough's customers; returns their ids by key ("ada", "bob")."""
    ids = {}
    for key, (name, limit) in CUSTOMERS.items():
        body = _json(await client.post("/customers", json={"name": name, "credit_limit": str(limit)}), 201)
        ids[key] = body["id"]
    return ids


async def _poll(probe: Callable[[], Awaitable[Any]], done: Callable[[Any], bool], timeout: float) -> Any:
    """Call `probe` until `done` accepts its result or `timeout` passes; returns the last result."""
    deadline = time.monotonic() + timeout
    while True:
        result = await probe()
        if done(result) or time.monotonic() >= deadline:
            return result
        await asyncio.sleep(0.02)


async def run_flow(
    client: httpx.AsyncClient,
    flow: Flow,
    customer_ids: Mapping[str, str],
    read_hops: HopReader,
    *,
    timeout: float = 30.0,
) -> FlowResult:
    """Place the flow's order through the API, wait for its saga to end, and check it."""
    result = FlowResult(flow)
    began = time.monotonic()
    customer_id = customer_ids.get(flow.customer, flow.customer)
    try:
        order = _json(await client.post("/orders", json={"customer_id": customer_id, "total": str(flow.total)}), 201)
        result.order_id, result.saga_id = order["id"], order["saga_id"]

        async def get_order() -> Any:
            return _json(await client.get(f"/orders/{order['id']}"), 200)

        order = await _poll(get_order, lambda o: o["state"] != OrderState.PENDING, timeout)
        if flow.cancel and order["state"] == OrderState.APPROVED:
            order = _json(await client.post(f"/orders/{order['id']}/cancel"), 200)
        result.state, result.reason = order["state"], order["rejection_reason"]

        # The order's state is decided before every compensation has run: wait for the hops.
        expected = Counter(flow.events)

        async def hops() -> list[Hop]:
            return await read_hops(order["saga_id"])

        result.hops = await _poll(
            hops, lambda found: Counter(h.event for h in found if not h.dead_letter) >= expected, timeout
        )
        if flow.customer in customer_ids:
            customer = _json(await client.get(f"/customers/{customer_id}"), 200)
            held = [r for r in customer["reservations"] if r["order_id"] == order["id"]]
            result.reservation = held[0]["state"] if held else None
    except (WalkthroughError, httpx.HTTPError) as error:
        result.problems.append(str(error))
    result.seconds = time.monotonic() - began
    if result.state != flow.final_state:
        result.problems.append(f"order ended {result.state}, expected {flow.final_state}")
    if flow.customer in customer_ids and result.reservation != flow.reservation:
        result.problems.append(f"credit reservation is {result.reservation}, expected {flow.reservation}")
    result.problems.extend(check_hops(flow, result.hops))
    return result
