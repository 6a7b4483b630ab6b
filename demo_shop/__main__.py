"""`demo-shop`: the whole shop in one process, then a walkthrough of every flow of the order saga.

Starts an embedded Kafka-compatible broker (tansu; or uses KAFKA_BOOTSTRAP_SERVERS), the orders,
customers and payments services on SQLite files, and their HTTP API; drives every flow through
that API, shows what each saga did, and keeps serving until Ctrl-C (or exits, with `--once`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import sysconfig
import time
from collections.abc import Awaitable, Generator, Sequence
from pathlib import Path
from typing import TypeVar

import httpx
import uvicorn
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from choreo import KafkaSettings, Service, TraceCollector, __version__
from choreo.cli import render_trace
from choreo.devbroker import DevBrokerError, Tansu
from choreo.explorer import create_app
from choreo.tracing import SagaTrace
from demo_shop.shop import SERVICES, Shop
from demo_shop.walkthrough import FLOWS, FlowResult, create_customers, hop_reader, run_flow

T = TypeVar("T")

TRACE_DB = "trace.db"
"""The trace collector's database, beside the services' in the data directory."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="demo-shop",
        description=(
            "Run the choreo demo shop (orders, customers, payments) in one process and walk "
            "through every flow of the order saga: success, credit limit exceeded, unknown "
            "customer, payment declined (compensation) and cancel after approval."
        ),
        epilog=(
            "Kafka: an embedded in-memory broker (tansu) is started unless KAFKA_BOOTSTRAP_SERVERS "
            "is set (then CHOREO_KAFKA_* settings apply too; a CHOREO_KAFKA_TOPIC_PREFIX keeps runs "
            "apart). Each service keeps its tables in <data-dir>/<service>.db, the trace collector in "
            f"<data-dir>/{TRACE_DB}. To run the services "
            "as separate processes, see `python -m demo_shop.orders --help` and compose.yaml."
        ),
    )
    parser.add_argument("--version", action="version", version=f"demo-shop (choreo {__version__})")
    parser.add_argument(
        "--once",
        action="store_true",
        help="exit after the walkthrough: status 0 if every flow ended as expected, 1 otherwise",
    )
    parser.add_argument("--host", default="127.0.0.1", help="HTTP listen address (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default: %(default)s)")
    parser.add_argument(
        "--ui-port", type=int, default=8700, help="port of the saga explorer (default: %(default)s; 0: none)"
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path("data"),
        help="directory of the services' SQLite databases (default: ./%(default)s)",
    )
    parser.add_argument(
        "--keep-data",
        action="store_true",
        help="keep the databases and traces of an earlier run (default: start from empty ones)",
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds each flow may take (default: 30)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the services do")
    args = parser.parse_args(argv)
    if not 0 <= args.port < 65536:
        parser.error(f"--port {args.port} is not a TCP port number")
    if not 0 <= args.ui_port < 65536:
        parser.error(f"--ui-port {args.ui_port} is not a TCP port number")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point of `demo-shop`."""
    args = parse_args(argv)
    console = Console(highlight=False)
    if not console.is_terminal:  # piped or captured: keep the trace trees readable
        console = Console(highlight=False, width=120)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(name)s: %(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
    )
    if not args.verbose:
        # Consumer groups rebalance while the services start; aiokafka warns about each one.
        logging.getLogger("aiokafka.consumer.group_coordinator").setLevel(logging.ERROR)
    sys.exit(asyncio.run(Demo(args, console).run()))


class Stopped(Exception):
    """Ctrl-C or SIGTERM arrived."""


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # demo-shop handles SIGINT/SIGTERM itself, so that it can stop the broker last.
        yield


class Demo:
    """One run of `demo-shop`."""

    def __init__(self, args: argparse.Namespace, console: Console) -> None:
        self.args = args
        self.console = console
        self.stop = asyncio.Event()
        self.broker: Tansu | None = None
        self.server: _Server | None = None
        self.serving: asyncio.Task[None] | None = None
        self.collector: TraceCollector | None = None
        self.explorer: _Server | None = None
        self.exploring: asyncio.Task[None] | None = None

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal)
        try:
            try:
                shop = await self.start()
            except _StartError as error:
                self.console.print(f"[red]demo-shop: {error}[/]")
                return 2
            results = await self.until_stopped(self.walk_through(shop))
            self.summarize(results)
            self.show_commands()
            failed = [r for r in results if not r.ok]
            if self.args.once:
                return 1 if failed else 0
            self.invite()
            await self.until_stopped(self.stop.wait())
            return 0
        except Stopped:
            self.console.print("\n[yellow]stopping[/]")
            return 130
        finally:
            await self.shutdown()

    def _on_signal(self) -> None:
        if self.stop.is_set() and self.server is not None:
            self.server.force_exit = True  # a second Ctrl-C: don't wait for open connections
        self.stop.set()

    async def until_stopped(self, work: Awaitable[T]) -> T:
        """`work`'s result, unless Ctrl-C comes first (then `Stopped`)."""
        task = asyncio.ensure_future(work)
        stopping = asyncio.ensure_future(self.stop.wait())
        try:
            await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise Stopped
        return task.result()

    # -- starting and stopping ---------------------------------------------------------------

    async def start(self) -> Shop:
        args = self.args
        listener = _listen(args.host, args.port)
        explorer_listener = _listen(args.host, args.ui_port) if args.ui_port else None
        data_dir: Path = args.data_dir
        _prepare_data_dir(data_dir, keep=args.keep_data)
        with Progress(
            SpinnerColumn(finished_text="[green]✔[/]"),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=self.console,
        ) as progress:
            kafka = await self._start_kafka(progress)
            if self.stop.is_set():
                raise Stopped
            shop = Shop.in_directory(data_dir, kafka)
            tasks: dict[str, TaskID] = {
                s.name: progress.add_task(f"starting {s.name} ({data_dir / s.name}.db)", total=1) for s in shop
            }

            def started(service: Service, seconds: float) -> None:
                progress.update(
                    tasks[service.name],
                    completed=1,
                    description=f"{service.name} consuming {', '.join(service.subscribed_topics)}",
                )

            http = progress.add_task(f"starting HTTP API on http://{args.host}:{args.port}", total=1)
            self.server = _Server(uvicorn.Config(shop.create_app(on_started=started), log_level="warning"))
            self.serving = asyncio.create_task(self.server.serve(sockets=[listener]))
            while not self.server.started and not self.serving.done():
                if self.stop.is_set():
                    raise Stopped
                await asyncio.sleep(0.02)
            if not self.server.started:
                raise _StartError("the services did not start (see the errors above)")
            progress.update(http, completed=1, description=f"HTTP API on http://{args.host}:{args.port}")
            tracing = progress.add_task("starting the trace collector", total=1)
            self.collector = TraceCollector(shop, self.trace_url, kafka=kafka or None)
            await self.collector.start()
            progress.update(tracing, completed=1, description=f"trace collector indexing into {data_dir / TRACE_DB}")
            if explorer_listener is not None:
                await self._start_explorer(progress, shop, explorer_listener)
        return shop

    async def _start_explorer(self, progress: Progress, shop: Shop, listener: socket.socket) -> None:
        url = f"http://{_client_host(self.args.host)}:{self.args.ui_port}/"
        task = progress.add_task("starting the saga explorer", total=1)
        # The running services themselves: the explorer reads their tables, starts and stops nothing.
        explorer = create_app(self.trace_url, list(shop), start_services=False)
        self.explorer = _Server(uvicorn.Config(explorer, log_level="warning"))
        self.exploring = asyncio.create_task(self.explorer.serve(sockets=[listener]))
        while not self.explorer.started and not self.exploring.done():
            await asyncio.sleep(0.02)
        if not self.explorer.started:
            raise _StartError("the saga explorer did not start (see the errors above)")
        progress.update(task, completed=1, description=f"saga explorer on {url}")

    @property
    def trace_url(self) -> str:
        return f"sqlite:///{self.args.data_dir / TRACE_DB}"

    async def _start_kafka(self, progress: Progress) -> KafkaSettings | None:
        bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or os.environ.get("CHOREO_KAFKA_BOOTSTRAP_SERVERS")
        if bootstrap:
            progress.add_task(f"using Kafka at {bootstrap} (KAFKA_BOOTSTRAP_SERVERS)", total=1, completed=1)
            return None  # each service reads KAFKA_BOOTSTRAP_SERVERS and CHOREO_KAFKA_* itself
        task = progress.add_task("starting the embedded Kafka-compatible broker (tansu, in memory)", total=1)
        self.broker = Tansu()
        try:
            await asyncio.to_thread(self.broker.start)
        except DevBrokerError as error:
            raise _StartError(f"{error}\n(or set KAFKA_BOOTSTRAP_SERVERS to use a Kafka you run)") from None
        progress.update(task, completed=1, description=f"embedded broker (tansu) on {self.broker.bootstrap}")
        # tansu cannot do the idempotent producer, and does not wake a waiting fetch when new
        # records arrive: short fetch waits keep each hop to a few milliseconds.
        return KafkaSettings(bootstrap_servers=self.broker.bootstrap, idempotence=False, fetch_max_wait_ms=5)

    async def shutdown(self) -> None:
        if self.explorer is not None and self.exploring is not None:
            self.explorer.should_exit = True
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await self.exploring
        if self.collector is not None:
            await self.collector.stop()
        if self.server is not None and self.serving is not None:
            self.server.should_exit = True  # the lifespan then stops the services
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await self.serving
        if self.broker is not None:
            await asyncio.to_thread(self.broker.stop)

    # -- the walkthrough ---------------------------------------------------------------------

    async def walk_through(self, shop: Shop) -> list[FlowResult]:
        base_url = f"http://{_client_host(self.args.host)}:{self.args.port}"
        read_hops = hop_reader({service.name: service.engine for service in shop})
        results = []
        async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
            customers = await create_customers(client)
            self.console.print()
            self.console.print(
                "customers: " + ", ".join(f"{key} = {customer_id}" for key, customer_id in customers.items())
            )
            for number, flow in enumerate(FLOWS, 1):
                self.console.print()
                self.console.rule(f"[bold]{number}. {flow.title}")
                self.console.print(f"[bold]expected[/]  {flow.story}")
                self.console.print(f"          order {flow.final_state}; events: {', '.join(flow.events)}")
                result = await run_flow(client, flow, customers, read_hops, timeout=self.args.timeout)
                await self.show(result)
                results.append(result)
        return results

    async def show(self, result: FlowResult) -> None:
        reason = f" ({result.reason})" if result.reason else ""
        self.console.print(
            f"[bold]happened[/]  order {result.state}{reason} in {result.seconds * 1000:.0f} ms\n"
            f"          order {result.order_id}, saga {result.saga_id}"
        )
        if result.reservation:
            self.console.print(f"          credit reservation: {result.reservation}")
        for problem in result.problems:
            self.console.print(f"[red]  ✘ {problem}[/]")
        if result.saga_id is not None:
            self.console.print()
            trace = await self.collected_trace(result.saga_id, len(result.hops))
            if trace is None:
                self.console.print("[yellow]  the trace collector has not seen this saga yet[/]")
            else:
                render_trace(trace, self.console)

    async def collected_trace(self, saga_id: str, events: int) -> SagaTrace | None:
        """The saga's trace once the collector has indexed all its `events` (or after 5 s)."""
        assert self.collector is not None
        deadline = time.monotonic() + 5
        while True:
            trace = await self.collector.store.trace(saga_id)
            seen = 0 if trace is None else sum(1 for hop in trace.hops() if hop.seen)
            if seen >= events or time.monotonic() > deadline:
                return trace
            await asyncio.sleep(0.05)

    def summarize(self, results: Sequence[FlowResult]) -> None:
        table = Table(title="summary")
        for column in ("flow", "expected", "happened", "hops", "time", ""):
            table.add_column(column)
        for result in results:
            table.add_row(
                result.flow.title,
                result.flow.final_state,
                str(result.state),
                str(len(result.hops)),
                f"{result.seconds * 1000:.0f} ms",
                "[green]✔[/]" if result.ok else "[red]✘ " + "; ".join(result.problems) + "[/]",
            )
        self.console.print()
        self.console.print(table)
        failed = sum(not r.ok for r in results)
        if failed:
            self.console.print(f"[red bold]{failed} of {len(results)} flows did not end as expected[/]")
        else:
            self.console.print(f"[green bold]all {len(results)} flows ended as expected[/]")

    def show_commands(self) -> None:
        """How to look at the sagas afterwards: the trace database outlives this run."""
        choreo = _command("choreo")
        self.console.print(
            "\nThe sagas, from the trace database (also after this run, from this directory):\n"
            f"  {choreo} sagas --db {self.trace_url}\n"
            f"  {choreo} trace <saga id> --db {self.trace_url}\n"
            f"  {choreo} graph demo_shop    {choreo} check demo_shop",
            soft_wrap=True,  # keep each command on one line, whatever the width
        )

    def invite(self) -> None:
        base = f"http://{_client_host(self.args.host)}:{self.args.port}"
        explorer = f"http://{_client_host(self.args.host)}:{self.args.ui_port}/"
        watch = f"Watch the sagas in the saga explorer: {explorer}\n" if self.args.ui_port else ""
        self.console.print(
            f"\nThe shop is still running at {base} (API docs: {base}/docs). Try:\n"
            f"  curl -s -X POST {base}/customers -H 'content-type: application/json' "
            '-d \'{"name": "Grace", "credit_limit": "300.00"}\'\n'
            f"  curl -s -X POST {base}/orders -H 'content-type: application/json' "
            '-d \'{"customer_id": "<id>", "total": "42.00"}\'\n'
            f"  curl -s {base}/orders?state=APPROVED\n"
            f"{watch}"
            "New sagas appear in the commands above while this runs. Ctrl-C to stop.",
            soft_wrap=True,
        )


class _StartError(Exception):
    pass


def _listen(host: str, port: int) -> socket.socket:
    """Bind the HTTP port now, so a busy port is reported before anything starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise _StartError(f"cannot listen on {host}:{port} ({error.strerror}); pass another --port") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _client_host(host: str) -> str:
    return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)


def _prepare_data_dir(data_dir: Path, *, keep: bool) -> None:
    """Create the data directory; unless `keep`, delete the services' and the trace's SQLite files (only those)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    if keep:
        return
    for database in [f"{name}.db" for name in SERVICES] + [TRACE_DB]:
        for suffix in ("", "-wal", "-shm", "-journal"):
            (data_dir / f"{database}{suffix}").unlink(missing_ok=True)


def _command(name: str) -> str:
    """`name`, this installation's console script, as it can be typed here: bare if PATH finds it, else its path."""
    script = Path(sysconfig.get_path("scripts")) / name
    found = shutil.which(name)
    if not script.exists() or (found is not None and Path(found).resolve() == script.resolve()):
        return name
    try:
        return str(script.relative_to(Path.cwd()))  # e.g. .venv/bin/choreo from the repository root
    except ValueError:
        return str(script)


if __name__ == "__main__":
    main()
