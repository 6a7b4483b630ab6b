"""choreo: choreography sagas for Python services, with a transactional outbox and inbox."""

from importlib.metadata import PackageNotFoundError as _NotInstalled
from importlib.metadata import version as _version

from choreo.cleanup import Retention
from choreo.consumer import RetryPolicy
from choreo.envelope import Envelope
from choreo.events import Event, EventRegistry
from choreo.exceptions import (
    ChoreoError,
    ConfigurationError,
    DependencyUnavailable,
    EventTooLarge,
    KafkaSecurityError,
    RejectedRecord,
    RelayError,
    SetupError,
    UndeclaredEmitError,
    UnitOfWorkError,
)
from choreo.relay import Relay
from choreo.saga import Saga
from choreo.service import Service
from choreo.settings import KafkaSettings
from choreo.tables import metadata
from choreo.tracing import TraceCollector, TraceStore
from choreo.tx import Tx

try:
    __version__ = _version("choreo")
    """The installed distribution's version (pyproject.toml is the one place it is set)."""
except _NotInstalled:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "ChoreoError",
    "ConfigurationError",
    "DependencyUnavailable",
    "Envelope",
    "Event",
    "EventRegistry",
    "EventTooLarge",
    "KafkaSecurityError",
    "KafkaSettings",
    "RejectedRecord",
    "Relay",
    "RelayError",
    "Retention",
    "RetryPolicy",
    "Saga",
    "Service",
    "SetupError",
    "TraceCollector",
    "TraceStore",
    "Tx",
    "UndeclaredEmitError",
    "UnitOfWorkError",
    "metadata",
]
