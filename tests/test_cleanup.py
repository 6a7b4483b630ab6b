"""Retention removes old bookkeeping rows in batches and keeps new ones and dead letters."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import func, insert, select

from choreo.cleanup import Retention, purge_once
from choreo.envelope import utcnow
from choreo.exceptions import ConfigurationError
from choreo.settings import parse_duration, retention_from_env
from choreo.tables import DeadLetter, InboxRow, OutboxRow
from tests.conftest import DatabaseFactory
from tests.toy import make_toy


async def test_cleanup_removes_old_rows_and_keeps_new_ones(database: DatabaseFactory) -> None:
    url = await database("clean")
    service = make_toy(url, url).shop
    await service._open(ensure_topics=False, consume=False)
    now = utcnow()
    old, new = now - timedelta(days=8), now - timedelta(hours=2)
    outbox_rows = [
        {
            "event_id": f"e{i}",
            "topic": "t",
            "key": "k",
            "event_type": "x",
            "event_version": 1,
            "saga_id": "s",
            "headers": {},
            "payload": b"{}",
            "created_at": when,
            "available_at": when,
            "published_at": published,
        }
        for i, (when, published) in enumerate(
            [(old, old)] * 25 + [(new, new)] * 5 + [(old, None)] * 3  # unpublished rows stay, however old
        )
    ]
    inbox_rows = [{"consumer": "c", "event_id": f"i{i}", "processed_at": old if i < 25 else new} for i in range(30)]
    letter = {
        "consumer": "c",
        "topic": "t",
        "partition": 0,
        "offset": 1,
        "headers": {},
        "payload": b"",
        "reason": "r",
        "error": "e",
        "attempts": 1,
        "first_failed_at": old,
        "last_failed_at": old,
    }
    try:
        async with service.engine.begin() as conn:
            await conn.execute(insert(OutboxRow.__table__), outbox_rows)
            await conn.execute(insert(InboxRow.__table__), inbox_rows)
            await conn.execute(insert(DeadLetter.__table__), [letter])
        deleted = await purge_once(service.engine, Retention(batch_size=10), now)
        assert deleted == (25, 25)
        async with service.engine.connect() as conn:
            assert await conn.scalar(select(func.count()).select_from(OutboxRow.__table__)) == 8
            assert await conn.scalar(select(func.count()).select_from(InboxRow.__table__)) == 5
            assert await conn.scalar(select(func.count()).select_from(DeadLetter.__table__)) == 1
    finally:
        await service.stop()


def test_retention_settings_from_the_environment() -> None:
    retention = retention_from_env("svc", {"CHOREO_OUTBOX_RETENTION": "12h", "CHOREO_SVC_INBOX_RETENTION": "14d"})
    assert (retention.outbox, retention.inbox) == (timedelta(hours=12), timedelta(days=14))
    assert parse_duration("30s", "X") == timedelta(seconds=30)
    assert parse_duration("1.5h", "X") == timedelta(minutes=90)
    assert parse_duration("250ms", "X") == timedelta(milliseconds=250)
    with pytest.raises(ConfigurationError, match="CHOREO_INBOX_RETENTION='soon' is not a duration"):
        retention_from_env("svc", {"CHOREO_INBOX_RETENTION": "soon"})
    with pytest.raises(ConfigurationError, match="shorter than an hour"):
        retention_from_env("svc", {"CHOREO_INBOX_RETENTION": "5m"})
