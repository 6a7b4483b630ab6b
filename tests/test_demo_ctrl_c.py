"""Ctrl-C in a terminal stops `demo-shop` cleanly: the whole foreground process group gets SIGINT."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from infra.kafka import free_port


def test_ctrl_c_on_the_running_demo_exits_cleanly(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "CHOREO_"))}
    env |= {"PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    output = tmp_path / "output.txt"
    ui_port = free_port()
    with output.open("wb") as sink:
        ports = ["--port", str(free_port()), "--ui-port", str(ui_port)]
        demo = subprocess.Popen(
            [sys.executable, "-m", "demo_shop", *ports, "--data-dir", str(tmp_path / "data")],
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
            # Like a shell running it in the foreground: a group of its own, which Ctrl-C signals.
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 120
            while "Ctrl-C to stop." not in output.read_text() and demo.poll() is None:
                assert time.monotonic() < deadline, output.read_text()
                time.sleep(0.2)
            assert demo.poll() is None, output.read_text()
            # The demo serves the saga explorer beside the shop, and says where.
            explorer = f"http://127.0.0.1:{ui_port}/"
            assert f"Watch the sagas in the saga explorer: {explorer}" in output.read_text()
            page = httpx.get(explorer, timeout=10)
            assert page.status_code == 200 and 'class="n">' in page.text
            os.killpg(demo.pid, signal.SIGINT)
            started = time.monotonic()
            status = demo.wait(timeout=30)
            took = time.monotonic() - started
        finally:
            if demo.poll() is None:
                os.killpg(demo.pid, signal.SIGKILL)
                demo.wait()
    text = output.read_text()
    tail = text.split("Ctrl-C to stop.", 1)[1]
    assert status in (0, 130), text
    assert "ERROR" not in tail and "Traceback" not in tail, tail
    print(f"stopped {took:.2f} s after SIGINT")  # shown with -s; the target is under 2 s
