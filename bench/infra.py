"""What a run stands on: fresh databases and topics, child processes, and resource sampling."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psutil

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_POSTGRES_URL = "postgresql://postgres:postgres@127.0.0.1:5432/postgres"

DatabaseFactory = Callable[[str], Awaitable[str]]
"""`url = await make("orders")`: an empty database for one service (a `postgresql+asyncpg://` URL)."""


# -- PostgreSQL ------------------------------------------------------------------------------


def asyncpg_dsn(url: str) -> str:
    """`url` as asyncpg's DSN: no SQLAlchemy `+driver`, and `ssl=` spelled `sslmode=`."""
    parts = urlsplit(url)
    query = "&".join(
        "sslmode=" + item[4:] if item.startswith("ssl=") else item for item in parts.query.split("&") if item
    )
    return urlunsplit(parts._replace(scheme=parts.scheme.split("+", 1)[0], query=query))


def without_tls(url: str) -> str:
    """`url` asking for a plain connection (`ssl=disable`) unless it says otherwise.

    asyncpg's default, `prefer`, negotiates TLS whenever the server offers it (Debian's
    PostgreSQL does, even on 127.0.0.1); on loopback that only adds CPU to every round trip.
    The compose deployment's PostgreSQL has no TLS, so every system here runs without it.
    """
    parts = urlsplit(url)
    if "ssl" in parts.query:
        return url
    return urlunsplit(parts._replace(query="&".join(filter(None, [parts.query, "ssl=disable"]))))


def sqlalchemy_url(url: str) -> str:
    """`url` for SQLAlchemy's asyncpg dialect."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(scheme="postgresql+asyncpg"))


def named_databases(postgres_url: str, prefix: str = "bench") -> DatabaseFactory:
    """Factory of databases named `<prefix>_<service>`, dropped (if present) and created anew."""

    async def make(name: str) -> str:
        import asyncpg

        database = f"{prefix}_{re.sub(r'[^a-z0-9_]+', '_', name.lower())}"
        conn = await asyncpg.connect(asyncpg_dsn(postgres_url), timeout=10)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
            await conn.execute(f'CREATE DATABASE "{database}"')
        finally:
            await conn.close()
        return urlunsplit(urlsplit(postgres_url)._replace(scheme="postgresql+asyncpg", path=f"/{database}"))

    return make


async def drop_databases(postgres_url: str, urls: Iterable[str]) -> None:
    """Drop the databases behind `urls` (used at the end of a run)."""
    import asyncpg

    conn = await asyncpg.connect(asyncpg_dsn(postgres_url), timeout=10)
    try:
        for url in urls:
            name = urlsplit(url).path.lstrip("/")
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def create_tables(url: str, metadata: Any) -> None:
    """Create `metadata`'s tables in the database at `url` (for the baseline and the ceiling)."""
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(sqlalchemy_url(url))
    try:
        async with engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
    finally:
        await engine.dispose()


async def server_version(postgres_url: str) -> str:
    """PostgreSQL's `server_version`."""
    import asyncpg

    conn = await asyncpg.connect(asyncpg_dsn(postgres_url), timeout=10)
    try:
        return str(await conn.fetchval("SHOW server_version"))
    finally:
        await conn.close()


# -- Kafka -----------------------------------------------------------------------------------


async def create_topics(bootstrap: str, names: Iterable[str], partitions: int) -> None:
    """Create topics with `partitions` partitions (replication factor 1); existing ones are kept."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [NewTopic(n, partitions, 1) for n in sorted(set(names)) if n not in existing]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(missing)
    finally:
        await admin.close()


# -- processes -------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(**overrides: str) -> dict[str, str]:
    """Our environment minus any service settings, plus `overrides`, with the repo importable."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("CHOREO_", "KAFKA_", "BENCH_")) and key not in ("DATABASE_URL", "HOST", "PORT")
    }
    env.update(overrides)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


@dataclass
class Proc:
    """One child process, logging to a file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    port: int | None = None
    ready_file: Path | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Procs:
    """The child processes of one scenario; `stop()` ends exactly these (SIGTERM, then SIGKILL)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.running: list[Proc] = []

    def start(
        self,
        name: str,
        argv: list[str],
        env: Mapping[str, str],
        *,
        port: int | None = None,
        ready_file: Path | None = None,
    ) -> Proc:
        log = self.log_dir / f"{name}.log"
        with open(log, "wb") as out:
            popen = subprocess.Popen(
                [sys.executable, *argv], env=dict(env), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
            )
        proc = Proc(name, popen, log, port, ready_file)
        self.running.append(proc)
        return proc

    def stop(self, timeout: float = 20.0) -> dict[str, int]:
        """Stop every process gracefully; returns exit codes by name."""
        for proc in self.running:
            if proc.alive():
                with contextlib.suppress(ProcessLookupError):
                    proc.popen.send_signal(signal.SIGTERM)
        codes: dict[str, int] = {}
        deadline = time.monotonic() + timeout
        for proc in self.running:
            try:
                codes[proc.name] = proc.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                codes[proc.name] = proc.popen.wait()
        self.running = []
        return codes


async def wait_ready(procs: Iterable[Proc], timeout: float) -> None:
    """Wait until each process answers `GET /health` with 200 (or wrote its ready file)."""
    import httpx

    waiting = list(procs)
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=2) as client:
        while waiting:
            for proc in list(waiting):
                if not proc.alive():
                    raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}")
                if proc.ready_file is not None:
                    if proc.ready_file.exists():
                        waiting.remove(proc)
                    continue
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get(f"http://127.0.0.1:{proc.port}/health")).status_code == 200:
                        waiting.remove(proc)
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {p.name}\n{p.tail()}" for p in waiting)
                raise RuntimeError(f"not ready after {timeout:.0f}s: {[p.name for p in waiting]}\n{tails}")
            await asyncio.sleep(0.2)


async def health(proc: Proc) -> dict[str, Any]:
    """A service process's `/health` report and its `/metrics` as {name: value} ({} if silent)."""
    import httpx

    report: dict[str, Any] = {}
    try:
        async with httpx.AsyncClient(timeout=5) as client:
            report["health"] = (await client.get(f"http://127.0.0.1:{proc.port}/health")).json()
            text = (await client.get(f"http://127.0.0.1:{proc.port}/metrics")).text
    except (httpx.HTTPError, ValueError):
        return report
    metrics: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        name = name.split("{", 1)[0]
        try:
            metrics[name] = metrics.get(name, 0.0) + float(value)
        except ValueError:
            continue
    report["metrics"] = metrics
    return report


# -- sampling --------------------------------------------------------------------------------


def postgres_pids(databases: Iterable[str] = ()) -> list[int]:
    """PostgreSQL's server processes: its background workers, and the backends of `databases`.

    Backends of other databases are left out: on a shared server they are someone else's work
    (they show up as "other processes").
    """
    wanted = set(databases)
    pids = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        if proc.info["name"] not in ("postgres", "postmaster"):
            continue
        title = " ".join(proc.info["cmdline"] or ())
        # A backend's title is "postgres: <cluster>: <user> <database> <client> <state>".
        words = title.split()
        is_backend = "(" in title or "[local]" in title
        if not is_backend or (len(words) > 4 and words[3] in wanted):
            pids.append(proc.pid)
    return pids


MACHINE = "(machine)"
OTHER = "other processes"
STOLEN = "stolen"


@dataclass
class Sample:
    """One sampling instant: per group, resident memory (bytes) and cumulative CPU seconds."""

    t: float
    rss: dict[str, int]
    cpu: dict[str, float]


@dataclass
class Sampler:
    """Samples RSS and CPU of process groups every `interval` seconds, in a background thread.

    CPU is accumulated per process id between consecutive samples, so processes that come and
    go (PostgreSQL backends, driver runs) count while they are seen.
    """

    interval: float = 1.0
    groups: dict[str, Callable[[], list[int]]] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)
    _seen: dict[int, tuple[str, float]] = field(default_factory=dict)
    _totals: dict[str, float] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def track(self, name: str, pids: Callable[[], list[int]] | list[int]) -> None:
        """Sample the processes `pids` (or those a callable finds at each sample) as group `name`."""
        if isinstance(pids, list):
            fixed = list(pids)

            def finder() -> list[int]:
                return fixed

        else:
            finder = pids
        with self._lock:
            self.groups[name] = finder

    def untrack(self, name: str) -> None:
        with self._lock:
            self.groups.pop(name, None)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        with self._lock:
            groups = dict(self.groups)
        now = time.time()
        rss: dict[str, int] = {}
        seen: dict[int, tuple[str, float]] = {}
        for name, finder in groups.items():
            rss[name] = 0
            self._totals.setdefault(name, 0.0)
            try:
                pids = finder()
            except Exception:
                pids = []
            for pid in pids:
                try:
                    proc = psutil.Process(pid)
                    with proc.oneshot():
                        times = proc.cpu_times()
                        cpu = times.user + times.system
                        rss[name] += proc.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                before = self._seen.get(pid)
                if before is not None and before[0] == name:
                    self._totals[name] += max(0.0, cpu - before[1])
                seen[pid] = (name, cpu)
        self._seen = seen
        machine = psutil.cpu_times()
        totals = dict(self._totals)
        totals[MACHINE] = sum(getattr(machine, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq"))
        totals[STOLEN] = getattr(machine, "steal", 0.0)
        self.samples.append(Sample(now, rss, totals))

    def cpu_between(self, t0: float, t1: float) -> dict[str, float]:
        """Average cores used by each group between wall times `t0` and `t1`."""
        inside = [s for s in self.samples if t0 <= s.t <= t1]
        if len(inside) < 2:
            return {}
        first, last = inside[0], inside[-1]
        span = last.t - first.t
        cores = {name: (last.cpu.get(name, 0.0) - first.cpu.get(name, 0.0)) / span for name in last.cpu}
        # What the machine did besides the tracked processes (other work on a shared host).
        busy = cores.pop(MACHINE, 0.0)
        stolen = cores.pop(STOLEN, 0.0)
        cores[OTHER] = max(0.0, busy - sum(cores.values()))
        # Time the hypervisor ran someone else while we had work: the host's noise, not ours.
        cores[STOLEN] = stolen
        return {name: round(value, 3) for name, value in cores.items()}

    def rss_series(self, name: str, t0: float = 0.0, t1: float = float("inf")) -> list[tuple[float, int]]:
        """(time, bytes) of one group's resident memory between `t0` and `t1`."""
        return [(s.t, s.rss[name]) for s in self.samples if name in s.rss and t0 <= s.t <= t1 and s.rss[name]]
