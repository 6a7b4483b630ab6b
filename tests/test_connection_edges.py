"""Connections that die without a word, and services started while a dependency is down."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import asyncpg
from sqlalchemy import text

from choreo import KafkaSettings, Service
from demo_shop.shop import SERVICES, Shop
from tests.demo_support import api_client

MakeDatabase = Callable[[str], Awaitable[str]]


def _asyncpg_dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://")


async def terminate_backends(url: str) -> int:
    """`pg_terminate_backend` every session on `url`'s database; return once they are gone."""
    name = url.rsplit("/", 1)[1]
    admin = await asyncpg.connect(_asyncpg_dsn(url).rsplit("/", 1)[0] + "/postgres")
    try:
        pids = await admin.fetchval(
            "SELECT array_agg(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()", name
        )
        await admin.execute("SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) AS pid", pids)
        async with asyncio.timeout(10):  # termination is asynchronous: wait for those sessions to end
            while await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1)", pids):
                await asyncio.sleep(0.05)
        return len(pids or ())
    finally:
        await admin.close()


# -- the pool after pg_terminate_backend --------------------------------------------------------


async def test_a_unit_of_work_after_its_pooled_connections_were_terminated_succeeds(
    fresh_pg_database: MakeDatabase,
) -> None:
    url = await fresh_pg_database("pool")
    service = Service("pool", database_url=url)
    async with service.running(kafka=False):
        async with service.transaction() as tx:  # leaves a connection in the pool
            await tx.session.execute(text("SELECT 1"))
        assert await terminate_backends(url) >= 1
        async with service.transaction() as tx:
            assert await tx.session.scalar(text("SELECT 2")) == 2


async def test_the_demo_shop_places_an_order_after_its_database_sessions_were_terminated(
    fresh_pg_database: MakeDatabase, kafka_settings: KafkaSettings
) -> None:
    urls = {name: await fresh_pg_database(name) for name in SERVICES}
    shop = Shop.build(urls, kafka_settings)
    async with contextlib.AsyncExitStack() as running:
        for service in shop:
            await running.enter_async_context(service.running())
        client = await running.enter_async_context(api_client(shop))
        created = await client.post("/customers", json={"name": "Ada", "credit_limit": "100.00"})
        assert created.status_code == 201, created.text
        for url in urls.values():
            await terminate_backends(url)
        # ASGITransport re-raises what the app does not handle, so a 500 fails here loudly.
        placed = await client.post("/orders", json={"customer_id": created.json()["id"], "total": "10.00"})
        assert placed.status_code == 201, placed.text
