"""Every flow of the demo shop against PostgreSQL (a database per service) and a real Kafka broker."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from choreo import KafkaSettings
from demo_shop.shop import SERVICES, Shop
from tests.demo_support import api_client, assert_credit_consistent, assert_flow, dead_letters, engines_of, run_flows


@pytest.fixture
async def pg_shop(
    fresh_pg_database: Callable[[str], Awaitable[str]], kafka_settings: KafkaSettings
) -> AsyncIterator[Shop]:
    """The shop on fresh PostgreSQL databases and private topics, started by its app's lifespan."""
    shop = Shop.build({name: await fresh_pg_database(name) for name in SERVICES}, kafka_settings)
    app = shop.create_app()
    async with app.router.lifespan_context(app):
        yield shop


async def test_every_flow_end_to_end(pg_shop: Shop) -> None:
    engines = engines_of(pg_shop)
    async with api_client(pg_shop) as client:
        results = await run_flows(client, engines, timeout=60)
        assert (await client.get("/health")).status_code == 200
    for result in results:
        await assert_flow(engines, result)
    await assert_credit_consistent(engines["customers"])
    assert await dead_letters(engines) == []
