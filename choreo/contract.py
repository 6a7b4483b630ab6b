"""The event contract of a choreography, and the check that a code change keeps it.

`export()` describes every event the services emit or handle: wire name, version, topic, key,
JSON schema, compensation link, external flag, and who emits and handles it. `check()`
compares the code with a contract exported at the last release and lists every change that
would break a consumer or a producer still running that release:

- compatible: a new event; a new optional field (consumers ignore what they do not know, old
  records validate because the field has a default);
- breaking unless the event gets a new version and an upcaster from each older version: a
  field removed or renamed, a field's type changed, a field made required (or a required field
  added);
- always breaking: a changed topic or key (consumers subscribe by topic, and per-key order
  lives in one partition), a version going back, and a wire name that nothing emits any more
  while a handler still waits for it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from choreo.events import Event
from choreo.exceptions import ConfigurationError
from choreo.graph import Choreography
from choreo.service import Service

FORMAT = 1
"""The version of the contract file's own layout."""

_DOC_KEYS = frozenset({"title", "description", "examples", "default"})


def export(services: Iterable[Service]) -> dict[str, Any]:
    """The contract of `services` as a JSON-ready dict (sorted, so the file diffs well)."""
    choreography = Choreography(services)
    by_name: dict[str, list[type[Event]]] = {}
    for event_type in choreography.events:
        by_name.setdefault(event_type.event_name, []).append(event_type)
    events: dict[str, Any] = {}
    for name in sorted(by_name):
        versions = sorted(by_name[name], key=lambda t: t.event_version)
        current = versions[-1]
        events[name] = {
            "version": current.event_version,
            "class": f"{current.__module__}.{current.__qualname__}",
            "topic": current.event_topic,
            "key": current.event_key,
            "external": current.event_external,
            "compensates": sorted(t.event_name for t in current.compensates),
            "upcasters_from": sorted(current.event_upcasters),
            "emitted_by": sorted(
                {f"{e.label} v{t.event_version}" for t in versions for e in choreography.emitters.get(t, [])}
            ),
            "handled_by": sorted(
                {f"{h.name} v{t.event_version}" for t in versions for _, h in choreography.consumers.get(t, [])}
            ),
            "schema": current.model_json_schema(),
        }
    return {"choreo_contract": FORMAT, "events": events}


def dumps(contract: Mapping[str, Any]) -> str:
    """The contract as the text of `contracts.json`."""
    return json.dumps(contract, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def load(text: str, source: str = "contract") -> dict[str, Any]:
    """Parse a stored contract; a file that is not one is a ConfigurationError."""
    try:
        contract = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigurationError(f"{source} is not JSON ({error}); write it with `choreo contract export`") from None
    if not isinstance(contract, dict) or contract.get("choreo_contract") != FORMAT:
        raise ConfigurationError(f"{source} is not a choreo contract (format {FORMAT}); `choreo contract export`")
    return contract


@dataclass(frozen=True)
class Change:
    """One difference between the stored contract and the code; `breaking` ones fail the check."""

    event: str
    message: str
    breaking: bool

    def __str__(self) -> str:
        return f"{self.event}: {self.message}"


def check(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[Change]:
    """Every change from the `stored` contract to the `current` one, breaking ones first."""
    changes: list[Change] = []
    old_events: Mapping[str, Any] = stored["events"]
    new_events: Mapping[str, Any] = current["events"]
    for name in sorted(set(new_events) - set(old_events)):
        changes.append(Change(name, "new event", breaking=False))
    for name in sorted(old_events):
        old, new = old_events[name], new_events.get(name)
        if new is None:
            if old["handled_by"]:
                changes.append(Change(name, _removed(old["handled_by"]), breaking=True))
            else:
                changes.append(Change(name, "removed (nothing handled it)", breaking=False))
            continue
        changes += _compare(name, old, new)
    return sorted(changes, key=lambda c: (not c.breaking, c.event))


def _removed(handlers: list[str]) -> str:
    return (
        f"no longer in the code, but {', '.join(handlers)} handled it in the released contract: consumers still "
        "running that release wait for it. Keep emitting it until they are gone, then export the contract again"
    )


def _compare(name: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Change]:
    changes: list[Change] = []
    cls = new["class"].rpartition(".")[2]  # for the advice: the class to decorate
    for what in ("topic", "key"):
        if old[what] != new[what]:
            changes.append(
                Change(
                    name,
                    f"{what} changed from {old[what]!r} to {new[what]!r}: consumers subscribe by topic and "
                    "per-key order holds within one partition, so no version bump can carry this. Publish a new "
                    "event (a new wire name) instead and keep this one until its consumers moved",
                    breaking=True,
                )
            )
    if old["emitted_by"] and not new["emitted_by"] and new["handled_by"]:
        changes.append(
            Change(
                name,
                f"nothing emits it any more, but {', '.join(new['handled_by'])} still handle(s) it: "
                "keep an emitter, or remove the handlers first",
                breaking=True,
            )
        )
    if new["version"] < old["version"]:
        changes.append(
            Change(
                name,
                f"version went back from v{old['version']} to v{new['version']}: versions only grow",
                breaking=True,
            )
        )
        return changes
    if new["version"] > old["version"]:
        missing = [v for v in range(old["version"], new["version"]) if v not in new["upcasters_from"]]
        if missing:
            changes.append(
                Change(
                    name,
                    f"version v{old['version']} → v{new['version']} without an upcaster from "
                    f"{', '.join(f'v{v}' for v in missing)}: records already on the topic (and producers still "
                    "running the release) would be dead-lettered. Register "
                    + ", ".join(f"@{cls}.upcaster(from_version={v})" for v in missing),
                    breaking=True,
                )
            )
        else:
            changes.append(Change(name, f"new version v{new['version']}, upcast from v{old['version']}", False))
        return changes
    advice = (
        f"; to make this change, declare version={old['version'] + 1} on {cls} and register "
        f"@{cls}.upcaster(from_version={old['version']}) turning the old payload into the new one"
    )
    for problem in _schema_changes(old["schema"], new["schema"]):
        changes.append(Change(name, problem + advice, breaking=True))
    added = set(new["schema"].get("properties", {})) - set(old["schema"].get("properties", {}))
    for field in sorted(added - set(new["schema"].get("required", []))):
        changes.append(Change(name, f"optional field {field!r} added", breaking=False))
    return changes


def _schema_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    old_props: Mapping[str, Any] = old.get("properties", {})
    new_props: Mapping[str, Any] = new.get("properties", {})
    old_required, new_required = set(old.get("required", [])), set(new.get("required", []))
    problems: list[str] = []
    added = sorted(set(new_props) - set(old_props))
    for field in sorted(set(old_props) - set(new_props)):
        renamed = f" (renamed to {', '.join(map(repr, added))}?)" if added else ""
        problems.append(f"field {field!r} removed{renamed}: old records carry it, consumers of the release need it")
    for field in sorted(set(old_props) & set(new_props)):
        before, after = _plain(old_props[field], old), _plain(new_props[field], new)
        if before != after:
            problems.append(
                f"field {field!r} changed type from {json.dumps(before, sort_keys=True)} to "
                f"{json.dumps(after, sort_keys=True)}"
            )
        if field in new_required and field not in old_required:
            problems.append(f"field {field!r} made required: old records without it would be dead-lettered")
    for field in added:
        if field in new_required:
            problems.append(f"required field {field!r} added: old records lack it (a default makes it optional)")
    return problems


def _plain(schema: Any, root: Mapping[str, Any], seen: frozenset[str] = frozenset()) -> Any:
    """A property's schema with references resolved and documentation left out, for comparison."""
    if isinstance(schema, list):
        return [_plain(item, root, seen) for item in schema]
    if not isinstance(schema, dict):
        return schema
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/") and ref not in seen:  # `seen`: recursive models
        return _plain(root.get("$defs", {}).get(ref.removeprefix("#/$defs/"), {}), root, seen | {ref})
    plain: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "properties":  # field names, not schema keywords: keep every one
            plain[key] = {field: _plain(sub, root, seen) for field, sub in value.items()}
        elif key not in _DOC_KEYS:
            plain[key] = _plain(value, root, seen)
    return plain
