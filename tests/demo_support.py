"""Shared by the demo shop tests: drive flows through the HTTP API, then check every database."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from decimal import Decimal

import httpx
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlmodel import col

from choreo.tables import DeadLetter
from demo_shop.customers.models import Customer, Reservation, ReservationState
from demo_shop.orders.models import Order, OrderState
from demo_shop.payments.models import Payment
from demo_shop.shop import Shop
from demo_shop.walkthrough import FLOWS, Flow, FlowResult, check_hops, create_customers, hop_reader, run_flow, saga_hops


def engines_of(shop: Shop) -> dict[str, AsyncEngine]:
    """Each running service's engine, by service name."""
    return {service.name: service.engine for service in shop}


@asynccontextmanager
async def api_client(shop: Shop) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client for the shop's combined app, in process (the services run already)."""
    transport = httpx.ASGITransport(app=shop.create_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://shop") as client:
        yield client


async def run_flows(
    client: httpx.AsyncClient, engines: Mapping[str, AsyncEngine], flows: Iterable[Flow] = FLOWS, timeout: float = 30
) -> list[FlowResult]:
    """Create the walkthrough's customers, then run `flows` all at once."""
    customers = await create_customers(client)
    read_hops = hop_reader(engines)
    return list(await asyncio.gather(*(run_flow(client, f, customers, read_hops, timeout=timeout) for f in flows)))


@dataclass
class Rows:
    """What each service's own database says about one order."""

    order: Order | None
    reservation: Reservation | None
    payment: Payment | None


async def rows_for(engines: Mapping[str, AsyncEngine], order_id: str) -> Rows:
    async with AsyncSession(engines["orders"]) as session:
        order = await session.get(Order, order_id)
    async with AsyncSession(engines["customers"]) as session:
        reservation = await session.get(Reservation, order_id)
    async with AsyncSession(engines["payments"]) as session:
        payment = (await session.execute(select(Payment).where(col(Payment.order_id) == order_id))).scalar_one_or_none()
    return Rows(order, reservation, payment)


async def dead_letters(engines: Mapping[str, AsyncEngine]) -> list[str]:
    """Every dead letter of every service, described."""
    found = []
    for name, engine in engines.items():
        async with AsyncSession(engine) as session:
            for letter in (await session.execute(select(DeadLetter))).scalars():
                found.append(f"{name}: {letter.event_type} {letter.reason}: {letter.error[:200]}")
    return found


async def assert_flow(engines: Mapping[str, AsyncEngine], result: FlowResult) -> None:
    """The flow ended as it must: in the API's view, in each database, and in its saga's events."""
    flow = result.flow
    assert result.ok, f"{flow.key}: {result.problems}"
    assert result.order_id is not None and result.saga_id is not None
    rows = await rows_for(engines, result.order_id)
    assert rows.order is not None, f"{flow.key}: order {result.order_id} missing from the orders database"
    assert rows.order.state == flow.final_state, flow.key
    assert rows.order.saga_id == result.saga_id
    assert (rows.order.rejection_reason is not None) == (flow.final_state == OrderState.REJECTED), flow.key
    assert (rows.reservation.state if rows.reservation else None) == flow.reservation, flow.key
    assert (rows.payment.state if rows.payment else None) == flow.payment, flow.key
    if rows.reservation is not None:
        assert rows.reservation.amount == flow.total
    if rows.payment is not None:
        assert rows.payment.amount == flow.total
    # Read again now that everything has settled: a late, unexpected event would show here.
    hops = await saga_hops(engines, result.saga_id)
    sequence = [hop.event for hop in hops]
    assert check_hops(flow, hops) == [], f"{flow.key}: {sequence}"
    assert sequence[0] == "order.created", f"{flow.key}: {sequence}"


async def credit_books(customers_engine: AsyncEngine) -> dict[str, tuple[Decimal, Decimal, Decimal]]:
    """Per customer: (credit limit, credit_reserved column, sum of RESERVED reservations)."""
    async with AsyncSession(customers_engine) as session:
        customers = list((await session.execute(select(Customer))).scalars())
        held: dict[str, Decimal] = {c.id: Decimal("0.00") for c in customers}
        reservations = await session.execute(
            select(Reservation).where(col(Reservation.state) == ReservationState.RESERVED)
        )
        for reservation in reservations.scalars():
            held[reservation.customer_id] += reservation.amount
    return {c.id: (c.credit_limit, c.credit_reserved, held[c.id]) for c in customers}


async def assert_credit_consistent(customers_engine: AsyncEngine) -> None:
    """No customer holds more than their limit, and the running total matches the reservations."""
    for customer_id, (limit, reserved, held) in (await credit_books(customers_engine)).items():
        assert reserved == held, f"customer {customer_id}: credit_reserved {reserved} != reservations {held}"
        assert held <= limit, f"customer {customer_id}: {held} reserved over a limit of {limit}"


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    """Poll `check` until it returns True; fail after `timeout` seconds saying `what` was awaited."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)
