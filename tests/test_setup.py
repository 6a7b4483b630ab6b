"""Declaration mistakes are caught at import or start time, with messages that say what to fix."""

from __future__ import annotations

import pytest

import choreo
from choreo import ConfigurationError, Event, KafkaSettings, Service, SetupError, Tx
from choreo.database import normalize_url
from choreo.events import EventRegistry


class Ping(Event, name="setup.ping", topic="setup"):
    n: int


class Pong(Event, name="setup.pong", topic="setup"):
    n: int


class Other(Event, name="setup.other", topic="setup"):
    pass


class Abstract(Event):
    pass


def test_public_api_is_sorted_and_complete() -> None:
    assert choreo.__all__ == sorted(choreo.__all__)
    public = {name for name in vars(choreo) if not name.startswith("_")}
    modules = {name for name in public if type(getattr(choreo, name)).__name__ == "module"}
    assert public - modules == set(choreo.__all__)


def test_decorator_returns_the_function_and_reads_emits_from_the_annotation() -> None:
    service = Service("svc")

    async def handle(event: Ping, tx: Tx) -> Pong | Other | None:
        return None

    assert service.on(Ping)(handle) is handle
    (handler,) = service.handlers
    assert handler.name == "svc.handle"
    assert handler.emits == {Pong, Other}
    assert service.subscribed_topics == ["setup"]


def test_list_return_annotation_and_explicit_emits() -> None:
    service = Service("svc")

    @service.on(Ping)
    async def many(event: Ping, tx: Tx) -> list[Pong | Other]:
        return []

    @service.on(Pong, emits=[Other])
    async def explicit(event, tx):  # type: ignore[no-untyped-def]
        return None

    assert [h.emits for h in service.handlers] == [{Pong, Other}, {Other}]


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("def h(event: Ping, tx: Tx) -> None: ...", "must be declared `async def`"),
        ("async def h(event: Ping) -> None: ...", "must take exactly (event, tx)"),
        ("async def h(event: Ping, tx: Tx, extra: int) -> None: ...", "must take exactly (event, tx)"),
        ("async def h(event: Pong, tx: Tx) -> None: ...", "first parameter is annotated"),
        ("async def h(event: Ping, tx: int) -> None: ...", "second parameter must be the choreo.Tx"),
        ("async def h(event: Ping, tx: Tx): ...", "must declare what it emits"),
        ("async def h(event: Ping, tx: Tx) -> int: ...", "is not an event type"),
        ("async def h(event: Ping, tx: Tx) -> Abstract: ...", "abstract event"),
    ],
)
def test_signature_mistakes_are_setup_errors_naming_the_function(source: str, message: str) -> None:
    namespace: dict[str, object] = {"Ping": Ping, "Pong": Pong, "Tx": Tx, "Abstract": Abstract}
    exec(source, namespace)
    service = Service("svc")
    with pytest.raises(SetupError, match="'h'") as raised:
        service.on(Ping)(namespace["h"])  # type: ignore[arg-type]
    assert message in str(raised.value)


def test_registering_a_non_event_is_refused() -> None:
    service = Service("svc")

    async def h(event: Abstract, tx: Tx) -> None: ...

    with pytest.raises(SetupError, match="not a concrete choreo.Event"):
        service.on(Abstract)(h)


def test_duplicate_handler_names_are_refused() -> None:
    service = Service("svc")

    async def h(event: Ping | Pong, tx: Tx) -> None: ...

    service.on(Ping)(h)
    with pytest.raises(SetupError, match="already has a handler named 'svc.h'"):
        service.on(Pong)(h)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "Order Created", "topic": "t"}, "must be lowercase words"),
        ({"name": "order.created", "topic": "bad topic"}, "must be a Kafka topic name"),
        ({"name": "order.created"}, "must be a Kafka topic name"),
        ({"topic": "t"}, "has a topic but no name="),
        ({"name": "order.created", "topic": "t", "version": 0}, "positive int"),
        ({"name": "order.created", "topic": "t", "key": "missing"}, "is not one of its fields"),
    ],
)
def test_malformed_event_declarations(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(SetupError, match=message):
        type("Bad", (Event,), {"__annotations__": {"order_id": str}}, **kwargs)


def test_wire_name_conflicts_are_setup_errors() -> None:
    class First(Event, name="setup.same", topic="setup"):
        pass

    class Second(Event, name="setup.same", topic="setup"):
        pass

    registry = EventRegistry()
    registry.add(First)
    registry.add(First)  # the same class twice is fine
    with pytest.raises(SetupError, match="wire name conflict"):
        registry.add(Second)


def test_service_names_are_checked() -> None:
    with pytest.raises(SetupError, match="service name 'Orders Service'"):
        Service("Orders Service")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"KAFKA_BOOTSTRAP_SERVERS": "localhost"}, "is not host:port"),
        ({"CHOREO_KAFKA_FETCH_MAX_WAIT_MS": "soon"}, "must be a whole number"),
        ({"CHOREO_KAFKA_SECURITY_PROTOCOL": "TLS"}, "use one of PLAINTEXT"),
        ({"CHOREO_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "needs CHOREO_KAFKA_SASL_MECHANISM"),
        ({"CHOREO_SVC_KAFKA_IDEMPOTENCE": "maybe"}, "CHOREO_SVC_KAFKA_IDEMPOTENCE='maybe'"),
    ],
)
def test_bad_kafka_environment_refuses_to_start(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        KafkaSettings.from_env("svc", env)


def test_per_service_variables_win_over_shared_ones() -> None:
    env = {"KAFKA_BOOTSTRAP_SERVERS": "a:1", "CHOREO_SVC_KAFKA_BOOTSTRAP_SERVERS": "b:2"}
    assert KafkaSettings.from_env("svc", env).bootstrap_servers == "b:2"
    assert KafkaSettings.from_env("other", env).bootstrap_servers == "a:1"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u:p@h/db", "postgresql+asyncpg://u:p@h/db"),
        ("postgres://u:p@h/db", "postgresql+asyncpg://u:p@h/db"),
        ("sqlite:///x.db", "sqlite+aiosqlite:///x.db"),
    ],
)
def test_database_urls_get_async_drivers(url: str, expected: str) -> None:
    assert normalize_url(url) == expected


@pytest.mark.parametrize("url", ["mysql://u@h/db", "not a url"])
def test_unsupported_database_urls_are_refused(url: str) -> None:
    with pytest.raises(ConfigurationError, match="database URL"):
        normalize_url(url)


async def test_late_registration_is_refused(tmp_path: object) -> None:
    from choreo.testing import in_memory

    service = Service("svc", database_url=f"sqlite+aiosqlite:///{tmp_path}/svc.db")
    async with in_memory(service):

        async def h(event: Ping, tx: Tx) -> None: ...

        with pytest.raises(SetupError, match="already running"):
            service.on(Ping)(h)
