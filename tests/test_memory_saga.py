"""The unit of work and saga path on SQLite with FastStream's in-memory Kafka."""

from __future__ import annotations

from pathlib import Path

from choreo.testing import in_memory, settle
from tests.toy import add_stock, make_toy, order_status, place_order, reservations


def sqlite_urls(tmp_path: Path) -> tuple[str, str]:
    return f"sqlite+aiosqlite:///{tmp_path}/shop.db", f"sqlite+aiosqlite:///{tmp_path}/stock.db"


async def test_saga_runs_end_to_end_in_memory(tmp_path: Path) -> None:
    toy = make_toy(*sqlite_urls(tmp_path))
    async with in_memory(toy.shop, toy.stock):
        await add_stock(toy.stock, "apple", 5)
        await place_order(toy.shop, "o1", "apple", 3)
        await place_order(toy.shop, "o2", "apple", 3)
        await settle(toy.shop, toy.stock)
        assert await order_status(toy.shop, "o1") == "CONFIRMED"
        assert await order_status(toy.shop, "o2") == "REJECTED"
        assert [r.order_id for r in await reservations(toy.stock)] == ["o1"]
