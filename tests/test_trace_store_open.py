"""Processes opening one trace database together (compose starts the collector and the explorer at once)."""

from __future__ import annotations

import asyncio

from choreo.tracing import TraceStore
from tests.conftest import DatabaseFactory


async def test_several_processes_creating_the_trace_tables_at_once_all_start(
    fresh_pg_database: DatabaseFactory,
) -> None:
    # Unserialized, concurrent CREATE TABLEs on a fresh PostgreSQL database collide in the
    # catalog (a duplicate type name): the explorer then exited at start-up.
    url = await fresh_pg_database("trace")
    stores = [TraceStore(url) for _ in range(6)]
    try:
        await asyncio.gather(*(store.open() for store in stores))
    finally:
        for store in stores:
            await store.close()
