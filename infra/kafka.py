"""Single-node Apache Kafka (KRaft, broker and controller in one JVM) for tests, benchmarks and drills.

No Kafka distribution is needed: the broker's jars come from Maven Central through the tiny
Maven project in ``infra/kafka/pom.xml`` and are cached in ``~/.cache/choreo/kafka-<version>/libs``.
Requirements: ``java`` (17+) always, ``mvn`` only until the jars are cached. Standard library only.

Library use::

    from infra.kafka import ApacheKafka

    with ApacheKafka() as kafka:
        print(kafka.bootstrap)  # "127.0.0.1:PORT"
        kafka.pause(); kafka.resume()  # SIGSTOP / SIGCONT, for failure drills
        kafka.restart()  # stop and start on the same ports, keeping the log directory
        kafka.halt(); kafka.relaunch()  # the same in two steps, for an outage of your own length

    # Secured listeners beside the PLAINTEXT one, and SCRAM users created at format time:
    with ApacheKafka(
        listeners={"SCRAM": "SASL_SSL"},
        properties={"listener.name.scram.sasl.enabled.mechanisms": "SCRAM-SHA-512", ...},
        scram_users={"alice": "alice-secret"},
    ) as kafka:
        print(kafka.address("SCRAM"))  # "127.0.0.1:PORT" of that listener

Script use::

    python infra/kafka.py fetch            # only download the jars into the cache
    python infra/kafka.py run [--port N]   # start, print the bootstrap address, run until Ctrl-C
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["KAFKA_VERSION", "ApacheKafka", "KafkaUnavailable", "ensure_jars", "unavailable_reason"]

#: Kafka release whose jars are fetched (overrides the property in infra/kafka/pom.xml).
KAFKA_VERSION = "4.1.1"

POM = Path(__file__).resolve().parent / "kafka" / "pom.xml"
_MARKER = ".complete"
_MIN_JAVA = 17  # Kafka 4 brokers need Java 17+


class KafkaUnavailable(RuntimeError):
    """Java/Maven missing, the jars cannot be fetched, or the broker failed to start."""


def cache_dir(version: str = KAFKA_VERSION) -> Path:
    """Return the per-version cache directory (``$CHOREO_CACHE_DIR`` or ``~/.cache/choreo``)."""
    root = os.environ.get("CHOREO_CACHE_DIR")
    if root:
        return Path(root) / f"kafka-{version}"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "choreo" / f"kafka-{version}"


def _jars_complete(libs: Path) -> bool:
    """Return True when ``libs`` holds every jar listed in its completion marker."""
    marker = libs / _MARKER
    if not marker.is_file():
        return False
    names = [n for n in marker.read_text().splitlines() if n]
    return bool(names) and all((libs / n).is_file() for n in names)


def _java_major(java: str) -> int:
    """Return the major version of ``java`` (0 when it cannot be told)."""
    try:
        out = subprocess.run(
            [java, "-XshowSettings:properties", "-version"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stderr
    except (OSError, subprocess.SubprocessError):
        return 0
    for line in out.splitlines():
        if line.strip().startswith("java.specification.version"):
            value = line.split("=", 1)[1].strip()
            with contextlib.suppress(ValueError):
                return int(value.split(".")[1] if value.startswith("1.") else value)
    return 0


def unavailable_reason(version: str = KAFKA_VERSION) -> str | None:
    """Return why Apache Kafka cannot run here (no java, too old, no jars and no mvn), or None."""
    java = shutil.which("java")
    if java is None:
        return "no `java` on PATH"
    major = _java_major(java)
    if major and major < _MIN_JAVA:
        return f"`java` is version {major}; Kafka 4 needs {_MIN_JAVA}+"
    if not _jars_complete(cache_dir(version) / "libs") and shutil.which("mvn") is None:
        return f"Kafka {version} jars not cached in {cache_dir(version)} and no `mvn` on PATH"
    return None


def ensure_jars(version: str = KAFKA_VERSION, *, verbose: bool = False) -> Path:
    """Return the directory holding the broker's jars, fetching them with Maven when not cached."""
    root = cache_dir(version)
    libs = root / "libs"
    if _jars_complete(libs):
        return libs
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent test processes fetch once
        if _jars_complete(libs):
            return libs
        mvn = shutil.which("mvn")
        if mvn is None:
            raise KafkaUnavailable(
                f"Kafka {version} jars are not cached in {root} and `mvn` is not on PATH "
                "(install Maven, e.g. `apt-get install maven`)"
            )
        staging = Path(tempfile.mkdtemp(prefix="libs.", dir=root))
        cmd = [
            mvn,
            "-B",
            "-q",
            "-Dstyle.color=never",
            "-f",
            str(POM),
            f"-Dkafka.version={version}",
            "dependency:copy-dependencies",
            f"-DoutputDirectory={staging}",
            "-DincludeScope=runtime",
        ]
        if verbose:
            print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        jars = sorted(p.name for p in staging.glob("*.jar"))
        if proc.returncode != 0 or not any(n.startswith("kafka_2.13-") for n in jars):
            shutil.rmtree(staging, ignore_errors=True)
            raise KafkaUnavailable(
                f"fetching Kafka {version} jars with Maven failed (exit {proc.returncode}):\n"
                + (proc.stdout + proc.stderr)[-4000:]
            )
        (staging / _MARKER).write_text("\n".join(jars) + "\n")
        if libs.exists():
            shutil.rmtree(libs)
        staging.rename(libs)
    return libs


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _free_port_not_in(taken: set[int]) -> int:
    """Return a free port on 127.0.0.1 that is not in ``taken``."""
    while (port := free_port()) in taken:
        pass
    return port


def _cluster_id() -> str:
    """Return a random Kafka cluster id (base64url UUID, like ``StorageTool random-uuid``)."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):  # would read as a command-line flag
            return cid


# --- minimal Kafka wire protocol, enough for readiness probes ------------------------------


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    """Read exactly ``n`` bytes from ``sock``."""
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed by broker")
        buf += chunk
    return bytes(buf)


def _request(addr: tuple[str, int], api_key: int, version: int, body: bytes, timeout: float) -> bytes:
    """Send one request (header v1) and return the response body after the correlation id."""
    client = b"choreo-infra"
    msg = struct.pack(">hhih", api_key, version, 7, len(client)) + client + body
    with socket.create_connection(addr, timeout=timeout) as sock:
        sock.settimeout(timeout)
        sock.sendall(struct.pack(">i", len(msg)) + msg)
        (size,) = struct.unpack(">i", _recv_exact(sock, 4))
        data = _recv_exact(sock, size)
    return data[4:]


def metadata_brokers(addr: tuple[str, int], timeout: float = 2.0) -> list[tuple[int, str, int]]:
    """Return the brokers (node id, host, port) of a Metadata v4 response (no topics asked)."""
    data = _request(addr, 3, 4, struct.pack(">ib", 0, 0), timeout)
    off = 4  # throttle_time_ms
    (count,) = struct.unpack_from(">i", data, off)
    off += 4
    brokers = []
    for _ in range(count):
        node_id, hlen = struct.unpack_from(">ih", data, off)
        off += 6
        host = data[off : off + hlen].decode()
        off += hlen
        port, rack_len = struct.unpack_from(">ih", data, off)
        off += 6 + max(rack_len, 0)
        brokers.append((node_id, host, port))
    return brokers


def group_coordinator_error(addr: tuple[str, int], group: str, timeout: float = 2.0) -> int:
    """Return the error code of a FindCoordinator v1 request for ``group`` (0: coordinator ready)."""
    key = group.encode()
    data = _request(addr, 10, 1, struct.pack(">h", len(key)) + key + b"\x00", timeout)
    (error,) = struct.unpack_from(">h", data, 4)
    return int(error)


# --- the broker ------------------------------------------------------------------------------

_LOG4J2 = """\
status = warn
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = {log}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
"""


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL the child when the thread that started it dies (no orphan brokers)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class ApacheKafka:
    """A throwaway single-node KRaft Apache Kafka broker on free ports of 127.0.0.1."""

    def __init__(
        self,
        *,
        version: str = KAFKA_VERSION,
        port: int | None = None,
        num_partitions: int = 4,
        properties: dict[str, Any] | None = None,
        listeners: dict[str, str] | None = None,
        scram_users: dict[str, str] | None = None,
        heap: str = "512m",
        startup_timeout: float = 90.0,
        die_with_parent: bool = True,
    ) -> None:
        self.version = version
        self.num_partitions = num_partitions
        self.extra_properties = dict(properties or {})
        self.listeners = {name.upper(): protocol for name, protocol in (listeners or {}).items()}
        """Extra listeners, name -> security protocol, each on a free port (see `address`)."""
        self.scram_users = dict(scram_users or {})
        """SCRAM-SHA-256 and SCRAM-SHA-512 credentials (name -> password) created at format time."""
        self.listener_ports: dict[str, int] = {}
        self.heap = heap
        self.startup_timeout = startup_timeout
        # PR_SET_PDEATHSIG follows the starting *thread*: disable when starting from a worker thread.
        self.die_with_parent = die_with_parent and sys.platform.startswith("linux")
        self.port: int | None = port
        self.controller_port: int | None = None
        self.workdir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._paused = False
        self._libs: Path | None = None

    # -- public API ---------------------------------------------------------------------------

    @property
    def bootstrap(self) -> str:
        """Return ``"127.0.0.1:PORT"`` for ``bootstrap_servers``."""
        if self.port is None:
            raise RuntimeError("broker not started")
        return f"127.0.0.1:{self.port}"

    def address(self, listener: str) -> str:
        """Return ``"127.0.0.1:PORT"`` of the extra listener named ``listener``."""
        if listener.upper() not in self.listener_ports:
            raise RuntimeError(f"no started listener {listener!r}")
        return f"127.0.0.1:{self.listener_ports[listener.upper()]}"

    @property
    def pid(self) -> int | None:
        """Return the JVM's process id while it runs."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def log_file(self) -> Path | None:
        """Return the broker's log file (log4j output)."""
        return self.workdir / "server.log" if self.workdir else None

    @property
    def data_dir(self) -> Path | None:
        """Return the broker's ``log.dirs`` (topic data and KRaft metadata)."""
        return self.workdir / "data" if self.workdir else None

    def ensure_jars(self) -> Path:
        """Return the cached jar directory, fetching it with Maven on first use."""
        if self._libs is None:
            self._libs = ensure_jars(self.version)
        return self._libs

    def start(self) -> ApacheKafka:
        """Fetch jars if needed, format storage, start the JVM and wait until it serves requests."""
        if self._proc is not None:
            raise RuntimeError("broker already started")
        reason = unavailable_reason(self.version)
        if reason:
            raise KafkaUnavailable(f"Apache Kafka unavailable: {reason}")
        self.ensure_jars()
        self.workdir = Path(tempfile.mkdtemp(prefix="choreo-kafka-"))
        try:
            self.port = self.port or free_port()
            taken = {self.port}
            self.controller_port = _free_port_not_in(taken)
            taken.add(self.controller_port)
            for name in self.listeners:
                self.listener_ports[name] = _free_port_not_in(taken)
                taken.add(self.listener_ports[name])
            self._write_config()
            self._format()
            self._launch()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the broker (SIGTERM, then SIGKILL) and delete its temporary directory."""
        self._terminate()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def restart(self) -> None:
        """Stop the broker and start it again on the same ports, keeping its log directory."""
        self.halt()
        self.relaunch()

    def halt(self) -> None:
        """Stop the JVM (SIGTERM, then SIGKILL) but keep its ports and log directory, for `relaunch()`."""
        if self.workdir is None:
            raise RuntimeError("broker not started")
        self._terminate()

    def relaunch(self) -> None:
        """Start a halted broker again on the same ports; returns once it serves requests."""
        if self.workdir is None:
            raise RuntimeError("broker not started")
        if self._proc is not None:
            raise RuntimeError("broker already running")
        self._launch()

    def pause(self) -> None:
        """Freeze the broker (SIGSTOP): connections stay open but nothing answers."""
        if self._proc is None:
            raise RuntimeError("broker not started")
        os.kill(self._proc.pid, signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """Unfreeze a paused broker (SIGCONT)."""
        if self._proc is None:
            raise RuntimeError("broker not started")
        os.kill(self._proc.pid, signal.SIGCONT)
        self._paused = False

    def __enter__(self) -> ApacheKafka:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "paused" if self._paused else ("running" if self.pid else "stopped")
        return f"<ApacheKafka {self.version} {state} bootstrap={self.port and self.bootstrap}>"

    # -- internals ----------------------------------------------------------------------------

    def _java_cmd(self, main: str, *args: str, heap: str) -> list[str]:
        """Return a ``java`` command line running ``main`` on the cached classpath."""
        assert self._libs is not None and self.workdir is not None
        return [
            shutil.which("java") or "java",
            f"-Xmx{heap}",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.workdir / 'log4j2.properties'}",
            f"-Dkafka.logs.dir={self.workdir}",
            "-cp",
            f"{self._libs}/*",
            main,
            *args,
        ]

    def _write_config(self) -> None:
        """Write server.properties and the log4j2 configuration into the work directory."""
        assert self.workdir is not None
        extra = "".join(f",{name}://127.0.0.1:{port}" for name, port in self.listener_ports.items())
        protocols = "".join(f",{name}:{protocol}" for name, protocol in self.listeners.items())
        props: dict[str, Any] = {
            "process.roles": "broker,controller",
            "node.id": 1,
            "controller.quorum.voters": f"1@127.0.0.1:{self.controller_port}",
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}{extra}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}{extra}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": f"PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT{protocols}",
            "log.dirs": self.workdir / "data",
            "num.partitions": self.num_partitions,
            "auto.create.topics.enable": "true",
            "offsets.topic.replication.factor": 1,
            "offsets.topic.num.partitions": 10,
            "transaction.state.log.replication.factor": 1,
            "transaction.state.log.min.isr": 1,
            "transaction.state.log.num.partitions": 10,
            "share.coordinator.state.topic.replication.factor": 1,
            "share.coordinator.state.topic.min.isr": 1,
            "group.initial.rebalance.delay.ms": 0,
        }
        props.update(self.extra_properties)
        text = "".join(f"{k}={v}\n" for k, v in props.items())
        (self.workdir / "server.properties").write_text(text)
        (self.workdir / "log4j2.properties").write_text(_LOG4J2.format(log=self.workdir / "server.log"))

    def _format(self) -> None:
        """Format the KRaft storage directory (static quorum: no ``--standalone`` needed)."""
        assert self.workdir is not None
        scram = [
            arg
            for name, password in self.scram_users.items()
            for mechanism in ("SCRAM-SHA-256", "SCRAM-SHA-512")
            for arg in ("--add-scram", f"{mechanism}=[name={name},password={password}]")
        ]
        cmd = self._java_cmd(
            "kafka.tools.StorageTool",
            "format",
            "-t",
            _cluster_id(),
            "-c",
            str(self.workdir / "server.properties"),
            *scram,
            heap="256m",
        )
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise KafkaUnavailable(f"kafka.tools.StorageTool format failed:\n{proc.stdout}{proc.stderr}")

    def _launch(self) -> None:
        """Start the JVM and block until the broker answers metadata and group-coordinator requests."""
        assert self.workdir is not None
        cmd = self._java_cmd("kafka.Kafka", str(self.workdir / "server.properties"), heap=self.heap)
        with open(self.workdir / "stdout.log", "ab") as out:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches us, and we stop the broker in order
                preexec_fn=_die_with_parent if self.die_with_parent else None,
            )
        self._paused = False
        self._wait_ready()

    def _wait_ready(self) -> None:
        """Poll with real protocol requests until the broker and its group coordinator are up."""
        assert self._proc is not None and self.port is not None
        addr = ("127.0.0.1", self.port)
        deadline = time.monotonic() + self.startup_timeout
        last: object = None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise KafkaUnavailable(
                    f"Kafka exited with code {self._proc.returncode} during startup:\n{self._log_tail()}"
                )
            try:
                brokers = metadata_brokers(addr)
                if any(port == self.port for _, _, port in brokers):
                    # Creates __consumer_offsets now, so the first consumer group does not wait.
                    error = group_coordinator_error(addr, "choreo-readiness")
                    if error == 0:
                        return
                    last = f"FindCoordinator error {error}"
                else:
                    last = f"metadata lists brokers {brokers}"
            except (OSError, struct.error) as exc:
                last = exc
            time.sleep(0.1)
        raise KafkaUnavailable(
            f"Kafka not ready on {self.bootstrap} after {self.startup_timeout:.0f}s "
            f"(last: {last}):\n{self._log_tail()}"
        )

    def _terminate(self, timeout: float = 30.0) -> None:
        """Stop the JVM: SIGCONT if paused, SIGTERM, SIGKILL after ``timeout``."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            if self._paused:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGCONT)
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._paused = False

    def _log_tail(self, lines: int = 40) -> str:
        """Return the last lines of the broker's stdout and log file, for error messages."""
        parts = []
        if self.workdir is not None:
            for name in ("stdout.log", "server.log"):
                path = self.workdir / name
                if path.is_file():
                    tail = path.read_text(errors="replace").splitlines()[-lines:]
                    parts.append(f"--- {path}\n" + "\n".join(tail))
        return "\n".join(parts)


# --- command line ----------------------------------------------------------------------------


def _main(argv: list[str] | None = None) -> int:
    """Command-line entry point: ``fetch`` or ``run``."""
    parser = argparse.ArgumentParser(prog="infra/kafka.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="download the broker jars into the cache")
    run = sub.add_parser("run", help="start a broker and keep it in the foreground")
    for p in (fetch, run):
        p.add_argument("--version", default=KAFKA_VERSION, help="Kafka version (default %(default)s)")
    run.add_argument("--port", type=int, default=None, help="client port (default: a free one)")
    run.add_argument("--partitions", type=int, default=4, help="num.partitions (default %(default)s)")
    args = parser.parse_args(argv)

    t0 = time.monotonic()
    if args.command == "fetch":
        cached = _jars_complete(cache_dir(args.version) / "libs")
        libs = ensure_jars(args.version, verbose=True)
        state = "already cached" if cached else "fetched"
        print(f"Kafka {args.version} jars {state} in {time.monotonic() - t0:.1f}s: {libs}", flush=True)
        return 0

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    kafka = ApacheKafka(version=args.version, port=args.port, num_partitions=args.partitions)
    try:
        kafka.start()
        print(kafka.bootstrap, flush=True)
        print(
            f"Apache Kafka {args.version} ready in {time.monotonic() - t0:.1f}s "
            f"(pid {kafka.pid}, log {kafka.log_file}); Ctrl-C to stop",
            file=sys.stderr,
            flush=True,
        )
        while not stop.wait(0.5):
            if kafka.pid is None:
                print(f"Kafka exited unexpectedly:\n{kafka._log_tail()}", file=sys.stderr)
                return 1
    finally:
        kafka.stop()
    return 0


if __name__ == "__main__":
    sys.exit(_main())
