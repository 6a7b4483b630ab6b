"""The one exception tree of choreo.

ChoreoError
├── SetupError (also ValueError)        a service, handler or event is declared wrongly
│   └── ConfigurationError              settings or environment cannot be used
├── UndeclaredEmitError (also TypeError) a handler emitted an event it did not declare
├── UnitOfWorkError (also RuntimeError)  code inside a unit of work committed or rolled back its session
├── EventTooLarge (also ValueError)      an emitted event is larger than Kafka accepts
├── RejectedRecord                       a consumed record can never be processed (dead letter)
├── HandlerFailed                        (internal) an exception out of handler code, whatever its type
├── DependencyUnavailable                the database or Kafka did not answer within the start timeout
│   └── KafkaSecurityError               the broker refused the connection's TLS or SASL settings
└── RelayError                           the relay cannot publish (retried, never raised to users)
    ├── NotSent                          held back behind a failed row of its key (retried)
    └── Unpublishable                    Kafka refuses an outbox row for good (dead letter)
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


class EventTooLarge(ChoreoError, ValueError):
    """An emitted event, as a Kafka record, exceeds the producer's `max_request_size`."""


class RejectedRecord(ChoreoError):
    """A consumed record is undecodable, invalid or unknown: it is dead-lettered at once."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class HandlerFailed(ChoreoError):
    """Internal: wraps an exception that escaped handler code, so its type cannot pass it off as an
    infrastructure failure (a handler's own TimeoutError or OSError is retried, then dead-lettered)."""

    def __init__(self, error: Exception) -> None:
        super().__init__(f"{type(error).__name__}: {error}")
        self.error = error


class DependencyUnavailable(ChoreoError):
    """The database or Kafka stayed unreachable for the whole start timeout (`CHOREO_START_TIMEOUT`)."""


class KafkaSecurityError(DependencyUnavailable):
    """A Kafka broker refused the TLS or SASL settings (login, certificate, protocol); the message names the fix."""


class RelayError(ChoreoError):
    """Publishing outbox rows failed; the relay retries with backoff."""


class NotSent(RelayError):
    """An outbox row was not handed to Kafka because an earlier row of its key failed."""


class Unpublishable(RelayError):
    """Kafka refuses an outbox row in a way no retry can cure (too large, topic invalid or
    forbidden): the relay parks it as a dead letter and moves on to the key's next row."""
