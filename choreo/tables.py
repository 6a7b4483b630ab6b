"""choreo's own tables, created in every service's database.

They live in their own `metadata` (not SQLModel's global one) so each service database gets
exactly its tables; an Alembic env.py adds it to `target_metadata` beside the application's.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import registry
from sqlmodel import Field, SQLModel

_mapped = MetaData()
"""The tables as choreo reads and writes them (see `metadata` for the ones it creates)."""


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("choreo stores timezone-aware datetimes only")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


# SQLite only auto-increments a column declared exactly INTEGER PRIMARY KEY.
_BigId = BigInteger().with_variant(Integer(), "sqlite")


class _ChoreoTable(SQLModel, registry=registry(metadata=_mapped)):
    pass


UNPUBLISHED_IMMEDIATE = "published_at IS NULL AND available_at <= created_at"
"""Outbox rows waiting for the relay that were due when written: every row but scheduled ones."""
UNPUBLISHED_SCHEDULED = "published_at IS NULL AND available_at > created_at"
"""Outbox rows waiting for the relay that were scheduled (e.g. saga timeouts), due or not.

The relay's queries repeat these predicates word for word, so the planners match them to the
partial indexes below."""


class OutboxRow(_ChoreoTable, table=True):
    """An event waiting for (or past) publication; `id` fixes the publication order."""

    __tablename__ = "choreo_outbox"
    __table_args__ = (
        # The relay's query (see `outbox.fetch_due`), in two parts. Rows due when written (all
        # but scheduled ones) in id order: a backlog is read a batch at a time, from the front.
        Index(
            "ix_choreo_outbox_pending",
            "id",
            postgresql_where=text(UNPUBLISHED_IMMEDIATE),
            sqlite_where=text(UNPUBLISHED_IMMEDIATE),
        ),
        # Scheduled rows (saga deadlines) by due time, so the many not yet due are never read.
        Index(
            "ix_choreo_outbox_scheduled",
            "available_at",
            postgresql_where=text(UNPUBLISHED_SCHEDULED),
            sqlite_where=text(UNPUBLISHED_SCHEDULED),
        ),
        # For retention. Unpublished rows are left out: inserts skip this index, and the planner
        # cannot mistake it for a way to the unpublished rows.
        Index(
            "ix_choreo_outbox_published",
            "published_at",
            postgresql_where=Column("published_at").isnot(None),
            sqlite_where=Column("published_at").isnot(None),
        ),
    )

    id: int | None = Field(default=None, sa_column=Column(_BigId, primary_key=True, autoincrement=True))
    event_id: str = Field(sa_type=String(64), unique=True)
    topic: str = Field(sa_type=String(249))
    key: str | None = Field(default=None, sa_type=String(255))
    event_type: str = Field(sa_type=String(255))
    event_version: int
    saga_id: str = Field(sa_type=String(64))
    headers: dict[str, str] = Field(sa_type=JSON)
    payload: bytes = Field(sa_type=LargeBinary)
    created_at: datetime = Field(sa_type=UtcDateTime)
    available_at: datetime = Field(sa_type=UtcDateTime)
    published_at: datetime | None = Field(default=None, sa_type=UtcDateTime)


class InboxRow(_ChoreoTable, table=True):
    """Marks a consumed event as processed by one handler; its key is the dedup key."""

    __tablename__ = "choreo_inbox"

    consumer: str = Field(sa_type=String(255), primary_key=True)
    event_id: str = Field(sa_type=String(64), primary_key=True)
    processed_at: datetime = Field(sa_type=UtcDateTime, index=True)


class DeadLetter(_ChoreoTable, table=True):
    """A record that could not be processed, kept with everything needed to replay it."""

    __tablename__ = "choreo_dead_letter"

    id: int | None = Field(default=None, sa_column=Column(_BigId, primary_key=True, autoincrement=True))
    consumer: str = Field(sa_type=String(255), index=True)
    topic: str = Field(sa_type=String(249))
    partition: int
    offset: int = Field(sa_type=BigInteger)
    key: bytes | None = Field(default=None, sa_type=LargeBinary)
    headers: dict[str, Any] = Field(sa_type=JSON)
    payload: bytes = Field(sa_type=LargeBinary)
    event_id: str | None = Field(default=None, sa_type=String(64))
    event_type: str | None = Field(default=None, sa_type=String(255))
    saga_id: str | None = Field(default=None, sa_type=String(64), index=True)
    reason: str = Field(sa_type=String(64))
    error: str = Field(sa_type=Text)
    traceback: str | None = Field(default=None, sa_type=Text)
    attempts: int
    first_failed_at: datetime = Field(sa_type=UtcDateTime)
    last_failed_at: datetime = Field(sa_type=UtcDateTime)
    status: str = Field(default="parked", sa_type=String(16), index=True)
    resolved_at: datetime | None = Field(default=None, sa_type=UtcDateTime)


# Core Table objects, for statements on the hot path (SQLModel's class attributes are typed
# as plain Python values, which SQLAlchemy's typed expressions do not accept).
outbox_table: Table = OutboxRow.__table__  # type: ignore[attr-defined]
inbox_table: Table = InboxRow.__table__  # type: ignore[attr-defined]
dead_letter_table: Table = DeadLetter.__table__  # type: ignore[attr-defined]


def _with_plain_types(source: MetaData) -> MetaData:
    """A copy of `source` whose columns have the SQL types underneath choreo's wrappers (UtcDateTime)."""
    copy = MetaData()
    for table in source.tables.values():
        for column in table.to_metadata(copy).columns:
            if isinstance(column.type, TypeDecorator):
                column.type = column.type.impl_instance
    return copy


# Alembic's autogenerate writes a column type as "<module of its class>.<repr>" and imports
# only SQLAlchemy's modules, so a migration naming choreo.tables.UtcDateTime fails with a
# NameError. The wrappers only convert values in Python (the DDL is the same), so the tables
# choreo creates, and an env.py's target_metadata, carry the plain types.
metadata = _with_plain_types(_mapped)
"""choreo's tables (`choreo_outbox`, `choreo_inbox`, `choreo_dead_letter`) as the database holds them:
what each service creates on start, and what an Alembic env.py adds to `target_metadata`."""
