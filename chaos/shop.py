"""The shop under test: Apache Kafka, a fresh database per service, each service as OS processes."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import psutil

from bench.infra import ROOT, asyncpg_dsn, clean_env, free_port, named_databases, without_tls
from chaos.proxy import BlackholeProxy
from choreo.relay import _LEADER_LOCK  # read only: to find which process leads a relay
from infra.kafka import ApacheKafka

SERVICES = ("orders", "customers", "payments")
PROXIED = "orders"
"""The service whose PostgreSQL connections go through the harness's blackhole proxy."""
HARNESS = "chaos-harness"
"""application_name of the harness's own connections: pg_terminate_backend spares them."""


@dataclass
class Replica:
    """One process of one service; it keeps its port (and proxy) across restarts."""

    service: str
    index: int
    port: int
    env: dict[str, str]
    log: Path
    proxy: BlackholeProxy | None = None
    popen: subprocess.Popen[bytes] | None = None
    starts: int = 0
    killed: bool = False
    """Down on purpose (SIGKILLed, not yet restarted); any other exit is a crash."""

    @property
    def name(self) -> str:
        return f"{self.service}-{self.index}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            out.write(f"\n===== start #{self.starts + 1} at {time.strftime('%H:%M:%S')} =====\n".encode())
            out.flush()
            self.popen = subprocess.Popen(
                [sys.executable, "-m", f"demo_shop.{self.service}"],
                env=self.env,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.starts += 1
        self.killed = False

    def kill(self) -> None:
        """SIGKILL: no shutdown hook runs, connections drop mid-flight."""
        self.killed = True
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait()

    def tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""


class Shop:
    """Kafka, databases and service replicas of one soak run; `close()` ends exactly these."""

    def __init__(self, run: str, replicas: int, log_dir: Path, postgres_url: str) -> None:
        self.run = run
        self.replica_count = replicas
        self.log_dir = log_dir
        self.postgres_url = postgres_url
        self.topic_prefix = f"{run}-{int(time.time())}."
        self.kafka = ApacheKafka(num_partitions=4)
        self.urls: dict[str, str] = {}
        self.replicas: list[Replica] = []
        self.admin: asyncpg.Connection | None = None

    async def open(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for old in self.log_dir.glob("*.log"):
            old.unlink()  # each start appends to its replica's log: begin the run with none
        # Started from the event loop's thread, so the JVM dies with us (PR_SET_PDEATHSIG).
        self.kafka.start()
        make = named_databases(self.postgres_url, prefix=f"chaos_{self.run}")
        for name in SERVICES:
            self.urls[name] = without_tls(await make(name))
        self.admin = await self.connect(self.postgres_url)
        pg = urlsplit(self.postgres_url)
        for name in SERVICES:
            for index in range(1, self.replica_count + 1):
                proxy = None
                url = self.urls[name]
                if name == PROXIED:
                    proxy = await BlackholeProxy((pg.hostname or "127.0.0.1", pg.port or 5432)).start()
                    parts = urlsplit(url)
                    netloc = parts.netloc.rsplit("@", 1)[0] + f"@127.0.0.1:{proxy.port}"
                    url = urlunsplit(parts._replace(netloc=netloc))
                port = free_port()
                env = clean_env(
                    DATABASE_URL=url,
                    KAFKA_BOOTSTRAP_SERVERS=self.kafka.bootstrap,
                    HOST="127.0.0.1",
                    PORT=str(port),
                    CHOREO_KAFKA_TOPIC_PREFIX=self.topic_prefix,
                    CHOREO_KAFKA_PARTITIONS="4",
                    LOG_LEVEL="warning",
                )
                replica = Replica(name, index, port, env, self.log_dir / f"{name}-{index}.log", proxy)
                self.replicas.append(replica)
        # One replica of each service first: the first start creates the tables and topics.
        firsts = [r for r in self.replicas if r.index == 1]
        for replica in firsts:
            replica.start()
        await self.wait_healthy(firsts, timeout=120)
        rest = [r for r in self.replicas if r.index > 1]
        for replica in rest:
            replica.start()
        await self.wait_healthy(rest, timeout=120)

    async def connect(self, url: str) -> asyncpg.Connection:
        return await asyncpg.connect(asyncpg_dsn(url), timeout=30, server_settings={"application_name": HARNESS})

    def of(self, service: str) -> list[Replica]:
        return [r for r in self.replicas if r.service == service]

    async def wait_healthy(self, replicas: list[Replica], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        waiting = list(replicas)
        async with httpx.AsyncClient(timeout=2) as client:
            while waiting:
                for replica in list(waiting):
                    if not replica.alive():
                        raise RuntimeError(f"{replica.name} exited:\n{replica.tail()}")
                    with contextlib.suppress(httpx.HTTPError):
                        if (await client.get(f"{replica.url}/health")).status_code == 200:
                            waiting.remove(replica)
                if time.monotonic() > deadline:
                    raise RuntimeError(f"not healthy after {timeout}s: {[r.name for r in waiting]}")
                await asyncio.sleep(0.2)

    async def relay_leader(self, service: str) -> Replica | None:
        """The replica whose connection holds `service`'s relay lock, found through pg_locks."""
        assert self.admin is not None
        port = await self.admin.fetchval(
            """
            SELECT a.client_port FROM pg_locks l
            JOIN pg_stat_activity a ON a.pid = l.pid
            JOIN pg_database d ON d.oid = l.database
            WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
              AND l.classid::text::bigint = $1 AND l.objid::text::bigint = $2 AND d.datname = $3
            """,
            _LEADER_LOCK[0],
            _LEADER_LOCK[1],
            self.database(service),
        )
        if port is None:
            return None
        for replica in self.of(service):
            if replica.proxy is not None and port in replica.proxy.upstream_ports:
                return replica
        # In a thread: reading a process's sockets parses /proc/net/tcp, slow with many sockets.
        return await asyncio.to_thread(self._owner_of, service, port)

    def _owner_of(self, service: str, port: int) -> Replica | None:
        for replica in self.of(service):
            if replica.alive() and replica.popen is not None:
                with contextlib.suppress(psutil.Error):
                    conns = psutil.Process(replica.popen.pid).net_connections("tcp")
                    if any(c.laddr and c.laddr.port == port for c in conns):
                        return replica
        return None

    def database(self, service: str) -> str:
        return urlsplit(self.urls[service]).path.lstrip("/")

    async def terminate_backends(self, service: str) -> int:
        """pg_terminate_backend on every connection of the service's database but ours."""
        assert self.admin is not None
        return int(
            await self.admin.fetchval(
                """
                SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                WHERE datname = $1 AND pid <> pg_backend_pid() AND application_name <> $2
                """,
                self.database(service),
                HARNESS,
            )
        )

    async def unpublished(self, service: str) -> list[tuple[str, str]]:
        """(topic, event id) of the due rows not yet marked published, in id order."""
        conn = await self.connect(self.urls[service])
        try:
            rows = await conn.fetch(
                "SELECT topic, event_id FROM choreo_outbox WHERE published_at IS NULL AND available_at <= created_at"
                " ORDER BY id"
            )
            return [(r["topic"], r["event_id"]) for r in rows]
        finally:
            await conn.close()

    @staticmethod
    async def backlog(conn: asyncpg.Connection) -> int:
        """Outbox rows due and not yet marked published, in the database `conn` is on."""
        query = "SELECT count(*) FROM choreo_outbox WHERE published_at IS NULL AND available_at <= created_at"
        return int(await conn.fetchval(query))

    async def close(self) -> None:
        for replica in self.replicas:
            if replica.alive() and replica.popen is not None:
                replica.popen.send_signal(signal.SIGTERM)
        for replica in self.replicas:
            if replica.popen is not None:
                try:
                    await asyncio.to_thread(replica.popen.wait, 20)
                except subprocess.TimeoutExpired:
                    replica.kill()
            if replica.proxy is not None:
                await replica.proxy.stop()
        if self.admin is not None:
            await self.admin.close()
        with contextlib.suppress(Exception):
            self.kafka.resume()
        self.kafka.stop()

    def describe(self) -> dict[str, Any]:
        return {
            "replicas": self.replica_count,
            "topic_prefix": self.topic_prefix,
            "databases": {name: self.database(name) for name in SERVICES},
            "proxied": PROXIED,
            "starts": {r.name: r.starts for r in self.replicas},
        }
