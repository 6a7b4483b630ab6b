"""`Service`: a named participant in the choreography, with its own database and consumer group.

customers = Service("customers")

@customers.on(OrderCreated)
async def reserve_credit(event: OrderCreated, tx: Tx) -> CreditReserved | CreditLimitExceeded:
    ...
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import itertools
import logging
import re
import time
import types
import typing
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any, TypeVar

from sqlalchemy import MetaData
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from choreo import deadletters, hotpath, tables
from choreo.cleanup import Retention, run_cleaner
from choreo.consumer import Consumer, Handler, RetryPolicy
from choreo.database import create_engine, is_transient, lock_schema, masked_url
from choreo.envelope import Envelope, new_id, utcnow
from choreo.events import Event, EventRegistry, describe, is_event_type
from choreo.exceptions import DependencyUnavailable, SetupError
from choreo.kafka import KafkaTransport
from choreo.relay import Relay
from choreo.saga import Saga, SagaIndex
from choreo.settings import KafkaSettings, database_url, relay_takeover_timeout, retention_from_env
from choreo.settings import start_timeout as start_timeout_setting
from choreo.tx import Tx

log = logging.getLogger("choreo.service")

H = TypeVar("H", bound=Callable[..., Awaitable[Any]])
T = TypeVar("T")

_SERVICE_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")


class Service:
    """A service: its handlers, its database, its Kafka consumer group and its relay."""

    def __init__(
        self,
        name: str,
        *,
        database_url: str | None = None,
        kafka: KafkaSettings | str | None = None,
        metadata: MetaData | Iterable[MetaData] = (),
        retry: RetryPolicy | None = None,
        relay: bool = True,
        group_id: str | None = None,
        retention: Retention | None = None,
    ) -> None:
        if not _SERVICE_NAME.match(name):
            raise SetupError(
                f"service name {name!r} must be lowercase letters, digits, '-' or '_', "
                "starting with a letter (it names the consumer group and env variables)"
            )
        self.name = name
        self.group_id = group_id or name
        self.retry = retry or RetryPolicy()
        self.run_relay = relay
        self._retention = retention
        self._cleaner: asyncio.Task[None] | None = None
        self.metadata = [metadata] if isinstance(metadata, MetaData) else list(metadata)
        """Application tables created in this service's database on start, beside choreo's."""
        self.registry = EventRegistry()
        self.handlers: list[Handler] = []
        self.sagas: list[Saga] = []
        self.declared: set[type[Event]] = set()
        """Events emitted outside handlers (see `declare`)."""
        self._database_url = database_url
        self._kafka = kafka
        self._engine: AsyncEngine | None = None
        self._transport: KafkaTransport | None = None
        self._relay: Relay | None = None
        self._consumer: Consumer | None = None
        self._started = False
        self._saga_index = SagaIndex()
        self._takeover_timeout = 0.0
        self._retention_in_use = Retention()

    def __repr__(self) -> str:
        return f"Service({self.name!r})"

    # -- declaring ---------------------------------------------------------------------------

    def on(
        self,
        *event_types: type[Event],
        emits: Iterable[type[Event]] | None = None,
        name: str | None = None,
        max_attempts: int | None = None,
    ) -> Callable[[H], H]:
        """Register `async def handler(event, tx) -> A | B | None` for `event_types`.

        What the handler may emit comes from its return annotation, or from `emits=`.
        Returns the function unchanged, so tests can call it directly.
        """

        def register(func: H) -> H:
            self._ensure_open(func)
            handler = _build_handler(self.name, func, event_types, emits, name, max_attempts)
            if any(h.name == handler.name for h in self.handlers):
                raise SetupError(
                    f"{self.name} already has a handler named {handler.name!r}; pass name= to "
                    "tell them apart (the name keys the inbox, so keep it stable)"
                )
            for event_type in (*handler.event_types, *handler.emits):
                self.registry.add(event_type)
            self.handlers.append(handler)
            return func

        return register

    def declare(self, *event_types: type[Event]) -> None:
        """Register events this service emits outside handlers (e.g. from HTTP endpoints)."""
        self._ensure_open(event_types)
        for event_type in event_types:
            self.registry.add(event_type)
            self.declared.add(event_type)

    def saga(
        self,
        name: str,
        *,
        starts: type[Event],
        ends: Iterable[type[Event]],
        deadline: timedelta | None = None,
        on_deadline: Callable[[Any], Event] | None = None,
        timeout_event: type[Event] | None = None,
        cancelled_by: type[Event] | Iterable[type[Event]] = (),
    ) -> Saga:
        """Declare a saga this service starts (see `choreo.saga`); returns it.

        `cancelled_by` names the events this service emits, under the saga's id, to undo the
        saga after it ended well (e.g. `order.cancelled` from an HTTP endpoint).
        """
        self._ensure_open(name)
        cancels = frozenset((cancelled_by,) if isinstance(cancelled_by, type) else cancelled_by)
        saga = Saga(name, starts, frozenset(ends), deadline, on_deadline, timeout_event, cancels)
        if any(s.name == name or s.starts is starts for s in self.sagas):
            raise SetupError(f"{self.name} already declares a saga named {name!r} or started by {starts!r}")
        self.declare(starts, *([timeout_event] if timeout_event else []), *cancels)
        self.sagas.append(saga)
        return saga

    def clone(
        self,
        *,
        database_url: str | None = None,
        kafka: KafkaSettings | str | None = None,
        group_id: str | None = None,
        deadlines: Mapping[str, timedelta] | None = None,
    ) -> Service:
        """A new, unstarted service with this one's name, handlers, sagas and tables, configured anew.

        For tests and for several instances in one process. Handler names, hence inbox keys,
        stay the same; `deadlines` overrides saga deadlines by saga name.
        """
        copy = Service(
            self.name,
            database_url=database_url,
            kafka=kafka,
            metadata=self.metadata,
            retry=self.retry,
            relay=self.run_relay,
            group_id=group_id or self.group_id,
            retention=self._retention,
        )
        copy.declare(*self.declared)
        for event_type in self.registry:
            copy.registry.add(event_type)
        for saga in self.sagas:
            deadline = (deadlines or {}).get(saga.name, saga.deadline)
            copy.sagas.append(dataclasses.replace(saga, deadline=deadline))
        copy.handlers = list(self.handlers)
        return copy

    def _ensure_open(self, what: object) -> None:
        if self._started:
            raise SetupError(f"{self.name} is already running; register {what!r} before start()")

    @property
    def subscribed_topics(self) -> list[str]:
        """Topics this service consumes, derived from its handlers."""
        return sorted({t.event_topic for h in self.handlers for t in h.event_types})

    @property
    def emitted_topics(self) -> list[str]:
        """Topics this service may publish to."""
        emitted = {t.event_topic for h in self.handlers for t in h.emits}
        emitted |= {t.event_topic for t in self.registry}
        return sorted(emitted | {deadletters.topic_for(self.name)})

    # -- running -----------------------------------------------------------------------------

    @property
    def database_url(self) -> str:
        """The URL of this service's database: the argument, else from the environment."""
        return self._database_url or database_url(self.name)

    @property
    def engine(self) -> AsyncEngine:
        """The service database's engine (after `start()`)."""
        if self._engine is None:
            raise SetupError(f"{self.name} has not started: call `await service.start()` first")
        return self._engine

    @property
    def transport(self) -> KafkaTransport:
        """The service's Kafka connection (after `start()`)."""
        if self._transport is None:
            raise SetupError(f"{self.name} has not started: call `await service.start()` first")
        return self._transport

    @property
    def relay(self) -> Relay | None:
        """The in-process relay, when running."""
        return self._relay

    @property
    def consumer(self) -> Consumer | None:
        """The record dispatcher, when running."""
        return self._consumer

    async def start(
        self, *, consume: bool = True, relay: bool | None = None, kafka: bool = True, start_timeout: float | None = None
    ) -> None:
        """Open the database (creating tables), then start consuming and relaying.

        `consume=False` runs only the relay (`choreo relay`); `relay=False` only the consumer.
        `kafka=False` opens the database alone, for tools and scripts: events they emit wait
        in the outbox until a running instance of the service relays them. While the database
        or Kafka does not answer, start waits and retries, up to `start_timeout` seconds
        (default `CHOREO_START_TIMEOUT`, 60 s; 0 fails at once), then raises DependencyUnavailable.
        """
        if self._started:
            return
        wait = start_timeout_setting(self.name) if start_timeout is None else start_timeout
        try:
            if not kafka:
                await self._open(ensure_topics=False, consume=False, wait=wait)
                self._started = True
                return
            await self._open(ensure_topics=True, consume=consume, wait=wait)
            await self._launch(start_transport=True, relay=relay)
        except BaseException:
            await self.stop()  # close what was opened: the caller has no service to stop
            raise

    async def _open(self, *, ensure_topics: bool, consume: bool = True, wait: float = 0.0) -> KafkaTransport:
        # Every setting is read before anything connects: a typo is reported at once, not
        # after the wait for an unreachable broker.
        kafka = self._kafka_settings()
        self._takeover_timeout = relay_takeover_timeout(self.name)
        self._retention_in_use = self._retention or retention_from_env(self.name)
        self._saga_index = SagaIndex.of(self.sagas)  # sagas are declared before start
        self._engine = create_engine(self.database_url)
        deadline = time.monotonic() + wait
        where, setting = masked_url(self.database_url), self._setting("DATABASE_URL")
        await wait_for_dependency(self.name, "the database", where, setting, self._create_tables, deadline)
        transport = self._transport = KafkaTransport(kafka, client_id=self.name)
        if ensure_topics:
            # Creating the topics is the first thing that needs Kafka: once it succeeds, the
            # producer and consumers that start next find the broker too.
            topics = [*self.subscribed_topics, *self.emitted_topics]
            setting = self._setting("KAFKA_BOOTSTRAP_SERVERS")

            async def create_topics() -> None:
                await transport.ensure_topics(topics)

            with quiet("aiokafka"):  # an ERROR per refused connection: we log one line per attempt
                await wait_for_dependency(
                    self.name,
                    "Kafka",
                    kafka.bootstrap_servers,
                    setting,
                    lambda: transport.ensure_topics(topics),
                    deadline,
                )
        self._consumer = Consumer(
            service=self.name,
            handlers=self.handlers,
            registry=self.registry,
            unit_of_work=self._unit_of_work,
            policy=self.retry,
        )
        # One consumer for all topics: each extra consumer in the group costs a rebalance
        # at start, and the consumer already runs different keys concurrently.
        if consume and self.subscribed_topics:
            self._transport.subscribe_batches(self.subscribed_topics, self.group_id, self._consumer.on_batch)
        return self._transport

    def _setting(self, name: str) -> str:
        return f"CHOREO_{self.name.upper().replace('-', '_')}_{name} (or CHOREO_{name})"

    async def _create_tables(self) -> None:
        async with self.engine.begin() as conn:
            # Replicas starting together on a fresh PostgreSQL database would race to create
            # the same tables; a transaction-scoped advisory lock lets one go first.
            await lock_schema(conn)
            for metadata in (tables.metadata, *self.metadata):
                await conn.run_sync(metadata.create_all)

    async def _launch(self, *, start_transport: bool, relay: bool | None) -> None:
        assert self._transport is not None and self._engine is not None
        if start_transport:
            await self._transport.start()
        if self.run_relay if relay is None else relay:
            self._relay = Relay(self._engine, self._transport, name=self.name, takeover_timeout=self._takeover_timeout)
            self._relay.start()
        self._cleaner = asyncio.create_task(run_cleaner(self._engine, self._retention_in_use, self.name))
        self._started = True
        log.info("%s started: consuming %s", self.name, ", ".join(self.subscribed_topics) or "nothing")

    async def stop(self) -> None:
        """Stop consuming and relaying, and close connections. Safe to call twice."""
        if self._cleaner is not None:
            self._cleaner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._cleaner
            self._cleaner = None
        if self._relay is not None:
            await self._relay.stop()
            self._relay = None
        if self._transport is not None:
            await self._transport.stop()
            self._transport = None
        if self._engine is not None:
            await self._engine.dispose()
            self._engine = None
        self._started = False

    @asynccontextmanager
    async def running(self, **options: Any) -> AsyncIterator[Service]:
        """`async with service.running():` start, and stop on exit."""
        await self.start(**options)
        try:
            yield self
        finally:
            await self.stop()

    def _kafka_settings(self) -> KafkaSettings:
        if isinstance(self._kafka, KafkaSettings):
            self._kafka.validate()
            return self._kafka
        settings = KafkaSettings.from_env(self.name)
        if isinstance(self._kafka, str):
            settings = KafkaSettings(**{**vars(settings), "bootstrap_servers": self._kafka})
            settings.validate()
        return settings

    # -- units of work -----------------------------------------------------------------------

    def transaction(self, saga_id: str | None = None) -> typing.AsyncContextManager[Tx]:
        """A unit of work outside handlers: starts a new saga unless `saga_id` joins one.

        async with orders.transaction() as tx:
            tx.session.add(order)
            tx.emit(OrderCreated(...))
        """
        return self._unit_of_work(saga_id=saga_id or new_id(), cause=None, handler=None, allowed=None)

    @asynccontextmanager
    async def _unit_of_work(
        self,
        *,
        saga_id: str,
        cause: Envelope | None,
        handler: str | None,
        allowed: frozenset[type[Event]] | None,
        claim: bool = False,
    ) -> AsyncIterator[Tx]:
        async with self.engine.connect() as conn, conn.begin():
            statements = await hotpath.statements_for(conn)
            tx = Tx(
                conn,
                service=self.name,
                saga_id=saga_id,
                cause=cause,
                handler=handler,
                allowed=allowed,
                sagas=self._saga_index,
                max_record_size=self.transport.max_record_size,
            )
            try:
                # The inbox row is written first: a concurrent duplicate waits here for this
                # transaction's outcome, and the handler's effects and the "processed" mark
                # commit or roll back together.
                inbox_row = None
                if claim:
                    assert cause is not None and handler is not None
                    inbox_row = hotpath.Claim(handler, cause.event_id, utcnow())
                tx.duplicate = not await statements.begin(inbox_row)
                yield tx
                # Written last, on the same connection: business rows, inbox row and events
                # commit together or not at all.
                await tx.flush()
                # The relay leading here is woken directly after the commit; a NOTIFY is for a
                # relay elsewhere (a replica's, or this service's main process for a script).
                relay_here = self._relay is not None and self._relay.stats.is_leader
                await statements.write(tx.pending, utcnow(), notify=not relay_here)
                await statements.withdraw(tx.withdrawn)
            finally:
                await tx.close()
            tx.committing = True  # from here a failure may have committed (see `run_transaction`)
        if (tx.pending or tx.wake_relay) and self._relay is not None:
            self._relay.wake()

    async def run_transaction(
        self, work: Callable[[Tx], Awaitable[T]], *, saga_id: str | None = None, attempts: int = 3
    ) -> T:
        """`await work(tx)` in a unit of work (see `transaction()`), again on a fresh connection when
        the database failed before the commit was sent, up to `attempts` times; returns its result.

        For HTTP endpoints: a request whose connection the database dropped mid-transaction
        (a restart, `pg_terminate_backend`) is then answered, not failed. Nothing of a failed
        attempt committed, so running `work` again is safe as long as it only touches the
        database through `tx`; a failure of the commit itself is never retried, since it may
        have committed. Each attempt of a new saga gets a new saga id.
        """
        for attempt in itertools.count(1):
            tx: Tx | None = None
            try:
                async with self.transaction(saga_id) as tx:
                    result = await work(tx)
                return result
            except Exception as error:
                # A failure before `work` ran (checking a connection out, BEGIN) is as safe to
                # retry as one inside it: nothing was committed.
                if attempt >= attempts or (tx is not None and tx.committing) or not is_transient(error):
                    raise
                log.warning("%s: transaction failed before its commit (%s); running it again", self.name, error)
        raise AssertionError("unreachable")

    def session(self) -> AsyncSession:
        """A session on the service's database for reads, e.g. from HTTP endpoints (after `start()`).

        async with orders.session() as session:
            order = await session.get(Order, order_id)

        Changes that go with events belong in `transaction()`: this session emits nothing.
        """
        return AsyncSession(self.engine, expire_on_commit=False)


async def wait_for_dependency(
    owner: str, dependency: str, where: str, setting: str, attempt: Callable[[], Awaitable[None]], deadline: float
) -> None:
    """Run `attempt` until it succeeds, retrying infrastructure failures until `deadline`.

    Raises DependencyUnavailable, in one line naming `dependency`, `where` (no password) and
    the `setting` to check, when time is up or the failure is not one waiting can mend.
    """
    # A service started before its database or broker (a reboot, a compose file) waits for
    # them instead of exiting; only a failure of the infrastructure is worth waiting for.
    for tries in itertools.count():
        try:
            return await attempt()
        except DependencyUnavailable:
            raise  # already one line that names the fix (e.g. a TLS or SASL refusal)
        except Exception as error:
            kind, first_line = type(error).__name__, next(iter(str(error).strip().splitlines()), "")
            reason = first_line if first_line.startswith(kind) else f"{kind}: {first_line}"
            if not is_transient(error):  # e.g. a wrong password: waiting will not help
                raise DependencyUnavailable(
                    f"{owner}: cannot use {dependency} at {where}: {reason}; check {setting}"
                ) from error
            pause = min(5.0, 0.5 * 2**tries)
            if time.monotonic() + pause > deadline:
                raise DependencyUnavailable(
                    f"{owner}: {dependency} at {where} did not answer within the start timeout "
                    f"(CHOREO_START_TIMEOUT): {reason}; check {setting}"
                ) from error
            log.warning("%s: waiting for %s at %s (%s); retry in %.1fs", owner, dependency, where, reason, pause)
            await asyncio.sleep(pause)


@contextlib.contextmanager
def quiet(logger: str) -> Iterator[None]:
    """Drop `logger`'s records for the duration (a filter of its own: safe when nested)."""
    drop_all = logging.Filter("\x00")  # matches no logger name: filters every record out
    logging.getLogger(logger).addFilter(drop_all)
    try:
        yield
    finally:
        logging.getLogger(logger).removeFilter(drop_all)


def _build_handler(
    service: str,
    func: Callable[..., Awaitable[Any]],
    event_types: tuple[type[Event], ...],
    emits: Iterable[type[Event]] | None,
    name: str | None,
    max_attempts: int | None,
) -> Handler:
    where = f"{service}.on: handler {getattr(func, '__qualname__', func)!r}"
    if not inspect.iscoroutinefunction(func):
        raise SetupError(f"{where} must be declared `async def`")
    if not event_types:
        raise SetupError(f"{where}: name the event type(s) it handles, e.g. @{service}.on(OrderCreated)")
    for event_type in event_types:
        if not is_event_type(event_type):
            raise SetupError(f"{where}: {event_type!r} is not a concrete choreo.Event (name= and topic=)")
    if max_attempts is not None and max_attempts < 1:
        raise SetupError(f"{where}: max_attempts must be at least 1")
    params = list(inspect.signature(func).parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required_rest = [p for p in params[2:] if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if len(positional) < 2 or required_rest:
        raise SetupError(f"{where} must take exactly (event, tx), got ({', '.join(p.name for p in params)})")
    try:
        hints = typing.get_type_hints(func)
    except NameError as missing:
        raise SetupError(
            f"{where}: cannot resolve its annotations ({missing}); define the event classes at module level"
        ) from None
    accepted = hints.get(positional[0].name)
    if accepted is not None:
        accepted_types = _event_types_in(accepted, where, allow_none=False)
        for event_type in event_types:
            if not any(issubclass(event_type, t) for t in accepted_types):
                raise SetupError(
                    f"{where} is registered for {describe(event_type)} but its first parameter "
                    f"is annotated {accepted!r}"
                )
    tx_hint = hints.get(positional[1].name)
    if tx_hint is not None and tx_hint is not Tx:
        raise SetupError(f"{where}: its second parameter must be the choreo.Tx, annotated {tx_hint!r}")
    if emits is not None:
        emitted = frozenset(emits)
        for event_type in emitted:
            if not is_event_type(event_type):
                raise SetupError(f"{where}: emits= lists {event_type!r}, which is not a concrete event")
    elif "return" in hints:
        emitted = frozenset(_event_types_in(hints["return"], where, allow_none=True))
    else:
        raise SetupError(
            f"{where} must declare what it emits: a return annotation such as "
            "`-> CreditReserved | CreditLimitExceeded` (`-> None` if nothing), or emits=[...]"
        )
    return Handler(
        name=name or f"{service}.{func.__name__}",
        func=func,
        event_types=tuple(event_types),
        emits=emitted,
        max_attempts=max_attempts,
    )


def _event_types_in(annotation: Any, where: str, *, allow_none: bool) -> set[type[Event]]:
    """The event classes named by an annotation: `A`, `A | B | None`, `list[A | B]`, ..."""
    if annotation is None or annotation is type(None):
        if allow_none:
            return set()
        raise SetupError(f"{where}: None is not an event type")
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        found: set[type[Event]] = set()
        for arg in typing.get_args(annotation):
            found |= _event_types_in(arg, where, allow_none=allow_none)
        return found
    if origin in (list, tuple, set, frozenset) or (origin is not None and origin.__module__ == "collections.abc"):
        found = set()
        for arg in typing.get_args(annotation):
            if arg is not Ellipsis:
                found |= _event_types_in(arg, where, allow_none=allow_none)
        return found
    if is_event_type(annotation):
        return {annotation}
    if isinstance(annotation, type) and issubclass(annotation, Event):
        raise SetupError(f"{where}: {annotation.__qualname__} is an abstract event; name the concrete ones")
    raise SetupError(f"{where}: annotation {annotation!r} is not an event type, a union or a list of them")
