"""The explorer's two diagrams, drawn on the server as SVG: a saga's timeline and the choreography.

Both are plain strings of SVG with classes and `data-` attributes, so the page styles them and a
browser test reads the values they show.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from html import escape

from choreo.events import Event
from choreo.graph import Choreography, Problem
from choreo.tracing import SagaTrace, service_of

LANE_HEIGHT = 84
GUTTER = 120
STEP = 150
TOP = 28


def ms(delta: timedelta | float | None) -> str:
    """`12.3 ms`, `4.20 s`, or an empty string for None."""
    if delta is None:
        return ""
    seconds = delta.total_seconds() if isinstance(delta, timedelta) else delta
    millis = seconds * 1000
    return f"{millis / 1000:.2f} s" if abs(millis) >= 10_000 else f"{millis:.1f} ms"


def _attr(value: object) -> str:
    return escape(str(value), quote=True)


def timeline(trace: SagaTrace, waiting: Mapping[str, list[str]]) -> str:
    """One lane per service, one mark per event in time order, arrows cause → effect with the hop latency.

    `waiting` maps the event id of a hop where the saga stopped to the handlers that should react next.
    """
    hops = sorted(trace.hops(), key=lambda h: (h.event.occurred_at, h.event.event_id))
    lanes = list(trace.services)
    for hop in hops:
        for letter in hop.dead_letters:
            if service_of(letter) not in lanes:
                lanes.append(service_of(letter))
    if not lanes:
        lanes = ["unknown"]
    lane_of = {name: index for index, name in enumerate(lanes)}
    place: dict[int, tuple[float, float]] = {}
    column = 0
    for hop in hops:
        place[id(hop)] = (GUTTER + 40 + column * STEP, TOP + lane_of.get(hop.event.producer, 0) * LANE_HEIGHT + 30)
        column += 2 if hop.dead_letters else 1
    width = max(1100, GUTTER + 260 + max(column, 1) * STEP)  # room for the "waits for" note
    height = TOP + len(lanes) * LANE_HEIGHT + 10
    out = [
        f'<svg class="timeline" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="timeline of saga {_attr(trace.saga_id)}">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
        'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#556"/></marker>'
        '<marker id="arrow-bad" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
        'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#c0392b"/></marker></defs>',
    ]
    for name, index in lane_of.items():
        top = TOP + index * LANE_HEIGHT
        out.append(
            f'<g class="lane" data-lane="{_attr(name)}"><rect x="0" y="{top}" width="{width}" height="{LANE_HEIGHT}" '
            f'class="lane-bg lane-{index % 2}"/><text class="lane-name" x="10" y="{top + 34}">{escape(name)}</text></g>'
        )
    for hop in hops:
        if hop.parent is None or id(hop.parent) not in place:
            continue
        (x1, y1), (x2, y2) = place[id(hop.parent)], place[id(hop)]
        css = "hop compensation" if hop.event.is_compensation else "hop"
        out.append(
            f'<g class="{css}" data-from="{_attr(hop.parent.event.event_type)}" '
            f'data-to="{_attr(hop.event.event_type)}">'
            f'<line x1="{x1 + 9}" y1="{y1}" x2="{x2 - 11}" y2="{y2}" marker-end="url(#arrow)"/>'
            f'<text class="hop-label" x="{(x1 + x2) / 2}" y="{(y1 + y2) / 2 - 6}">{ms(hop.latency)}</text></g>'
        )
    for hop in hops:
        x, y = place[id(hop)]
        event = hop.event
        kinds = ["mark"]
        if event.is_compensation:
            kinds.append("compensation")
        if hop is trace.ended_by:
            kinds.append("end")
        if not hop.seen:
            kinds.append("unseen")
        stopped = any(hop is s for s in trace.stopped_at)
        if stopped:
            kinds.append("stopped")
        shape = (
            f'<rect x="{x - 9}" y="{y - 9}" width="18" height="18" transform="rotate(45 {x} {y})"/>'
            if event.is_compensation
            else f'<circle cx="{x}" cy="{y}" r="9"/>'
        )
        title = f"{event.by} emits {event.event_type} at +{ms(trace.offset(hop))}"
        out.append(
            f'<g class="{" ".join(kinds)}" data-event-id="{_attr(event.event_id)}" '
            f'data-event="{_attr(event.event_type)}" data-lane="{_attr(event.producer)}" '
            f'data-compensation="{str(event.is_compensation).lower()}"><title>{escape(title)}</title>'
            f'<a href="#event-{_attr(event.event_id)}">{shape}</a>'
            f'<text class="mark-label" x="{x}" y="{y + 24}">{escape(event.event_type)}</text>'
            f'<text class="mark-time" x="{x}" y="{y + 37}">+{ms(trace.offset(hop))}</text></g>'
        )
        for number, letter in enumerate(hop.dead_letters):
            lane = lane_of.get(service_of(letter), 0)
            lx, ly = x + STEP * 0.9, TOP + lane * LANE_HEIGHT + 30 + number * 12
            out.append(
                f'<g class="dead-letter" data-consumer="{_attr(letter.consumer)}" data-reason="{_attr(letter.reason)}">'
                f'<line x1="{x + 9}" y1="{y}" x2="{lx - 12}" y2="{ly}" marker-end="url(#arrow-bad)"/>'
                f'<text class="cross" x="{lx}" y="{ly + 6}">✗</text>'
                f'<text class="dead-label" x="{lx}" y="{ly + 22}">'
                f"{escape(letter.consumer)}: {escape(letter.reason or '')}</text>"
                "</g>"
            )
        if stopped and not hop.dead_letters:
            next_up = waiting.get(event.event_id) or []
            text = "waits for " + ", ".join(next_up) if next_up else "stopped here"
            note = f'<text class="waiting-label" x="{x + 16}" y="{y - 14}">{escape(text)}</text>'
            out.append(f'<g class="waiting">{note}</g>')
    out.append("</svg>")
    return "".join(out)


@dataclass
class EdgeTraffic:
    """Live traffic on one handler → event edge of the graph, or failures on an event → handler edge."""

    latencies: list[float] = field(default_factory=list)
    failures: int = 0

    def percentile(self, share: float) -> float | None:
        """The latency (seconds) below which `share` of the hops fall."""
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def _name(event: type[Event]) -> str:
    return event.event_name


def graph(
    choreography: Choreography,
    emitted: Mapping[tuple[str, str], EdgeTraffic],
    failed: Mapping[tuple[str, str], int],
    problems: Sequence[Problem],
    minutes: float,
) -> str:
    """Events and handlers in layers from each saga's start, handlers coloured by service.

    `emitted` is keyed by (handler, event type), `failed` by (event type, handler).
    """
    layer: dict[str, int] = {}
    # Layer 0: what starts a saga, and whatever is emitted outside handlers (requests, deadlines).
    starts = [_name(saga.starts) for _, saga in choreography.sagas]
    starts += sorted(
        _name(e) for e, emitters in choreography.emitters.items() if any(x.handler is None for x in emitters)
    )
    frontier = list(dict.fromkeys(starts))
    for name in frontier:
        layer[name] = 0
    by_name = {_name(e): e for e in choreography.events}
    while frontier:
        following = []
        for name in frontier:
            for handler in choreography.handlers_of(by_name[name]):
                layer.setdefault(handler.name, layer[name] + 1)
                for emitted_type in sorted(handler.emits, key=_name):
                    if _name(emitted_type) not in layer:
                        layer[_name(emitted_type)] = layer[handler.name] + 1
                        following.append(_name(emitted_type))
        frontier = following
    nodes = [*sorted(by_name), *(h.name for _, h in choreography.handlers)]
    deepest = max(layer.values(), default=0)
    for name in nodes:
        layer.setdefault(name, deepest + 1)
    columns: dict[int, list[str]] = {}
    for name in nodes:
        columns.setdefault(layer[name], []).append(name)
    col_width, row_height, box_w, box_h = 340, 70, 200, 40
    preds: dict[str, list[str]] = {}
    for _, handler in choreography.handlers:
        preds.setdefault(handler.name, []).extend(_name(e) for e in handler.event_types)
        for emitted_type in handler.emits:
            preds.setdefault(_name(emitted_type), []).append(handler.name)
    # Each column in the order of its nodes' predecessors (the barycentre heuristic): fewer crossings.
    where: dict[str, tuple[float, float]] = {}
    rank: dict[str, float] = {}
    for index in sorted(columns):

        def barycentre(name: str) -> tuple[float, str]:
            placed = [rank[p] for p in preds.get(name, []) if p in rank]
            return (sum(placed) / len(placed) if placed else 0.0, name)

        for row, name in enumerate(sorted(columns[index], key=barycentre)):
            rank[name] = row
            where[name] = (30 + index * col_width, 40 + row * row_height)
    width = 60 + (max(columns) + 1) * col_width
    height = 80 + max(len(names) for names in columns.values()) * row_height
    services = [s.name for s in choreography.services]
    service_of = {h.name: s.name for s, h in choreography.handlers}
    flagged: dict[str, list[str]] = {}
    for problem in problems:
        flagged.setdefault(problem.subject, []).append(problem.kind)
    out = [
        f'<svg class="graph" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="choreography">',
        '<defs><marker id="g-arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
        'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#667"/></marker></defs>',
    ]

    labels: list[str] = []  # drawn last, over every line and box

    def edge(a: str, b: str, css: str, label: str, data: str) -> None:
        (x1, y1), (x2, y2) = where[a], where[b]
        sx, sy, ex, ey = x1 + box_w, y1 + box_h / 2, x2, y2 + box_h / 2
        out.append(
            f'<g class="{css}" {data}><path d="M{sx},{sy} C{sx + 40},{sy} {ex - 60},{ey} {ex},{ey}" '
            f'marker-end="url(#g-arrow)"/></g>'
        )
        if label:
            # Near the arrow's head, where the edges fanning out of one box are apart.
            lines, lx = label.split("\n"), ex - (col_width - box_w) / 2
            spans = "".join(
                f'<tspan x="{lx}" dy="{12 * (n > 0)}">{escape(line)}</tspan>' for n, line in enumerate(lines)
            )
            y = ey - 8 - 12 * (len(lines) - 1)
            labels.append(f'<text class="edge-label {css}" {data} x="{lx}" y="{y}">{spans}</text>')

    for _, handler in choreography.handlers:
        for event_type in sorted(handler.event_types, key=_name):
            n = failed.get((_name(event_type), handler.name), 0)
            label = f"✗ {n} failed" if n else ""
            data = f'data-from="{_attr(_name(event_type))}" data-to="{_attr(handler.name)}" data-failures="{n}"'
            edge(_name(event_type), handler.name, "edge consumes" + (" failing" if n else ""), label, data)
        for event_type in sorted(handler.emits, key=_name):
            traffic = emitted.get((handler.name, _name(event_type)))
            count = len(traffic.latencies) if traffic else 0
            label = ""
            if traffic and count:
                p50, p99 = ms(traffic.percentile(0.5)), ms(traffic.percentile(0.99))
                label = f"{count / minutes:.1f}/min\np50 {p50} · p99 {p99}"
            css = "edge emits" + (" compensation" if event_type.compensates else "") + (" live" if count else "")
            data = f'data-from="{_attr(handler.name)}" data-to="{_attr(_name(event_type))}" data-count="{count}"'
            if traffic and count:
                data += f' data-p50="{_attr(p50)}" data-p99="{_attr(p99)}"'
            edge(handler.name, _name(event_type), css, label, data)
    for name in nodes:
        x, y = where[name]
        problem_kinds = flagged.get(name, [])
        if name in by_name:
            event_type = by_name[name]
            css = "node event" + (" compensation" if event_type.compensates else "")
            if any(event_type is saga.starts for _, saga in choreography.sagas):
                css += " start"
            if any(event_type in saga.ends for _, saga in choreography.sagas):
                css += " end"
            shape = f'<rect x="{x}" y="{y}" width="{box_w}" height="{box_h}" rx="20"/>'
            sub = "↺ undoes " + ", ".join(_name(e) for e in event_type.compensates) if event_type.compensates else ""
        else:
            service = service_of.get(name, "")
            css = f"node handler service-{services.index(service) % 6 if service in services else 0}"
            shape = f'<rect x="{x}" y="{y}" width="{box_w}" height="{box_h}" rx="3"/>'
            sub = service
        if problem_kinds:
            css += " flagged"
        flag = f'<text class="node-flag" x="{x + box_w - 4}" y="{y - 3}">⚠ {escape(" ".join(problem_kinds))}</text>'
        out.append(
            f'<g class="{css}" data-node="{_attr(name)}" data-problems="{_attr(" ".join(problem_kinds))}">{shape}'
            f'<text class="node-label" x="{x + box_w / 2}" y="{y + (17 if sub else 24)}">{escape(name)}</text>'
            + (f'<text class="node-sub" x="{x + box_w / 2}" y="{y + 32}">{escape(sub)}</text>' if sub else "")
            + (flag if problem_kinds else "")
            + "</g>"
        )
    out += labels
    out.append("</svg>")
    return "".join(out)
