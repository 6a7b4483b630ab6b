"""Events: pydantic models with a stable wire name, a version and a topic.

    class OrderCreated(Event, name="order.created", topic="orders"):
        order_id: str
        total: Decimal

The wire name, not the Python path, identifies an event between services, so classes can be
renamed or moved freely. Fields may grow; consumers ignore fields they do not know.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from choreo.exceptions import SetupError

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

    def kafka_key(self, saga_id: str) -> str:
        """The Kafka key this event is published with: its key field, else the saga id."""
        if self.event_key is None:
            return saga_id
        return str(getattr(self, self.event_key))


def is_event_type(obj: object) -> bool:
    """True for a concrete (named) Event subclass."""
    return isinstance(obj, type) and issubclass(obj, Event) and "event_name" in vars(obj)


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
