"""`choreo`: trace sagas, list them, draw and check the choreography, run services and relays.

    choreo collect demo_shop                 index every saga of the app's services
    choreo check demo_shop shipping          several apps, one choreography
    choreo check                             the apps of [tool.choreo] in ./pyproject.toml
    choreo sagas --state failed --since 1h   recent sagas and their state
    choreo trace 3f1c2b7e                    one saga as a causal tree
    choreo graph demo_shop --format mermaid  the static choreography
    choreo check demo_shop                   static verification (non-zero exit on problems)
    choreo run demo_shop.orders.handlers:service
    choreo relay demo_shop.orders.handlers:service
    choreo contract check demo_shop --against demo_shop/contracts.json
    choreo asyncapi demo_shop --format yaml  the choreography as an AsyncAPI 3.0 document
    choreo rebuild demo_shop.order_history.handlers:service   replay a read model from its topics

Errors are one line on stderr and a documented exit status (1: the command failed, 2: bad input
or setting, 69: the database or Kafka cannot be reached or used); `CHOREO_DEBUG=1` or
`LOG_LEVEL=debug` shows the traceback.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, ParamSpec, TypeVar

import typer
import yaml
from rich.console import Console
from rich.table import Table
from rich.text import Text
from sqlalchemy.exc import SQLAlchemyError

from choreo import __version__, asyncapi, contract, dlq, readmodel
from choreo.database import masked_url, require_existing
from choreo.exceptions import ChoreoError, ConfigurationError, DependencyUnavailable
from choreo.graph import Choreography, configured_apps, discover, load_service, target_label
from choreo.service import Service
from choreo.settings import LOG_FORMAT, KafkaSettings, log_level_from_env, parse_duration
from choreo.tables import DeadLetter
from choreo.tracing import (
    DATABASE_URL_ENV,
    DEFAULT_DATABASE_URL,
    DEFAULT_GROUP_ID,
    MIN_PREFIX,
    Hop,
    SagaDeclaration,
    SagaState,
    SagaTrace,
    TraceCollector,
    TraceStore,
    declarations_of,
    default_database_url,
)

P = ParamSpec("P")
R = TypeVar("R")

app = typer.Typer(
    name="choreo",
    help="Choreography sagas: trace them, list them, draw and check the choreography, run services.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"choreo {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Show the version and exit."),
    ] = False,
) -> None:
    """Choreography sagas: trace them, list them, draw and check the choreography, run services."""


class TraceFormat(StrEnum):
    """Output formats of `choreo trace`."""

    text = "text"
    json = "json"
    mermaid = "mermaid"


class ListFormat(StrEnum):
    """Output formats of `choreo sagas`."""

    text = "text"
    json = "json"


class GraphFormat(StrEnum):
    """Output formats of `choreo graph`."""

    mermaid = "mermaid"
    dot = "dot"
    text = "text"


DbOption = Annotated[
    str | None,
    typer.Option(
        "--db",
        help=f"Trace database URL [default: ${DATABASE_URL_ENV}, else {DEFAULT_DATABASE_URL}]",
        show_default=False,
    ),
]
AppOption = Annotated[
    str | None,
    typer.Option(
        "--app",
        help="Module or package whose saga declarations to use (default: those the collector stored)",
    ),
]
TargetsArgument = Annotated[
    list[str] | None,
    typer.Argument(
        help="Modules or packages holding the services (e.g. demo_shop shipping, app/services.py, "
        "module:service) [default: apps = [...] under [tool.choreo] in ./pyproject.toml]",
        show_default=False,
    ),
]
ServiceArgument = Annotated[
    str, typer.Argument(help="The service: module:attribute (e.g. demo_shop.orders.handlers:service)")
]


EXIT_FAILED = 1
"""The command ran and failed: `check` found problems, a replayed letter failed again."""
EXIT_USAGE = 2
"""Bad input: an argument, a name that matches nothing, or a setting (as click's usage errors)."""
EXIT_UNAVAILABLE = 69
"""The database or Kafka could not be reached or used (sysexits' EX_UNAVAILABLE)."""


def exit_status(error: BaseException) -> int:
    """The documented exit status for a command that failed with `error`."""
    if isinstance(error, ConfigurationError):
        return EXIT_USAGE
    if isinstance(error, DependencyUnavailable):
        return EXIT_UNAVAILABLE
    return EXIT_FAILED


def show_tracebacks() -> bool:
    """True when errors should show their traceback (`CHOREO_DEBUG=1` or `LOG_LEVEL=debug`)."""
    return bool(os.environ.get("CHOREO_DEBUG")) or os.environ.get("LOG_LEVEL", "").strip().lower() == "debug"


def _fail(message: str, status: int = EXIT_FAILED) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(status)


def handled(func: Callable[P, R]) -> Callable[P, R]:
    """Turn every failure of a command into one line on stderr and its exit status (see `exit_status`)."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except Exception as error:
            if show_tracebacks():
                raise
            if isinstance(error, ChoreoError):
                message = str(error)
            elif isinstance(error, SQLAlchemyError):
                original = getattr(error, "orig", None)
                message = f"database: {original if original is not None else error}"
            else:
                message = f"{type(error).__name__}: {error}"
            raise _fail(_first_line(message), exit_status(error)) from None

    return wrapper


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "failed"


def _run(coro: Awaitable[R]) -> R:
    async def main() -> R:
        return await coro

    return asyncio.run(main())


def _console() -> Console:
    console = Console(highlight=False)
    if not console.is_terminal:
        # Piped or captured: do not squeeze the table into 80 columns.
        console = Console(highlight=False, width=240)
    return console


def _declarations(app_module: str | None) -> list[SagaDeclaration] | None:
    if app_module is None:
        return None
    return declarations_of(discover(app_module))


# -- trace -------------------------------------------------------------------------------------


@app.command()
@handled
def trace(
    saga_id: Annotated[str, typer.Argument(help=f"The saga id (or a unique prefix of it, {MIN_PREFIX}+ characters)")],
    db: DbOption = None,
    output: Annotated[TraceFormat, typer.Option("--format", "-f", help="text, json or mermaid")] = TraceFormat.text,
    app_module: AppOption = None,
) -> None:
    """Show one saga as a causal tree: who emitted what, in reaction to what, how fast, and how it ended."""
    declarations = _declarations(app_module)

    async def load() -> SagaTrace:
        store = TraceStore(db or default_database_url())
        await store.open(create=False)
        try:
            found = await store.resolve(saga_id)
            if found is None:
                short = f" (a prefix needs at least {MIN_PREFIX} characters)" if len(saga_id) < MIN_PREFIX else ""
                raise ConfigurationError(f"no saga {saga_id!r} in the trace database {masked_url(store.url)}{short}")
            saga = await store.trace(found, declarations)
            assert saga is not None
            return saga
        finally:
            await store.close()

    saga = _run(load())
    if output is TraceFormat.json:
        typer.echo(json.dumps(saga.to_dict(), indent=2))
    elif output is TraceFormat.mermaid:
        typer.echo(saga.to_mermaid())
    else:
        render_trace(saga, _console())


_STATE_STYLE = {
    SagaState.COMPLETED: "bold green",
    SagaState.COMPENSATED: "bold yellow",
    SagaState.FAILED: "bold red",
    SagaState.IN_FLIGHT: "bold cyan",
    SagaState.OVERDUE: "bold magenta",
    SagaState.UNKNOWN: "bold",
}


def _ms(delta: timedelta | None) -> str:
    if delta is None:
        return ""
    millis = delta.total_seconds() * 1000
    return f"{millis / 1000:.2f} s" if abs(millis) >= 10_000 else f"{millis:.1f} ms"


def _tree(roots: list[Hop]) -> Iterator[tuple[Hop, str, str]]:
    """(hop, its tree prefix, the prefix of lines below it) in display order."""

    def walk(hop: Hop, prefix: str, last: bool, root: bool) -> Iterator[tuple[Hop, str, str]]:
        here = prefix if root else prefix + ("└─ " if last else "├─ ")
        below = prefix if root else prefix + ("   " if last else "│  ")
        yield hop, here, below
        for index, child in enumerate(hop.children):
            yield from walk(child, below, index == len(hop.children) - 1, False)

    for root in roots:
        yield from walk(root, "", True, True)


def render_trace(saga: SagaTrace, console: Console) -> None:
    """Print a saga as an aligned, coloured timeline tree."""
    declaration = saga.declaration
    header = Text()
    header.append("saga ", style="bold")
    header.append(saga.saga_id, style="bold")
    header.append("  ·  ")
    header.append(declaration.name if declaration else "(undeclared)", style="bold blue")
    header.append("  ·  ")
    header.append(saga.state.value, style=_STATE_STYLE[saga.state])
    console.print(header)
    events = sum(1 for hop in saga.hops() if hop.seen)
    console.print(
        Text(
            f"started {saga.started_at.isoformat(timespec='milliseconds')} · {events} events · "
            f"{' → '.join(saga.services)}",
            style="dim",
        )
    )
    table = Table(box=None, show_header=True, header_style="dim", pad_edge=False, padding=(0, 1))
    table.add_column("offset", justify="right", no_wrap=True)
    table.add_column("by", no_wrap=True)
    table.add_column("event", no_wrap=True)
    table.add_column("hop", justify="right", no_wrap=True)
    table.add_column("publish", justify="right", no_wrap=True)
    table.add_column("", no_wrap=True)
    for hop, prefix, below in _tree(saga.roots):
        event = hop.event
        style = "yellow" if event.is_compensation else ("red" if hop.dead_letters else "")
        if hop is saga.ended_by:
            style = "green"
        marks = Text()
        if declaration is not None and event.event_type == declaration.starts and hop.parent is None:
            marks.append(f"▶ starts {declaration.name} ", style="cyan")
        if event.cause_upcast and hop.parent is not None:
            marks.append(f"⇡ took {hop.parent.event.event_type} upcast {event.cause_upcast} ", style="magenta")
        if event.is_compensation:
            marks.append(f"↺ undoes {', '.join(event.compensates)} ", style="yellow")
        if declaration is not None and event.event_type in declaration.ends:
            marks.append(f"■ ends {declaration.name} ", style="green")
        if declaration is not None and event.event_type == declaration.timeout_event:
            marks.append("⏰ deadline ", style="magenta")
        if not hop.seen:
            marks.append("(known from a dead letter only) ", style="dim")
        table.add_row(
            Text(f"+{_ms(saga.offset(hop))}"),
            Text(prefix, style="dim") + Text(event.by, style=style or "bold"),
            Text(event.event_type, style=style),
            Text(_ms(hop.latency)),
            Text(_ms(hop.publish_delay), style="dim"),
            marks,
        )
        for letter in hop.dead_letters:
            offset = _ms(letter.published_at - saga.started_at) if letter.published_at else ""
            table.add_row(
                Text(f"+{offset}" if offset else ""),
                Text(below + ("   " if not hop.children else "│  "), style="dim")
                + Text(f"✗ {letter.consumer}", style="bold red"),
                Text(letter.reason or "dead letter", style="red"),
                Text(""),
                Text(""),
                Text(f"✗ {letter.error or ''}", style="red"),
            )
    console.print(table)
    closing = saga.summary()
    style = "green" if saga.ended_by else ("red" if saga.state is SagaState.FAILED else "yellow")
    console.print(Text(closing, style=style))


# -- sagas -------------------------------------------------------------------------------------


@app.command()
@handled
def sagas(
    db: DbOption = None,
    state: Annotated[
        SagaState | None,
        typer.Option("--state", help=f"Only sagas in this state: {', '.join(SagaState)}"),
    ] = None,
    since: Annotated[
        str | None, typer.Option("--since", help="Only sagas started within this long, e.g. 90s, 10m, 2h, 1d")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="At most this many sagas")] = 20,
    app_module: AppOption = None,
    output: Annotated[ListFormat, typer.Option("--format", "-f", help="text or json")] = ListFormat.text,
) -> None:
    """List recent sagas, newest first, with their state (from the saga declarations)."""
    declarations = _declarations(app_module)
    window = parse_duration(since, "--since") if since else None

    async def load() -> tuple[list[SagaTrace], bool]:
        store = TraceStore(db or default_database_url())
        await store.open(create=False)
        try:
            now = datetime.now().astimezone()
            found = await store.sagas(
                declarations=declarations,
                state=state,
                since=now - window if window else None,
                limit=limit,
                now=now,
            )
            declared = bool(declarations if declarations is not None else await store.declarations())
            return found, declared
        finally:
            await store.close()

    found, declared = _run(load())
    if output is ListFormat.json:
        typer.echo(json.dumps([_summary(saga) for saga in found], indent=2))
        return
    console = _console()
    if not found:
        console.print("no sagas" + (f" in state {state.value}" if state else "") + (f" since {since}" if since else ""))
        return
    table = Table(box=None, header_style="dim", pad_edge=False, padding=(0, 2))
    # `ended`: to the end event; `settled`: to the last event, e.g. a compensation long after the end.
    for column in ("saga id", "saga", "state", "started", "ended", "settled", "events", "ended by / stopped at"):
        numeric = column in ("ended", "settled", "events")
        table.add_column(column, no_wrap=True, justify="right" if numeric else "left")
    for saga in found:
        where = (
            saga.ended_by.event.event_type if saga.ended_by else ", ".join(h.event.event_type for h in saga.stopped_at)
        )
        if saga.dead_lettered:
            where += f"  ✗ {sum(len(h.dead_letters) for h in saga.hops())} dead letter(s)"
        table.add_row(
            saga.saga_id,
            saga.declaration.name if saga.declaration else "-",
            Text(saga.state.value, style=_STATE_STYLE[saga.state]),
            saga.started_at.astimezone().strftime("%Y-%m-%d %H:%M:%S"),
            _ms(saga.ended_after) or "-",
            _ms(saga.settled_after),
            str(sum(1 for hop in saga.hops() if hop.seen)),
            where,
        )
    console.print(table)
    if not declared:
        console.print(Text("no saga declarations known: pass --app <module> to tell how sagas end", style="dim yellow"))


def _summary(saga: SagaTrace) -> dict[str, Any]:
    full = saga.to_dict()
    full.pop("roots")
    return full


# -- graph and check ---------------------------------------------------------------------------


@app.command()
@handled
def graph(
    targets: TargetsArgument = None,
    output: Annotated[GraphFormat, typer.Option("--format", "-f", help="mermaid, dot or text")] = GraphFormat.mermaid,
) -> None:
    """Draw the static choreography: which service reacts to which event and may emit what."""
    choreography = Choreography(discover(*targets or ()))
    if output is GraphFormat.dot:
        typer.echo(choreography.to_dot())
    elif output is GraphFormat.text:
        typer.echo(choreography.to_text())
    else:
        typer.echo(choreography.to_mermaid())


@app.command()
@handled
def check(targets: TargetsArgument = None) -> None:
    """Verify the choreography statically; exit 1 with an explanation per problem.

    Checks: events emitted that nobody handles, that end no saga and are not external;
    handlers whose event nothing emits; saga runs that reach no declared end; failure runs
    that leave a compensable step uncompensated; services that did a step of a saga and do
    not handle the event that cancels it after it ended. See docs/tracing.md.
    """
    targets = targets or configured_apps()
    services = discover(*targets)
    choreography = Choreography(services)
    report = choreography.check()
    handlers = len(choreography.handlers)
    scope = ", ".join(
        _count(n, noun)
        for n, noun in ((len(services), "service"), (handlers, "handler"), (len(choreography.sagas), "saga"))
    )
    for problem in report.problems:
        typer.echo(f"✗ {problem}")
    for note in report.notes:
        typer.echo(f"note: {note}")
    apps = ", ".join(target_label(t) for t in targets)
    if report.problems:
        typer.echo(f"choreo check: {len(report.problems)} problem(s) in {apps} ({scope})", err=True)
        raise typer.Exit(1)
    typer.echo(f"✓ choreo check: {apps} ({scope}): no problems")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


# -- collect, run, relay -----------------------------------------------------------------------


def _log_from_env() -> None:
    # Long-running commands log what the service does, at LOG_LEVEL, like the services' images.
    logging.basicConfig(level=log_level_from_env().upper(), format=LOG_FORMAT)


async def serve(start: Callable[[], Awaitable[None]], stop: Callable[[], Awaitable[None]]) -> None:
    """Run `start()`, block until SIGINT or SIGTERM, then `stop()`."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stopping.set)
    try:
        await start()  # a start that fails closes what it opened; there is nothing to stop
        try:
            await stopping.wait()
        finally:
            await stop()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


@app.command()
@handled
def collect(
    targets: TargetsArgument = None,
    db: DbOption = None,
    group: Annotated[str, typer.Option("--group", help="Kafka consumer group of the collector")] = DEFAULT_GROUP_ID,
    bootstrap_servers: Annotated[
        str | None,
        typer.Option(
            "--bootstrap-servers",
            help="Kafka host:port[,host:port] [default: $CHOREO_TRACE_KAFKA_BOOTSTRAP_SERVERS, "
            "$CHOREO_KAFKA_BOOTSTRAP_SERVERS or $KAFKA_BOOTSTRAP_SERVERS]",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Index every record of the app's services (their topics and dead-letter topics) by saga id.

    Runs until SIGINT/SIGTERM. Kafka settings come from CHOREO_TRACE_KAFKA_*, CHOREO_KAFKA_*
    (e.g. CHOREO_KAFKA_TOPIC_PREFIX) as for services.
    """
    _log_from_env()
    services = discover(*targets or ())
    collector = TraceCollector(services, db or default_database_url(), kafka=bootstrap_servers, group_id=group)
    settings: KafkaSettings = collector.kafka_settings()

    started = False

    async def start() -> None:
        nonlocal started
        await collector.start()
        started = True
        typer.echo(
            f"collecting {len(collector.topics)} topics of {', '.join(s.name for s in services)} from "
            f"{settings.bootstrap_servers} into {collector.store!r} (group {group}); Ctrl-C to stop"
        )

    async def stop() -> None:
        await collector.stop()
        if not started:
            return  # the error that stopped `start()` is the only line to show
        stats = collector.stats
        typer.echo(
            f"stopped: {stats.indexed} events and {stats.dead_letters} dead letters indexed, "
            f"{stats.duplicates} duplicates, {stats.ignored} records without choreo headers"
        )

    _run(serve(start, stop))


@app.command()
@handled
def run(service_spec: ServiceArgument) -> None:
    """Run one service (consumer, relay, cleanup) until SIGINT/SIGTERM, then stop it cleanly.

    Logs at LOG_LEVEL (debug, info, warning, error; default info).
    """
    _log_from_env()
    service = load_service(service_spec)

    async def start() -> None:
        await service.start()
        typer.echo(f"{service.name} running: consuming {', '.join(service.subscribed_topics) or 'nothing'}")

    _run(serve(start, service.stop))


@app.command()
@handled
def relay(service_spec: ServiceArgument) -> None:
    """Run only the relay of a service (publish its outbox, consume nothing) until SIGINT/SIGTERM."""
    _log_from_env()
    service = load_service(service_spec)

    async def start() -> None:
        await service.start(consume=False)
        typer.echo(f"{service.name} relay running")

    _run(serve(start, service.stop))


@app.command()
@handled
def ui(
    targets: Annotated[
        list[str] | None, typer.Argument(help="Modules or packages holding the services, as for `choreo graph`")
    ] = None,
    db: DbOption = None,
    host: Annotated[str, typer.Option(help="Interface to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to serve on", min=1, max=65535)] = 8700,
    token: Annotated[
        str | None, typer.Option(help="Require this token on every request [default: $CHOREO_UI_TOKEN]")
    ] = None,
    allow_actions: Annotated[
        bool, typer.Option("--allow-actions", help="Enable dead-letter replay and discard")
    ] = False,
) -> None:
    """Serve the saga explorer: sagas, their timelines, the choreography, dead letters and health."""
    try:
        import uvicorn

        from choreo.explorer import create_app
    except ImportError as error:
        raise ChoreoError(f"the explorer needs the ui extra: pip install 'choreo[ui]' ({error})") from None
    _log_from_env()
    services = [service for target in targets or [] for service in discover(target)]
    secret = token or os.environ.get("CHOREO_UI_TOKEN") or None
    if host not in ("127.0.0.1", "localhost", "::1") and secret is None:
        typer.echo(
            f"warning: serving on {host} without authentication: anyone who reaches it can read every saga"
            + (" and replay dead letters" if allow_actions else "")
            + "; set --token or CHOREO_UI_TOKEN",
            err=True,
        )
    explorer = create_app(db or default_database_url(), services, token=secret, allow_actions=allow_actions)
    typer.echo(f"choreo explorer on http://{host}:{port}/ (Ctrl-C to stop)")
    uvicorn.run(explorer, host=host, port=port, log_level="warning")


class DocFormat(StrEnum):
    """Output formats of `choreo asyncapi`."""

    yaml = "yaml"
    json = "json"


@app.command("asyncapi")
@handled
def asyncapi_document(
    targets: TargetsArgument = None,
    output: Annotated[DocFormat, typer.Option("--format", "-f", help="yaml or json")] = DocFormat.yaml,
    title: Annotated[str | None, typer.Option(help="info.title [default: the apps' names]")] = None,
    doc_version: Annotated[str, typer.Option("--doc-version", help="info.version")] = "0.0.0",
) -> None:
    """Print the choreography as an AsyncAPI 3.0 document: topics, events, who sends and receives."""
    targets = targets or configured_apps()
    doc = asyncapi.document(
        discover(*targets), title=title or ", ".join(target_label(t) for t in targets), version=doc_version
    )
    if output is DocFormat.json:
        typer.echo(json.dumps(doc, indent=2, ensure_ascii=False))
    else:
        typer.echo(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True), nl=False)


contract_app = typer.Typer(
    help="Export the event contract, and check the code against the contract of the last release.",
    no_args_is_help=True,
)
app.add_typer(contract_app, name="contract")


@contract_app.command("export")
@handled
def contract_export(targets: TargetsArgument = None) -> None:
    """Print the event contract (JSON) of the apps' services: `choreo contract export app > contracts.json`."""
    typer.echo(contract.dumps(contract.export(discover(*targets or ()))), nl=False)


@contract_app.command("check")
@handled
def contract_check(
    targets: TargetsArgument = None,
    against: Annotated[
        Path, typer.Option("--against", help="The contract of the last release (from `choreo contract export`)")
    ] = Path("contracts.json"),
) -> None:
    """Compare the code with a stored contract; exit 1 on a change that would break a consumer."""
    if not against.is_file():
        raise ConfigurationError(f"no contract at {against}: write one with `choreo contract export > {against}`")
    stored = contract.load(against.read_text(encoding="utf-8"), str(against))
    changes = contract.check(stored, contract.export(discover(*targets or ())))
    breaking = [c for c in changes if c.breaking]
    for change in changes:
        typer.echo(f"{'✗' if change.breaking else '·'} {change}")
    if breaking:
        typer.echo(
            f"choreo contract check: {len(breaking)} breaking change(s) against {against}; see "
            "'Changing an event' in choreo's README",
            err=True,
        )
        raise typer.Exit(1)
    typer.echo(f"✓ choreo contract check: compatible with {against} ({len(changes)} compatible change(s))")


dlq_app = typer.Typer(
    help="Operate a service's dead letters: list, show, replay, discard (nothing is ever deleted).",
    no_args_is_help=True,
)
app.add_typer(dlq_app, name="dlq")

LetterIds = Annotated[list[int] | None, typer.Argument(help="Dead-letter ids (see `choreo dlq list`)")]
SagaOption = Annotated[str | None, typer.Option("--saga", help="Only letters of this saga id")]
HandlerOption = Annotated[
    str | None, typer.Option("--handler", help="Only letters of this handler, e.g. orders.approve_order")
]


ServiceDbOption = Annotated[
    str | None,
    typer.Option(
        "--db",
        help="The service's database URL [default: $CHOREO_<SERVICE>_DATABASE_URL, $CHOREO_DATABASE_URL, "
        "$DATABASE_URL, else sqlite+aiosqlite:///<service>.db]",
        show_default=False,
    ),
]


def _letters_of(service_spec: str, db: str | None) -> Service:
    service = load_service(service_spec)
    return service if db is None else service.clone(database_url=db)


async def _open(service: Service) -> None:
    # An operator's typo must not create an empty database that then "has no dead letters".
    variable = f"CHOREO_{service.name.upper().replace('-', '_')}_DATABASE_URL"
    require_existing(service.database_url, f"{service.name}'s database", f"pass --db or set {variable}")
    # The database alone: a replay's events wait in the outbox for the running service's relay.
    # A one-shot command fails at once rather than wait for a database that is down.
    await service.start(kafka=False, start_timeout=0)


async def _select(
    service: Service, ids: list[int] | None, saga: str | None, handler: str | None, status: str | None
) -> list[DeadLetter]:
    if not (ids or saga or handler):
        raise ConfigurationError("name the letters: ids, --saga or --handler")
    return await dlq.letters(service, ids=ids or (), saga_id=saga, consumer=handler, status=status, limit=10_000)


@app.command()
@handled
def rebuild(service_spec: ServiceArgument, db: ServiceDbOption = None) -> None:
    """Empty a read model (a service that emits nothing) and rewind its consumer group.

    Stop every instance first; its next start replays the topics from their start.
    """
    service = _letters_of(service_spec, db)
    readmodel.require_read_model(service)

    async def main() -> readmodel.Rebuilt:
        await _open(service)
        try:
            return await readmodel.rebuild(service)
        finally:
            await service.stop()

    done = _run(main())
    topics = ", ".join(f"{topic} ({n} partitions)" for topic, n in done.partitions.items())
    typer.echo(
        f"✓ {service.name}: consumer group {done.group_id} rewound to the start of {topics}; "
        f"emptied {', '.join(done.tables) or 'no tables'} and the inbox. Start the service to replay."
    )


@dlq_app.command("list")
@handled
def dlq_list(
    service_spec: ServiceArgument,
    status: Annotated[str, typer.Option(help="parked, replayed, discarded or all")] = "parked",
    saga: SagaOption = None,
    handler: HandlerOption = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1)] = 50,
    output: Annotated[ListFormat, typer.Option("--format", "-f", help="text or json")] = ListFormat.text,
    db: ServiceDbOption = None,
) -> None:
    """List dead letters, newest first."""
    service = _letters_of(service_spec, db)

    async def main() -> list[DeadLetter]:
        await _open(service)
        try:
            wanted = None if status == "all" else status
            return await dlq.letters(service, status=wanted, saga_id=saga, consumer=handler, limit=limit)
        finally:
            await service.stop()

    found = _run(main())
    if output is ListFormat.json:
        typer.echo(json.dumps([_letter_dict(letter) for letter in found], indent=2))
        return
    table = Table("id", "status", "handler", "event", "saga", "reason", "attempts", "last failure", "error")
    for letter in found:
        table.add_row(
            str(letter.id),
            letter.status,
            letter.consumer,
            letter.event_type or "?",
            (letter.saga_id or "")[:8],
            letter.reason,
            str(letter.attempts),
            letter.last_failed_at.strftime("%Y-%m-%d %H:%M:%S"),
            _first_line(letter.error)[:60],
        )
    which = "" if status == "all" else f"{status} "
    _console().print(table if found else f"no {which}dead letters in {service.name}")


@dlq_app.command("show")
@handled
def dlq_show(
    service_spec: ServiceArgument,
    letter_id: Annotated[int, typer.Argument(help="The letter's id")],
    db: ServiceDbOption = None,
) -> None:
    """Show one dead letter whole: headers, payload, error and traceback."""
    service = _letters_of(service_spec, db)

    async def main() -> list[DeadLetter]:
        await _open(service)
        try:
            return await dlq.letters(service, ids=[letter_id], status=None)
        finally:
            await service.stop()

    found = _run(main())
    if not found:
        raise ChoreoError(f"{service.name} has no dead letter {letter_id}")
    typer.echo(json.dumps(_letter_dict(found[0], whole=True), indent=2))


@dlq_app.command("replay")
@handled
def dlq_replay(
    service_spec: ServiceArgument,
    ids: LetterIds = None,
    saga: SagaOption = None,
    handler: HandlerOption = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replay (and mark replayed) even letters the inbox shows as processed")
    ] = False,
    db: ServiceDbOption = None,
) -> None:
    """Run parked letters through their handler again (idempotent; saga and causation ids kept)."""
    service = _letters_of(service_spec, db)

    async def main() -> list[dlq.ReplayResult]:
        await _open(service)
        try:
            return await dlq.replay(service, await _select(service, ids, saga, handler, status=None), force=force)
        finally:
            await service.stop()

    results = _run(main())
    for result in results:
        typer.echo(f"{result.letter_id}: {result.outcome}")
    if not results:
        raise ChoreoError("no dead letter matched")
    refused = [result for result in results if result.outcome == "already-processed"]
    for result in refused:
        typer.echo(
            f"letter {result.letter_id} not replayed: {result.detail}; "
            "discard it, or replay it with --force to mark it replayed",
            err=True,
        )
    if refused or any(result.outcome == "dead-lettered" for result in results):
        raise typer.Exit(1)  # refused, or failed again: parked anew


@dlq_app.command("discard")
@handled
def dlq_discard(
    service_spec: ServiceArgument,
    ids: LetterIds = None,
    saga: SagaOption = None,
    handler: HandlerOption = None,
    db: ServiceDbOption = None,
) -> None:
    """Mark parked letters discarded: kept for audit, never replayed."""
    service = _letters_of(service_spec, db)

    async def main() -> list[int]:
        await _open(service)
        try:
            return await dlq.discard(service, await _select(service, ids, saga, handler, status="parked"))
        finally:
            await service.stop()

    discarded = _run(main())
    typer.echo(f"discarded {len(discarded)} letter(s): {', '.join(map(str, discarded)) or '-'}")


def _letter_dict(letter: DeadLetter, *, whole: bool = False) -> dict[str, Any]:
    fields = letter.model_dump(mode="json", exclude={"payload", "key", "traceback", "headers"})
    if whole:
        fields["headers"] = letter.headers
        fields["key"] = letter.key.decode(errors="replace") if letter.key is not None else None
        fields["payload"] = letter.payload.decode(errors="replace")
        fields["traceback"] = letter.traceback
    return fields


def main() -> None:
    """Console-script entry point."""
    app(prog_name="choreo")


if __name__ == "__main__":  # pragma: no cover
    main()
