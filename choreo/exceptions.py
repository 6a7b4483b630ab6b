"""The one exception tree of choreo.

ChoreoError
├── SetupError (also ValueError)        a service, handler or event is declared wrongly
│   └── ConfigurationError              settings or environment cannot be used
├── UndeclaredEmitError (also TypeError) a handler emitted an event it did not declare
├── UnitOfWorkError (also RuntimeError)  code inside a unit of work committed or rolled back its session
├── RejectedRecord                       a consumed record can never be processed (dead letter)
├── RelayError                           the relay cannot publish (retried, never raised to users)
└── KafkaSecurityError                   the broker refused the connection's TLS or SASL settings
"""

from __future__ import annotations


class ChoreoError(Exception):
    """Root of every error choreo raises."""


class SetupError(ChoreoError, ValueError):
    """A service, handler, event or saga is declared wrongly; raised at import or start time."""


class ConfigurationError(SetupError):
    """A setting (argument or environment variable) is missing or malformed."""


class UndeclaredEmitError(ChoreoError, TypeError):
    """A handler emitted an event type it did not declare in its return annotation or `emits=`."""


class UnitOfWorkError(ChoreoError, RuntimeError):
    """Code inside a unit of work tried to end its transaction; choreo commits it, whole, at the end."""


class RejectedRecord(ChoreoError):
    """A consumed record is undecodable, invalid or unknown: it is dead-lettered at once."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class RelayError(ChoreoError):
    """Publishing outbox rows failed; the relay retries with backoff."""


class KafkaSecurityError(ChoreoError):
    """A Kafka broker refused the TLS or SASL settings (login, certificate, protocol); the message names the fix."""
