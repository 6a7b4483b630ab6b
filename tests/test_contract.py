"""`choreo contract`: the exported contract, and the check of each breaking and compatible change."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from choreo import Event, Service, Tx, contract
from choreo.cli import app

DEMO_CONTRACT = Path(__file__).parent.parent / "demo_shop" / "contracts.json"


class Shipment(Event, name="c.shipment", topic="c-ship"):
    """The released version every case below changes."""

    shipment_id: str
    weight: int
    note: str | None = None


class Shipped(Event, name="c.shipped", topic="c-done"):
    shipment_id: str


def shop(shipment: type[Event], *, emitted: bool = True, extra: tuple[type[Event], ...] = ()) -> list[Service]:
    """A sender that emits `shipment` (unless not `emitted`) and a carrier that handles it."""
    sender, carrier = Service("sender"), Service("carrier")
    if emitted:
        sender.declare(shipment)
    sender.declare(*extra)

    async def ship(event: Any, tx: Tx) -> Shipped:
        return Shipped(shipment_id="x")

    ship.__annotations__["event"] = shipment  # the variant this case checks
    carrier.on(shipment)(ship)
    return [sender, carrier]


RELEASED = contract.export(shop(Shipment))


def check(services: list[Service]) -> list[contract.Change]:
    # Through the file format, as the CLI reads it.
    return contract.check(contract.load(contract.dumps(RELEASED)), contract.export(services))


def breaking(services: list[Service]) -> list[str]:
    return [str(c) for c in check(services) if c.breaking]


def test_the_contract_names_each_event_with_its_wire_details_and_parties() -> None:
    entry = RELEASED["events"]["c.shipment"]
    assert {k: v for k, v in entry.items() if k != "schema"} == {
        "version": 1,
        "class": "tests.test_contract.Shipment",
        "topic": "c-ship",
        "key": None,
        "external": False,
        "compensates": [],
        "upcasters_from": [],
        "emitted_by": ["sender (outside handlers) v1"],
        "handled_by": ["carrier.ship v1"],
    }
    assert entry["schema"]["required"] == ["shipment_id", "weight"]
    assert RELEASED["events"]["c.shipped"]["emitted_by"] == ["carrier.ship v1"]


def test_the_unchanged_code_passes() -> None:
    assert check(shop(Shipment)) == []


# -- breaking changes, each with what to do ------------------------------------------------------------


class Removed(Event, name="c.shipment", topic="c-ship"):
    shipment_id: str
    note: str | None = None


class Renamed(Event, name="c.shipment", topic="c-ship"):
    shipment_id: str
    grams: int
    note: str | None = None


class Retyped(Event, name="c.shipment", topic="c-ship"):
    shipment_id: str
    weight: str
    note: str | None = None


class MadeRequired(Event, name="c.shipment", topic="c-ship"):
    shipment_id: str
    weight: int
    note: str


class RequiredAdded(Event, name="c.shipment", topic="c-ship"):
    shipment_id: str
    weight: int
    note: str | None = None
    carrier: str


class Moved(Event, name="c.shipment", topic="c-ship-2"):
    shipment_id: str
    weight: int
    note: str | None = None


class Rekeyed(Event, name="c.shipment", topic="c-ship", key="shipment_id"):
    shipment_id: str
    weight: int
    note: str | None = None


class BumpedAlone(Event, name="c.shipment", topic="c-ship", version=2):
    shipment_id: str
    grams: int


class Upcast(Event, name="c.shipment", topic="c-ship", version=2):
    shipment_id: str
    grams: int
    note: str | None = None


@Upcast.upcaster(from_version=1)
def weight_to_grams(payload: dict[str, Any]) -> dict[str, Any]:
    return {**payload, "grams": payload["weight"]}


UPCASTER = "declare version=2 on {cls} and register @{cls}.upcaster(from_version=1)"


@pytest.mark.parametrize(
    ("services", "expected"),
    [
        (shop(Removed), ["field 'weight' removed: old records carry it", UPCASTER]),
        (shop(Renamed), ["field 'weight' removed (renamed to 'grams'?)", "required field 'grams' added", UPCASTER]),
        (shop(Retyped), ['field \'weight\' changed type from {"type": "integer"} to {"type": "string"}']),
        (shop(MadeRequired), ["field 'note' made required: old records without it would be dead-lettered"]),
        (shop(RequiredAdded), ["required field 'carrier' added: old records lack it", UPCASTER]),
        (shop(Moved), ["topic changed from 'c-ship' to 'c-ship-2'", "Publish a new event (a new wire name)"]),
        (shop(Rekeyed), ["key changed from None to 'shipment_id'"]),
        (shop(BumpedAlone), ["version v1 → v2 without an upcaster from v1", "@BumpedAlone.upcaster(from_version=1)"]),
        (shop(Shipment, emitted=False), ["nothing emits it any more, but carrier.ship v1 still handle(s) it"]),
    ],
    ids=["removed", "renamed", "type", "made-required", "required-added", "topic", "key", "version", "unemitted"],
)
def test_each_breaking_change_fails_with_an_explanation(services: list[Service], expected: list[str]) -> None:
    (problem,) = [p for p in breaking(services) if expected[0] in p]
    assert problem.startswith("c.shipment: ")
    cls = services[1].handlers[0].event_types[0].__name__
    for text in expected[1:]:
        assert text.format(cls=cls) in " ".join(breaking(services))


def test_a_wire_name_removed_while_the_release_handles_it_is_breaking() -> None:
    sender = Service("sender")
    sender.declare(Shipped)
    (problem,) = breaking([sender])
    assert problem.startswith("c.shipment: no longer in the code, but carrier.ship v1 handled it")
    assert "Keep emitting it until they are gone" in problem


# -- compatible changes ---------------------------------------------------------------------------


class OptionalAdded(Event, name="c.shipment", topic="c-ship"):
    shipment_id: str
    weight: int
    note: str | None = None
    fragile: bool = False


class Label(Event, name="c.label", topic="c-ship"):
    shipment_id: str


def test_compatible_changes_pass_and_are_listed() -> None:
    assert [(str(c), c.breaking) for c in check(shop(OptionalAdded))] == [
        ("c.shipment: optional field 'fragile' added", False)
    ]
    assert [(str(c), c.breaking) for c in check(shop(Shipment, extra=(Label,)))] == [("c.label: new event", False)]
    (upcast,) = check(shop(Upcast))
    assert (str(upcast), upcast.breaking) == ("c.shipment: new version v2, upcast from v1", False)


# -- the command, and the demo shop's committed contract -------------------------------------------


def invoke(*args: str) -> Any:
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200", "CHOREO_DEBUG": ""})


def test_the_demo_shop_code_matches_its_committed_contract() -> None:
    result = invoke("contract", "check", "demo_shop", "--against", str(DEMO_CONTRACT))
    assert result.exit_code == 0, result.output
    assert "✓ choreo contract check: compatible with" in result.output
    exported = invoke("contract", "export", "demo_shop")
    assert exported.exit_code == 0
    assert json.loads(exported.output) == json.loads(DEMO_CONTRACT.read_text()), "re-export demo_shop/contracts.json"


def test_a_breaking_edit_of_the_demo_events_fails_the_check_saying_what_to_do(tmp_path: Path) -> None:
    # The released contract had a field the code no longer has: as if it was deleted from events.py.
    released = json.loads(DEMO_CONTRACT.read_text())
    created = released["events"]["order.created"]
    created["schema"]["properties"]["gift_note"] = {"type": "string"}
    stored = tmp_path / "contracts.json"
    stored.write_text(json.dumps(released))
    result = invoke("contract", "check", "demo_shop", "--against", str(stored))
    assert result.exit_code == 1
    version = created["version"]
    assert "✗ order.created: field 'gift_note' removed: old records carry it" in result.output
    assert f"declare version={version + 1} on OrderCreated and register @OrderCreated.upcaster(" in result.output
    assert "1 breaking change(s)" in result.output


def test_check_without_a_contract_file_is_a_one_line_error(tmp_path: Path) -> None:
    result = invoke("contract", "check", "demo_shop", "--against", str(tmp_path / "nope.json"))
    assert result.exit_code == 2
    assert "no contract at" in result.output and "choreo contract export" in result.output
