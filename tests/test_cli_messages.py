"""What a user reads: help texts, empty results and refusals say exactly what is the case."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pytest import MonkeyPatch
from typer.testing import CliRunner

from choreo.cli import app
from choreo.tracing import MIN_PREFIX, SagaState
from tests.dlq_app import ledger
from tests.test_cli import Flows, db, flows  # noqa: F401 (the module-scoped fixture)

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def test_a_too_short_saga_prefix_is_named_as_such(flows: Flows) -> None:  # noqa: F811
    result = runner.invoke(app, ["trace", "4", "--db", db(flows)], env={"CHOREO_DEBUG": ""})
    assert result.exit_code == 2
    assert "no saga '4' in the trace database" in result.stderr
    assert f"a prefix needs at least {MIN_PREFIX} characters" in result.stderr


def test_sagas_help_lists_every_state() -> None:
    result = runner.invoke(app, ["sagas", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert all(state.value in result.stdout for state in SagaState)


def test_an_empty_list_of_all_dead_letters_reads_as_english(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/ledger.db"
    asyncio.run(_create_database(url))
    result = runner.invoke(app, ["dlq", "list", "tests.dlq_app:ledger", "--status", "all", "--db", url])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "no dead letters in ledger"


def test_dlq_commands_refuse_a_database_that_does_not_exist(tmp_path: Path, monkeypatch: MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for command in (["list"], ["show", "1"], ["replay", "1"], ["discard", "1"]):
        result = runner.invoke(app, ["dlq", command[0], "tests.dlq_app:ledger", *command[1:]], env={"CHOREO_DEBUG": ""})
        assert result.exit_code == 2
        assert "ledger's database ledger.db does not exist; pass --db or set CHOREO_LEDGER_DATABASE_URL" in (
            result.stderr
        )
    assert list(tmp_path.iterdir()) == [], "nothing was created"


async def _create_database(url: str) -> None:
    async with ledger.clone(database_url=url).running(kafka=False):
        pass


def test_service_help_aligns_its_columns() -> None:
    shown = subprocess.run(
        [sys.executable, "-m", "demo_shop.customers", "--help"], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    rows = [line for line in shown.splitlines() if line.startswith("  ")]
    assert len(rows) == 4
    # The explanation column starts at the same place on every row.
    starts = {len(line) - len(line.split("   ")[-1].lstrip()) for line in rows}
    assert len(starts) == 1, shown


def test_choreo_run_refuses_a_bad_log_level_before_connecting() -> None:
    result = runner.invoke(app, ["run", "tests.dlq_app:ledger"], env={"LOG_LEVEL": "loud", "CHOREO_DEBUG": ""})
    assert result.exit_code == 2
    assert "LOG_LEVEL='loud'" in result.stderr


def test_choreo_run_logs_at_log_level(tmp_path: Path, kafka_bootstrap: str) -> None:
    env = {
        **os.environ,
        "LOG_LEVEL": "debug",
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "CHOREO_KAFKA_TOPIC_PREFIX": f"{tmp_path.name}.",
        "CHOREO_LEDGER_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/ledger.db",
    }
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    with out.open("w") as stdout, err.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "choreo.cli", "run", "tests.dlq_app:ledger"],
            cwd=ROOT,
            env=env,
            stdout=stdout,
            stderr=stderr,
        )
        try:
            deadline = time.monotonic() + 60
            while "ledger running" not in out.read_text():
                assert time.monotonic() < deadline and process.poll() is None, err.read_text()
                time.sleep(0.1)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)
    logged = err.read_text()
    assert "DEBUG" in logged and "INFO choreo.service: ledger started" in logged
