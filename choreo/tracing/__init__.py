"""Saga tracing: collect every choreo record by saga id, then rebuild each saga as a causal tree.

    collector = TraceCollector([orders, customers, payments], "sqlite+aiosqlite:///trace.db")
    async with collector.running():
        ...
    store = TraceStore("sqlite+aiosqlite:///trace.db")
    trace = await store.trace(saga_id)      # SagaTrace: roots, state, ended_by, stopped_at

The collector is a consumer group of its own (`choreo-trace`) on the topics of the services it
is given and on their dead-letter topics. It indexes the envelope headers of each record, never
the payload, in a database of its own. The headers suffice: the saga id groups the records, the
causation id links each event to the one its handler consumed, and a dead letter carries the
headers of the event it failed on. `choreo trace`, `choreo sagas` and anything embedding a
`TraceStore` read that index.

The package holds three concepts: `model` (traced events, declarations, the causal tree),
`store` (the index and its summaries), `collector` (the consumer that fills it); the CLI and the
saga explorer (`choreo.explorer`) are two renderers over the same model.
"""

from __future__ import annotations

from choreo.tracing.collector import (
    DEFAULT_GROUP_ID,
    CollectorStats,
    TraceCollector,
    index_record,
)
from choreo.tracing.model import (
    DEAD_LETTER,
    EVENT,
    Hop,
    SagaDeclaration,
    SagaState,
    SagaTrace,
    TracedEvent,
    build_trace,
    compensations_of,
    declarations_of,
    service_of,
)
from choreo.tracing.store import (
    DATABASE_URL_ENV,
    DEFAULT_DATABASE_URL,
    MIN_PREFIX,
    SagaSummary,
    TraceStore,
    default_database_url,
    events_table,
    sagas_table,
    summaries_table,
    summary_services_table,
    trace_metadata,
)

__all__ = [
    "DATABASE_URL_ENV",
    "DEAD_LETTER",
    "DEFAULT_DATABASE_URL",
    "DEFAULT_GROUP_ID",
    "EVENT",
    "MIN_PREFIX",
    "CollectorStats",
    "Hop",
    "SagaDeclaration",
    "SagaState",
    "SagaSummary",
    "SagaTrace",
    "TraceCollector",
    "TraceStore",
    "TracedEvent",
    "build_trace",
    "compensations_of",
    "declarations_of",
    "default_database_url",
    "events_table",
    "index_record",
    "sagas_table",
    "service_of",
    "summaries_table",
    "summary_services_table",
    "trace_metadata",
]
