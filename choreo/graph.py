"""The static choreography: who reacts to which event and may emit what, drawn and checked.

    choreography = Choreography(discover("demo_shop"))
    print(choreography.to_mermaid())
    for problem in choreography.check().problems:
        print(problem)

Everything here comes from declarations: `@service.on(...)` with its return annotation or
`emits=`, `service.declare(...)` for events emitted outside handlers, `service.saga(...)` (with
its `cancelled_by=`), and `compensates=` and `external=` on event classes. Nothing runs and
nothing connects.

`check()` reports five kinds of problems (docs/tracing.md has the details):

- `unhandled-event`: an event is emitted, nobody handles it, it ends no saga and is not external;
- `unreachable-handler`: a handler reacts to an event that nothing emits;
- `saga-without-end`: some run of a saga reaches none of its declared ends;
- `uncompensated-step`: a run that ends a saga in failure leaves a compensable step undone;
- `uncancelled-step`: a service did a step of a saga that ended well, and does not handle the
  event that cancels that saga afterwards.

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
import tomllib
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
UNCANCELLED_STEP = "uncancelled-step"
PROBLEM_KINDS = (UNHANDLED_EVENT, UNREACHABLE_HANDLER, SAGA_WITHOUT_END, UNCOMPENSATED_STEP, UNCANCELLED_STEP)

OUTSIDE = "outside this system"
"""Where the drawings send external events (`external=True`): consumers beyond these services."""


# -- discovery ---------------------------------------------------------------------------------


def discover(*targets: str) -> list[Service]:
    """Import one or more targets and collect their `Service` objects, once each, in order.

    A target is a dotted module name (`demo_shop`), a path (`demo_shop/`, `app/services.py`)
    relative to the current directory, which is put on `sys.path` like `python -m` does, or
    `module:attribute` for one service. A package is searched in every sub-module, for services
    in module globals, in import order. With no target, the `apps` listed under `[tool.choreo]`
    in the current directory's pyproject.toml are used.
    """
    services: list[Service] = []
    found_in: dict[str, str] = {}
    for target in targets or configured_apps():
        for service in [load_service(target)] if ":" in target else _services_in(target):
            known = next((s for s in services if s.name == service.name), None)
            if known is not None and (known is service or known.handlers == service.handlers):
                continue  # named twice (a package and its sub-module) or a configured copy
            if known is not None:
                raise ConfigurationError(
                    f"two different services are named {service.name!r}: one in {found_in[service.name]}, "
                    f"another in {target}; a service's name is its consumer group, so it must be unique"
                )
            found_in[service.name] = target
            services.append(service)
    return services


def _services_in(target: str) -> list[Service]:
    name = module_name(target)
    modules = list(_import_tree(name))
    services: dict[str, Service] = {}
    for module in modules:
        for value in list(vars(module).values()):
            # Another object of the same name (e.g. a configured copy): the first one counts.
            if isinstance(value, Service) and value.name not in services:
                services[value.name] = value
    if not services:
        raise ConfigurationError(
            f"{name} defines no choreo.Service at module level (searched {len(modules)} module(s))"
        )
    return list(services.values())


def load_service(spec: str) -> Service:
    """The `Service` named by `module:attribute` (or `module` when it holds exactly one)."""
    module_part, _, attribute = spec.partition(":")
    module = import_module(module_name(module_part))
    if attribute:
        value: object = module
        for part in attribute.split("."):
            value = getattr(value, part, None)
        if isinstance(value, Service):
            return value
        named = [s for s in vars(module).values() if isinstance(s, Service) and s.name == attribute]
        if named:
            return named[0]
        raise ConfigurationError(f"{spec}: {module.__name__} has no Service named {attribute!r}")
    found = list({id(s): s for s in vars(module).values() if isinstance(s, Service)}.values())
    if len(found) == 1:
        return found[0]
    if not found:
        raise ConfigurationError(f"{spec}: {module.__name__} defines no choreo.Service; use module:attribute")
    names = ", ".join(sorted(s.name for s in found))
    raise ConfigurationError(f"{spec}: {module.__name__} defines several services ({names}); use module:attribute")


def configured_apps(directory: Path | None = None) -> list[str]:
    """The targets listed as `apps` under `[tool.choreo]` in the pyproject.toml of `directory` (default: cwd)."""
    path = (directory or Path.cwd()) / "pyproject.toml"
    hint = (
        "name the apps (e.g. choreo check demo_shop shipping) or list them in pyproject.toml: "
        '[tool.choreo] apps = ["demo_shop"]'
    )
    if not path.is_file():
        raise ConfigurationError(f"no app given and no pyproject.toml in {path.parent}; {hint}")
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigurationError(f"{path} is not valid TOML: {error}") from None
    apps = document.get("tool", {}).get("choreo", {}).get("apps")
    if apps is None:
        raise ConfigurationError(f"no app given and {path} has no [tool.choreo] apps; {hint}")
    if not isinstance(apps, list) or not apps or not all(isinstance(app, str) and app.strip() for app in apps):
        raise ConfigurationError(f"{path}: [tool.choreo] apps must be a non-empty list of module names, got {apps!r}")
    return apps


def target_label(target: str) -> str:
    """How a target is named in messages: its dotted module name, with `:attribute` if any."""
    module_part, colon, attribute = target.partition(":")
    return module_name(module_part) + colon + attribute


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
            self.events |= {saga.starts, *saga.ends, *saga.cancelled_by}
        self.external = sorted((e for e in self.events if e.event_external), key=_name)
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
            failure_ends = self._failure_ends(saga, runs)
            self._check_compensations(report, saga, runs, failure_ends)
            self._check_cancellations(report, saga, runs, failure_ends)
        return report

    def _check_unhandled(self, report: CheckReport) -> None:
        ends = {end for _, saga in self.sagas for end in saga.ends}
        for event_type in sorted(self.emitters, key=_name):
            if event_type in self.consumers or event_type in ends:
                continue
            if event_type.compensates:
                continue  # a compensation is the last word of an undo: announcing it is enough
            if event_type.event_external:
                continue  # published for consumers outside this codebase
            by = ", ".join(e.label for e in self.emitters[event_type])
            report.problems.append(
                Problem(
                    UNHANDLED_EVENT,
                    _name(event_type),
                    f"{_name(event_type)} is emitted by {by}, but no handler reacts to it and it ends no saga; "
                    "handle it, add it to a saga's ends=, mark it external=True if it is published for "
                    "consumers outside these services, or stop emitting it",
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

    def _compensations(self) -> set[type[Event]]:
        return {c for cs in self.compensated_by.values() for c in cs}

    def _failure_ends(self, saga: Saga, runs: list[Run]) -> set[type[Event]]:
        """Ends that mean failure: reached along with a compensation, or answered by one."""
        compensations = self._compensations()
        return {
            end
            for end in saga.ends
            if any(end in run.events and run.events & compensations for run in runs)
            or any(h.emits & compensations for h in self.handlers_of(end))
        }

    def _check_compensations(
        self, report: CheckReport, saga: Saga, runs: list[Run], failure_ends: set[type[Event]]
    ) -> None:
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

    def _check_cancellations(
        self, report: CheckReport, saga: Saga, runs: list[Run], failure_ends: set[type[Event]]
    ) -> None:
        """Every service that did a step of a saga that ended well must handle each cancellation.

        A step is a handler that reacted on a successful run (one reaching an end that is not a
        failure, with no compensation) and emitted something that is not itself a compensation;
        events after the end (e.g. shipping reacting to `order.approved`) count too. A service
        that emits the cancellation undoes its own steps while emitting it, so it is exempt.
        """
        if not saga.cancelled_by:
            return
        compensations = self._compensations()
        good_ends = saga.ends - failure_ends
        cancellers = {e.service for c in saga.cancelled_by for e in self.emitters.get(c, [])}
        # (service, cancellation) -> steps as "handler (on X → Y)", and the first run showing one
        missing: dict[tuple[str, type[Event]], tuple[dict[str, None], list[type[Event]]]] = {}
        for run in runs:
            if not run.events & good_ends or run.events & compensations:
                continue
            for emitted, cause in run.causes.items():
                if cause is None or emitted.compensates:
                    continue
                trigger, handler = cause
                service = self.owner(handler)
                if service.name in cancellers:
                    continue
                handled = {t for h in service.handlers for t in h.event_types}
                for cancel in sorted(saga.cancelled_by - handled, key=_name):
                    steps, path = missing.setdefault((service.name, cancel), ({}, run.path_to(emitted)))
                    steps.setdefault(f"{handler.name} (on {_name(trigger)} → {_name(emitted)})")
        for (service_name, cancel), (steps, path) in missing.items():
            by = ", ".join(e.label for e in self.emitters.get(cancel, [])) or "nobody"
            several = len(steps) > 1
            report.problems.append(
                Problem(
                    UNCANCELLED_STEP,
                    f"{service_name}/{_name(cancel)}",
                    f"saga {saga.name!r} can be cancelled after it ended with {_name(cancel)} (emitted by {by}), "
                    f"but {service_name} does not handle it, so its step{'s' if several else ''} "
                    f"{', '.join(steps)} stay{'' if several else 's'} done when the saga is cancelled "
                    f"(e.g. on the run {_chain(path)}); give {service_name} a handler of {cancel.__name__} "
                    f"that undoes {'them' if several else 'it'} (emitting a compensation if others must know)",
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
            if event_type in saga.cancelled_by:
                roles.append(f"cancels {saga.name}")
        if event_type.compensates:
            roles.append(f"↺ undoes {_names(event_type.compensates)}")
        if event_type.event_external:
            roles.append("→ outside")
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
                cancelled = f", cancelled by {_names(saga.cancelled_by, ' | ')}" if saga.cancelled_by else ""
                lines.append(
                    f"  {saga.name} ({service.name}): starts {_name(saga.starts)}, "
                    f"ends {_names(saga.ends, ' | ')}{deadline}{cancelled}"
                )
        compensations = sorted(self._compensations(), key=_name)
        if compensations:
            lines.append("compensations")
            for event_type in compensations:
                lines.append(f"  {_name(event_type)} ↺ undoes {_names(event_type.compensates)}")
        if self.external:
            lines.append(f"published {OUTSIDE}: {_names(self.external)}")
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
        if self.external:
            lines.append(f'    outside{{{{"{OUTSIDE}"}}}}:::outside')
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
        for event_type in self.external:
            lines.append(f"    {_event_id(event_type)} --> outside")
        lines += [
            "    classDef event fill:#eef,stroke:#557",
            "    classDef sagaStart fill:#dfd,stroke:#383",
            "    classDef sagaEnd fill:#ffd,stroke:#873",
            "    classDef compensation fill:#fed,stroke:#a50,stroke-dasharray: 4 2",
            *(["    classDef outside fill:#eee,stroke:#777"] if self.external else []),
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
        if self.external:
            lines.append(f'    "{OUTSIDE}" [shape=doubleoctagon, style=filled, fillcolor="#eeeeee"];')
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
        for event_type in self.external:
            lines.append(f'    "{_name(event_type)}" -> "{OUTSIDE}";')
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
