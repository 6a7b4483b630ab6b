"""The trace store: the index of every traced record by saga id, and the per-saga summaries."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    delete,
    func,
    insert,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from choreo.database import (
    create_engine,
    insert_ignoring_duplicates,
    lock_schema,
    masked_url,
    normalize_url,
    require_existing,
)
from choreo.envelope import (
    utcnow,
)
from choreo.exceptions import ConfigurationError
from choreo.tables import UtcDateTime
from choreo.tracing.model import (
    DEAD_LETTER,
    EVENT,
    SagaDeclaration,
    SagaState,
    SagaTrace,
    TracedEvent,
    build_trace,
    service_of,
)

DATABASE_URL_ENV = "CHOREO_TRACE_DATABASE_URL"
DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///choreo-trace.db"
MIN_PREFIX = 4
"""The fewest characters of a saga id that `choreo trace` looks up as a prefix."""


def default_database_url(env: Mapping[str, str] | None = None) -> str:
    """`$CHOREO_TRACE_DATABASE_URL`, else `sqlite+aiosqlite:///choreo-trace.db`."""
    env = os.environ if env is None else env
    return env.get(DATABASE_URL_ENV, "").strip() or DEFAULT_DATABASE_URL


# -- the index ---------------------------------------------------------------------------------

trace_metadata = MetaData()
"""The trace database's tables: `choreo_trace_event`, `choreo_trace_saga` and the summaries."""

events_table = Table(
    "choreo_trace_event",
    trace_metadata,
    Column("id", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True),
    Column("kind", String(16), nullable=False),
    Column("event_id", String(64), nullable=False),
    # Empty for events; for a dead letter, the handler (or service) that parked it: one event can
    # fail in several consumers, and each failure is a fact of its own.
    Column("consumer", String(255), nullable=False, default=""),
    Column("saga_id", String(64), nullable=False),
    Column("event_type", String(255), nullable=False),
    Column("event_version", Integer, nullable=False),
    Column("causation_id", String(64)),
    Column("producer", String(63), nullable=False),
    Column("handler", String(255)),
    Column("occurred_at", UtcDateTime, nullable=False),
    Column("published_at", UtcDateTime),
    Column("topic", String(249), nullable=False),
    Column("partition", Integer, nullable=False),
    Column("offset", BigInteger, nullable=False),
    Column("compensates", JSON, nullable=False),
    Column("is_compensation", Boolean, nullable=False),
    Column("reason", String(64)),
    Column("error", Text),
    Column("traceparent", String(64)),
    Column("cause_upcast", String(32)),
    Column("recorded_at", UtcDateTime, nullable=False),
    # The dedup key: a record delivered or published twice is indexed once.
    UniqueConstraint("event_id", "kind", "consumer", name="uq_choreo_trace_event"),
    Index("ix_choreo_trace_event_saga", "saga_id", "occurred_at"),
    Index("ix_choreo_trace_event_time", "occurred_at"),
)

sagas_table = Table(
    "choreo_trace_saga",
    trace_metadata,
    Column("name", String(255), primary_key=True),
    Column("service", String(63), nullable=False),
    Column("starts", String(255), nullable=False),
    Column("ends", JSON, nullable=False),
    Column("deadline_seconds", Float),
    Column("timeout_event", String(255)),
)

summaries_table = Table(
    "choreo_trace_summary",
    trace_metadata,
    # One row per saga, rewritten whenever a record of the saga is indexed: lists, filters and
    # counts read this table through its indexes instead of grouping every event.
    Column("saga_id", String(64), primary_key=True),
    Column("saga", String(255), nullable=False),
    Column("state", String(16), nullable=False),
    Column("started_at", UtcDateTime, nullable=False),
    Column("last_at", UtcDateTime, nullable=False),
    Column("ended_at", UtcDateTime),
    # When an unfinished saga becomes overdue: its state is stored as in flight, and a reader
    # compares this with its own clock.
    Column("deadline_at", UtcDateTime),
    Column("services", String(1024), nullable=False),
    Column("hops", Integer, nullable=False),
    Column("compensations", Integer, nullable=False),
    Column("dead_letters", Integer, nullable=False),
    Index("ix_choreo_trace_summary_started", "started_at"),
    Index("ix_choreo_trace_summary_state", "state", "started_at"),
    Index("ix_choreo_trace_summary_saga", "saga", "started_at"),
)

summary_services_table = Table(
    "choreo_trace_summary_service",
    trace_metadata,
    # The summary once per service the saga touched, so "sagas through payments" and their
    # counts per state are read from an index too.
    Column("service", String(63), primary_key=True),
    Column("saga_id", String(64), primary_key=True),
    Column("saga", String(255), nullable=False),
    Column("state", String(16), nullable=False),
    Column("started_at", UtcDateTime, nullable=False),
    Column("deadline_at", UtcDateTime),
    Index("ix_choreo_trace_summary_service_started", "service", "started_at"),
    Index("ix_choreo_trace_summary_service_state", "service", "state", "started_at"),
)


# -- the store ---------------------------------------------------------------------------------


def _add_new_columns(conn: Connection) -> None:
    # The trace database is an index that outlives choreo upgrades (the demo keeps its file):
    # a nullable column added in a later release is added to an older table, empty.
    present = {column["name"] for column in inspect(conn).get_columns(events_table.name)}
    for column in events_table.columns:
        if column.name not in present and column.nullable:
            name, kind = conn.dialect.identifier_preparer.quote(column.name), column.type.compile(dialect=conn.dialect)
            conn.execute(text(f"ALTER TABLE {events_table.name} ADD COLUMN {name} {kind}"))


class TraceStore:
    """The trace database: written by the collector, read by `choreo trace` and `choreo sagas`."""

    def __init__(self, database_url: str | None = None) -> None:
        self.url = normalize_url(database_url or default_database_url())
        self._engine: AsyncEngine | None = None

    def __repr__(self) -> str:
        return f"TraceStore({masked_url(self.url)!r})"

    @property
    def engine(self) -> AsyncEngine:
        """The database engine (after `open()`)."""
        if self._engine is None:
            raise ConfigurationError("the trace store is not open: call `await store.open()` first")
        return self._engine

    async def open(self, *, create: bool = True) -> None:
        """Connect and create the tables. `create=False` refuses a SQLite file that does not exist."""
        if self._engine is not None:
            return
        if not create:
            require_existing(
                self.url,
                "trace database",
                f"run `choreo collect <app>` to fill it, or pass --db / set {DATABASE_URL_ENV}",
            )
        self._engine = create_engine(self.url)
        async with self._engine.begin() as conn:
            # The collector and the explorer may start together on a fresh database: one
            # creates the tables, the other waits and finds them (PostgreSQL).
            await lock_schema(conn)
            await conn.run_sync(trace_metadata.create_all)
            await conn.run_sync(_add_new_columns)

    async def close(self) -> None:
        """Close connections. Safe to call twice."""
        if self._engine is not None:
            await self._engine.dispose()
            self._engine = None

    async def __aenter__(self) -> TraceStore:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def add(self, event: TracedEvent) -> bool:
        """Index `event`; False when it was indexed before (same event id, kind and consumer)."""
        return (await self.add_all([event]))[0]

    async def add_all(self, events: Sequence[TracedEvent]) -> list[bool]:
        """Index several events in one transaction; per event, False when it was indexed before."""
        added: list[bool] = []
        if not events:
            return added
        now = utcnow()
        async with self.engine.begin() as conn:
            statement = insert_ignoring_duplicates(events_table, conn.dialect.name)
            for event in events:
                # One statement per row: its rowcount tells a new row from a duplicate.
                result = await conn.execute(statement.values(**event.to_row(now)))
                added.append(bool(result.rowcount))
            await self._summarize(conn, {event.saga_id for event in events})
        return added

    async def save_declarations(self, declarations: Iterable[SagaDeclaration]) -> None:
        """Store saga declarations, replacing those of the same names."""
        rows = [
            {
                "name": d.name,
                "service": d.service,
                "starts": d.starts,
                "ends": sorted(d.ends),
                "deadline_seconds": d.deadline.total_seconds() if d.deadline else None,
                "timeout_event": d.timeout_event,
            }
            for d in declarations
        ]
        if not rows:
            return
        async with self.engine.begin() as conn:
            await conn.execute(delete(sagas_table).where(sagas_table.c.name.in_([r["name"] for r in rows])))
            await conn.execute(insert(sagas_table), rows)

    async def declarations(self) -> list[SagaDeclaration]:
        """The saga declarations the collector stored."""
        async with self.engine.connect() as conn:
            result = await conn.execute(select(sagas_table).order_by(sagas_table.c.name))
            return [
                SagaDeclaration(
                    name=row.name,
                    starts=row.starts,
                    ends=frozenset(row.ends),
                    deadline=timedelta(seconds=row.deadline_seconds) if row.deadline_seconds is not None else None,
                    timeout_event=row.timeout_event,
                    service=row.service,
                )
                for row in result
            ]

    async def records(self, saga_id: str) -> list[TracedEvent]:
        """Every indexed record of a saga."""
        return (await self.records_of([saga_id])).get(saga_id, [])

    async def records_of(self, saga_ids: Sequence[str]) -> dict[str, list[TracedEvent]]:
        """Indexed records of several sagas, by saga id."""
        found: dict[str, list[TracedEvent]] = {}
        if not saga_ids:
            return found
        async with self.engine.connect() as conn:
            result = await conn.execute(
                select(events_table).where(events_table.c.saga_id.in_(list(saga_ids))).order_by(events_table.c.id)
            )
            for row in result:
                found.setdefault(row.saga_id, []).append(TracedEvent.from_row(row))
        return found

    async def resolve(self, saga_id: str) -> str | None:
        """The full saga id for an id or a unique prefix of one (`MIN_PREFIX`+ characters); None if unknown.

        Raises ConfigurationError when the prefix is ambiguous.
        """
        async with self.engine.connect() as conn:
            exact = await conn.scalar(select(events_table.c.saga_id).where(events_table.c.saga_id == saga_id).limit(1))
            if exact is not None or len(saga_id) < MIN_PREFIX:
                return exact
            pattern = saga_id.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            result = await conn.execute(
                select(events_table.c.saga_id)
                .where(events_table.c.saga_id.like(pattern, escape="\\"))
                .distinct()
                .limit(5)
            )
            candidates = sorted(result.scalars())
        if len(candidates) > 1:
            raise ConfigurationError(
                f"saga id prefix {saga_id!r} is ambiguous: {', '.join(candidates)}; give more characters"
            )
        return candidates[0] if candidates else None

    async def trace(
        self,
        saga_id: str,
        declarations: Iterable[SagaDeclaration] | None = None,
        *,
        now: datetime | None = None,
    ) -> SagaTrace | None:
        """The trace of one saga, or None when nothing of it was collected.

        `declarations` default to those the collector stored.
        """
        records = await self.records(saga_id)
        if not records:
            return None
        known = await self.declarations() if declarations is None else list(declarations)
        return build_trace(saga_id, records, known, now=now)

    async def sagas(
        self,
        *,
        declarations: Iterable[SagaDeclaration] | None = None,
        state: SagaState | None = None,
        since: datetime | None = None,
        limit: int = 20,
        now: datetime | None = None,
    ) -> list[SagaTrace]:
        """The most recently started sagas (newest first), optionally only those in `state`."""
        known = await self.declarations() if declarations is None else list(declarations)
        now = now or utcnow()
        started = func.min(events_table.c.occurred_at).label("started")
        query = select(events_table.c.saga_id, started).group_by(events_table.c.saga_id)
        if since is not None:
            query = query.having(started >= since)
        query = query.order_by(started.desc(), events_table.c.saga_id)
        found: list[SagaTrace] = []
        page, offset = max(limit, 50), 0
        while len(found) < limit:
            async with self.engine.connect() as conn:
                ids = list((await conn.execute(query.limit(page).offset(offset))).scalars())
            if not ids:
                break
            records = await self.records_of(ids)
            for saga_id in ids:
                trace = build_trace(saga_id, records[saga_id], known, now=now)
                if state is None or trace.state is state:
                    found.append(trace)
                    if len(found) == limit:
                        break
            offset += page
        return found

    # -- summaries: what lists, filters and counts read ----------------------------------------

    async def _summarize(self, conn: AsyncConnection, saga_ids: Iterable[str]) -> None:
        ids = sorted(set(saga_ids))
        if not ids:
            return
        known = [_declaration_of(row) for row in await conn.execute(select(sagas_table))]
        records: dict[str, list[TracedEvent]] = {}
        for row in await conn.execute(select(events_table).where(events_table.c.saga_id.in_(ids))):
            records.setdefault(row.saga_id, []).append(TracedEvent.from_row(row))
        rows = [_summary_row(build_trace(saga_id, found, known)) for saga_id, found in records.items()]
        per_service = [
            {key: row[key] for key in ("saga_id", "saga", "state", "started_at", "deadline_at")} | {"service": service}
            for row in rows
            for service in row["services"].split(",")
            if service
        ]
        await conn.execute(delete(summaries_table).where(summaries_table.c.saga_id.in_(ids)))
        await conn.execute(delete(summary_services_table).where(summary_services_table.c.saga_id.in_(ids)))
        if rows:
            await conn.execute(insert(summaries_table), rows)
        if per_service:
            await conn.execute(insert(summary_services_table), per_service)

    async def summarize_missing(self, batch: int = 1000) -> int:
        """Summarize sagas indexed before summaries existed; returns how many.

        Walks the saga ids in index order, so a database of any size is read once.
        """
        async with self.engine.connect() as conn:
            summarized = await conn.scalar(select(func.count()).select_from(summaries_table))
            indexed = await conn.scalar(select(func.count(events_table.c.saga_id.distinct())))
        if summarized == indexed:
            return 0
        done, last = 0, ""
        while True:
            async with self.engine.begin() as conn:
                ids = list(
                    (
                        await conn.execute(
                            select(events_table.c.saga_id)
                            .where(events_table.c.saga_id > last)
                            .distinct()
                            .order_by(events_table.c.saga_id)
                            .limit(batch)
                        )
                    ).scalars()
                )
                if not ids:
                    return done
                last = ids[-1]
                known = select(summaries_table.c.saga_id).where(summaries_table.c.saga_id.in_(ids))
                have = set((await conn.execute(known)).scalars())
                missing = [saga_id for saga_id in ids if saga_id not in have]
                await self._summarize(conn, missing)
            done += len(missing)

    def _filtered(
        self,
        query: Any,
        now: datetime,
        *,
        state: SagaState | None = None,
        saga: str | None = None,
        service: str | None = None,
        since: datetime | None = None,
    ) -> Any:
        # With a service, the per-service rows carry every filtered column.
        c = summaries_table.c if service is None else summary_services_table.c
        if service is not None:
            query = query.where(c.service == service)
        if state is SagaState.OVERDUE:
            query = query.where(c.state == SagaState.IN_FLIGHT.value, c.deadline_at <= now)
        elif state is SagaState.IN_FLIGHT:
            query = query.where(c.state == state.value, (c.deadline_at.is_(None)) | (c.deadline_at > now))
        elif state is not None:
            query = query.where(c.state == state.value)
        if saga is not None:
            query = query.where(c.saga == saga)
        if since is not None:
            query = query.where(c.started_at >= since)
        return query

    async def summaries(
        self,
        *,
        state: SagaState | None = None,
        saga: str | None = None,
        service: str | None = None,
        since: datetime | None = None,
        limit: int = 50,
        now: datetime | None = None,
    ) -> list[SagaSummary]:
        """The most recently started sagas (newest first), filtered, read from the summary index."""
        now = now or utcnow()
        query = select(summaries_table)
        c = summaries_table.c
        if service is not None:
            c = summary_services_table.c
            query = query.join(summary_services_table, c.saga_id == summaries_table.c.saga_id)
        query = self._filtered(query, now, state=state, saga=saga, service=service, since=since)
        query = query.order_by(c.started_at.desc(), c.saga_id.desc()).limit(limit)
        async with self.engine.connect() as conn:
            return [SagaSummary.from_row(row, now) for row in await conn.execute(query)]

    async def state_counts(
        self,
        *,
        saga: str | None = None,
        service: str | None = None,
        since: datetime | None = None,
        now: datetime | None = None,
    ) -> dict[SagaState, int]:
        """How many sagas are in each state (overdue apart from in flight), filtered like `summaries`."""
        now = now or utcnow()
        table = summaries_table if service is None else summary_services_table
        # Two queries, so each reads an index alone: the states (state, started_at), then the
        # few unfinished sagas past their deadline.
        by_state = select(table.c.state, func.count()).group_by(table.c.state)
        by_state = self._filtered(by_state, now, saga=saga, service=service, since=since)
        overdue = select(func.count()).select_from(table)
        overdue = self._filtered(overdue, now, state=SagaState.OVERDUE, saga=saga, service=service, since=since)
        counts = dict.fromkeys(SagaState, 0)
        async with self.engine.connect() as conn:
            for state, count in await conn.execute(by_state):
                counts[SagaState(state)] = count
            counts[SagaState.OVERDUE] = int(await conn.scalar(overdue) or 0)
        counts[SagaState.IN_FLIGHT] -= counts[SagaState.OVERDUE]
        return counts

    async def hop_latencies(self, since: datetime, limit: int = 20_000) -> list[tuple[str, str, str, float]]:
        """(cause type, handler, effect type, seconds) of the latest hops since `since`, newest first."""
        child, parent = events_table.alias("child"), events_table.alias("parent")
        query = (
            select(parent.c.event_type, child.c.handler, child.c.event_type, child.c.occurred_at, parent.c.occurred_at)
            .join(parent, (parent.c.event_id == child.c.causation_id) & (parent.c.kind == EVENT))
            .where(child.c.kind == EVENT, child.c.occurred_at >= since)
            .order_by(child.c.occurred_at.desc())
            .limit(limit)
        )
        async with self.engine.connect() as conn:
            return [
                (cause, handler or "", effect, (at - cause_at).total_seconds())
                for cause, handler, effect, at, cause_at in await conn.execute(query)
            ]

    async def dead_letter_counts(self, since: datetime) -> dict[tuple[str, str], int]:
        """Dead letters since `since`, by (event type, consumer)."""
        c = events_table.c
        query = (
            select(c.event_type, c.consumer, func.count())
            .where(c.kind == DEAD_LETTER, c.occurred_at >= since)
            .group_by(c.event_type, c.consumer)
        )
        async with self.engine.connect() as conn:
            return {(event_type, consumer): n for event_type, consumer, n in await conn.execute(query)}


@dataclass(frozen=True)
class SagaSummary:
    """One line of the saga list: a saga's state and timing, without its tree."""

    saga_id: str
    saga: str | None
    state: SagaState
    started_at: datetime
    last_at: datetime
    ended_at: datetime | None
    services: tuple[str, ...]
    hops: int
    compensations: int
    dead_letters: int

    @property
    def to_end(self) -> timedelta | None:
        """From the start to the end event (None while it has not ended)."""
        return None if self.ended_at is None else self.ended_at - self.started_at

    @property
    def to_settle(self) -> timedelta:
        """From the start to the last event seen (compensations after the end included)."""
        return self.last_at - self.started_at

    @classmethod
    def from_row(cls, row: Any, now: datetime) -> SagaSummary:
        """Read a `choreo_trace_summary` row, judging overdue by `now`."""
        state = SagaState(row.state)
        if state is SagaState.IN_FLIGHT and row.deadline_at is not None and row.deadline_at <= now:
            state = SagaState.OVERDUE
        return cls(
            saga_id=row.saga_id,
            saga=row.saga or None,
            state=state,
            started_at=row.started_at,
            last_at=row.last_at,
            ended_at=row.ended_at,
            services=tuple(s for s in row.services.split(",") if s),
            hops=row.hops,
            compensations=row.compensations,
            dead_letters=row.dead_letters,
        )


def _summary_row(trace: SagaTrace) -> dict[str, Any]:
    declaration = trace.declaration
    state = SagaState.IN_FLIGHT if trace.state is SagaState.OVERDUE else trace.state
    deadline = declaration.deadline if declaration is not None else None
    services = dict.fromkeys(trace.services)
    for hop in trace.dead_lettered:
        services.update(dict.fromkeys(service_of(letter) for letter in hop.dead_letters))
    return {
        "saga_id": trace.saga_id,
        "saga": declaration.name if declaration else "",
        "state": state.value,
        "started_at": trace.started_at,
        "last_at": trace.last_at,
        "ended_at": trace.ended_by.event.occurred_at if trace.ended_by else None,
        "deadline_at": trace.started_at + deadline if deadline is not None and state is SagaState.IN_FLIGHT else None,
        "services": "," + ",".join(services)[:1000] + ",",
        "hops": sum(1 for hop in trace.hops() if hop.seen),
        "compensations": len(trace.compensations),
        "dead_letters": sum(len(hop.dead_letters) for hop in trace.hops()),
    }


def _declaration_of(row: Any) -> SagaDeclaration:
    return SagaDeclaration(
        name=row.name,
        starts=row.starts,
        ends=frozenset(row.ends),
        deadline=timedelta(seconds=row.deadline_seconds) if row.deadline_seconds is not None else None,
        timeout_event=row.timeout_event,
        service=row.service,
    )
