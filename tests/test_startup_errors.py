"""A service that cannot start says why in one line, with a documented exit status, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from choreo.cli import EXIT_UNAVAILABLE, EXIT_USAGE
from infra.kafka import free_port

ROOT = Path(__file__).resolve().parents[1]


def start_orders(**env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("CHOREO_", "KAFKA_", "DATABASE_"))}
    return subprocess.run(
        [sys.executable, "-m", "demo_shop.orders"],
        cwd=ROOT,
        env={**clean, "CHOREO_START_TIMEOUT": "1s", "PORT": str(free_port()), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def failure(result: subprocess.CompletedProcess[str]) -> str:
    """The one line the service ended with; waiting is logged a line per attempt before it."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), result.stderr
    assert all(" waiting for " in line for line in lines[:-1]), result.stderr
    return lines[-1]


def test_an_unreachable_database_is_named_with_its_masked_url(tmp_path: Path) -> None:
    port = free_port()
    result = start_orders(CHOREO_ORDERS_DATABASE_URL=f"postgresql://shop:s3cret@127.0.0.1:{port}/orders")
    line = failure(result)
    assert result.returncode == EXIT_UNAVAILABLE
    assert line.startswith(f"error: orders: the database at postgresql://shop:***@127.0.0.1:{port}/orders")
    assert "did not answer within the start timeout" in line and "check CHOREO_ORDERS_DATABASE_URL" in line
    assert "s3cret" not in result.stderr


def test_wrong_database_credentials_fail_at_once_in_one_line(postgres_url: str) -> None:
    wrong = make_url(postgres_url).set(password="not-the-password").render_as_string(hide_password=False)
    result = start_orders(CHOREO_ORDERS_DATABASE_URL=wrong, CHOREO_START_TIMEOUT="60s")
    line = failure(result)
    assert result.returncode == EXIT_UNAVAILABLE
    assert "cannot use the database at" in line and "password authentication failed" in line
    assert "check CHOREO_ORDERS_DATABASE_URL" in line and "not-the-password" not in result.stderr


def test_an_sqlite_file_that_cannot_be_opened_is_named(tmp_path: Path) -> None:
    result = start_orders(CHOREO_ORDERS_DATABASE_URL=f"sqlite:///{tmp_path}/no/such/dir/orders.db")
    line = failure(result)
    assert result.returncode == EXIT_UNAVAILABLE
    assert f"the database at sqlite:///{tmp_path}/no/such/dir/orders.db" in line
    assert "unable to open database file" in line


def test_an_unreachable_kafka_is_named(tmp_path: Path) -> None:
    port = free_port()
    result = start_orders(
        CHOREO_ORDERS_DATABASE_URL=f"sqlite:///{tmp_path}/orders.db", KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{port}"
    )
    line = failure(result)
    assert result.returncode == EXIT_UNAVAILABLE
    assert line.startswith(f"error: orders: Kafka at 127.0.0.1:{port} did not answer within the start timeout")
    assert "check CHOREO_ORDERS_KAFKA_BOOTSTRAP_SERVERS" in line


@pytest.mark.parametrize(
    ("variable", "value"),
    [("CHOREO_OUTBOX_RETENTION", "7days"), ("CHOREO_RELAY_TAKEOVER_TIMEOUT", "soon"), ("LOG_LEVEL", "loud")],
)
def test_a_bad_setting_is_refused_before_anything_connects(tmp_path: Path, variable: str, value: str) -> None:
    # Kafka is unreachable too: the setting's error must not wait behind it.
    result = start_orders(
        CHOREO_ORDERS_DATABASE_URL=f"sqlite:///{tmp_path}/orders.db",
        KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}",
        CHOREO_START_TIMEOUT="60s",
        **{variable: value},
    )
    line = failure(result)
    assert result.returncode == EXIT_USAGE
    assert variable in line and " waiting for " not in result.stderr
    assert not (tmp_path / "orders.db").exists(), "nothing was opened"


def test_choreo_collect_waits_for_kafka_then_fails_in_one_line(tmp_path: Path) -> None:
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("CHOREO_", "KAFKA_", "DATABASE_"))}
    result = subprocess.run(
        [sys.executable, "-m", "choreo.cli", "collect", "demo_shop", "--db", f"sqlite:///{tmp_path}/trace.db"],
        cwd=ROOT,
        env={**clean, "CHOREO_START_TIMEOUT": "1s", "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{port}"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    line = failure(result)
    assert result.returncode == EXIT_UNAVAILABLE
    assert line.startswith(f"error: trace collector: Kafka at 127.0.0.1:{port} did not answer within the start timeout")
    assert "stopped:" not in result.stdout
