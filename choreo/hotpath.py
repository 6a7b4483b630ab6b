"""Statements that run for every event: the unit of work's (inbox claim, outbox insert, timeout
withdrawal) and the relay's (read due rows, mark them published).

On PostgreSQL they bypass SQLAlchemy: they are sent through asyncpg on the unit of work's (or
the relay's) own connection, inside its transaction. That skips, per statement, SQLAlchemy's
execution context, its result object and the greenlet switch into and out of its synchronous
core: about a quarter of a handler transaction's client CPU when the handler does little. The
SQL is the text SQLAlchemy would send (compiled once from the statements in `outbox` and
`database`), so both paths write the same rows. The unit of work's BEGIN travels with its
inbox claim, one round trip instead of two (see `AsyncpgStatements.begin`).

The handler's `tx.session` stays a SQLAlchemy session on the same connection, and SQLAlchemy
still ends the transaction (commit, rollback, invalidation) through `_Transaction`. On other
drivers (SQLite) the statements run through SQLAlchemy.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import TextClause, TextualSelect
from sqlalchemy.dialects.postgresql import asyncpg as asyncpg_dialect
from sqlalchemy.ext.asyncio import AsyncConnection

from choreo import database, outbox
from choreo.exceptions import UnitOfWorkError
from choreo.outbox import OutboxRecord, PendingEvent


class Statements(Protocol):
    """The unit of work's own statements on its connection and in its transaction."""

    async def begin(self, claim: Claim | None = None) -> bool:
        """Begin the transaction and, if given, insert the inbox row `claim`.

        False when that consumer already processed the event (a duplicate).
        """
        ...

    async def write(self, pending: Sequence[PendingEvent], now: datetime, *, notify: bool) -> None:
        """Insert `pending` into the outbox, in emit order."""
        ...

    async def withdraw(self, event_ids: Sequence[str]) -> None:
        """Delete the unpublished rows of `event_ids` (timeouts made moot)."""
        ...


@dataclass(frozen=True, slots=True)
class Claim:
    """An inbox row: `consumer` processed `event_id` (at `now`)."""

    consumer: str
    event_id: str
    now: datetime


_DIALECT = asyncpg_dialect.dialect()  # type: ignore[no-untyped-call]


class _Compiled:
    """A statement as asyncpg takes it: SQL with $n placeholders, and its parameters' order."""

    def __init__(self, statement: TextClause | TextualSelect) -> None:
        compiled = statement.compile(dialect=_DIALECT)
        self.sql = compiled.string
        self.names = tuple(compiled.positiontup or ())

    def args(self, values: dict[str, Any]) -> list[Any]:
        return [values[name] for name in self.names]


_CLAIM = _Compiled(database._CLAIM_INBOX)
# The same statement with its values as literals, for the simple protocol: "{consumer}", ...
_CLAIM_LITERAL = re.sub(r"\$(\d+)", lambda m: "{" + _CLAIM.names[int(m[1]) - 1] + "}", _CLAIM.sql)
_LOCK_NOTIFY_INSERT = _Compiled(outbox._LOCK_NOTIFY_INSERT)
_LOCK_INSERT = _Compiled(outbox._LOCK_INSERT)
_INSERT = _Compiled(outbox._INSERT)
_WITHDRAW = "DELETE FROM choreo_outbox WHERE event_id = ANY($1::text[]) AND published_at IS NULL"
_FETCH_DUE = _Compiled(outbox._FETCH_DUE_POSTGRES)
_MARK_PUBLISHED = _Compiled(outbox._MARK_PUBLISHED_POSTGRES)


class AsyncpgStatements:
    """The statements sent through asyncpg on `adapted`'s connection, in its transaction."""

    def __init__(self, adapted: Any) -> None:
        self._adapted = adapted
        self._driver = adapted.driver_connection

    async def begin(self, claim: Claim | None = None) -> bool:
        # BEGIN travels with the claim in one simple-protocol message, so a handler transaction
        # costs one round trip less. That protocol takes no parameters: the claim's values are
        # written as literals, escaped for E'' strings. SQLAlchemy's adapter then sees a
        # transaction in progress and ends it through `_Transaction`.
        if self._adapted._transaction is not None:
            raise RuntimeError("the unit of work's connection is already in a transaction")
        self._adapted._transaction = _Transaction(self._driver)
        if claim is None:
            await self._driver.execute("BEGIN")
            return True
        claim_sql = _CLAIM_LITERAL.format(
            consumer=_literal(claim.consumer),
            event_id=_literal(claim.event_id),
            processed_at=_literal(claim.now.isoformat()),
        )
        status: str = await self._driver.execute(f"BEGIN; {claim_sql}")
        return status != "INSERT 0 0"

    def _check_in_transaction(self) -> None:
        # The session rolls the connection's transaction back when a flush fails, even if the
        # handler catches the error; a raw statement would then run outside any transaction.
        if not isinstance(self._adapted._transaction, _Transaction):
            raise UnitOfWorkError(
                "the unit of work's transaction was rolled back (a failed flush of tx.session?); "
                "its events are not written"
            )

    async def write(self, pending: Sequence[PendingEvent], now: datetime, *, notify: bool) -> None:
        if not pending:
            return
        self._check_in_transaction()
        # SQLAlchemy's JSON codec on the connection takes the JSON text.
        rows = [{**outbox.row_of(p, now), "headers": json.dumps(p.headers)} for p in pending]
        first = _LOCK_NOTIFY_INSERT if notify else _LOCK_INSERT
        keys = [p.key for p in pending if p.key is not None]
        await self._driver.execute(first.sql, *first.args({**rows[0], "keys": keys}))
        if len(rows) > 1:
            # One execution per row, in order, so ids follow emit order; asyncpg pipelines them.
            await self._driver.executemany(_INSERT.sql, [_INSERT.args(row) for row in rows[1:]])

    async def withdraw(self, event_ids: Sequence[str]) -> None:
        if event_ids:
            self._check_in_transaction()
            await self._driver.execute(_WITHDRAW, list(event_ids))


class _Transaction:
    """A transaction choreo began on the asyncpg connection, as SQLAlchemy's adapter ends it."""

    def __init__(self, driver: Any) -> None:
        self._driver = driver

    async def commit(self) -> None:
        status = await self._driver.execute("COMMIT")
        if status != "COMMIT":
            # PostgreSQL answers COMMIT in a failed transaction with ROLLBACK, not an error: a
            # statement failed and its error was caught. Nothing was committed; say so.
            raise UnitOfWorkError(
                "the transaction was rolled back at commit: one of its statements had failed "
                "(an exception caught inside the unit of work?)"
            )

    async def rollback(self) -> None:
        await self._driver.execute("ROLLBACK")


def _literal(value: str) -> str:
    """`value` as a PostgreSQL E'' string literal (any standard_conforming_strings setting)."""
    if "\x00" in value:
        raise ValueError(f"{value!r}: PostgreSQL text cannot hold NUL characters")
    return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


class SqlAlchemyStatements:
    """The same statements through SQLAlchemy, for drivers other than asyncpg."""

    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn

    async def begin(self, claim: Claim | None = None) -> bool:
        # SQLAlchemy has begun the transaction (`conn.begin()`).
        if claim is None:
            return True
        return await database.claim_inbox(self._conn, claim.consumer, claim.event_id, claim.now)

    async def write(self, pending: Sequence[PendingEvent], now: datetime, *, notify: bool) -> None:
        await outbox.write(self._conn, pending, now, notify=notify)

    async def withdraw(self, event_ids: Sequence[str]) -> None:
        await outbox.withdraw(self._conn, event_ids)


async def fetch_due(driver: Any, now: datetime, limit: int) -> list[OutboxRecord]:
    """`outbox.fetch_due` without held keys, through asyncpg (the relay's connection)."""
    rows = await driver.fetch(_FETCH_DUE.sql, *_FETCH_DUE.args({"now": now, "limit": limit}))
    # SQLAlchemy's dialect registers a JSON codec on its connections; a bare one returns text.
    return [OutboxRecord(r[0], r[1], r[2], r[3] if isinstance(r[3], dict) else json.loads(r[3]), r[4]) for r in rows]


async def mark_published(driver: Any, ids: Sequence[int], now: datetime) -> None:
    """`outbox.mark_published` through asyncpg (the relay's connection)."""
    if ids:
        await driver.execute(_MARK_PUBLISHED.sql, *_MARK_PUBLISHED.args({"now": now, "ids": list(ids)}))


async def asyncpg_driver(conn: AsyncConnection) -> Any | None:
    """The asyncpg connection under `conn`, or None on other drivers."""
    if conn.dialect.driver != "asyncpg":
        return None
    return (await conn.get_raw_connection()).driver_connection


async def statements_for(conn: AsyncConnection) -> Statements:
    """The statements for `conn`, after `conn.begin()`; `begin()` on them comes first.

    On asyncpg, SQLAlchemy's adapter would send BEGIN lazily, before its own first statement;
    choreo sends it instead, with the claim (see `AsyncpgStatements.begin`).
    """
    fairy = await conn.get_raw_connection()
    adapted = fairy.dbapi_connection
    if conn.dialect.driver != "asyncpg" or adapted is None:
        return SqlAlchemyStatements(conn)
    return AsyncpgStatements(adapted)
