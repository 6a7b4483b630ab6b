"""The explorer over HTTP: bad input is a clear 4xx, the token guards every page, actions are off by default."""

from __future__ import annotations

import html
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from choreo.explorer import create_app
from choreo.explorer.app import mask_urls
from choreo.kafka import KafkaTransport
from choreo.settings import KafkaSettings
from tests.explorer_support import _free_port
from tests.test_tracing import Flows, play_flows
from tests.toy3 import make_toy3


@pytest.fixture(scope="module")
def flows(tmp_path_factory: pytest.TempPathFactory) -> Flows:
    return play_flows(tmp_path_factory.mktemp("flows"))


async def client_for(flows: Flows, **options: object) -> AsyncIterator[httpx.AsyncClient]:
    toy = make_toy3(*(f"sqlite+aiosqlite:///{flows.directory}/{name}.db" for name in ("orders", "stock", "payments")))
    app = create_app(flows.store().url, toy.services, **options)  # type: ignore[arg-type]
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://explorer") as client:
            yield client


@pytest.fixture
async def client(flows: Flows) -> AsyncIterator[httpx.AsyncClient]:
    async for client in client_for(flows):
        yield client


@pytest.mark.parametrize(
    ("path", "status", "says"),
    [
        ("/sagas/no-such-saga", 404, "no saga 'no-such-saga' in the trace database"),
        ("/sagas/ab", 404, "a prefix needs at least 4 characters"),
        ("/sagas/bad%20id%3B", 400, "is not a saga id"),
        ("/sagas/" + "x" * 65, 400, "is not a saga id"),
        ("/?state=stuck", 400, "unknown state 'stuck'"),
        ("/?window=1y", 400, "unknown window '1y'"),
        ("/?saga=nope", 400, "unknown saga type 'nope'; known: purchase"),
        ("/?service=nope", 400, "unknown service 'nope'; known: orders, stock, payments"),
        ("/rows?state=stuck", 400, "unknown state 'stuck'"),
        ("/?q=zzzz-none", 404, "no saga has the id, id prefix or business key 'zzzz-none'"),
        ("/?q=" + "x" * 201, 400, "at most 200 characters"),
        ("/dead-letters?status=lost", 400, "unknown status 'lost'"),
        ("/dead-letters/nope/1", 404, "no service 'nope'"),
        ("/dead-letters/payments/999", 404, "payments has no dead letter 999"),
        ("/dead-letters/payments/one", 422, ""),
        ("/graph?window=all", 400, "unknown window 'all'"),
        ("/nothing-here", 404, ""),
    ],
)
async def test_bad_input_is_a_clear_4xx(client: httpx.AsyncClient, path: str, status: int, says: str) -> None:
    response = await client.get(path)
    assert response.status_code == status, response.text[:300]
    assert says in html.unescape(response.text)


async def test_every_page_renders(client: httpx.AsyncClient, flows: Flows) -> None:
    for path in ["/", "/?window=all&state=failed", "/rows", "/graph", "/dead-letters?status=all", "/health"]:
        assert (await client.get(path)).status_code == 200, path
    for saga_id in flows.ids.values():
        assert (await client.get(f"/sagas/{saga_id}")).status_code == 200


async def test_a_prefix_redirects_to_the_permanent_url(client: httpx.AsyncClient, flows: Flows) -> None:
    saga_id = flows.ids["compensation"]
    response = await client.get(f"/sagas/{saga_id[:8]}")
    assert (response.status_code, response.headers["location"]) == (307, f"/sagas/{saga_id}")
    response = await client.get(f"/?q={saga_id[:6]}")
    assert (response.status_code, response.headers["location"]) == (303, f"/sagas/{saga_id}")


async def test_a_business_key_finds_its_saga(client: httpx.AsyncClient, flows: Flows) -> None:
    response = await client.get("/?q=big-1")  # the order id in the compensated saga's payloads
    assert (response.status_code, response.headers["location"]) == (303, f"/sagas/{flows.ids['compensation']}")


async def test_the_dead_letter_list_and_record(client: httpx.AsyncClient, flows: Flows) -> None:
    page = (await client.get("/dead-letters")).text
    assert f'href="/sagas/{flows.ids["dead-letter"]}"' in page
    assert "card processor exploded" in page
    record = (await client.get("/dead-letters/payments/1")).text
    assert "boom-1" in record and "handler-error" in record
    assert "disabled" in record  # the buttons show, greyed out


async def test_actions_are_off_unless_allowed(client: httpx.AsyncClient) -> None:
    response = await client.post("/dead-letters/payments/1/discard")
    assert response.status_code == 403 and "--allow-actions" in response.text
    assert 'data-status="parked"' in (await client.get("/dead-letters")).text


async def test_a_token_guards_every_request(flows: Flows) -> None:
    async for client in client_for(flows, token="s3cret"):
        for path in ["/", "/rows", "/graph", "/health", "/static/explorer.css", f"/sagas/{flows.ids['success']}"]:
            assert (await client.get(path)).status_code == 401, path
        assert (await client.post("/dead-letters/payments/1/replay")).status_code == 401
        assert (await client.get("/", headers={"authorization": "Bearer wrong"})).status_code == 401
        assert (await client.get("/", headers={"authorization": "Bearer s3cret"})).status_code == 200
        first = await client.get("/?token=s3cret")  # a link with the token: the browser keeps a cookie
        assert first.status_code == 200 and "choreo_ui_token" in first.headers["set-cookie"]
        assert (await client.get("/health")).status_code == 200


async def test_without_targets_the_sagas_show_and_the_graph_says_why(flows: Flows) -> None:
    app = create_app(flows.store().url)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://explorer") as client:
            assert flows.ids["success"][:8] in (await client.get("/?window=all")).text
            assert (await client.get(f"/sagas/{flows.ids['success']}")).status_code == 200
            graph = await client.get("/graph")
            assert graph.status_code == 404 and "choreo ui demo_shop" in graph.text


@pytest.mark.parametrize(
    ("broken", "node"),
    [("unhandled-event", "t3.payment_audited"), ("unreachable-handler", "orders.refund")],
)
async def test_check_findings_flag_their_node_on_the_graph(flows: Flows, broken: str, node: str) -> None:
    toy = make_toy3(broken=broken)
    app = create_app(flows.store().url, toy.services, start_services=False)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://explorer") as client:
            page = (await client.get("/graph")).text
    flagged = re.findall(r'data-node="([^"]+)" data-problems="([^"]+)"', page)
    assert flagged == [(node, broken)]
    assert f'<li data-kind="{broken}">' in page


def test_urls_with_passwords_are_masked() -> None:
    text = '{"dsn": "postgresql+asyncpg://shop:hunter2@db:5432/shop", "site": "https://example.com/a@b"}'
    assert mask_urls(text) == '{"dsn": "postgresql+asyncpg://shop:***@db:5432/shop", "site": "https://example.com/a@b"}'


def _serve(flows: Flows, *args: str) -> tuple[str, int]:
    """Start `choreo ui`, wait until it answers, stop it; returns (stderr, status of GET /)."""
    port = _free_port()
    env = {**os.environ, "CHOREO_UI_TOKEN": ""}
    command = [sys.executable, "-m", "choreo.cli", "ui", "--db", flows.store().url, "--port", str(port), *args]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        status, deadline = 0, time.monotonic() + 30
        while time.monotonic() < deadline and process.poll() is None:
            try:
                status = httpx.get(f"http://127.0.0.1:{port}/", timeout=1).status_code
                break
            except httpx.TransportError:
                time.sleep(0.1)
    finally:
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=15)
    return err, status


def test_binding_beyond_loopback_warns_unless_a_token_is_set(flows: Flows) -> None:
    err, status = _serve(flows, "--host", "0.0.0.0")
    assert status == 200
    assert "warning: serving on 0.0.0.0 without authentication" in err and "set --token or CHOREO_UI_TOKEN" in err
    err, status = _serve(flows, "--host", "0.0.0.0", "--token", "s3cret")
    assert status == 401 and "warning" not in err
    err, status = _serve(flows)
    assert status == 200 and "warning" not in err


def test_the_wheel_carries_the_pages(tmp_path: Path) -> None:
    root = Path(__file__).parent.parent
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-qw", str(tmp_path), str(root)],
        check=True,
    )
    (wheel,) = tmp_path.glob("choreo-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ["saga.html", "sagas.html", "_rows.html", "graph.html", "base.html"]:
        assert f"choreo/explorer/templates/{needed}" in names
    assert {"choreo/explorer/static/explorer.css", "choreo/explorer/static/explorer.js"} <= names


@pytest.mark.infra
async def test_health_shows_consumer_lag_from_the_broker(flows: Flows, kafka_settings: KafkaSettings) -> None:
    toy = make_toy3(
        *(f"sqlite+aiosqlite:///{flows.directory}/{name}.db" for name in ("orders", "stock", "payments")),
        kafka=kafka_settings,
    )
    stock = toy.stock  # consumes t3-orders (and t3-payments)
    topic = kafka_settings.topic_prefix + "t3-orders"
    transport = KafkaTransport(kafka_settings, client_id="test")
    await transport.ensure_topics(["t3-orders", "t3-payments"])
    producer = AIOKafkaProducer(bootstrap_servers=kafka_settings.bootstrap_servers)
    await producer.start()
    for n in range(5):
        await producer.send_and_wait(topic, b"{}", partition=0, key=str(n).encode())
    await producer.stop()
    # The stock group has committed the first two records of partition 0: three wait.
    member = AIOKafkaConsumer(
        bootstrap_servers=kafka_settings.bootstrap_servers,
        group_id=kafka_settings.group(stock.group_id),
        enable_auto_commit=False,
    )
    await member.start()
    member.assign([TopicPartition(topic, 0)])
    await member.commit({TopicPartition(topic, 0): 2})
    await member.stop()
    assert await transport.group_lag(stock.group_id, stock.subscribed_topics) == {
        **{f"t3-orders/{p}": 0 for p in range(1, 4)},
        **{f"t3-payments/{p}": 0 for p in range(4)},
        "t3-orders/0": 3,
    }
    app = create_app(flows.store().url, toy.services)
    transport_to_app = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport_to_app, base_url="http://explorer") as client,
    ):
        page = (await client.get("/health")).text
    row = re.search(r'<tr data-service="stock">(.*?)</tr>', page, re.S)
    assert row is not None
    assert re.search(r'<td class="num lag" title="t3-orders/0: 3">3</td>', row[1]), row[1]
