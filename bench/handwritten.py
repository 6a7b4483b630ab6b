"""What the two hand-written baselines (`bench.baseline`, `bench.lean`) share: the saga's wiring
and the timestamps their handlers note. Imports neither FastStream nor SQLAlchemy."""

from __future__ import annotations

import asyncio
from pathlib import Path

SERVICES = ("orders", "customers", "payments")
CONSUMES = {"customers": "orders", "payments": "customers", "orders": "payments"}
"""The topic each service subscribes to in the order saga."""


class Timings:
    """Handler timestamps, appended to a file once a second (no database writes of their own)."""

    def __init__(self, path: str | None) -> None:
        self.path = Path(path) if path else None
        self.rows: list[str] = []

    def add(self, order_id: str, step: str, received: float, emitted: float) -> None:
        if self.path is not None:
            self.rows.append(f"{order_id},{step},{received:.6f},{emitted:.6f}\n")

    def flush(self) -> None:
        if self.path is not None and self.rows:
            rows, self.rows = self.rows, []
            with self.path.open("a") as out:
                out.writelines(rows)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.flush()
