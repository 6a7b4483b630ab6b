"""Passwords and payload values stay out of messages, logs, dead letters and their topic."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

from choreo import Event, KafkaSettings, RetryPolicy, Service, Tx
from choreo.cli import app
from choreo.database import masked_url, normalize_url
from choreo.deadletters import ERROR
from choreo.exceptions import ConfigurationError
from choreo.tables import DeadLetter, OutboxRow
from choreo.testing import in_memory, record_of
from choreo.tracing import TraceStore
from tests.conftest import DatabaseFactory
from tests.toy import StockItem, stock_metadata


def test_masked_url_hides_the_password_of_parsable_and_unparsable_urls() -> None:
    assert masked_url("postgresql://shop:s3cret@db:5432/orders") == "postgresql://shop:***@db:5432/orders"
    assert "s3cret" not in masked_url("postgresql://shop:s3cret@db:notaport/orders")
    assert masked_url("sqlite+aiosqlite:///orders.db") == "sqlite+aiosqlite:///orders.db"
    with pytest.raises(ConfigurationError) as refused:
        normalize_url("shop:s3cret@db/orders")  # no scheme: not a URL at all
    assert "s3cret" not in str(refused.value)
    with pytest.raises(ConfigurationError) as refused:
        normalize_url("mysql://shop:s3cret@db/orders")
    assert "s3cret" not in str(refused.value) and "not 'mysql'" in str(refused.value)


def test_kafka_settings_never_show_the_sasl_password() -> None:
    settings = KafkaSettings(
        security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN", sasl_username="shop", sasl_password="s3cret"
    )
    assert "s3cret" not in repr(settings)


def test_trace_of_an_unknown_saga_names_the_database_without_its_password(postgres_url: str) -> None:
    url = make_url(postgres_url).set(drivername="postgresql+asyncpg")
    assert url.password, "the test server is reached with a password"
    result = CliRunner().invoke(
        app, ["trace", "feedface", "--db", url.render_as_string(hide_password=False)], env={"CHOREO_DEBUG": ""}
    )
    assert result.exit_code != 0
    assert "no saga 'feedface'" in result.stderr
    assert f":{url.password}@" not in result.stderr + result.stdout
    assert ":***@" in result.stderr
    assert f":{url.password}@" not in repr(TraceStore(postgres_url))


class Restock(Event, name="secret.restock", topic="secret"):
    sku: str


async def test_sql_errors_in_dead_letters_carry_no_parameter_values(database: DatabaseFactory) -> None:
    service = Service(
        "secret-stock",
        database_url=await database("secret"),
        metadata=stock_metadata,
        retry=RetryPolicy(max_attempts=1),
    )

    @service.on(Restock)
    async def restock(event: Restock, tx: Tx) -> None:
        tx.session.add(StockItem(sku=event.sku, available=1))
        tx.session.add(StockItem(sku=event.sku, available=2))  # the same key twice: IntegrityError

    async with in_memory(service):
        assert service.consumer is not None
        assert await service.consumer.process(record_of(Restock(sku="card-4111111111111111"))) == ["dead-lettered"]
        async with service.engine.connect() as conn:
            letter = (await conn.execute(select(DeadLetter.__table__))).one()  # type: ignore[attr-defined]
            topic_row = (await conn.execute(select(OutboxRow.__table__))).one()  # type: ignore[attr-defined]
    assert "IntegrityError" in letter.error
    for stored in (letter.error, letter.traceback, topic_row.headers[ERROR]):
        assert "4111111111111111" not in stored
