"""Where a service process spends its CPU: summaries of py-spy's raw (collapsed-stack) output.

`python -m bench --only throughput --profile` records every choreo service with
`py-spy record --format raw --nonblocking` during the last throughput run; this module turns
each file into shares of the samples: by layer (each sample counted once), by a few inclusive
categories, by package where the time is spent itself, and the top functions.

`python -m bench.profile bench/results/profiles/*.txt` prints the same for existing files.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]+)(?::(?P<line>\d+))?\)$")

# Exclusive layers, first match wins, from the top of the stack down. SQLAlchemy runs its
# sync core in greenlets, so a sample inside it has no frames of the choreo code that called it:
# the handler's transaction and the relay's statements land together in the first layer.
LAYERS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("SQLAlchemy + asyncpg (handler transactions, relay statements)", re.compile(r"sqlalchemy/|greenlet")),
    ("choreo relay (publishing, outside SQL)", re.compile(r"choreo/relay\.py")),
    ("choreo consumer and unit of work (outside SQL)", re.compile(r"choreo/(consumer|tx|service|outbox|envelope)\.py")),
    ("demo handlers", re.compile(r"demo_shop/\w+/handlers\.py")),
    ("FastStream per-message machinery (DI, middlewares)", re.compile(r"faststream/|fast_depends/")),
    ("aiokafka (fetcher, offset commits, producer, heartbeats)", re.compile(r"aiokafka/")),
    ("asyncpg outside SQLAlchemy (LISTEN)", re.compile(r"asyncpg/")),
    ("HTTP app (FastAPI)", re.compile(r"(fastapi|starlette)/")),
    ("asyncio event loop, threads", re.compile(r"asyncio/|selectors|threading|anyio/|uvicorn/|runpy")),
)

# Inclusive categories: a sample counts for a category when any frame of its stack matches.
CATEGORIES: dict[str, re.Pattern[str]] = {
    "SQLAlchemy ORM (session, unit of work)": re.compile(r"sqlalchemy/orm/"),
    "pydantic": re.compile(r"pydantic"),
    "json": re.compile(r"json/"),
    "logging": re.compile(r"logging/__init__\.py"),
    "FastStream DI worker-thread hop (run_in_threadpool)": re.compile(r"run_in_threadpool"),
}


def _package(file: str) -> str:
    """A short owner for a source file: choreo.<module>, demo_shop, a site-package, or the stdlib."""
    if "choreo/" in file and "site-packages" not in file:
        return "choreo." + Path(file).stem
    if "demo_shop/" in file:
        return "demo_shop"
    match = re.search(r"site-packages/([^/]+)", file)
    if match:
        return match[1].removesuffix(".py")
    match = re.search(r"python3\.\d+/([^/]+)", file)
    if match:
        return "stdlib:" + match[1].removesuffix(".py")
    return Path(file).stem


def parse(path: Path) -> list[tuple[list[tuple[str, str]], int]]:
    """(frames as (function, file), count) per collapsed stack; root first."""
    stacks = []
    for line in path.read_text(errors="replace").splitlines():
        body, _, count = line.rpartition(" ")
        if not body or not count.isdigit():
            continue
        frames = []
        for raw in body.split(";"):
            match = _FRAME.match(raw.strip())
            frames.append((match["func"], match["file"]) if match else (raw.strip(), ""))
        stacks.append((frames, int(count)))
    return stacks


def summarize_raw(path: Path, top: int = 15) -> dict[str, Any]:
    """Shares (percent of samples) by category, by package (self), and the top self functions."""
    stacks = parse(path)
    total = sum(count for _, count in stacks)
    if not total:
        return {"samples": 0}
    layers: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    self_package: Counter[str] = Counter()
    self_function: Counter[str] = Counter()
    for frames, count in stacks:
        joined = ";".join(f"{func} ({file})" for func, file in frames)
        layer = next((name for name, pattern in LAYERS if pattern.search(joined)), "other")
        layers[layer] += count
        for name, pattern in CATEGORIES.items():
            if pattern.search(joined):
                inclusive[name] += count
        func, file = frames[-1]
        self_package[_package(file)] += count
        self_function[f"{func} ({_package(file)})"] += count

    def pct(counter: Counter[str], n: int | None = None) -> dict[str, float]:
        return {k: round(v * 100 / total, 1) for k, v in counter.most_common(n)}

    return {
        "samples": total,
        "layers_pct": pct(layers),
        "inclusive_pct": pct(inclusive),
        "self_by_package_pct": pct(self_package, top),
        "self_top_functions_pct": pct(self_function, top),
    }


def main() -> None:
    for name in sys.argv[1:]:
        summary = summarize_raw(Path(name))
        print(f"== {name}: {summary.get('samples', 0)} samples")
        for section in ("layers_pct", "inclusive_pct", "self_by_package_pct", "self_top_functions_pct"):
            print(f"  -- {section}")
            for key, value in summary.get(section, {}).items():
                print(f"    {value:5.1f}%  {key}")


if __name__ == "__main__":
    main()
