"""What a user gets from `pip install 'choreo[demo]'`: the commands work, the extras carry what
they import, the version has one source, and the demo's docs, data and hints work as shown."""

from __future__ import annotations

import ast
import os
import re
import shlex
import socket
import subprocess
import sys
import sysconfig
import tomllib
import venv
from collections.abc import Callable, Iterator
from importlib.metadata import packages_distributions, version
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from typer.testing import CliRunner

import choreo
from choreo.cli import app as cli_app
from demo_shop.__main__ import TRACE_DB, _command, _prepare_data_dir, parse_args
from demo_shop.orders import api as orders_api
from demo_shop.shop import SERVICES, Shop
from demo_shop.walkthrough import FLOWS

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirement_name(requirement: str) -> str:
    return re.split(r"[\[<>=!~;\s]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _third_party_imports(package: str) -> Iterator[tuple[str, str]]:
    """(top-level module, file) for every import of a non-stdlib, non-local module in `package`."""
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("choreo", "demo_shop"):
                    yield top, str(path.relative_to(ROOT))


# choreo.devbroker (tansu, for demos) needs the demo extra, choreo.otel the otel extra.
@pytest.mark.parametrize(("package", "extras"), [("choreo", ["otel", "demo", "ui"]), ("demo_shop", ["demo"])])
def test_each_extra_carries_what_its_code_imports(package: str, extras: list[str]) -> None:
    project = PYPROJECT["project"]
    declared = {_requirement_name(r) for r in project["dependencies"]}
    for extra in extras:
        declared |= {_requirement_name(r) for r in project["optional-dependencies"][extra]}
    distributions = packages_distributions()
    missing = {
        f"{module} (imported by {where})"
        for module, where in _third_party_imports(package)
        if not {d.lower().replace("_", "-") for d in distributions.get(module, [module])} & declared
    }
    assert not missing, f"not in the dependencies of {package} + {extras}: {sorted(missing)}"


def test_the_version_comes_from_the_package_metadata() -> None:
    assert choreo.__version__ == version("choreo") == PYPROJECT["project"]["version"]
    result = CliRunner().invoke(cli_app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"choreo {choreo.__version__}"


def test_demo_shop_prints_its_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"demo-shop (choreo {choreo.__version__})"


def test_make_demo_passes_its_args_to_demo_shop() -> None:
    dry_run = subprocess.run(
        ["make", "--dry-run", "--no-print-directory", "demo", "ARGS=--port 8600 --once"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert dry_run.stdout.strip().splitlines()[-1] == ".venv/bin/demo-shop --port 8600 --once"


def test_each_demo_run_starts_from_empty_databases_and_traces_unless_kept(tmp_path: Path) -> None:
    databases = [f"{name}.db" for name in SERVICES] + [TRACE_DB, f"{TRACE_DB}-wal"]
    for keep in (True, False):
        for name in [*databases, "notes.txt"]:
            (tmp_path / name).write_text("an earlier run")
        _prepare_data_dir(tmp_path, keep=keep)
        left = {p.name for p in tmp_path.iterdir()}
        assert left == ({*databases, "notes.txt"} if keep else {"notes.txt"})


def test_the_demo_prints_commands_that_run_as_printed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scripts = Path(sysconfig.get_path("scripts"))
    others = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and Path(p).resolve() != scripts.resolve()]
    monkeypatch.setenv("PATH", os.pathsep.join([str(scripts), *others]))
    assert _command("choreo") == "choreo"  # on PATH: as a user would type it
    monkeypatch.setenv("PATH", os.pathsep.join(others))
    monkeypatch.chdir(scripts.parent.parent)  # e.g. the repository root, holding .venv
    assert _command("choreo") == str((scripts / "choreo").relative_to(Path.cwd()))  # .venv/bin/choreo
    monkeypatch.chdir(tmp_path)
    assert _command("choreo") == str(scripts / "choreo")


@pytest.mark.parametrize("build", [lambda: Shop.in_directory(Path("unused")).create_app(), orders_api.create_app])
async def test_api_docs_load_nothing_from_outside(build: Callable[[], FastAPI]) -> None:
    # No lifespan runs here: the docs need no service, only the app's routes and static files.
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=build()), base_url="http://shop") as client:
        page = await client.get("/docs")
        assert page.status_code == 200
        assert not re.findall(r"https?://[^\s'\"]+", page.text), "the docs page loads from the internet"
        assets = re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", page.text)
        assert {a.rsplit(".", 1)[-1] for a in assets} >= {"js", "css", "json"}, assets
        for asset in assets:
            response = await client.get(asset)
            assert response.status_code == 200, asset
            assert response.content, asset


# -- the wheel, installed as a user installs it ------------------------------------------------


@pytest.mark.timeout(900)
def test_the_wheel_with_the_demo_extra_runs_the_demo_and_the_cli(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    pip_quiet = ["--quiet", "--disable-pip-version-check"]
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", *pip_quiet, "--no-deps", "-w", str(wheels), str(ROOT)], check=True
    )
    (wheel,) = wheels.glob("choreo-*.whl")
    home = tmp_path / "home"  # stands for the user's project directory
    home.mkdir()
    venv.create(home / ".venv", with_pip=True)
    bin_dir = home / ".venv" / "bin"
    # A direct reference: a same-named project on PyPI can never be picked instead.
    subprocess.run(
        [bin_dir / "python", "-m", "pip", "install", *pip_quiet, f"choreo[demo] @ {wheel.as_uri()}"], check=True
    )
    # As in a shell that has not activated the venv: its bin directory is not on PATH.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHOREO_", "KAFKA_"))}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if Path(p) != bin_dir)

    def run(*command: str | Path, timeout: float = 60) -> str:
        done = subprocess.run(command, cwd=home, env=env, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, f"{command}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
        return done.stdout

    assert run(bin_dir / "choreo", "--version").strip() == f"choreo {choreo.__version__}"
    assert run(bin_dir / "demo-shop", "--version").strip() == f"demo-shop (choreo {choreo.__version__})"
    assert "no problems" in run(bin_dir / "choreo", "check", "demo_shop")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    walkthrough = run(bin_dir / "demo-shop", "--once", "--port", str(port), "--ui-port", "0", timeout=300)
    assert f"all {len(FLOWS)} flows ended as expected" in walkthrough

    # The command the demo prints for its sagas runs as printed, from where the demo ran.
    (printed,) = [line.strip() for line in walkthrough.splitlines() if " sagas --db " in line]
    assert printed == f".venv/bin/choreo sagas --db sqlite:///data/{TRACE_DB}"
    sagas = run(*shlex.split(printed))
    assert len(re.findall(r"^[0-9a-f]{8}-[0-9a-f]{4}-", sagas, re.MULTILINE)) == len(FLOWS), sagas
