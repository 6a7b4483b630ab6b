"""The static choreography: who reacts to which event and may emit what, drawn and checked.

    choreography = Choreography(discover("demo_shop"))
    print(choreography.to_mermaid())
    for problem in choreography.check().problems:
        print(problem)

Everything here comes from declarations: `@service.on(...)` with its return annotation or
`emits=`, `service.declare(...)` for events emitted outside handlers, `service.saga(...)`, and
`compensates=` on event classes. Nothing runs and nothing connects.

`check()` reports four kinds of problems (docs/tracing.md has the details):

- `unhandled-event`: an event is emitted, nobody handles it, and it ends no saga;
- `unreachable-handler`: a handler reacts to an event that nothing emits;
- `saga-without-end`: some run of a saga reaches none of its declared ends;
- `uncompensated-step`: a run that ends a saga in failure leaves a compensable step undone.

A *run* of a saga starts with its `starts` event; every handler of an event in the run reacts,
and each handler emits one of the events it declares (or nothing, if it declares none). Each
event type is expanded once per run, so cycles end. The deadline's timeout event is left out:
the deadline is a safety net, and a path that only the deadline can finish is still a bug.
"""

from __future__ import annotations

import importlib
import itertools
import os
import pkgutil
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import ModuleType

from choreo.consumer import Handler
from choreo.events import Event
from choreo.exceptions import ConfigurationError
from choreo.saga import Saga
from choreo.service import Service

MAX_RUNS = 20_000
"""Runs explored per saga; beyond that `check` says it stopped early."""

UNHANDLED_EVENT = "unhandled-event"
UNREACHABLE_HANDLER = "unreachable-handler"
SAGA_WITHOUT_END = "saga-without-end"
UNCOMPENSATED_STEP = "uncompensated-step"
PROBLEM_KINDS = (UNHANDLED_EVENT, UNREACHABLE_HANDLER, SAGA_WITHOUT_END, UNCOMPENSATED_STEP)


# -- discovery ---------------------------------------------------------------------------------


def discover(target: str) -> list[Service]:
    """Import a module or package (every sub-module of a package) and collect its `Service` objects.

    `target` is a dotted module name (`demo_shop`) or a path (`demo_shop/`, `app/services.py`)
    relative to the current directory, which is put on `sys.path` like `python -m` does.
    Services are found in module globals, once each, in import order.
    """
    name = module_name(target)
    modules = list(_import_tree(name))
    services: list[Service] = []
    names: dict[str, Service] = {}
    for module in modules:
        for value in list(vars(module).values()):
            if not isinstance(value, Service) or any(value is s for s in services):
                continue
            if value.name in names:
                continue  # another object of the same name (e.g. a configured copy): the first one counts
            names[value.name] = value
            services.append(value)
    if not services:
        raise ConfigurationError(
            f"{name} defines no choreo.Service at module level (searched {len(modules)} module(s))"
        )
    return services


def module_name(target: str) -> str:
    """A dotted module name for a module name or a path to a `.py` file or package directory."""
    target = target.strip()
    if not target:
        raise ConfigurationError("name a module or package, e.g. demo_shop or app/services.py")
    looks_like_path = "/" in target or os.sep in target or target.endswith(".py")
    if looks_like_path:
        path = Path(target)
        if path.suffix == ".py":
            path = path.with_suffix("")
        parts = [part for part in path.parts if part not in ("", ".")]
        if not parts or any(part == ".." or not part.isidentifier() for part in parts):
            raise ConfigurationError(
                f"{target!r} is not a module path under the current directory; pass a dotted name such as demo_shop"
            )
        return ".".join(parts)
    if not all(part.isidentifier() for part in target.split(".")):
        raise ConfigurationError(f"{target!r} is not a module name (expected e.g. demo_shop or demo_shop.orders)")
    return target


def import_module(name: str) -> ModuleType:
    """Import `name` with the current directory on the path; one clear ConfigurationError if it fails."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as missing:
        if missing.name and (name == missing.name or name.startswith(missing.name + ".")):
            raise ConfigurationError(
                f"no module named {name!r} (run choreo from the project directory, or check the spelling)"
            ) from None
        raise ConfigurationError(f"importing {name} failed: {missing}") from None
    except ConfigurationError:
        raise
    except Exception as error:
        raise ConfigurationError(f"importing {name} failed: {type(error).__name__}: {error}") from None


def _import_tree(name: str) -> Iterator[ModuleType]:
    module = import_module(name)
    yield module
    path = getattr(module, "__path__", None)
    if path is None:
        return
    # walk_packages imports sub-packages itself; importing a failed one again raises the clear error.
    for info in pkgutil.walk_packages(path, name + ".", onerror=import_module):
        if info.name.rsplit(".", 1)[-1] == "__main__":
            continue  # running it is its job, not importing it
        yield import_module(info.name)


# -- the choreography --------------------------------------------------------------------------


@dataclass(frozen=True)
class Emitter:
    """Something that may emit an event: a handler, code outside handlers, or a saga deadline."""

    service: str
    handler: str | None = None
    deadline_of: str | None = None

    @property
    def label(self) -> str:
        """`orders.reject`, `orders (outside handlers)`, `orders (deadline of saga 'order')`."""
        if self.handler is not None:
            return self.handler
        if self.deadline_of is not None:
            return f"{self.service} (deadline of saga {self.deadline_of!r})"
        return f"{self.service} (outside handlers)"


@dataclass(frozen=True)
class Problem:
    """One finding of `check`: its kind, what it is about, and an explanation with a way out."""

    kind: str
    subject: str
    message: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


@dataclass
class CheckReport:
    """What `check` found: problems (the check fails) and notes (it does not)."""

    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when there is no problem."""
        return not self.problems

    def of_kind(self, kind: str) -> list[Problem]:
        """The problems of one kind."""
        return [p for p in self.problems if p.kind == kind]


@dataclass(frozen=True)
class Run:
    """One run of a saga: every event in it, with the event and handler that caused it."""

    causes: dict[type[Event], tuple[type[Event], Handler] | None]

    @property
    def events(self) -> frozenset[type[Event]]:
        """The event types in the run."""
        return frozenset(self.causes)

    def path_to(self, event: type[Event]) -> list[type[Event]]:
        """The chain of events from the start to `event`."""
        path = [event]
        cause = self.causes[event]
        while cause is not None:
            path.append(cause[0])
            cause = self.causes[cause[0]]
        return path[::-1]

    def leaves(self) -> list[type[Event]]:
        """Events of the run that caused nothing further in it."""
        causing = {cause[0] for cause in self.causes.values() if cause is not None}
        return [event for event in self.causes if event not in causing]


def _name(event: type[Event]) -> str:
    return event.event_name


def _names(events: Iterable[type[Event]], joiner: str = ", ") -> str:
    return joiner.join(sorted(_name(e) for e in events))


def _chain(path: list[type[Event]]) -> str:
    return " → ".join(_name(e) for e in path)


class Choreography:
    """The services' declarations as one graph of events and handlers."""

    def __init__(self, services: Iterable[Service]) -> None:
        self.services = list(services)
        self.handlers: list[tuple[Service, Handler]] = [(s, h) for s in self.services for h in s.handlers]
        self.sagas: list[tuple[Service, Saga]] = [(s, saga) for s in self.services for saga in s.sagas]
        self.consumers: dict[type[Event], list[tuple[Service, Handler]]] = {}
        self.emitters: dict[type[Event], list[Emitter]] = {}
        for service, handler in self.handlers:
            for event_type in handler.event_types:
                self.consumers.setdefault(event_type, []).append((service, handler))
            for event_type in sorted(handler.emits, key=_name):
                self.emitters.setdefault(event_type, []).append(Emitter(service.name, handler.name))
        for service in self.services:
            timeouts = {saga.timeout_event: saga.name for saga in service.sagas if saga.timeout_event}
            emitted = {t for h in service.handlers for t in h.emits}
            # `declare()` names what the service emits outside handlers (HTTP endpoints,
            # scripts); `saga()` declares the start and the timeout event too.
            for event_type in sorted(service.declared, key=_name):
                if event_type in timeouts:
                    self.emitters.setdefault(event_type, []).append(
                        Emitter(service.name, deadline_of=timeouts[event_type])
                    )
                else:
                    self.emitters.setdefault(event_type, []).append(Emitter(service.name))
            for saga in service.sagas:
                if saga.starts in emitted and saga.starts not in timeouts:
                    continue
                starters = self.emitters.setdefault(saga.starts, [])
                if not any(e.service == service.name and e.handler is None for e in starters):
                    starters.append(Emitter(service.name))
        self.events: set[type[Event]] = set(self.consumers) | set(self.emitters)
        for _, saga in self.sagas:
            self.events |= {saga.starts, *saga.ends}
        self.compensated_by: dict[type[Event], set[type[Event]]] = {}
        for event_type in self.events:
            for undone in event_type.compensates:
                self.compensated_by.setdefault(undone, set()).add(event_type)

    def __repr__(self) -> str:
        return f"Choreography({[s.name for s in self.services]!r})"

    def handlers_of(self, event_type: type[Event]) -> list[Handler]:
        """Handlers reacting to `event_type`, in declaration order."""
        return [handler for _, handler in self.consumers.get(event_type, [])]

    def owner(self, handler: Handler) -> Service:
        """The service a handler belongs to."""
        return next(s for s, h in self.handlers if h is handler)

    # -- runs ----------------------------------------------------------------------------------

    def runs(self, saga: Saga, limit: int = MAX_RUNS) -> Iterator[Run]:
        """Every run of `saga` (up to `limit`), as defined in the module docstring."""
        stack: list[tuple[dict[type[Event], tuple[type[Event], Handler] | None], tuple[type[Event], ...]]]
        stack = [({saga.starts: None}, (saga.starts,))]
        produced = 0
        while stack:
            causes, pending = stack.pop()
            if not pending:
                produced += 1
                yield Run(causes)
                if produced >= limit:
                    return
                continue
            event_type, rest = pending[0], pending[1:]
            choices: list[list[tuple[Handler, type[Event] | None]]] = [
                [(handler, choice) for choice in sorted(handler.emits, key=_name)] or [(handler, None)]
                for handler in self.handlers_of(event_type)
            ]
            branches = []
            for combination in itertools.product(*choices):
                new_causes = dict(causes)
                queue = list(rest)
                for handler, choice in combination:
                    if choice is not None and choice not in new_causes:
                        new_causes[choice] = (event_type, handler)
                        queue.append(choice)
                branches.append((new_causes, tuple(queue)))
            stack.extend(reversed(branches))  # explore in sorted order

    # -- check ---------------------------------------------------------------------------------

    def check(self) -> CheckReport:
        """Verify the choreography; see the module docstring for what is checked."""
        report = CheckReport()
        self._check_unhandled(report)
        self._check_unreachable(report)
        for service, saga in self.sagas:
            runs = list(self.runs(saga))
            if len(runs) >= MAX_RUNS:
                report.notes.append(
                    f"saga {saga.name!r} has more than {MAX_RUNS} runs; only the first {MAX_RUNS} were checked"
                )
            self._check_ends(report, service, saga, runs)
            self._check_compensations(report, saga, runs)
        return report

    def _check_unhandled(self, report: CheckReport) -> None:
        ends = {end for _, saga in self.sagas for end in saga.ends}
        for event_type in sorted(self.emitters, key=_name):
            if event_type in self.consumers or event_type in ends:
                continue
            if event_type.compensates:
                continue  # a compensation is the last word of an undo: announcing it is enough
            by = ", ".join(e.label for e in self.emitters[event_type])
            report.problems.append(
                Problem(
                    UNHANDLED_EVENT,
                    _name(event_type),
                    f"{_name(event_type)} is emitted by {by}, but no handler reacts to it and it ends no saga; "
                    "handle it, add it to a saga's ends=, or stop emitting it",
                )
            )

    def _check_unreachable(self, report: CheckReport) -> None:
        for _, handler in self.handlers:
            for event_type in handler.event_types:
                if event_type in self.emitters:
                    continue
                report.problems.append(
                    Problem(
                        UNREACHABLE_HANDLER,
                        handler.name,
                        f"{handler.name} reacts to {_name(event_type)}, which nothing emits: no handler declares "
                        f"it and no service declares it with service.declare(); the handler can never fire",
                    )
                )

    def _check_ends(self, report: CheckReport, service: Service, saga: Saga, runs: list[Run]) -> None:
        stuck: dict[frozenset[type[Event]], Run] = {}
        for run in runs:
            if not run.events & saga.ends:
                stuck.setdefault(run.events, run)
        shown = list(stuck.values())[:3]
        for run in shown:
            reasons = [self._why_leaf_stops(leaf, run) for leaf in run.leaves()]
            paths = "; ".join(_chain(run.path_to(leaf)) for leaf in run.leaves())
            report.problems.append(
                Problem(
                    SAGA_WITHOUT_END,
                    saga.name,
                    f"saga {saga.name!r} (declared by {service.name}) can stall: on the run {paths} "
                    f"nothing emits an end ({_names(saga.ends, ' or ')}); " + "; ".join(reasons),
                )
            )
        if len(stuck) > len(shown):
            report.notes.append(f"saga {saga.name!r}: {len(stuck) - len(shown)} more runs stall the same way")

    def _why_leaf_stops(self, leaf: type[Event], run: Run) -> str:
        handlers = self.handlers_of(leaf)
        if not handlers:
            return f"nobody handles {_name(leaf)}"
        silent = [h.name for h in handlers if not h.emits]
        if silent:
            return f"{', '.join(silent)} reacts to {_name(leaf)} but emits nothing"
        return f"the handlers of {_name(leaf)} only emit events already on the run"

    def _check_compensations(self, report: CheckReport, saga: Saga, runs: list[Run]) -> None:
        compensations = {c for cs in self.compensated_by.values() for c in cs}
        failure_ends = {
            end
            for end in saga.ends
            if any(end in run.events and run.events & compensations for run in runs)
            or any(h.emits & compensations for h in self.handlers_of(end))
        }
        reported: set[tuple[type[Event], type[Event], tuple[type[Event], ...]]] = set()
        for run in runs:
            for end in sorted(run.events & failure_ends, key=_name):
                for step in sorted(run.events & set(self.compensated_by), key=_name):
                    undo = self.compensated_by[step]
                    if run.events & undo:
                        continue
                    path = tuple(run.path_to(end))
                    if (step, end, path) in reported:
                        continue
                    reported.add((step, end, path))
                    cause = run.causes[step]
                    by = cause[1].name if cause is not None else "the saga's start"
                    report.problems.append(
                        Problem(
                            UNCOMPENSATED_STEP,
                            _name(step),
                            f"saga {saga.name!r}: {_name(step)} (emitted by {by}) is left uncompensated when the "
                            f"saga fails with {_name(end)} on the run {_chain(list(path))}; nothing on that run "
                            f"emits {_names(undo, ' or ')}, which compensates it. Let a handler on that path "
                            f"(e.g. of {_name(path[-2]) if len(path) > 1 else _name(end)} or {_name(end)}) "
                            "emit the compensation",
                        )
                    )

    # -- drawing -------------------------------------------------------------------------------

    def _roles(self, event_type: type[Event]) -> list[str]:
        roles = []
        for _, saga in self.sagas:
            if event_type is saga.starts:
                roles.append(f"starts {saga.name}")
            if event_type in saga.ends:
                roles.append(f"ends {saga.name}")
            if event_type is saga.timeout_event:
                roles.append(f"deadline of {saga.name}")
        if event_type.compensates:
            roles.append(f"↺ undoes {_names(event_type.compensates)}")
        return roles

    def to_text(self) -> str:
        """A plain listing: each service's handlers, what starts and ends each saga, compensations."""
        lines: list[str] = []
        for service in self.services:
            lines.append(f"{service.name}  (consumer group {service.group_id})")
            mine = [(t, e) for t, es in self.emitters.items() for e in es if e.service == service.name]
            outside = [t for t, e in mine if e.handler is None and e.deadline_of is None]
            deadlines = [t for t, e in mine if e.deadline_of is not None]
            if outside:
                lines.append(f"  emits outside handlers: {_names(outside)}")
            if deadlines:
                lines.append(f"  emits on saga deadlines: {_names(deadlines)}")
            for handler in service.handlers:
                emits = _names(handler.emits) if handler.emits else "nothing"
                lines.append(f"  {handler.name}: on {_names(handler.event_types)} → may emit {emits}")
        if self.sagas:
            lines.append("sagas")
            for service, saga in self.sagas:
                deadline = f", deadline {_duration(saga.deadline)}" if saga.deadline else ""
                lines.append(
                    f"  {saga.name} ({service.name}): starts {_name(saga.starts)}, "
                    f"ends {_names(saga.ends, ' | ')}{deadline}"
                )
        compensations = sorted((c for cs in self.compensated_by.values() for c in cs), key=_name)
        if compensations:
            lines.append("compensations")
            for event_type in dict.fromkeys(compensations):
                lines.append(f"  {_name(event_type)} ↺ undoes {_names(event_type.compensates)}")
        return "\n".join(lines)

    def to_mermaid(self) -> str:
        """A Mermaid flowchart: events as rounded nodes, handlers grouped by service."""
        lines = ["flowchart LR"]
        for event_type in sorted(self.events, key=_name):
            roles = self._roles(event_type)
            label = _name(event_type) + (f"<br/><small>{', '.join(roles)}</small>" if roles else "")
            css = (
                "compensation"
                if event_type.compensates
                else "sagaStart"
                if any(event_type is s.starts for _, s in self.sagas)
                else "sagaEnd"
                if any(event_type in s.ends for _, s in self.sagas)
                else "event"
            )
            lines.append(f'    {_event_id(event_type)}(["{label}"]):::{css}')
        for service in self.services:
            lines.append(f'    subgraph {_node_id("svc", service.name)}["{service.name}"]')
            if any(e.handler is None for es in self.emitters.values() for e in es if e.service == service.name):
                lines.append(f'        {_node_id("out", service.name)}[/"{service.name} (outside handlers)"/]')
            for handler in service.handlers:
                lines.append(f'        {_node_id("h", handler.name)}["{handler.name}"]')
            lines.append("    end")
        for _, handler in self.handlers:
            for event_type in sorted(handler.event_types, key=_name):
                lines.append(f"    {_event_id(event_type)} --> {_node_id('h', handler.name)}")
            for event_type in sorted(handler.emits, key=_name):
                arrow = "-.->" if event_type.compensates else "-->"
                lines.append(f"    {_node_id('h', handler.name)} {arrow} {_event_id(event_type)}")
        for event_type, emitters in sorted(self.emitters.items(), key=lambda item: _name(item[0])):
            for emitter in emitters:
                if emitter.handler is None:
                    arrow = "-. deadline .->" if emitter.deadline_of else "-->"
                    lines.append(f"    {_node_id('out', emitter.service)} {arrow} {_event_id(event_type)}")
        lines += [
            "    classDef event fill:#eef,stroke:#557",
            "    classDef sagaStart fill:#dfd,stroke:#383",
            "    classDef sagaEnd fill:#ffd,stroke:#873",
            "    classDef compensation fill:#fed,stroke:#a50,stroke-dasharray: 4 2",
        ]
        return "\n".join(lines)

    def to_dot(self) -> str:
        """A Graphviz digraph: events as ellipses, handlers as boxes clustered by service."""
        lines = ["digraph choreography {", "    rankdir=LR;", '    node [fontname="Helvetica"];']
        for event_type in sorted(self.events, key=_name):
            roles = self._roles(event_type)
            label = _name(event_type) + ("\\n" + "\\n".join(roles) if roles else "")
            style = ', style="dashed,filled", fillcolor="#ffeedd"' if event_type.compensates else ""
            lines.append(f'    "{_name(event_type)}" [shape=ellipse, label="{label}"{style}];')
        for service in self.services:
            lines.append(f'    subgraph "cluster_{service.name}" {{')
            lines.append(f'        label="{service.name}";')
            if any(e.handler is None for es in self.emitters.values() for e in es if e.service == service.name):
                lines.append(f'        "{service.name} (outside handlers)" [shape=cds];')
            for handler in service.handlers:
                lines.append(f'        "{handler.name}" [shape=box];')
            lines.append("    }")
        for _, handler in self.handlers:
            for event_type in sorted(handler.event_types, key=_name):
                lines.append(f'    "{_name(event_type)}" -> "{handler.name}";')
            for event_type in sorted(handler.emits, key=_name):
                style = " [style=dashed]" if event_type.compensates else ""
                lines.append(f'    "{handler.name}" -> "{_name(event_type)}"{style};')
        for event_type, emitters in sorted(self.emitters.items(), key=lambda item: _name(item[0])):
            for emitter in emitters:
                if emitter.handler is None:
                    style = ' [style=dotted, label="deadline"]' if emitter.deadline_of else ""
                    lines.append(f'    "{emitter.service} (outside handlers)" -> "{_name(event_type)}"{style};')
        lines.append("}")
        return "\n".join(lines)


def _duration(delta: timedelta) -> str:
    seconds = delta.total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def _node_id(prefix: str, name: str) -> str:
    return prefix + "_" + "".join(ch if ch.isalnum() else "_" for ch in name)


def _event_id(event_type: type[Event]) -> str:
    return _node_id("e", event_type.event_name)
