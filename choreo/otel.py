"""OpenTelemetry spans for handler runs, linked hop to hop by the W3C `traceparent` header.

Optional: install the `otel` extra (`pip install 'choreo[otel]'`), then either call
`choreo.otel.instrument()` or set `CHOREO_OTEL=1`. Each handler run becomes a span
`choreo.handle <handler>` (kind CONSUMER) whose parent is the span that emitted the consumed
event; every event emitted in the run carries the run's span as its `traceparent`. A saga
started inside a span (e.g. an instrumented HTTP request) therefore becomes one distributed
trace across all services. Without the extra, or when disabled, the hooks cost one flag check.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from choreo.envelope import TRACEPARENT, Envelope
from choreo.exceptions import ConfigurationError

try:
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    AVAILABLE = True
    """True when the OpenTelemetry API is importable."""
except ImportError:  # the otel extra is not installed: every hook stays a no-op
    AVAILABLE = False

log = logging.getLogger("choreo.otel")

ENV = "CHOREO_OTEL"
SPAN_PREFIX = "choreo.handle "


@dataclass
class _State:
    tracer: Any = None
    propagator: Any = None
    env_checked: bool = False


_state = _State()


def instrument(tracer_provider: Any = None) -> None:
    """Turn spans and `traceparent` propagation on (`tracer_provider` defaults to the global one)."""
    if not AVAILABLE:
        raise ConfigurationError(
            "OpenTelemetry is not installed: pip install 'choreo[otel]' (opentelemetry-api and -sdk)"
        )
    _state.tracer = trace.get_tracer("choreo", tracer_provider=tracer_provider)
    _state.propagator = TraceContextTextMapPropagator()
    _state.env_checked = True


def uninstrument() -> None:
    """Turn spans and propagation off again."""
    _state.tracer = None
    _state.propagator = None
    _state.env_checked = True


def enabled() -> bool:
    """True when choreo records spans (after `instrument()`, or with `CHOREO_OTEL=1`)."""
    if not _state.env_checked:
        _state.env_checked = True
        if os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes", "on"):
            if AVAILABLE:
                instrument()
            else:
                log.warning("%s is set but OpenTelemetry is not installed: pip install 'choreo[otel]'", ENV)
    return _state.tracer is not None


def current_traceparent() -> str | None:
    """The `traceparent` of the active span, for an event emitted now; None when off or no span."""
    if not enabled():
        return None
    carrier: dict[str, str] = {}
    _state.propagator.inject(carrier)
    return carrier.get(TRACEPARENT)


def handler_span(service: str, handler: str, envelope: Envelope) -> contextlib.AbstractAsyncContextManager[None]:
    """`async with handler_span(...)`: the span of one handler run (a no-op when off)."""
    if not enabled():
        return contextlib.nullcontext()
    return _span(service, handler, envelope)


@contextlib.asynccontextmanager
async def _span(service: str, handler: str, envelope: Envelope) -> AsyncIterator[None]:
    # The parent comes from the consumed event only, never from whatever context the consumer
    # task happens to run in: a hop's span must descend from the span that emitted its event.
    carrier = {TRACEPARENT: envelope.traceparent} if envelope.traceparent else {}
    parent = _state.propagator.extract(carrier)
    attributes = {
        "choreo.saga_id": envelope.saga_id,
        "choreo.event_type": envelope.event_type,
        "choreo.event_version": envelope.event_version,
        "choreo.event_id": envelope.event_id,
        "choreo.service": service,
        "choreo.handler": handler,
        "messaging.system": "kafka",
        "messaging.operation.type": "process",
    }
    if envelope.causation_id:
        attributes["choreo.causation_id"] = envelope.causation_id
    span = _state.tracer.start_span(
        SPAN_PREFIX + handler, context=parent, kind=trace.SpanKind.CONSUMER, attributes=attributes
    )
    token = otel_context.attach(trace.set_span_in_context(span, parent))
    try:
        yield
    except BaseException as error:
        span.record_exception(error)
        span.set_status(trace.Status(trace.StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        raise
    finally:
        otel_context.detach(token)
        span.end()
