"""How long a saga took: to its end event, and until it settled (its last event, compensations included)."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from pathlib import Path

from typer.testing import CliRunner

from choreo.cli import app
from choreo.envelope import utcnow
from choreo.tracing import SagaDeclaration, TracedEvent, TraceStore, build_trace

ORDER = SagaDeclaration("order", "order.created", frozenset({"order.approved", "order.rejected"}))


def cancelled_late(saga_id: str, start_ago: timedelta) -> list[TracedEvent]:
    """Approved after 62 ms, cancelled 28 s later, refunded 40 ms after the cancel."""
    start = utcnow() - start_ago

    def event(n: int, event_type: str, cause: int | None, at_ms: int, compensates: tuple[str, ...] = ()) -> TracedEvent:
        return TracedEvent(
            "event",
            f"{saga_id}-{n}",
            saga_id,
            event_type,
            1,
            None if cause is None else f"{saga_id}-{cause}",
            event_type.split(".")[0],
            None,
            start + timedelta(milliseconds=at_ms),
            "t",
            0,
            n,
            compensates=compensates,
        )

    return [
        event(1, "order.created", None, 0),
        event(2, "payment.authorized", 1, 30),
        event(3, "order.approved", 2, 62),
        event(4, "order.cancelled", 3, 28_062),
        event(5, "payment.refunded", 4, 28_102, compensates=("payment.authorized",)),
    ]


def test_a_saga_ends_with_its_end_event_and_settles_with_its_last() -> None:
    saga = build_trace("s1", cancelled_late("s1", timedelta(minutes=1)), [ORDER])
    assert saga.ended_after == timedelta(milliseconds=62)
    assert saga.settled_after == timedelta(milliseconds=28_102)
    document = saga.to_dict()
    assert (document["ended_ms"], document["settled_ms"]) == (62.0, 28_102.0)
    unfinished = build_trace("s2", cancelled_late("s2", timedelta(minutes=1))[:2], [ORDER])
    assert unfinished.ended_after is None and unfinished.settled_after == timedelta(milliseconds=30)
    assert unfinished.to_dict()["ended_ms"] is None


async def test_sagas_shows_both_columns(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/trace.db"
    async with TraceStore(url) as store:
        await store.save_declarations([ORDER])
        for event in cancelled_late("late-cancel", timedelta(minutes=1)):
            await store.add(event)
        for event in cancelled_late("pending", timedelta(seconds=5))[:2]:
            await store.add(event)

    def invoke(*args: str) -> str:
        result = CliRunner().invoke(app, ["sagas", "--db", url, *args], env={"COLUMNS": "200", "CHOREO_DEBUG": ""})
        assert result.exit_code == 0, result.output
        return result.stdout

    out = await asyncio.to_thread(invoke)
    header, *rows = out.splitlines()
    assert header.split()[5:8] == ["ended", "settled", "events"]
    cells = {row.split()[0]: row.split() for row in rows}
    assert cells["late-cancel"][2] == "compensated"
    assert cells["late-cancel"][5:10] == ["62.0", "ms", "28.10", "s", "5"]
    assert cells["pending"][5:8] == ["-", "30.0", "ms"]
    listed = {d["saga_id"]: d for d in json.loads(await asyncio.to_thread(invoke, "--format", "json"))}
    assert (listed["late-cancel"]["ended_ms"], listed["late-cancel"]["settled_ms"]) == (62.0, 28_102.0)
    assert (listed["pending"]["ended_ms"], listed["pending"]["settled_ms"]) == (None, 30.0)
