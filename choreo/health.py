"""Liveness, readiness and metrics of a running service, in Prometheus' text format.

Frameworks stay outside choreo: an HTTP app serves `await metrics(service)` as
`text/plain; version=0.0.4` and `await readiness(service)` as JSON.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select, text

from choreo import outbox
from choreo.envelope import utcnow
from choreo.exceptions import SetupError
from choreo.service import Service
from choreo.tables import dead_letter_table

_letters = dead_letter_table


async def readiness(service: Service) -> dict[str, Any]:
    """`ready` is true when the database answers and the service runs; details per check."""
    checks: dict[str, Any] = {"started": service.consumer is not None}
    try:
        dead = service.transport.dead_consumers()
    except SetupError:  # not started
        dead = {}
    checks["consumer"] = "; ".join(f"{group} stopped ({why})" for group, why in dead.items()) or "ok"
    try:
        async with service.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as error:
        checks["database"] = f"{type(error).__name__}: {error}"
    relay = service.relay
    checks["relay"] = "off" if relay is None else ("leader" if relay.stats.is_leader else "standby")
    if relay is not None and relay.stats.last_error:
        checks["relay_last_error"] = relay.stats.last_error
    ready = checks["started"] and checks["database"] == "ok" and not dead
    return {"ready": ready, "service": service.name, "checks": checks}


async def metrics(service: Service) -> str:
    """Prometheus exposition of the outbox backlog, relay and consumer counters."""
    async with service.engine.connect() as conn:
        backlog, oldest = await outbox.backlog(conn, utcnow())
        parked = await conn.scalar(select(func.count()).where(_letters.c.status == "parked"))
    age = (utcnow() - oldest).total_seconds() if oldest is not None else 0.0
    label = f'service="{service.name}"'
    lines = [
        ("choreo_outbox_backlog", "gauge", "Unpublished outbox rows that are due.", backlog),
        ("choreo_outbox_oldest_age_seconds", "gauge", "How long the oldest due unpublished row has been due.", age),
        ("choreo_dead_letters_parked", "gauge", "Dead letters waiting for replay or discard.", parked or 0),
    ]
    relay = service.relay
    if relay is not None:
        lines += [
            ("choreo_relay_published_total", "counter", "Outbox rows published.", relay.stats.published),
            ("choreo_relay_failures_total", "counter", "Relay failures (retried).", relay.stats.failures),
            ("choreo_relay_parked_total", "counter", "Outbox rows Kafka refused for good, parked.", relay.stats.parked),
            ("choreo_relay_leader", "gauge", "1 when this relay publishes.", int(relay.stats.is_leader)),
        ]
    consumer = service.consumer
    if consumer is not None:
        stats = consumer.stats
        lines += [
            ("choreo_handled_total", "counter", "Records processed by a handler.", stats.handled),
            ("choreo_duplicates_total", "counter", "Redelivered records absorbed by the inbox.", stats.duplicates),
            ("choreo_retried_total", "counter", "Handler failures retried.", stats.retried),
            ("choreo_transient_retries_total", "counter", "Infrastructure failures retried.", stats.transient_retries),
            ("choreo_dead_lettered_total", "counter", "Records dead-lettered.", stats.dead_lettered),
            ("choreo_unknown_total", "counter", "Records of event types this service does not know.", stats.unknown),
        ]
    out = []
    for name, kind, help_text, value in lines:
        out += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name}{{{label}}} {value}"]
    lags = await service.transport.lag() if service.consumer is not None else {}
    if lags:
        out += ["# HELP choreo_consumer_lag Records not yet consumed.", "# TYPE choreo_consumer_lag gauge"]
        for where, lag in sorted(lags.items()):
            topic, partition = where.rsplit("/", 1)
            out.append(f'choreo_consumer_lag{{{label},topic="{topic}",partition="{partition}"}} {lag}')
    return "\n".join(out) + "\n"
