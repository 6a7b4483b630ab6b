"""The unit of work owns its transaction: code inside it cannot commit or roll back half of it."""

from __future__ import annotations

import contextlib

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError

from choreo import Event, RetryPolicy, Service, Tx, UnitOfWorkError
from choreo.tables import DeadLetter, InboxRow, OutboxRow
from choreo.testing import in_memory, record_of
from tests.conftest import DatabaseFactory
from tests.toy import StockItem, stock_metadata


class Restock(Event, name="uow.restock", topic="uow"):
    sku: str


class Restocked(Event, name="uow.restocked", topic="uow-out"):
    sku: str


def stock_service(url: str, *, habit: str) -> Service:
    service = Service(
        "uow-stock",
        database_url=url,
        metadata=stock_metadata,
        retry=RetryPolicy(max_attempts=2, initial_backoff=0.001, max_backoff=0.002),
    )

    @service.on(Restock)
    async def restock(event: Restock, tx: Tx) -> Restocked:
        tx.session.add(StockItem(sku=event.sku, available=1))
        await getattr(tx.session, habit)()  # what SQLModel tutorials teach
        return Restocked(sku=event.sku)

    return service


async def count(service: Service, table: type, *where: object) -> int:
    async with service.engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(table).where(*where)) or 0)  # type: ignore[arg-type]


@pytest.mark.parametrize("habit", ["commit", "rollback"])
async def test_a_handler_ending_its_session_is_refused_and_its_record_dead_lettered(
    database: DatabaseFactory, habit: str
) -> None:
    service = stock_service(await database("uow"), habit=habit)
    async with in_memory(service):
        assert service.consumer is not None
        outcomes = await service.consumer.process(record_of(Restock(sku="pear")))
        # Before, commit() made the inbox mark durable without the event, and the retry then
        # reported a duplicate: nothing emitted, nothing dead-lettered.
        assert outcomes == ["dead-lettered"]
        assert await count(service, StockItem) == 0
        assert await count(service, InboxRow) == 0, "nothing of the handler's transaction committed"
        assert await count(service, OutboxRow, OutboxRow.topic == "uow-out") == 0
        async with service.engine.connect() as conn:
            letter = (await conn.execute(select(DeadLetter.__table__))).one()  # type: ignore[attr-defined]
        assert letter.reason == "handler-error"
        assert f"session.{habit}() inside a unit of work" in letter.error


@pytest.mark.parametrize("habit", ["commit", "rollback"])
async def test_ending_the_session_of_service_transaction_is_refused_before_anything_commits(
    database: DatabaseFactory, habit: str
) -> None:
    service = stock_service(await database("uow"), habit=habit)
    async with service.running(kafka=False):
        with pytest.raises(UnitOfWorkError, match=f"session.{habit}"):
            async with service.transaction() as tx:
                tx.session.add(StockItem(sku="apple", available=3))
                tx.emit(Restocked(sku="apple"))
                await getattr(tx.session, habit)()
        assert await count(service, StockItem) == 0
        assert await count(service, OutboxRow) == 0
        # The unit of work still commits normally, through its own transaction.
        async with service.transaction() as tx:
            tx.session.add(StockItem(sku="apple", available=3))
            tx.emit(Restocked(sku="apple"))
        assert await count(service, StockItem) == 1
        assert await count(service, OutboxRow) == 1


async def test_a_statement_error_swallowed_inside_a_handler_is_not_mistaken_for_success(
    fresh_pg_database: DatabaseFactory,
) -> None:
    # PostgreSQL answers COMMIT in a failed transaction with ROLLBACK, not an error. Unnoticed,
    # the record counted as processed although its inbox mark was rolled back with everything
    # else: its offset was committed and the event lost without a trace.
    service = Service(
        "uow-swallow",
        database_url=await fresh_pg_database("uow"),
        retry=RetryPolicy(max_attempts=2, initial_backoff=0.001, max_backoff=0.002),
    )

    @service.on(Restock)
    async def restock(event: Restock, tx: Tx) -> None:
        with contextlib.suppress(DBAPIError):
            await tx.session.execute(text("SELECT 1 / 0"))

    async with in_memory(service):
        assert service.consumer is not None
        assert await service.consumer.process(record_of(Restock(sku="pear"))) == ["dead-lettered"]
        assert await count(service, InboxRow) == 0
        async with service.engine.connect() as conn:
            letter = (await conn.execute(select(DeadLetter.__table__))).one()  # type: ignore[attr-defined]
        assert "rolled back at commit" in letter.error


async def test_writes_after_the_session_rolled_the_transaction_back_are_refused(
    fresh_pg_database: DatabaseFactory,
) -> None:
    # A failed flush makes the session roll back the connection's transaction. The events
    # must not then be written outside any transaction (autocommit), without the business rows.
    url = await fresh_pg_database("uow")
    service = Service("uow-flush", database_url=url, metadata=stock_metadata)
    async with service.running(kafka=False):
        async with service.transaction() as tx:
            tx.session.add(StockItem(sku="apple", available=1))
        with pytest.raises(Exception, match="rolled back|Session"):
            async with service.transaction() as tx:
                tx.session.add(StockItem(sku="apple", available=2))  # the same primary key
                with contextlib.suppress(DBAPIError):
                    await tx.session.flush()
                tx.emit(Restocked(sku="apple"))
        assert await count(service, OutboxRow) == 0


async def test_a_key_or_saga_id_longer_than_its_outbox_column_is_refused_at_emit(database: DatabaseFactory) -> None:
    # PostgreSQL would refuse the row only at the outbox insert, with a driver error; SQLite
    # would store it whole. Either way the author learns of it best where the event is emitted.
    service = stock_service(await database("uow"), habit="commit")
    async with service.running(kafka=False):
        with pytest.raises(ValueError, match="its key is 256 characters long; the outbox stores at most 255"):
            async with service.transaction() as tx:
                tx.session.add(StockItem(sku="apple", available=3))
                tx.emit(Restocked(sku="apple"), key="k" * 256)
        with pytest.raises(ValueError, match="its saga id is 65 characters long; the outbox stores at most 64"):
            async with service.transaction(saga_id="s" * 65) as tx:
                tx.emit(Restocked(sku="apple"))
        assert await count(service, StockItem) == 0
        assert await count(service, OutboxRow) == 0
        async with service.transaction() as tx:
            tx.emit(Restocked(sku="apple"), key="k" * 255)  # the longest that fits
        assert await count(service, OutboxRow) == 1
