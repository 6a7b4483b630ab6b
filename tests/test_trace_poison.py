"""The trace collector indexes whatever a topic holds: odd headers never stall it."""

from __future__ import annotations

from sqlalchemy import select

from choreo.envelope import CAUSATION_ID, EVENT_ID, EVENT_TYPE, EVENT_VERSION, HANDLER, PRODUCER, SAGA_ID
from choreo.kafka import Record
from choreo.tracing import TraceStore, events_table, index_record
from tests.conftest import DatabaseFactory


async def test_over_long_and_nul_header_values_are_indexed_cut_to_fit(database: DatabaseFactory) -> None:
    headers = {
        EVENT_ID: "e" * 80,
        EVENT_TYPE: "odd.\x00event" + "x" * 300,
        EVENT_VERSION: "1",
        SAGA_ID: "s\x00" * 40,
        CAUSATION_ID: "c" * 300,
        PRODUCER: "p" * 100,
        HANDLER: "h\x00" * 200,
    }
    record = Record("orders", 0, 7, b"k", b"{}", tuple((k, v.encode()) for k, v in headers.items()))
    event = index_record(record)
    assert event is not None
    async with TraceStore(await database("trace")) as store:
        assert await store.add(event)
        async with store.engine.connect() as conn:
            row = (await conn.execute(select(events_table))).one()
    assert (len(row.event_id), len(row.causation_id), len(row.producer), len(row.handler)) == (64, 64, 63, 255)
    assert "\x00" not in row.saga_id + row.event_type + row.handler
