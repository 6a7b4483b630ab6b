"""OpenTelemetry: one span per handler run, parented hop to hop through the `traceparent` header."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from choreo import otel
from choreo.tracing import TraceStore
from tests.test_tracing import collector_for, settle_due, toy_in
from tests.toy3 import place, traced_in_memory


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    otel.instrument(tracer_provider=provider)
    try:
        yield exporter
    finally:
        otel.uninstrument()
        provider.shutdown()


def by_name(finished: tuple[ReadableSpan, ...]) -> dict[str, list[ReadableSpan]]:
    found: dict[str, list[ReadableSpan]] = {}
    for span in finished:
        found.setdefault(span.name, []).append(span)
    return found


async def test_a_saga_started_in_a_span_is_one_trace_across_services(
    tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    toy = toy_in(tmp_path)
    collector = collector_for(toy, tmp_path)
    provider_tracer = otel._state.tracer
    async with traced_in_memory(collector, *toy.services):
        with provider_tracer.start_as_current_span("checkout") as checkout:
            saga_id = await place(toy.orders, "ok-1", 40)
        await settle_due(toy)
    named = by_name(spans.get_finished_spans())
    (root,) = named["checkout"]
    (reserve,) = named["choreo.handle stock.reserve"]
    (charge,) = named["choreo.handle payments.charge"]
    (confirm,) = named["choreo.handle orders.confirm"]
    trace_id = checkout.get_span_context().trace_id
    assert {s.context.trace_id for s in (root, reserve, charge, confirm)} == {trace_id}
    assert reserve.parent is not None and reserve.parent.span_id == root.context.span_id
    assert charge.parent is not None and charge.parent.span_id == reserve.context.span_id
    assert confirm.parent is not None and confirm.parent.span_id == charge.context.span_id
    assert reserve.kind is SpanKind.CONSUMER
    attributes = dict(reserve.attributes or {})
    assert attributes["choreo.saga_id"] == saga_id
    assert attributes["choreo.event_type"] == "t3.order_placed"
    assert attributes["choreo.service"] == "stock"
    assert attributes["choreo.handler"] == "stock.reserve"
    async with TraceStore(collector.store.url) as store:
        records = {r.event_type: r for r in await store.records(saga_id)}
    # The collector keeps each event's traceparent: the trace of a saga points at its spans.
    traceparent = records["t3.stock_reserved"].traceparent
    assert traceparent is not None
    assert traceparent.startswith(f"00-{trace_id:032x}-{reserve.context.span_id:016x}-")
    assert attributes["choreo.event_id"] == records["t3.order_placed"].event_id


async def test_a_failing_handler_records_its_error_on_each_attempt(tmp_path: Path, spans: InMemorySpanExporter) -> None:
    toy = toy_in(tmp_path)
    async with traced_in_memory(collector_for(toy, tmp_path), *toy.services):
        await place(toy.orders, "boom-1", 10)
        await settle_due(toy)
    attempts = by_name(spans.get_finished_spans())["choreo.handle payments.charge"]
    assert len(attempts) == 2
    assert all(span.status.status_code is StatusCode.ERROR for span in attempts)
    assert all(span.events and span.events[0].name == "exception" for span in attempts)


async def test_without_instrumentation_nothing_is_traced(tmp_path: Path) -> None:
    otel.uninstrument()
    toy = toy_in(tmp_path)
    collector = collector_for(toy, tmp_path)
    async with traced_in_memory(collector, *toy.services):
        saga_id = await place(toy.orders, "ok-1", 40)
        await settle_due(toy)
    async with TraceStore(collector.store.url) as store:
        assert {r.traceparent for r in await store.records(saga_id)} == {None}
    assert otel.current_traceparent() is None


def test_the_environment_switches_it_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHOREO_OTEL", "1")
    monkeypatch.setattr(otel, "_state", otel._State())
    assert otel.enabled()
    monkeypatch.setattr(otel, "_state", otel._State())
    monkeypatch.setenv("CHOREO_OTEL", "0")
    assert not otel.enabled()
