"""The one exception tree of choreo.

ChoreoError
├── SetupError (also ValueError)        a service, handler or event is declared wrongly
│   └── ConfigurationError              settings or environment cannot be used
├── UndeclaredEmitError (also TypeError) a handler emitted an event it did not declare
├── EventTooLarge (also ValueError)      an emitted event is larger than Kafka accepts
├── RejectedRecord                       a consumed record can never be processed (dead letter)
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


class EventTooLarge(ChoreoError, ValueError):
    """An emitted event, as a Kafka record, exceeds the producer's `max_request_size`."""


class RejectedRecord(ChoreoError):
    """A consumed record is undecodable, invalid or unknown: it is dead-lettered at once."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class RelayError(ChoreoError):
    """Publishing outbox rows failed; the relay retries with backoff."""


class NotSent(RelayError):
    """An outbox row was not handed to Kafka because an earlier row of its key failed."""


class Unpublishable(RelayError):
    """Kafka refuses an outbox row in a way no retry can cure (too large, topic invalid or
    forbidden): the relay parks it as a dead letter and moves on to the key's next row."""
