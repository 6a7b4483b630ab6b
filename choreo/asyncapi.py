"""The choreography as an AsyncAPI 3.0 document: `choreo asyncapi demo_shop --format yaml`.

Channels are the Kafka topics, messages the events (their JSON schema as the payload, the
envelope's Kafka headers as the message headers, the saga id as the correlation id), and
operations what each service sends (per topic) and each handler receives.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic.json_schema import models_json_schema

from choreo import envelope
from choreo.events import Event
from choreo.graph import Choreography
from choreo.service import Service

ASYNCAPI_VERSION = "3.0.0"
KAFKA_BINDING = "0.5.0"
_REF = "#/components/schemas/{model}"


def envelope_headers(event_type: type[Event]) -> dict[str, Any]:
    """The Kafka headers of `event_type`'s records, as a JSON schema (see choreo.envelope)."""

    def text(description: str, **extra: Any) -> dict[str, Any]:
        return {"type": "string", "description": description, **extra}

    return {
        "type": "object",
        "required": [envelope.EVENT_ID, envelope.EVENT_TYPE, envelope.EVENT_VERSION, envelope.SAGA_ID],
        "properties": {
            envelope.EVENT_ID: text("Unique id of this event: consumers deduplicate on it."),
            envelope.EVENT_TYPE: text("The wire name.", const=event_type.event_name),
            envelope.EVENT_VERSION: text(
                "The version of the payload; older ones are upcast by consumers.", const=str(event_type.event_version)
            ),
            envelope.SAGA_ID: text("The saga (correlation) id; also the Kafka key unless the event names one."),
            envelope.CAUSATION_ID: text("The id of the event whose handler emitted this one."),
            envelope.PRODUCER: text("The service that emitted it."),
            envelope.HANDLER: text("The handler that emitted it (service.function)."),
            envelope.OCCURRED_AT: text("When it was emitted (ISO 8601).", format="date-time"),
            envelope.TRACEPARENT: text("W3C trace context, when OpenTelemetry is on."),
            envelope.CAUSE_UPCAST: text("`v1→v3` when the emitting handler took its cause upcast."),
        },
    }


def document(services: Iterable[Service], *, title: str = "choreography", version: str = "0.0.0") -> dict[str, Any]:
    """The AsyncAPI 3.0 document of `services`, as a JSON-ready dict."""
    choreography = Choreography(services)
    events = sorted(choreography.events, key=lambda t: (t.event_name, t.event_version))
    refs, defs = models_json_schema([(t, "validation") for t in events], ref_template=_REF)
    message_id = {t: _message_id(t, events) for t in events}
    messages: dict[str, Any] = {}
    channels: dict[str, Any] = {}
    for event_type in events:
        key = event_type.event_key
        messages[message_id[event_type]] = {
            "name": event_type.event_name,
            "title": f"{event_type.__qualname__} (v{event_type.event_version})",
            "summary": (event_type.__doc__ or "").strip().split("\n")[0] or event_type.event_name,
            "contentType": "application/json",
            "headers": envelope_headers(event_type),
            "payload": refs[(event_type, "validation")],
            "correlationId": {"location": f"$message.header#/{envelope.SAGA_ID}"},
            "bindings": {
                "kafka": {
                    "key": {
                        "type": "string",
                        "description": f"the {key!r} field" if key else "the saga id",
                    },
                    "bindingVersion": KAFKA_BINDING,
                }
            },
            "x-choreo-version": event_type.event_version,
            "x-choreo-compensates": sorted(t.event_name for t in event_type.compensates),
            "x-choreo-external": event_type.event_external,
        }
        channel = channels.setdefault(
            event_type.event_topic,
            {
                "address": event_type.event_topic,
                "messages": {},
                "bindings": {"kafka": {"topic": event_type.event_topic, "bindingVersion": KAFKA_BINDING}},
            },
        )
        channel["messages"][message_id[event_type]] = {"$ref": f"#/components/messages/{message_id[event_type]}"}

    def on_channel(event_types: Iterable[type[Event]]) -> list[dict[str, str]]:
        return [{"$ref": f"#/channels/{t.event_topic}/messages/{message_id[t]}"} for t in event_types]

    operations: dict[str, Any] = {}
    for service in choreography.services:
        sent: dict[str, list[type[Event]]] = {}
        for event_type in events:
            if any(e.service == service.name for e in choreography.emitters.get(event_type, [])):
                sent.setdefault(event_type.event_topic, []).append(event_type)
        for topic, sent_types in sorted(sent.items()):
            operations[f"{service.name}.send.{topic}"] = {
                "action": "send",
                "channel": {"$ref": f"#/channels/{topic}"},
                "summary": f"{service.name} publishes on {topic} (from its outbox)",
                "messages": on_channel(sent_types),
            }
        for handler in service.handlers:
            for topic in sorted({t.event_topic for t in handler.event_types}):
                taken = [t for t in handler.event_types if t.event_topic == topic]
                suffix = "" if len({t.event_topic for t in handler.event_types}) == 1 else f".{topic}"
                operations[f"{handler.name}{suffix}"] = {
                    "action": "receive",
                    "channel": {"$ref": f"#/channels/{topic}"},
                    "summary": f"{handler.name} handles {', '.join(t.event_name for t in taken)}",
                    "messages": on_channel(taken),
                    "x-choreo-emits": sorted(f"{t.event_name} v{t.event_version}" for t in handler.emits),
                }
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": title,
            "version": version,
            "description": "Events of a choreography (generated by `choreo asyncapi`). Each Kafka record's value is "
            "the event's JSON; its headers carry the envelope.",
        },
        "defaultContentType": "application/json",
        "channels": dict(sorted(channels.items())),
        "operations": operations,
        "components": {"messages": messages, "schemas": defs.get("$defs", {})},
    }


def _message_id(event_type: type[Event], events: list[type[Event]]) -> str:
    # Versions of one wire name share it; when the code holds several, each gets its own.
    several = sum(1 for t in events if t.event_name == event_type.event_name) > 1
    return f"{event_type.event_name}.v{event_type.event_version}" if several else event_type.event_name
