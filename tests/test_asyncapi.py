"""`choreo asyncapi`: the demo shop's choreography as an AsyncAPI 3.0 document, valid against the spec's schema."""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from typer.testing import CliRunner

from choreo.cli import app

SCHEMA = Path(__file__).parent / "data" / "asyncapi-3.0.0.json"  # from @asyncapi/specs, see data/README.md


@cache
def validator() -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(json.loads(SCHEMA.read_text()))


def generate(*args: str) -> str:
    result = CliRunner().invoke(app, ["asyncapi", "demo_shop", *args], env={"CHOREO_DEBUG": ""})
    assert result.exit_code == 0, result.output
    return result.output


@cache
def demo_document() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(generate("--format", "json"))
    return document


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"]
        for value in node.values():
            yield from refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from refs(item)


def resolve(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = document
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def test_the_document_is_valid_asyncapi_3() -> None:
    errors = sorted(validator().iter_errors(demo_document()), key=str)
    assert errors == [], "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors[:5])


def test_the_schema_rejects_a_broken_document() -> None:
    # The validation above can fail: an operation without its action is not AsyncAPI.
    broken = json.loads(json.dumps(demo_document()))
    del broken["operations"]["customers.reserve_credit"]["action"]
    assert not validator().is_valid(broken)


def test_every_reference_resolves_inside_the_document() -> None:
    document = demo_document()
    for ref in set(refs(document)):
        assert resolve(document, ref) is not None


def test_yaml_and_json_are_the_same_document() -> None:
    assert yaml.safe_load(generate()) == demo_document()


def test_channels_are_topics_messages_are_events_and_operations_are_who_sends_and_receives() -> None:
    document = demo_document()
    assert sorted(document["channels"]) == ["customers", "orders", "payments"]
    created = document["components"]["messages"]["order.created"]
    assert created["name"] == "order.created"
    assert created["headers"]["properties"]["choreo-event-type"]["const"] == "order.created"
    assert set(created["headers"]["required"]) == {
        "choreo-event-id",
        "choreo-event-type",
        "choreo-event-version",
        "choreo-saga-id",
    }
    assert created["correlationId"] == {"location": "$message.header#/choreo-saga-id"}
    payload = resolve(document, created["payload"]["$ref"])
    assert {"order_id", "customer_id", "total"} <= set(payload["properties"])
    assert document["operations"]["customers.reserve_credit"]["action"] == "receive"
    assert document["operations"]["customers.reserve_credit"]["messages"] == [
        {"$ref": "#/channels/orders/messages/order.created"}
    ]
    sends = document["operations"]["orders.send.orders"]
    assert sends["action"] == "send"
    assert {"$ref": "#/channels/orders/messages/order.created"} in sends["messages"]
    released = document["components"]["messages"]["credit.released"]
    assert released["x-choreo-compensates"] == ["credit.reserved"]


@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_the_title_and_version_are_options(fmt: str) -> None:
    text = generate("--format", fmt, "--title", "Demo shop", "--doc-version", "2.1.0")
    info = (json.loads(text) if fmt == "json" else yaml.safe_load(text))["info"]
    assert (info["title"], info["version"]) == ("Demo shop", "2.1.0")
