"""Fixtures shared by the suites: real infrastructure comes from tests/infra.py."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from choreo import KafkaSettings

pytest_plugins = ["tests.infra"]

DatabaseFactory = Callable[[str], Awaitable[str]]


@pytest.fixture
def kafka_settings(kafka_bootstrap: str, kafka_kind: str, topic_prefix: str) -> KafkaSettings:
    """Settings for the session's broker, with topics private to this test."""
    tansu = kafka_kind == "tansu"
    return KafkaSettings(
        bootstrap_servers=kafka_bootstrap,
        topic_prefix=topic_prefix,
        partitions=4,
        # tansu rejects the idempotent producer and does not wake fetches on new data.
        idempotence=not tansu,
        fetch_max_wait_ms=5 if tansu else 100,
    )


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> DatabaseFactory:
    """A factory of fresh, empty databases on the parametrized backend: `await database("shop")`."""
    if request.param == "sqlite":

        async def sqlite(name: str) -> str:
            return f"sqlite+aiosqlite:///{tmp_path}/{name}.db"

        return sqlite
    make: DatabaseFactory = request.getfixturevalue("fresh_pg_database")
    return make
