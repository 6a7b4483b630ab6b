"""The infrastructure fixtures work: a record with headers through Kafka, a query on a fresh database."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from infra.kafka import ApacheKafka


async def test_kafka_round_trip_with_headers(
    kafka_bootstrap: str, kafka_kind: str, kafka_broker: ApacheKafka | None, topic_prefix: str
) -> None:
    assert kafka_kind in {"apache", "tansu", "external"}
    assert (kafka_broker is not None) == (kafka_kind == "apache")
    topic = f"{topic_prefix}ping"
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        sent = await producer.send_and_wait(topic, b"hello", key=b"k1", headers=[("trace", b"t-1"), ("kind", b"ping")])
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka_bootstrap,
        group_id=f"{topic_prefix}group",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        fetch_max_wait_ms=50,
    )
    await consumer.start()
    try:
        consumer.subscribe([topic])
        record = await asyncio.wait_for(consumer.getone(), timeout=60)
        await consumer.commit()
    finally:
        await consumer.stop()

    assert (record.topic, record.partition, record.offset) == (topic, sent.partition, sent.offset)
    assert record.key == b"k1"
    assert record.value == b"hello"
    assert list(record.headers) == [("trace", b"t-1"), ("kind", b"ping")]


async def test_fresh_postgres_databases(fresh_pg_database: Callable[..., Awaitable[str]]) -> None:
    first, second = await fresh_pg_database("shop"), await fresh_pg_database()
    assert first.startswith("postgresql+asyncpg://") and first != second
    engine = create_async_engine(first)
    try:
        async with engine.connect() as conn:
            assert await conn.scalar(text("SELECT 1")) == 1
            assert await conn.scalar(text("SELECT current_database()")) == first.rsplit("/", 1)[1]
    finally:
        await engine.dispose()
