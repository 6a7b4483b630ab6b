"""The order history read model: built only from events, and rebuilt from the topics to the same result."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession
from typer.testing import CliRunner

from choreo import KafkaSettings, Service
from choreo.cli import app as cli
from choreo.exceptions import SetupError
from choreo.readmodel import rebuild
from choreo.tables import DeadLetter, InboxRow, OutboxRow
from demo_shop.order_history import api, handlers
from demo_shop.orders.models import Order
from demo_shop.shop import SERVICES, Shop
from tests.conftest import DatabaseFactory
from tests.demo_support import api_client, engines_of, eventually, run_flows

pytestmark = pytest.mark.infra

PROJECTED = sorted({t.event_name for h in handlers.service.handlers for t in h.event_types})


async def scalar(service: Service, query: Any) -> int:
    async with AsyncSession(service.engine) as session:
        return int(await session.scalar(query) or 0)


async def caught_up(shop: Shop, history: Service) -> bool:
    """Every projected event the shop emitted has been recorded by the history (one inbox row each)."""
    emitted = 0
    for service in shop:
        emitted += await scalar(
            service,
            select(func.count()).select_from(OutboxRow).where(OutboxRow.event_type.in_(PROJECTED)),  # type: ignore[attr-defined]
        )
    return emitted > 0 and await scalar(history, select(func.count()).select_from(InboxRow)) == emitted


async def snapshot(history_app: Any, customer_ids: list[str]) -> dict[str, list[dict[str, Any]]]:
    transport = httpx.ASGITransport(app=history_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://history") as client:
        views = {}
        for customer_id in customer_ids:
            response = await client.get(f"/customers/{customer_id}/orders")
            assert response.status_code == 200, response.text
            views[customer_id] = response.json()
        return views


async def test_the_history_rebuilt_from_the_topics_equals_the_live_one_after_every_flow(
    database: DatabaseFactory, kafka_settings: KafkaSettings
) -> None:
    shop = Shop.build({name: await database(name) for name in SERVICES}, kafka_settings)
    history = handlers.service.clone(database_url=await database("order_history"), kafka=kafka_settings)
    shop_app, history_app = shop.create_app(), api.create_app(history)
    async with shop_app.router.lifespan_context(shop_app):
        async with history_app.router.lifespan_context(history_app):
            async with api_client(shop) as client:
                results = await run_flows(client, engines_of(shop), timeout=60)
            assert all(r.ok for r in results), [r.problems for r in results if not r.ok]
            await eventually(lambda: caught_up(shop, history), 60, "the history to record every event")
            async with AsyncSession(shop.orders.engine) as session:
                orders = list((await session.execute(select(Order))).scalars())
            customers = sorted({o.customer_id for o in orders})
            live = await snapshot(history_app, customers)
            # While it runs, its group cannot be rewound under it.
            with pytest.raises(SetupError, match="stop every instance of the service first"):
                await rebuild(history)
        assert await scalar_dead_letters(history) == 0

        # The query side agrees with the write side, without ever asking it.
        seen = {view["order_id"]: view for views in live.values() for view in views}
        assert sorted(seen) == sorted(o.id for o in orders)
        for order in orders:
            assert (seen[order.id]["state"], seen[order.id]["total"]) == (order.state, f"{order.total:.2f}"), order.id
        assert {view["payment"] for view in seen.values()} >= {"AUTHORIZED", "DECLINED", "REFUNDED"}

        await history.start(kafka=False)
        try:
            done = await rebuild(history)
            assert await scalar(history, select(func.count()).select_from(InboxRow)) == 0
        finally:
            await history.stop()
        assert done.tables == ["order_history"]
        assert set(done.partitions) == {"customers", "orders", "payments"}

        async with history_app.router.lifespan_context(history_app):
            await eventually(lambda: caught_up(shop, history), 60, "the rebuilt history to replay every event")
            assert await snapshot(history_app, customers) == live


async def scalar_dead_letters(history: Service) -> int:
    await history.start(kafka=False)
    try:
        return await scalar(history, select(func.count()).select_from(DeadLetter))
    finally:
        await history.stop()


def test_only_a_service_that_emits_nothing_can_be_rebuilt() -> None:
    result = CliRunner().invoke(cli, ["rebuild", "demo_shop.orders.handlers:service"], env={"CHOREO_DEBUG": ""})
    assert result.exit_code == 1
    assert "orders is not a read model: it emits order.approved" in result.output
    assert "only a service that emits nothing can be rebuilt" in result.output
