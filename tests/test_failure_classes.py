"""Failures are classified by where they came from: handler code, or choreo's own database and Kafka work.

An exception out of a handler follows the retry policy and ends as a dead letter whatever its
type; a lost connection of the handler's own session is the infrastructure's and is waited out.
A lane of a batch that raises takes its sibling lanes down with it before the batch is rewound.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import replace

import pytest
from sqlalchemy import text

from choreo import Event, RetryPolicy, Service, Tx
from choreo.tables import DeadLetter, InboxRow
from choreo.testing import in_memory, record_of
from tests.conftest import DatabaseFactory
from tests.test_memory_consumer import consumer_of, count, dead_letters

POLICY = RetryPolicy(max_attempts=3, initial_backoff=0.001, max_backoff=0.005)


class Job(Event, name="failures.job", topic="failures"):
    label: str


def raise_timeout() -> None:
    raise TimeoutError("the payment provider did not answer in 5 s")


def raise_connection_error() -> None:
    raise ConnectionRefusedError(111, "payment provider refused the connection")


def raise_os_error() -> None:
    raise OSError(28, "No space left on device: '/tmp/receipt.pdf'")


def raise_value_error_while_handling_os_error() -> None:
    try:
        raise_os_error()
    except OSError:
        raise ValueError("receipt total does not match the order") from None


FAILURES: dict[str, Callable[[], None]] = {
    "TimeoutError": raise_timeout,
    "ConnectionRefusedError": raise_connection_error,
    "OSError": raise_os_error,
    "ValueError": raise_value_error_while_handling_os_error,
}


@pytest.mark.parametrize("kind", list(FAILURES))
async def test_an_exception_out_of_handler_code_is_dead_lettered_after_its_attempts_whatever_its_type(
    database: DatabaseFactory, kind: str
) -> None:
    calls: list[str] = []
    service = Service("failures", database_url=await database("failures"), retry=POLICY)

    @service.on(Job)
    async def work(event: Job, tx: Tx) -> None:
        calls.append(event.label)
        if event.label == "bad":
            FAILURES[kind]()

    async with in_memory(service):
        consumer = consumer_of(service)
        bad = replace(record_of(Job(label="bad"), offset=1), key=b"k")
        good = replace(record_of(Job(label="good"), offset=2), key=b"k")  # same key: after "bad", in its lane
        async with asyncio.timeout(30):
            await consumer.on_batch([bad, good])
        (letter,) = await dead_letters(service)
        assert (letter.reason, letter.attempts) == ("handler-error", POLICY.max_attempts)
        assert letter.error.startswith(f"{kind}: ")
        assert letter.traceback and "work" in letter.traceback
        assert calls == ["bad"] * POLICY.max_attempts + ["good"]
        assert (consumer.stats.transient_retries, consumer.stats.retried) == (0, POLICY.max_attempts - 1)


async def test_a_dropped_connection_of_the_handlers_own_session_is_retried_and_never_dead_lettered(
    fresh_pg_database: Callable[[str], Awaitable[str]],
) -> None:
    # One attempt only: were the lost connection counted as the handler's failure, the record
    # would be parked at the first one.
    service = Service(
        "failures", database_url=await fresh_pg_database("failures"), retry=replace(POLICY, max_attempts=1)
    )
    drops = {"left": 3}

    @service.on(Job)
    async def work(event: Job, tx: Tx) -> None:
        if drops["left"]:
            drops["left"] -= 1
            # The server ends this very session's backend, as a failover or an admin would.
            await tx.session.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))

    async with in_memory(service):
        consumer = consumer_of(service)
        async with asyncio.timeout(30):
            assert await consumer.process(record_of(Job(label="x"))) == ["handled"]
        assert drops["left"] == 0
        assert (consumer.stats.transient_retries, consumer.stats.retried) == (3, 0)
        assert await count(service, DeadLetter) == 0
        assert await count(service, InboxRow) == 1


async def test_a_lane_that_raises_cancels_its_sibling_lanes_before_the_batch_is_given_up(
    fresh_pg_database: Callable[[str], Awaitable[str]],
) -> None:
    service = Service("failures", database_url=await fresh_pg_database("failures"), retry=POLICY)
    slow_started, slow_cancelled = asyncio.Event(), asyncio.Event()

    @service.on(Job)
    async def work(event: Job, tx: Tx) -> None:
        if event.label == "first":
            await slow_started.wait()  # the slow lane is inside its transaction by now
        elif event.label == "slow":
            slow_started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                slow_cancelled.set()
                raise

    async with in_memory(service):
        # Without a dead-letter table the database refuses every letter: the lane holding the
        # unreadable record raises, the only way out when a record can be neither processed
        # nor parked (the batch is then delivered again).
        async with service.engine.begin() as conn:
            await conn.execute(text("DROP TABLE choreo_dead_letter"))
        first = replace(record_of(Job(label="first"), offset=1), key=b"lane-a")
        unreadable = replace(record_of(Job(label="x"), offset=2), key=b"lane-a", headers=())
        slow = replace(record_of(Job(label="slow"), offset=3), key=b"lane-b")
        with pytest.raises(Exception) as raised:
            async with asyncio.timeout(30):
                await consumer_of(service).on_batch([first, unreadable, slow])
        errors = raised.value.exceptions if isinstance(raised.value, ExceptionGroup) else (raised.value,)
        assert any("choreo_dead_letter" in str(error) for error in errors)
        # Cancelled before on_batch gave up, so the rewind cannot race with it, and rolled back.
        assert slow_cancelled.is_set()
        assert await count(service, InboxRow) == 1  # only "first" committed


def test_backoff_stays_within_its_ceiling_however_long_an_outage_lasts() -> None:
    # Transient failures are retried without limit: after ~1,000 of them (hours at the default
    # ceiling) 2**n no longer fits a float.
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=10.0)
    assert all(5.0 <= policy.backoff(n) <= 10.0 for n in (8, 1_100, 100_000))
