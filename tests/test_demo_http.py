"""The demo shop's HTTP API refuses bad input with a 4xx that names the problem, never a 500."""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from choreo.testing import in_memory
from demo_shop.customers import api as customers_api
from demo_shop.orders import api as orders_api
from demo_shop.orders.handlers import place_order
from demo_shop.orders.models import Order, OrderState
from demo_shop.payments import api as payments_api
from demo_shop.shop import Shop
from tests.demo_support import api_client, eventually


@pytest.fixture
async def shop(tmp_path: Path) -> AsyncIterator[Shop]:
    shop = Shop.in_directory(tmp_path)
    async with in_memory(*shop):
        yield shop


@pytest.fixture
async def client(shop: Shop) -> AsyncIterator[httpx.AsyncClient]:
    # ASGITransport re-raises what the app does not handle: a 500 would fail the test loudly.
    async with api_client(shop) as client:
        yield client


def fields_named(response: httpx.Response) -> set[str]:
    """The body fields (or query parameters) a 422 answer complains about."""
    assert response.status_code == 422, response.text
    return {str(part) for error in response.json()["detail"] for part in error["loc"][1:]}


async def decided(client: httpx.AsyncClient, *orders: dict[str, Any]) -> None:
    """Wait until the sagas of `orders` have decided them."""

    async def none_pending() -> bool:
        states = [(await client.get(f"/orders/{order['id']}")).json()["state"] for order in orders]
        return OrderState.PENDING not in states

    await eventually(none_pending, timeout=10, what="the orders to be decided")


async def customer(client: httpx.AsyncClient, limit: str = "100.00") -> str:
    response = await client.post("/customers", json={"name": "Ada", "credit_limit": limit})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"customer_id": "c1", "total": 0}, "total"),
        ({"customer_id": "c1", "total": "0.00"}, "total"),
        ({"customer_id": "c1", "total": -5}, "total"),
        ({"customer_id": "c1", "total": "abc"}, "total"),
        ({"customer_id": "c1", "total": "1.005"}, "total"),
        ({"customer_id": "c1", "total": "NaN"}, "total"),
        ({"customer_id": "c1", "total": "Infinity"}, "total"),
        ({"customer_id": "c1", "total": "12345678901.00"}, "total"),
        ({"customer_id": "c1", "total": True}, "total"),
        ({"customer_id": "c1", "total": 12.5}, "total"),  # amounts are strings: no binary floats
        ({"customer_id": "c1", "total": "1e2"}, "total"),
        ({"customer_id": "c1"}, "total"),
        ({"total": "10.00"}, "customer_id"),
        ({"customer_id": "", "total": "10.00"}, "customer_id"),
        ({"customer_id": "   ", "total": "10.00"}, "customer_id"),
        ({"customer_id": "x" * 65, "total": "10.00"}, "customer_id"),
        ({"customer_id": 42, "total": "10.00"}, "customer_id"),
        ({"customer_id": "c1", "total": "10.00", "discount": "5"}, "discount"),
    ],
)
async def test_place_order_rejects_bad_fields(client: httpx.AsyncClient, body: dict[str, Any], field: str) -> None:
    response = await client.post("/orders", json=body)
    assert field in fields_named(response)


@pytest.mark.parametrize("content", [b"", b"{", b"[]", b'"an order"', b"null", b"customer_id=c1&total=1"], ids=repr)
async def test_place_order_rejects_malformed_bodies(client: httpx.AsyncClient, content: bytes) -> None:
    response = await client.post("/orders", content=content, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert response.json()["detail"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "Ada", "credit_limit": 0}, "credit_limit"),
        ({"name": "Ada", "credit_limit": "-1.00"}, "credit_limit"),
        ({"name": "Ada", "credit_limit": "lots"}, "credit_limit"),
        ({"name": "Ada"}, "credit_limit"),
        ({"credit_limit": "10.00"}, "name"),
        ({"name": "  ", "credit_limit": "10.00"}, "name"),
        ({"name": "A" * 201, "credit_limit": "10.00"}, "name"),
    ],
)
async def test_create_customer_rejects_bad_fields(client: httpx.AsyncClient, body: dict[str, Any], field: str) -> None:
    response = await client.post("/customers", json=body)
    assert field in fields_named(response)


async def test_amounts_are_normalized_to_cents(client: httpx.AsyncClient) -> None:
    response = await client.post("/customers", json={"name": " Ada ", "credit_limit": "100"})
    assert response.status_code == 201
    assert response.json()["name"] == "Ada"
    assert response.json()["credit_limit"] == "100.00"
    assert response.headers["location"] == f"/customers/{response.json()['id']}"


@pytest.mark.parametrize(
    ("method", "path", "kind"),
    [
        ("GET", "/orders/no-such-order", "order"),
        ("POST", "/orders/no-such-order/cancel", "order"),
        ("GET", "/customers/no-such-order", "customer"),
    ],
)
async def test_unknown_ids_are_404_naming_the_id(client: httpx.AsyncClient, method: str, path: str, kind: str) -> None:
    response = await client.request(method, path)
    assert response.status_code == 404
    assert response.json()["detail"] == f"{kind} 'no-such-order' not found"


async def test_list_orders_validates_its_filters(client: httpx.AsyncClient) -> None:
    assert "state" in fields_named(await client.get("/orders", params={"state": "SHIPPED"}))
    assert "limit" in fields_named(await client.get("/orders", params={"limit": 0}))
    assert "limit" in fields_named(await client.get("/orders", params={"limit": "many"}))


async def test_list_orders_filters_by_state(client: httpx.AsyncClient) -> None:
    ada = await customer(client, "100.00")
    placed = []
    for total in ("10.00", "20.13", "500.00"):  # approved, declined, over the limit
        response = await client.post("/orders", json={"customer_id": ada, "total": total})
        assert response.status_code == 201
        placed.append(response.json())
    await decided(client, *placed)
    everything = (await client.get("/orders")).json()
    approved = (await client.get("/orders", params={"state": "APPROVED"})).json()
    rejected = (await client.get("/orders", params={"state": "REJECTED"})).json()
    assert len(everything) == 3
    assert [o["total"] for o in approved] == ["10.00"]
    assert sorted(o["total"] for o in rejected) == ["20.13", "500.00"]
    assert (await client.get("/orders", params={"limit": 1})).json() == everything[:1]


async def test_only_an_approved_order_can_be_cancelled(client: httpx.AsyncClient) -> None:
    ada = await customer(client, "100.00")
    rejected = (await client.post("/orders", json={"customer_id": ada, "total": "500.00"})).json()
    approved = (await client.post("/orders", json={"customer_id": ada, "total": "10.00"})).json()
    await decided(client, rejected, approved)

    response = await client.post(f"/orders/{rejected['id']}/cancel")
    assert response.status_code == 409
    assert response.json()["detail"] == (
        f"order {rejected['id']!r} is REJECTED; only an APPROVED order can be cancelled"
    )
    first = await client.post(f"/orders/{approved['id']}/cancel")
    assert first.status_code == 200
    assert first.json()["state"] == "CANCELLED"
    again = await client.post(f"/orders/{approved['id']}/cancel")
    assert again.status_code == 409
    assert "is CANCELLED" in again.json()["detail"]


async def test_a_pending_order_cannot_be_cancelled(shop: Shop, client: httpx.AsyncClient) -> None:
    # An order whose saga has not decided yet: inserted without its order.created event.
    async with shop.orders.transaction() as tx:
        tx.session.add(Order(id="waiting", customer_id="c1", total=Decimal("5.00"), saga_id=tx.saga_id))
    response = await client.post("/orders/waiting/cancel")
    assert response.status_code == 409
    assert "is PENDING" in response.json()["detail"]


async def test_place_order_answers_201_with_location_and_saga(client: httpx.AsyncClient) -> None:
    response = await client.post("/orders", json={"customer_id": "someone", "total": "12.5"})
    assert response.status_code == 201
    order = response.json()
    assert response.headers["location"] == f"/orders/{order['id']}"
    assert order["state"] == OrderState.PENDING
    assert order["total"] == "12.50"
    assert order["saga_id"]
    await decided(client, order)
    assert (await client.get(f"/orders/{order['id']}")).json()["state"] == OrderState.REJECTED


async def test_health_and_openapi(client: httpx.AsyncClient) -> None:
    health = await client.get("/health")
    assert health.status_code == 200
    assert set(health.json()["services"]) == {"orders", "customers", "payments"}
    assert all(s["ready"] and s["checks"]["database"] == "ok" for s in health.json()["services"].values())
    assert (await client.get("/health/live")).json() == {"status": "ok"}
    exposition = (await client.get("/metrics")).text
    for name in ("orders", "customers", "payments"):
        assert f'choreo_outbox_backlog{{service="{name}"}}' in exposition
    paths = (await client.get("/openapi.json")).json()["paths"]
    assert {"/orders", "/orders/{order_id}", "/orders/{order_id}/cancel", "/customers"} <= set(paths)


async def test_service_apps_serve_their_own_api(tmp_path: Path) -> None:
    apps = {
        "orders": orders_api.create_app,
        "customers": customers_api.create_app,
        "payments": payments_api.create_app,
    }
    for name, create_app in apps.items():
        service = getattr(Shop.in_directory(tmp_path), name)
        transport = httpx.ASGITransport(app=create_app(service))
        async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
            # Not started (no lifespan here): unhealthy, and says so.
            health = await client.get("/health")
            assert health.status_code == 503
            assert health.json()["services"] == {name: {"ready": False, "status": "starting"}}
            paths = set((await client.get("/openapi.json")).json()["paths"])
        assert ("/orders" in paths) is (name == "orders")
        assert ("/customers" in paths) is (name == "customers")


async def test_place_order_keeps_money_exact(shop: Shop) -> None:
    order = await place_order(shop.orders, "c1", Decimal("113.13"))
    async with shop.orders.transaction() as tx:
        stored = await tx.session.get(Order, order.id)
    assert stored is not None
    assert stored.total == Decimal("113.13")


async def test_a_wrong_method_lists_every_method_of_the_resource(client: httpx.AsyncClient) -> None:
    response = await client.options("/orders")
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, POST"
    assert (await client.delete("/customers/c1")).headers["allow"] == "GET"


@pytest.mark.parametrize("content_type", ["application/octet-stream", "text/plain"])
async def test_a_body_of_raw_bytes_is_a_422_not_a_500(client: httpx.AsyncClient, content_type: str) -> None:
    response = await client.post("/customers", content=b"\xff\x00\xfe", headers={"content-type": content_type})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body"]


async def test_every_error_the_api_answers_is_documented(client: httpx.AsyncClient) -> None:
    paths = (await client.get("/openapi.json")).json()["paths"]
    assert set(paths["/customers"]["post"]["responses"]) == {"201", "400", "422"}
    assert set(paths["/orders/{order_id}"]["get"]["responses"]) == {"200", "404", "422"}
    assert set(paths["/orders/{order_id}/cancel"]["post"]["responses"]) == {"200", "404", "409", "422"}
    assert list(paths["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    not_json = await client.post("/customers", content=b"\xff", headers={"content-type": "application/json"})
    assert not_json.status_code == 400 and not_json.json()["detail"]
