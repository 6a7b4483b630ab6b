"""The README's first example is examples/quickstart.py, word for word, and it runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from choreo.testing import in_memory, settle

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_the_readme_shows_the_quickstart_file_verbatim() -> None:
    marker = "<!-- examples/quickstart.py, verbatim (tests/test_readme.py) -->"
    assert marker in README
    block = re.match(r"\s*```python\n(.*?)```", README.split(marker, 1)[1], re.DOTALL)
    assert block is not None, "no python block after the marker"
    assert block.group(1) == (ROOT / "examples" / "quickstart.py").read_text()


def test_the_readme_says_where_the_commands_are_before_using_them() -> None:
    first_command = min(README.index(f"`{command} ") for command in ("choreo", "demo-shop"))
    assert ".venv/bin" in README[:first_command]


async def test_the_quickstart_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for service in ("customers", "orders"):
        monkeypatch.setenv(f"CHOREO_{service.upper()}_DATABASE_URL", f"sqlite:///{tmp_path}/{service}.db")
    from examples import quickstart

    async with in_memory(quickstart.customers, quickstart.orders):
        async with quickstart.customers.transaction() as tx:
            tx.session.add(quickstart.Customer(id="ada", available_cents=100_00))
        approved = await quickstart.place_order("ada", 60_00)
        rejected = await quickstart.place_order("ada", 60_00)  # only 40.00 left
        unknown = await quickstart.place_order("bob", 1_00)
        await settle(quickstart.customers, quickstart.orders)
        assert [await quickstart.order_state(order) for order in (approved, rejected, unknown)] == [
            "APPROVED",
            "REJECTED",
            "REJECTED",
        ]
        async with quickstart.customers.session() as session:
            ada = await session.get(quickstart.Customer, "ada")
        assert ada is not None and ada.available_cents == 40_00
