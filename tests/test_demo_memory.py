"""Every flow of the demo shop on SQLite and FastStream's in-memory Kafka: fast, no broker."""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import pytest

from choreo.testing import in_memory, settle
from demo_shop.events import CreditReleased, CreditReserved, PaymentAuthorized, PaymentRefunded
from demo_shop.payments.handlers import decline_reason
from demo_shop.shop import Shop
from demo_shop.walkthrough import FLOWS, Flow, create_customers, hop_reader, run_flow
from tests.demo_support import api_client, assert_credit_consistent, assert_flow, dead_letters, engines_of, run_flows


@pytest.fixture
async def shop(tmp_path: Path) -> AsyncIterator[Shop]:
    shop = Shop.in_directory(tmp_path)
    async with in_memory(*shop):
        yield shop


@pytest.mark.parametrize("flow", FLOWS, ids=[flow.key for flow in FLOWS])
async def test_flow(shop: Shop, flow: Flow) -> None:
    engines = engines_of(shop)
    async with api_client(shop) as client:
        customers = await create_customers(client)
        result = await run_flow(client, flow, customers, hop_reader(engines), timeout=10)
    await settle(*shop)
    await assert_flow(engines, result)
    await assert_credit_consistent(engines["customers"])
    assert await dead_letters(engines) == []


async def test_all_flows_at_once(shop: Shop) -> None:
    engines = engines_of(shop)
    async with api_client(shop) as client:
        results = await run_flows(client, engines, timeout=10)
    await settle(*shop)
    for result in results:
        await assert_flow(engines, result)
    await assert_credit_consistent(engines["customers"])
    assert await dead_letters(engines) == []


@pytest.mark.parametrize(
    ("total", "declined"),
    [("113.13", True), ("0.13", True), ("13.13", True), ("113.14", False), ("13.00", False), ("1.30", False)],
)
def test_payments_decline_totals_ending_in_13_cents(total: str, declined: bool) -> None:
    assert (decline_reason(Decimal(total)) is not None) is declined


def test_compensations_are_declared() -> None:
    assert CreditReleased.compensates == (CreditReserved,)
    assert PaymentRefunded.compensates == (PaymentAuthorized,)
