"""The shop's HTTP API keeps the promises of its own OpenAPI document, checked by schemathesis.

schemathesis (property-based, from the document alone) runs every check it has, in all its
phases: examples, coverage, fuzzing, and stateful sequences (create a customer, then an order
for it, then cancel it) inferred from the document's links. Any mismatch fails the test.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import uvicorn

from choreo.testing import in_memory
from demo_shop.shop import Shop
from infra.kafka import free_port

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")


@pytest.fixture
async def served_shop(tmp_path: Path) -> AsyncIterator[str]:
    """The whole shop on the in-memory broker, its HTTP API on a free port; yields the base URL."""
    shop = Shop.in_directory(tmp_path)
    async with in_memory(*shop):
        port = free_port()
        # The services already run on the in-memory broker: no lifespan.
        config = uvicorn.Config(shop.create_app(), host="127.0.0.1", port=port, log_level="warning", lifespan="off")
        server = uvicorn.Server(config)
        serving = asyncio.create_task(server.serve())
        while not server.started:
            assert not serving.done(), "the API did not start"
            await asyncio.sleep(0.02)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
            await serving


@pytest.mark.timeout(600)
async def test_the_api_answers_as_its_openapi_document_says(served_shop: str, tmp_path: Path) -> None:
    run = await asyncio.create_subprocess_exec(
        str(SCHEMATHESIS),
        "--no-color",
        "run",
        f"{served_shop}/openapi.json",
        "--checks",
        "all",
        "--max-examples",
        "40",
        "--seed",
        "20261202",
        "--report-dir",
        str(tmp_path / "report"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={"PATH": "/usr/bin:/bin", "SCHEMATHESIS_HOOKS": ""},
        cwd=tmp_path,  # its cache directory stays out of the checkout
    )
    output, _ = await run.communicate()
    text = output.decode()
    assert run.returncode == 0, text
    assert "Stateful" in text, "the stateful phase found links to follow"
