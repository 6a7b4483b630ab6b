"""The trace collector against a real Kafka broker, indexing into SQLite and into PostgreSQL."""

from __future__ import annotations

import pytest

from choreo import KafkaSettings, outbox
from choreo.tables import outbox_table
from choreo.tracing import SagaState, TraceCollector
from tests.conftest import DatabaseFactory
from tests.test_core_infra import eventually
from tests.test_tracing import SUCCESS_SHAPE, shape
from tests.toy3 import make_toy3, place

pytestmark = pytest.mark.infra


async def test_the_collector_indexes_sagas_from_kafka(database: DatabaseFactory, kafka_settings: KafkaSettings) -> None:
    toy = make_toy3(await database("orders"), await database("stock"), await database("payments"), kafka_settings)
    collector = TraceCollector(toy.services, await database("trace"), kafka=kafka_settings)
    async with collector.running(), toy.orders.running(), toy.stock.running(), toy.payments.running():
        ids = {
            "success": await place(toy.orders, "ok-1", 40),
            "compensation": await place(toy.orders, "big-1", 150),
            "dead-letter": await place(toy.orders, "boom-1", 10),
        }
        # 4 + 5 + 2 events and one dead letter, whatever order the topics are read in.
        await eventually(lambda: collector.stats.indexed == 11 and collector.stats.dead_letters == 1)

        # The same event published again is indexed once.
        async with toy.stock.engine.connect() as conn:
            first = (await conn.execute(outbox_table.select().order_by(outbox_table.c.id).limit(1))).one()
        await toy.stock.transport.publish(
            [outbox.OutboxRecord(first.id, first.topic, first.key, first.headers, first.payload)]
        )
        await eventually(lambda: collector.stats.duplicates >= 1)
        assert collector.stats.indexed == 11 and collector.stats.ignored == 0

        success = await collector.store.trace(ids["success"])
        assert success is not None and success.state is SagaState.COMPLETED
        (root,) = success.roots
        assert shape(root) == SUCCESS_SHAPE
        for hop in success.hops():
            assert hop.event.published_at is not None and hop.publish_delay is not None
            assert hop.event.topic.startswith("t3-") and 0 <= hop.event.partition < 4
        compensated = await collector.store.trace(ids["compensation"])
        assert compensated is not None and compensated.state is SagaState.COMPENSATED
        assert [h.event.event_type for h in compensated.compensations] == ["t3.stock_released"]
        failed = await collector.store.trace(ids["dead-letter"])
        assert failed is not None and failed.state is SagaState.FAILED
        (stopped,) = failed.stopped_at
        assert stopped.event.event_type == "t3.stock_reserved"
        assert [(d.consumer, d.reason) for d in stopped.dead_letters] == [("payments.charge", "handler-error")]
        assert stopped.dead_letters[0].topic == "payments.dead-letters"
