"""Events: pydantic models with a stable wire name, a version and a topic.

    class OrderCreated(Event, name="order.created", topic="orders"):
        order_id: str
        total: Decimal

The wire name, not the Python path, identifies an event between services, so classes can be
renamed or moved freely. Fields may grow; consumers ignore fields they do not know.

Anything else (a field removed, renamed, retyped or made required) is a new version, plus an
upcaster that turns the previous version's payload into the new one:

    class OrderCreated(Event, name="order.created", topic="orders", version=2):
        order_id: str
        total: Decimal
        currency: str

    @OrderCreated.upcaster(from_version=1)
    def add_currency(payload: dict[str, Any]) -> dict[str, Any]:
        return {**payload, "currency": "EUR"}

A consumer whose handler takes v2 then receives a v1 record as a v2 instance: the upcasters
run on the JSON payload, in version order, before validation. See "Changing an event" in the
README for the whole workflow.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, TypeAdapter

from choreo.exceptions import RejectedRecord, SetupError

Payload = dict[str, Any]
Upcaster = Callable[[Payload], Payload]
"""Turns the JSON payload of one version of an event into the payload of the next version."""

_PAYLOAD: TypeAdapter[Payload] = TypeAdapter(Payload)

_WIRE_NAME = re.compile(r"^[a-z][a-z0-9_-]*(\.[a-z0-9_-]+)*$")
_TOPIC_NAME = re.compile(r"^[a-zA-Z0-9._-]{1,249}$")


class Event(BaseModel):
    """Base class of every event; subclass with `name=`, `topic=` and optionally `version=`,
    `key=` (a field whose value becomes the Kafka key instead of the saga id),
    `compensates=` (the event, or events, whose effect this one undoes) and `external=True`
    (an integration event: published for consumers outside this codebase)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    event_name: ClassVar[str]
    event_version: ClassVar[int]
    event_topic: ClassVar[str]
    event_key: ClassVar[str | None]
    compensates: ClassVar[tuple[type[Event], ...]]
    event_external: ClassVar[bool]
    event_upcasters: ClassVar[dict[int, Upcaster]]
    """`from_version` → the function that lifts that version's payload one version up."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # The class keywords are read in __pydantic_init_subclass__, once the fields exist.
        super().__init_subclass__()

    @classmethod
    def __pydantic_init_subclass__(
        cls,
        *,
        name: str | None = None,
        topic: str | None = None,
        version: int = 1,
        key: str | None = None,
        compensates: type[Event] | Iterable[type[Event]] = (),
        external: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        if name is None:
            if topic is not None:
                raise SetupError(f"event class {cls.__qualname__} has a topic but no name=")
            return  # an abstract base shared by several events
        if not _WIRE_NAME.match(name):
            raise SetupError(
                f"event {cls.__qualname__}: wire name {name!r} must be lowercase words joined "
                "by dots, e.g. 'order.created'"
            )
        if topic is None or not _TOPIC_NAME.match(topic):
            raise SetupError(
                f"event {cls.__qualname__} ({name}): topic= must be a Kafka topic name "
                f"(letters, digits, '.', '_', '-'), got {topic!r}"
            )
        if not isinstance(version, int) or version < 1:
            raise SetupError(f"event {name}: version must be a positive int, got {version!r}")
        if key is not None and key not in cls.model_fields:
            raise SetupError(f"event {name}: key={key!r} is not one of its fields {sorted(cls.model_fields)}")
        undone = (compensates,) if isinstance(compensates, type) else tuple(compensates)
        for other in undone:
            if not is_event_type(other):
                raise SetupError(f"event {name}: compensates= must name event classes, got {other!r}")
        cls.event_name = name
        cls.event_version = version
        cls.event_topic = topic
        cls.event_key = key
        if not isinstance(external, bool):
            raise SetupError(f"event {name}: external= must be True or False, got {external!r}")
        cls.event_external = external
        cls.compensates = undone
        cls.event_upcasters = {}

    @classmethod
    def upcaster(cls, *, from_version: int) -> Callable[[Upcaster], Upcaster]:
        """Register the decorated function as the upcaster of `from_version` to `from_version + 1`."""
        if not is_event_type(cls) or not isinstance(from_version, int) or not 1 <= from_version < cls.event_version:
            raise SetupError(
                f"{cls.__qualname__}.upcaster(from_version={from_version!r}): the version must be an older "
                f"version of this event, 1 to {getattr(cls, 'event_version', 1) - 1}"
            )

        def register(func: Upcaster) -> Upcaster:
            known = cls.event_upcasters.get(from_version)
            if known is not None and known is not func:
                raise SetupError(
                    f"event {cls.event_name}: two upcasters from v{from_version}: "
                    f"{known.__qualname__} and {func.__qualname__}; keep one"
                )
            cls.event_upcasters[from_version] = func
            return func

        return register

    @classmethod
    def missing_upcaster(cls, from_version: int) -> int | None:
        """The first version between `from_version` and this one without an upcaster, else None."""
        for version in range(from_version, cls.event_version):
            if version not in cls.event_upcasters:
                return version
        return None

    @classmethod
    def from_wire(cls, value: bytes, version: int) -> Event:
        """Validate a record's JSON value of `version`, upcasting it first when it is older.

        Raises pydantic's ValidationError for invalid JSON or a schema violation, and
        RejectedRecord("upcast-error") when an upcaster fails.
        """
        if version == cls.event_version:
            return cls.model_validate_json(value)  # the hot path: parsed once, by pydantic
        payload = _PAYLOAD.validate_json(value)
        for step in range(version, cls.event_version):
            try:
                payload = cls.event_upcasters[step](payload)
            except Exception as error:
                raise RejectedRecord(
                    "upcast-error",
                    f"{cls.event_name} upcaster v{step}→v{step + 1} failed: {type(error).__name__}: {error}",
                ) from error
        return cls.model_validate(payload)

    def kafka_key(self, saga_id: str) -> str:
        """The Kafka key this event is published with: its key field, else the saga id."""
        if self.event_key is None:
            return saga_id
        return str(getattr(self, self.event_key))


def is_event_type(obj: object) -> bool:
    """True for a concrete (named) Event subclass."""
    return isinstance(obj, type) and issubclass(obj, Event) and "event_name" in vars(obj)


def take_version(candidates: Iterable[type[Event]], name: str, version: int) -> type[Event]:
    """The class among `candidates` that takes a record of `name` at `version`, directly or upcast.

    The oldest class at or above `version` whose upcasters reach back to it wins (an exact
    match needs none). Raises RejectedRecord("unknown-version") naming what is missing.
    """
    versions = sorted((t for t in candidates if t.event_name == name), key=lambda t: t.event_version)
    for event_type in versions:
        if event_type.event_version >= version and event_type.missing_upcaster(version) is None:
            return event_type
    taken = [t.event_version for t in versions]
    target = versions[-1] if versions else None
    if target is not None and version > target.event_version:
        raise RejectedRecord(
            "unknown-version",
            f"{name} v{version}; the handler takes version(s) {taken}: a producer runs a newer release than this "
            "consumer; release consumers first, then replay the letter",
        )
    if target is None or version < 1:
        raise RejectedRecord("unknown-version", f"{name} v{version}; the handler takes version(s) {taken}")
    gap = target.missing_upcaster(version)
    assert gap is not None  # else the loop above would have taken `target`
    raise RejectedRecord(
        "unknown-version",
        f"{name} v{version}; the handler takes version(s) {taken} and no upcaster lifts v{gap} to v{gap + 1}: "
        f"register one with @{target.__qualname__}.upcaster(from_version={gap})",
    )


def describe(event_type: type[Event]) -> str:
    """`OrderCreated (order.created v1)`, for messages."""
    return f"{event_type.__qualname__} ({event_type.event_name} v{event_type.event_version})"


class EventRegistry:
    """Resolves wire names and versions back to event classes; one per service."""

    def __init__(self) -> None:
        self._by_name: dict[str, dict[int, type[Event]]] = {}

    def add(self, event_type: type[Event]) -> None:
        """Register `event_type`; a different class with the same name and version is an error."""
        if not is_event_type(event_type):
            raise SetupError(f"{event_type!r} is not a concrete event: subclass choreo.Event with name= and topic=")
        versions = self._by_name.setdefault(event_type.event_name, {})
        known = versions.get(event_type.event_version)
        if known is not None and known is not event_type:
            raise SetupError(
                f"wire name conflict: {describe(event_type)} is declared by both "
                f"{known.__module__}.{known.__qualname__} and "
                f"{event_type.__module__}.{event_type.__qualname__}; give one of them another name"
            )
        versions[event_type.event_version] = event_type

    def resolve(self, name: str, version: int) -> type[Event] | None:
        """The class for a wire name and version, or None."""
        return self._by_name.get(name, {}).get(version)

    def knows_name(self, name: str) -> bool:
        """True when some version of `name` is registered."""
        return name in self._by_name

    def __iter__(self) -> Iterator[type[Event]]:
        for versions in self._by_name.values():
            yield from versions.values()
