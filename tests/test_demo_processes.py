"""compose.yaml is wired right, and its service commands form the shop as separate OS processes.

No Docker engine runs here, so the containers' commands run as local processes with the
compose environment pointed at local PostgreSQL (a fresh database each) and the test Kafka.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml
from sqlalchemy.engine import make_url

from choreo.database import create_engine
from demo_shop.walkthrough import FLOWS
from tests.demo_support import assert_credit_consistent, assert_flow, dead_letters, run_flows

ROOT = Path(__file__).resolve().parents[1]
SHOP = ("orders", "customers", "payments")


def load_compose() -> dict[str, Any]:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert isinstance(compose, dict)
    return compose


def test_compose_file_is_well_formed() -> None:
    compose = load_compose()
    services = compose["services"]
    assert set(services) == {"kafka", "postgres", *SHOP, "trace-collector", "explorer"}
    for name, spec in services.items():
        assert spec.get("healthcheck", {}).get("test"), f"{name} has no health check"

    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    kafka_env = kafka["environment"]
    assert kafka_env["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, no ZooKeeper
    assert kafka_env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{kafka_env['KAFKA_NODE_ID']}@kafka:9093"
    assert "PLAINTEXT://kafka:9092" in kafka_env["KAFKA_ADVERTISED_LISTENERS"].split(",")
    assert kafka_env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"

    postgres = services["postgres"]
    assert postgres["image"].startswith("postgres:")
    init_scripts = [
        ROOT / host
        for host, _, target in (v.partition(":") for v in postgres["volumes"])
        if target.startswith("/docker-entrypoint-initdb.d/")
    ]
    assert len(init_scripts) == 1 and init_scripts[0].is_file()
    init_sql = init_scripts[0].read_text()
    databases = dict(re.findall(r"CREATE DATABASE (\w+) OWNER (\w+);", init_sql))
    assert databases == {**{name: name for name in SHOP}, "trace": "trace"}, "one database per service"

    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "COPY choreo" in dockerfile and "COPY demo_shop" in dockerfile
    for name in SHOP:
        spec = services[name]
        assert spec["build"] == "."
        assert spec["command"] == ["python", "-m", f"demo_shop.{name}"]
        assert spec["depends_on"] == {
            "kafka": {"condition": "service_healthy"},
            "postgres": {"condition": "service_healthy"},
        }
        env = spec["environment"]
        url = make_url(env["DATABASE_URL"])
        assert (url.host, url.database, url.username) == ("postgres", name, name), "its own database"
        assert url.password == re.search(rf"ROLE {name} LOGIN PASSWORD '(\w+)'", init_sql)[1]  # type: ignore[index]
        assert env["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
        assert env["HOST"] == "0.0.0.0"
        assert f":{env['PORT']}/health" in " ".join(spec["healthcheck"]["test"])
        published = [p.rsplit(":", 1)[1] for p in spec.get("ports", [])]
        assert published == ([] if name == "payments" else [env["PORT"]]), "orders and customers APIs only"

    # The trace collector and the saga explorer over its database and the services' own.
    collector, explorer = services["trace-collector"], services["explorer"]
    assert collector["command"] == ["python", "-m", "choreo.cli", "collect", "demo_shop"]
    assert explorer["command"][:5] == ["python", "-m", "choreo.cli", "ui", "demo_shop"]
    trace_url = collector["environment"]["CHOREO_TRACE_DATABASE_URL"]
    assert explorer["environment"]["CHOREO_TRACE_DATABASE_URL"] == trace_url
    for name in SHOP:
        own = services[name]["environment"]["DATABASE_URL"]
        assert explorer["environment"][f"CHOREO_{name.upper()}_DATABASE_URL"] == own
    assert explorer["ports"] == ["127.0.0.1:8700:8700"]
    assert ":8700/health" in " ".join(explorer["healthcheck"]["test"])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def local_environment(compose_env: dict[str, Any], **overrides: str) -> dict[str, str]:
    """The container's environment, on this machine: ours minus any shop settings, plus compose's."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("CHOREO_", "KAFKA_")) and key not in ("DATABASE_URL", "HOST", "PORT")
    }
    env.update({key: str(value) for key, value in compose_env.items()})
    env.update(overrides)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


class Processes:
    """The shop's services as child processes, each logging to a file."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, command: list[str], env: dict[str, str]) -> None:
        executable = sys.executable if command[0] == "python" else command[0]
        with open(self.log(name), "wb") as log:
            self.running[name] = subprocess.Popen(
                [executable, *command[1:]], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
            )

    def log(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def tail(self, name: str, lines: int = 30) -> str:
        return "\n".join(self.log(name).read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> dict[str, int]:
        """SIGTERM each (a graceful shutdown), SIGKILL any still running after 20 s."""
        for process in self.running.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        codes = {}
        for name, process in self.running.items():
            try:
                codes[name] = process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                codes[name] = process.wait()
        return codes


@contextmanager
def processes(log_dir: Path) -> Iterator[Processes]:
    procs = Processes(log_dir)
    try:
        yield procs
    finally:
        procs.stop()


class RoutingTransport(httpx.AsyncBaseTransport):
    """Sends `/orders...` to the orders process and `/customers...` to the customers process."""

    def __init__(self, routes: dict[str, str]) -> None:
        self.routes = routes
        self.inner = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        prefix = "/" + request.url.path.split("/")[1]
        target = httpx.URL(self.routes[prefix])
        request.url = request.url.copy_with(scheme=target.scheme, host=target.host, port=target.port)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


@asynccontextmanager
async def engines_on(urls: dict[str, str]) -> AsyncIterator[dict[str, Any]]:
    engines = {name: create_engine(url) for name, url in urls.items()}
    try:
        yield engines
    finally:
        for engine in engines.values():
            await engine.dispose()


async def wait_healthy(client: httpx.AsyncClient, procs: Processes, ports: dict[str, int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    waiting = set(ports)
    while waiting:
        for name in sorted(waiting):
            exited = procs.running[name].poll()
            assert exited is None, f"{name} exited with {exited}:\n{procs.tail(name)}"
            try:
                response = await client.get(f"http://127.0.0.1:{ports[name]}/health")
            except httpx.TransportError:
                continue
            if response.status_code == 200:
                waiting.discard(name)
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {name}\n{procs.tail(name)}" for name in waiting)
            raise AssertionError(f"not healthy after {timeout}s: {sorted(waiting)}\n{logs}")
        await asyncio.sleep(0.1)


async def test_compose_services_run_as_local_processes(
    fresh_pg_database: Callable[[str], Awaitable[str]],
    kafka_bootstrap: str,
    kafka_kind: str,
    topic_prefix: str,
    tmp_path: Path,
) -> None:
    compose = load_compose()["services"]
    urls = {name: await fresh_pg_database(name) for name in (*SHOP, "trace")}
    ports = {name: free_port() for name in (*SHOP, "explorer")}
    tansu = {"CHOREO_KAFKA_IDEMPOTENCE": "0", "CHOREO_KAFKA_FETCH_MAX_WAIT_MS": "5"} if kafka_kind == "tansu" else {}
    kafka = {"KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "CHOREO_KAFKA_TOPIC_PREFIX": topic_prefix, **tansu}
    with processes(tmp_path) as procs:
        for name in SHOP:
            assert {"DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS", "HOST", "PORT"} <= set(compose[name]["environment"])
            env = local_environment(
                compose[name]["environment"],
                DATABASE_URL=urls[name],
                KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap,
                HOST="127.0.0.1",
                PORT=str(ports[name]),
                CHOREO_KAFKA_TOPIC_PREFIX=topic_prefix,
                CHOREO_KAFKA_PARTITIONS="4",
                **tansu,
            )
            procs.start(name, compose[name]["command"], env)
        collector = compose["trace-collector"]
        env = local_environment(collector["environment"], CHOREO_TRACE_DATABASE_URL=urls["trace"], **kafka)
        procs.start("trace-collector", collector["command"], env)
        explorer = compose["explorer"]
        command = [*explorer["command"][:-4], "--host", "127.0.0.1", "--port", str(ports["explorer"])]
        service_urls = {f"CHOREO_{name.upper()}_DATABASE_URL": urls[name] for name in SHOP}
        # compose interpolates ${CHOREO_UI_TOKEN:-}: unset there, so no token here either.
        env = local_environment(
            explorer["environment"],
            CHOREO_TRACE_DATABASE_URL=urls["trace"],
            CHOREO_UI_TOKEN="",
            **service_urls,
            **kafka,
        )
        procs.start("explorer", command, env)

        async with httpx.AsyncClient(timeout=10) as probe:
            await wait_healthy(probe, procs, ports, timeout=60)
        routes = {f"/{name}": f"http://127.0.0.1:{ports[name]}" for name in ("orders", "customers")}
        async with (
            httpx.AsyncClient(transport=RoutingTransport(routes), base_url="http://shop", timeout=10) as client,
            engines_on({name: urls[name] for name in SHOP}) as engines,
        ):
            results = await run_flows(client, engines, FLOWS, timeout=60)
            for result in results:
                await assert_flow(engines, result)
            await assert_credit_consistent(engines["customers"])
            assert await dead_letters(engines) == []

        # The collector indexed every saga from the topics, and the explorer shows them.
        explorer_url = f"http://127.0.0.1:{ports['explorer']}"
        deadline = time.monotonic() + 30
        async with httpx.AsyncClient(timeout=10) as browser:
            while True:
                page = (await browser.get(f"{explorer_url}/rows?window=1h")).text
                counts = {s: int(n) for n, s in re.findall(r'<span class="n">(\d+)</span> ([a-z-]+)', page)}
                if (counts.get("completed") == 3 and counts.get("compensated") == 2) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
            assert counts == {"completed": 3, "compensated": 2, "failed": 0, "in-flight": 0, "overdue": 0}, counts
            for result in results:
                assert f'data-saga-id="{result.saga_id}"' in page

        procs.stop()
        for name in SHOP:
            # The lifespan ran to its end: the service stopped consuming and closed its database.
            assert "Application shutdown complete" in procs.log(name).read_text(), procs.tail(name)


def test_service_commands_explain_their_environment() -> None:
    helps = {
        name: subprocess.Popen(
            [sys.executable, "-m", f"demo_shop.{name}", "--help"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=local_environment({}),
        )
        for name in SHOP
    }
    for name, process in helps.items():
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
        assert f"python -m demo_shop.{name}" in out
        assert "DATABASE_URL" in out and "KAFKA_BOOTSTRAP_SERVERS" in out


def test_service_command_names_a_bad_setting() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "demo_shop.payments"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=local_environment({}, KAFKA_BOOTSTRAP_SERVERS="kafka", PORT="8003"),
    )
    assert result.returncode != 0
    assert "'kafka' is not host:port" in result.stderr
