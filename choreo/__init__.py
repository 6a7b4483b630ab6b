"""choreo: choreography sagas for Python services, with a transactional outbox and inbox."""

from choreo.cleanup import Retention
from choreo.consumer import RetryPolicy
from choreo.envelope import Envelope
from choreo.events import Event, EventRegistry
from choreo.exceptions import (
    ChoreoError,
    ConfigurationError,
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

__all__ = [
    "ChoreoError",
    "ConfigurationError",
    "Envelope",
    "Event",
    "EventRegistry",
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
