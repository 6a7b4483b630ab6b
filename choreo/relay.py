"""The relay: publishes outbox rows to Kafka in id order and marks them published.

It runs inside the service process by default, or alone (`choreo relay module:service`).
Only one relay per database publishes at a time: on PostgreSQL the leader holds a
session-level advisory lock on the very connection it reads and marks rows with, so if that
connection dies the lock is released and the leader's own work fails with it; standbys retry
the lock every `standby_interval`. SQLite serves one process, whose single relay is leader.

A leader that vanishes without closing its connection (host lost, network blackholed) is
replaced within `takeover_timeout` (30 s by default, `CHOREO_RELAY_TAKEOVER_TIMEOUT`): see
`_guard` for how, and for why the old leader cannot publish out of order meanwhile.

A send that fails never lets a later row of its key overtake: the key is held back, its first
unpublished row is sent alone (with backoff) until Kafka acknowledges it, and the key's other
rows are not even read meanwhile, so they cannot fill the batches other keys need. A row Kafka
refuses for good (too large, topic invalid or forbidden) is parked as a dead letter (reason
`unpublishable`) and its key moves on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from choreo import deadletters, hotpath, outbox
from choreo.database import NOTIFY_CHANNEL, is_postgres, is_transient
from choreo.envelope import utcnow
from choreo.exceptions import Unpublishable
from choreo.outbox import OutboxRecord

log = logging.getLogger("choreo.relay")

# The two-int advisory lock space is separate from the bigint one used for per-key locks.
_LEADER_LOCK = (0x63686F72, 0x72656C61)  # "chor", "rela"


class Publisher(Protocol):
    """What the relay needs from Kafka."""

    async def publish(self, records: Sequence[OutboxRecord]) -> list[BaseException | None]: ...


@dataclass
class RelayStats:
    """Counters a health endpoint or a test can read."""

    published: int = 0
    batches: int = 0
    failures: int = 0
    parked: int = 0
    """Rows Kafka refused for good, parked as dead letters (reason `unpublishable`)."""
    is_leader: bool = False
    last_error: str | None = None
    wakeups: int = 0


class Relay:
    """Moves committed outbox rows to Kafka, one leader per database."""

    def __init__(
        self,
        engine: AsyncEngine,
        publisher: Publisher,
        *,
        name: str,
        batch_size: int = 500,
        poll_interval: float = 1.0,
        standby_interval: float = 1.0,
        max_backoff: float = 5.0,
        linger: float = 0.001,
        takeover_timeout: float = 30.0,
    ) -> None:
        # The server ends a silent leader's session after `lease` (see `_guard`); the standby
        # then needs at most one `standby_interval` (and its statement) to take the lock.
        lease = takeover_timeout - 2 * standby_interval
        if lease < 1:
            raise ValueError(
                f"relay {name}: takeover_timeout={takeover_timeout}s leaves no time beyond two "
                f"standby intervals ({standby_interval}s); make it at least {2 * standby_interval + 1}s"
            )
        self.engine = engine
        self.publisher = publisher
        self.name = name
        self.batch_size = batch_size
        # A healthy leader must speak more often than the lease, or the server ends its session.
        self.poll_interval = min(poll_interval, lease / 2)
        self.standby_interval = standby_interval
        self.max_backoff = max_backoff
        self.linger = linger
        """Seconds to wait after a wake-up before reading while traffic is heavy (the last batch
        had several rows), so commits arriving together share a batch. A lone commit is
        published at once."""
        self.lease = lease
        """Seconds of silence after which PostgreSQL ends the leader's session, releasing its lock."""
        self.stats = RelayStats()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failures = 0
        """Consecutive failed attempts to lead, for the backoff; a publishing cycle resets it."""
        self._held: dict[str, _Hold] = {}
        """Keys a send of which failed: only their first row is sent, alone, until it succeeds."""
        self._driver: Any = None
        """The leader connection's asyncpg connection, for the statements of every batch."""

    def wake(self) -> None:
        """Publish soon: a transaction that wrote outbox rows has committed."""
        self._wake.set()

    def start(self) -> None:
        """Run in the background until `stop()`."""
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name=f"choreo-relay-{self.name}")

    async def stop(self) -> None:
        """Stop publishing; unpublished rows stay in the outbox for the next leader."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # asyncio.wait returns when the task has ended without raising what ended it, while
            # a cancellation of stop()'s own caller still propagates.
            await asyncio.wait({task})
            if not task.cancelled() and (error := task.exception()) is not None:
                log.warning("relay %s ended with %r", self.name, error)

    async def run(self) -> None:
        """Elect, publish while leader, and recover from any outage with backoff."""
        while True:
            try:
                async with self.engine.connect() as conn:
                    try:
                        if is_postgres(conn):
                            # No BEGIN/COMMIT round trips around the relay's two statements per
                            # batch; the session-level leader lock does not need a transaction.
                            await conn.execution_options(isolation_level="AUTOCOMMIT")
                            await self._guard(conn)
                        # Standbys keep their guarded connection: it must not go back to the pool.
                        while not await self._acquire_leadership(conn):
                            await asyncio.sleep(self.standby_interval)
                        self.stats.is_leader = True
                        log.info("relay %s is the leader", self.name)
                        if is_postgres(conn):
                            # Marking rows published need not wait for the WAL flush: a mark lost
                            # in a database crash only means the rows are published again, which
                            # consumers absorb. Set only here: this connection never goes back
                            # to the pool (see below), where handlers need durable commits.
                            await conn.exec_driver_sql("SET synchronous_commit = off")
                        await self._lead(conn)
                    finally:
                        self.stats.is_leader = False
                        self._driver = None
                        # The advisory lock belongs to the server session, which a connection
                        # pool would keep alive: close it so a standby can take over at once.
                        await conn.invalidate()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                self._failures += 1
                self.stats.failures += 1
                self.stats.last_error = f"{type(error).__name__}: {error}"
                level = logging.WARNING if is_transient(error) else logging.ERROR
                log.log(level, "relay %s failed (%s); retrying", self.name, self.stats.last_error)
                await asyncio.sleep(self._backoff(self._failures))

    async def _guard(self, conn: AsyncConnection) -> None:
        """Bound how long a silent leader keeps the lock, and how long any statement can hang.

        A leader whose host or network vanishes without a TCP close keeps its server session,
        hence the lock, until the server notices: with default keepalives, hours. So before it
        takes the lock, the relay's session is set to end itself after `lease` seconds of
        silence: `idle_session_timeout` (PostgreSQL 14+) ends a session that sends nothing, a
        leader sends a statement at least every `poll_interval`; `tcp_user_timeout` ends it when
        the server's own writes (a result, a NOTIFY) go unacknowledged that long; keepalives do
        the same for an idle socket on older servers. The standby then takes the lock within
        `standby_interval`, so takeover happens within lease + 2 * standby_interval =
        `takeover_timeout`. `idle_in_transaction_session_timeout` is not needed: the relay works
        in autocommit. A publish that outlasts the lease (Kafka slow or down) costs the leader
        its session too; it reconnects, and rows it could not mark are published again.

        Why the old leader cannot break per-key order even though it may still be publishing
        the batch it read when its session was cut: it reads rows only with a statement on the
        session that holds the lock, so once the lock is gone it reads nothing more, and marks
        nothing more. Its last batch was read while it held the lock, so it holds rows no later
        than the ones the new leader reads (which are still unmarked); each relay hands a key's
        rows to Kafka in id order, and two in-order copies of the same sequence, interleaved,
        still show each row first in order; consumers' inboxes drop the second copies. Timing
        is for liveness only. A client-side `command_timeout` (the lease) makes a blackholed
        statement fail instead of hanging forever, so the old leader steps down and, once the
        network is back, becomes a standby.
        """
        raw: Any = (await conn.get_raw_connection()).driver_connection
        # asyncpg applies the connection's command_timeout to every statement without its own;
        # this connection is never pooled (it is invalidated on exit), so no one else gets it.
        raw._config = raw._config._replace(command_timeout=self.lease)
        lease_ms = int(self.lease * 1000)
        settings = {
            "tcp_keepalives_idle": str(max(1, int(self.lease / 3))),
            "tcp_keepalives_interval": str(max(1, int(self.lease / 9))),
            "tcp_keepalives_count": "3",
            "tcp_user_timeout": str(lease_ms),
        }
        if raw.get_server_version().major >= 14:
            settings["idle_session_timeout"] = str(lease_ms)
        # One round trip for all, before the lock is taken: the lock is never held unguarded.
        calls = ", ".join(f"set_config('{name}', :{name}, false)" for name in settings)
        await conn.execute(text(f"SELECT {calls}"), settings)

    async def _acquire_leadership(self, conn: AsyncConnection) -> bool:
        if not is_postgres(conn):
            return True
        got = await conn.scalar(
            text("SELECT pg_try_advisory_lock(:a, :b)"), {"a": _LEADER_LOCK[0], "b": _LEADER_LOCK[1]}
        )
        await conn.commit()  # the lock is session-level: it outlives this transaction
        return bool(got)

    async def _lead(self, conn: AsyncConnection) -> None:
        await self._listen(conn)
        # The connection is in autocommit (PostgreSQL): each batch's read and mark go straight
        # through asyncpg, with no transaction to end.
        self._driver = await hotpath.asyncpg_driver(conn)
        self._held.clear()  # another leader may have published since
        while True:
            published = await self.publish_once(conn)
            self._failures = 0  # leading works again: the next outage starts its backoff afresh
            if published == self.batch_size:
                continue  # a full batch: more rows are probably waiting
            # Woken by commits here or NOTIFY from elsewhere; the poll also picks up
            # scheduled rows (saga deadlines) within `poll_interval` of becoming due.
            await self._sleep(self.poll_interval, linger=self.linger if published > 1 else 0.0)

    async def publish_once(self, conn: AsyncConnection) -> int:
        """Publish one batch of due rows; returns how many were marked published or parked.

        A failed send is retried, never skipped: the key is held (see `_Hold`) and its later
        rows wait. A row Kafka refuses for good (`Unpublishable`) is parked as a dead letter
        and the key moves on. Other keys are published meanwhile.
        """
        clock = asyncio.get_running_loop().time()
        heads = [hold.head for hold in self._held.values() if hold.retry_at <= clock]
        if self._driver is not None and not self._held:
            rows = await hotpath.fetch_due(self._driver, utcnow(), self.batch_size)
        else:
            rows = await outbox.fetch_due(conn, utcnow(), self.batch_size, held=list(self._held), heads=heads)
            await conn.commit()
        if heads:
            fetched = {row.id for row in rows}
            for key, hold in list(self._held.items()):
                if hold.head in heads and hold.head not in fetched:
                    del self._held[key]  # published, parked or withdrawn meanwhile
        if not rows:
            return 0
        outcomes = await self.publisher.publish(rows)
        done, unpublishable, failed = _settle(rows, outcomes)
        if unpublishable:
            await self._park(unpublishable)
        if self._driver is not None:
            await hotpath.mark_published(self._driver, done, utcnow())
        else:
            await outbox.mark_published(conn, done, utcnow())
            await conn.commit()
        self.stats.published += len(done)
        self.stats.batches += 1
        if self._held or unpublishable or failed:
            self._hold_after(rows, done, unpublishable, failed, clock)
        if failed:
            self.stats.failures += 1
            row, error = failed[0]
            self.stats.last_error = f"{type(error).__name__}: {error}"
            log.warning(
                "relay %s: %d row(s) not published, e.g. %s (%s); retrying",
                self.name,
                len(failed),
                row.id,
                self.stats.last_error,
            )
        return len(done) + len(unpublishable)

    def _hold_after(
        self,
        rows: Sequence[OutboxRecord],
        done: Sequence[int],
        unpublishable: Sequence[Failure],
        failed: Sequence[Failure],
        clock: float,
    ) -> None:
        published = set(done)
        for row in rows:
            if row.key is not None and row.id in published:
                self._held.pop(row.key, None)
        for row, _ in unpublishable:
            if row.key is None:
                continue
            # The key's next row may already have been handed to the producer behind the
            # parked one: it is sent alone next, like any row after a failure.
            after = [r.id for r in rows if r.key == row.key and r.id > row.id]
            if after:
                self._held[row.key] = _Hold(head=after[0], failures=0, retry_at=clock)
            else:
                self._held.pop(row.key, None)
        for row, _ in failed:
            if row.key is None:
                continue  # keyless rows have no order in Kafka (random partition): just retried
            earlier = self._held.get(row.key)
            failures = earlier.failures + 1 if earlier is not None and earlier.head == row.id else 1
            self._held[row.key] = _Hold(head=row.id, failures=failures, retry_at=clock + self._backoff(failures))

    async def _park(self, unpublishable: Sequence[Failure]) -> None:
        # One transaction on a pooled connection: each letter is stored and its row taken off
        # the queue together, so a row is neither lost nor parked twice.
        async with AsyncSession(self.engine) as session, session.begin():
            for row, error in unpublishable:
                await deadletters.park_unpublishable(session, row, service=self.name, error=error, now=utcnow())
        for row, error in unpublishable:
            log.error("relay %s: parked outbox row %d as a dead letter: %s", self.name, row.id, error)
        self.stats.parked += len(unpublishable)
        self.wake()  # their copies wait on the dead-letter topic

    async def _listen(self, conn: AsyncConnection) -> None:
        # Rows committed by other processes (an HTTP worker, a script) wake us through
        # NOTIFY; the polling interval only matters if a notification is lost.
        if not is_postgres(conn):
            return
        raw: Any = (await conn.get_raw_connection()).driver_connection
        await raw.add_listener(NOTIFY_CHANNEL, lambda *_: self._wake.set())

    async def _sleep(self, timeout: float, *, linger: float) -> None:
        # asyncio.timeout, not wait_for: on Python 3.11, a wake-up coinciding with stop()'s
        # cancel made wait_for swallow the cancellation, and stop() then waited forever.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._wake.wait()
            self.stats.wakeups += 1
            if linger > 0:
                # Under load commits come in bursts (a consumer batch, concurrent requests):
                # lingering a moment lets one SELECT, one produce and one UPDATE carry the burst.
                await asyncio.sleep(linger)
        # Cleared before reading: a commit that wakes us from here on is either seen by the
        # coming read or wakes the next one.
        self._wake.clear()

    def _backoff(self, failures: int) -> float:
        # The exponent is capped: 2.0**1024 overflows a float, which would end the relay after
        # about 1,000 failures in a row (some 80 minutes of outage at the default ceiling).
        ceiling = min(self.max_backoff, 0.05 * 2 ** min(failures, 32))
        return random.uniform(ceiling / 2, ceiling)


@dataclass
class _Hold:
    """A key whose send failed. Only its first unpublished row (`head`) is sent, alone and no
    earlier than `retry_at`, until Kafka acknowledges it; its later rows are not even read,
    so they can neither overtake it nor fill the batches that other keys need."""

    head: int
    failures: int
    retry_at: float


Failure = tuple[OutboxRecord, BaseException]


def _settle(
    rows: Sequence[OutboxRecord], outcomes: Sequence[BaseException | None]
) -> tuple[list[int], list[Failure], list[Failure]]:
    """Sort a batch's outcomes: ids to mark published, rows to park, rows to retry.

    Per key, rows count only up to its first failure: a later row of the key stays unpublished
    even if acknowledged, so it is sent again after the failed one (consumers absorb the
    duplicate); marking it would let it overtake. Keyless rows have no order to keep.
    """
    failed_keys: set[str] = set()
    done: list[int] = []
    unpublishable: list[Failure] = []
    failed: list[Failure] = []
    for row, outcome in zip(rows, outcomes, strict=True):
        if row.key is not None and row.key in failed_keys:
            continue
        if outcome is None:
            done.append(row.id)
            continue
        (unpublishable if isinstance(outcome, Unpublishable) else failed).append((row, outcome))
        if row.key is not None:
            failed_keys.add(row.key)
    return done, unpublishable, failed
