"""Failure drills: the broker or the database goes away for a while; nothing is lost or parked."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from choreo import KafkaSettings
from infra.kafka import ApacheKafka
from tests.conftest import DatabaseFactory
from tests.test_core_infra import eventually
from tests.toy import add_stock, make_toy, order_status, place_order, reservations

pytestmark = pytest.mark.infra


async def all_confirmed(shop: object, orders: list[str]) -> bool:
    return all([await order_status(shop, o) == "CONFIRMED" for o in orders])  # type: ignore[arg-type]


async def test_kafka_paused_then_back_loses_nothing(
    database: DatabaseFactory, kafka_settings: KafkaSettings, kafka_broker: ApacheKafka | None
) -> None:
    if kafka_broker is None:
        pytest.skip("needs the Apache Kafka broker this test session started (not an external or tansu one)")
    toy = make_toy(await database("shop"), await database("stock"), kafka_settings)
    async with toy.shop.running(), toy.stock.running():
        await add_stock(toy.stock, "apple", 100)
        await place_order(toy.shop, "before", "apple", 1)
        await eventually(lambda: all_confirmed(toy.shop, ["before"]))
        kafka_broker.pause()
        try:
            orders = [f"o{i}" for i in range(5)]
            for order in orders:  # the local transactions commit while Kafka is away
                await place_order(toy.shop, order, "apple", 1)
            await asyncio.sleep(3)
        finally:
            kafka_broker.resume()
        await eventually(lambda: all_confirmed(toy.shop, orders), timeout=120)
        assert len(await reservations(toy.stock)) == 6
        for service in (toy.shop, toy.stock):
            assert service.consumer is not None and service.consumer.stats.dead_lettered == 0


async def test_database_connections_killed_mid_flow_lose_nothing(
    fresh_pg_database: object, postgres_url: str, kafka_settings: KafkaSettings
) -> None:
    make = fresh_pg_database
    shop_db, stock_db = await make("shop"), await make("stock")  # type: ignore[operator]
    toy = make_toy(shop_db, stock_db, kafka_settings)
    admin_dsn = postgres_url.replace("postgresql+asyncpg://", "postgresql://")
    stock_name = stock_db.rsplit("/", 1)[1]
    async with toy.shop.running(), toy.stock.running():
        await add_stock(toy.stock, "apple", 100)
        orders = [f"o{i}" for i in range(20)]
        admin = await asyncpg.connect(admin_dsn)
        try:
            for i, order in enumerate(orders):
                await place_order(toy.shop, order, "apple", 1)
                if i % 5 == 2:  # cut every connection of the stock service while it works
                    await admin.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", stock_name
                    )
        finally:
            await admin.close()
        await eventually(lambda: all_confirmed(toy.shop, orders), timeout=120)
        assert len(await reservations(toy.stock)) == 20
        assert toy.stock.consumer is not None and toy.stock.consumer.stats.dead_lettered == 0
        # The relay's leader connection is always open, so the drill certainly cut it.
        assert toy.stock.relay is not None and toy.stock.relay.stats.failures >= 1
