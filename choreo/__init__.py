"""choreo: choreography sagas for Python services, with a transactional outbox and inbox."""

from choreo.consumer import RetryPolicy
from choreo.envelope import Envelope
from choreo.events import Event, EventRegistry
from choreo.exceptions import (
    ChoreoError,
    ConfigurationError,
    RejectedRecord,
    RelayError,
    SetupError,
    UndeclaredEmitError,
)
from choreo.relay import Relay
from choreo.service import Service
from choreo.settings import KafkaSettings
from choreo.tables import metadata
from choreo.tx import Tx

__all__ = [
    "ChoreoError",
    "ConfigurationError",
    "Envelope",
    "Event",
    "EventRegistry",
    "KafkaSettings",
    "RejectedRecord",
    "Relay",
    "RelayError",
    "RetryPolicy",
    "Service",
    "SetupError",
    "Tx",
    "UndeclaredEmitError",
    "metadata",
]
