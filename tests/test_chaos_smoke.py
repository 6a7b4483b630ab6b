"""The chaos soak's invariant checker finds each kind of violation and passes a consistent shop;
its blackhole proxy holds bytes without closing connections."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from chaos.driver import Saga
from chaos.invariants import Evidence, Record, check, reconcile
from chaos.proxy import BlackholeProxy

T0 = datetime(2026, 12, 2, tzinfo=UTC)


def outbox_row(row_id: int, topic: str, key: str, event_type: str, order_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": row_id,
        "event_id": f"{topic}-{row_id}",
        "topic": topic,
        "key": key,
        "event_type": event_type,
        "payload": json.dumps({"order_id": order_id}).encode(),
        "created_at": T0,
        "available_at": T0,
        "published_at": T0,
        **extra,
    }


def consistent() -> Evidence:
    """One approved order (saga 0) and one order rejected for an unknown customer (saga 1)."""
    orders_out = [
        outbox_row(1, "orders", "s0", "order.created", "o0"),
        outbox_row(2, "orders", "s1", "order.created", "o1"),
        outbox_row(3, "orders", "s1", "order.rejected", "o1"),
        outbox_row(4, "orders", "s0", "order.approved", "o0"),
    ]
    customers_out = [
        outbox_row(1, "customers", "s0", "credit.reserved", "o0"),
        outbox_row(2, "customers", "s1", "customer.not_found", "o1"),
    ]
    payments_out = [outbox_row(1, "payments", "s0", "payment.authorized", "o0")]
    outbox = {"orders": orders_out, "customers": customers_out, "payments": payments_out}
    records = {
        topic: [Record(0, i, row["key"], row["event_id"], row["event_type"]) for i, row in enumerate(rows)]
        for topic, rows in outbox.items()
    }
    handlers = {
        "orders": {"orders.approve_order": {"payment.authorized"}, "orders.reject_order": {"customer.not_found"}},
        "customers": {"customers.reserve_credit": {"order.created"}, "customers.release_credit": {"order.rejected"}},
        "payments": {"payments.authorize_payment": {"credit.reserved"}},
    }
    topics_of = {
        "payment.authorized": "payments",
        "customer.not_found": "customers",
        "order.created": "orders",
        "order.rejected": "orders",
        "credit.reserved": "customers",
    }
    inbox: dict[str, set[tuple[str, str]]] = {service: set() for service in outbox}
    for service, by_handler in handlers.items():
        for handler, names in by_handler.items():
            for name in names:
                inbox[service] |= {(handler, r.event_id) for r in records[topics_of[name]] if r.event_type == name}
    return Evidence(
        orders=[
            {"id": "o0", "customer_id": "c0", "total": "1000.00", "state": "APPROVED", "rejection_reason": None},
            {
                "id": "o1",
                "customer_id": "ghost-1",
                "total": "1001.00",
                "state": "REJECTED",
                "rejection_reason": "customer 'ghost-1' not found",
            },
        ],
        customers=[{"id": "c0", "credit_limit": "100000.00", "credit_reserved": "1000.00"}],
        reservations=[{"order_id": "o0", "customer_id": "c0", "amount": "1000.00", "state": "RESERVED"}],
        payments=[{"order_id": "o0", "state": "AUTHORIZED", "amount": "1000.00"}],
        outbox=outbox,
        inbox=inbox,
        dead_letters={service: [] for service in outbox},
        records=records,
        handlers=handlers,
        topics_of=topics_of,
        sagas=[
            Saga(0, "success", "c0", order_id="o0", placed="201", total=Decimal(0)),
            Saga(1, "unknown-customer", "ghost-1", order_id="o1", placed="201", total=Decimal(0)),
        ],
    )


def failing(evidence: Evidence) -> dict[str, list[str]]:
    return {name: found for name, found in check(evidence).items() if found}


def test_a_consistent_shop_passes_every_invariant() -> None:
    assert failing(consistent()) == {}


def test_a_redelivered_record_is_allowed_but_an_inversion_is_not() -> None:
    evidence = consistent()
    orders = evidence.records["orders"]
    evidence.records["orders"] = [*orders, Record(0, 9, "s1", "orders-2", "order.created")]  # a duplicate
    assert failing(evidence) == {}
    # order.rejected (outbox id 3) reaches the topic before order.created (outbox id 2) of key s1.
    created, rejected = orders[1], orders[2]
    evidence.records["orders"] = [orders[0], replace(rejected, offset=1), replace(created, offset=2), orders[3]]
    assert list(failing(evidence)) == ["per-key order on every topic"]


def test_a_record_missing_from_a_handlers_inbox_is_reported() -> None:
    evidence = consistent()
    evidence.inbox["payments"].clear()
    found = failing(evidence)
    assert list(found) == ["every event in the inbox of each handler subscribed to it"]
    assert "payments.authorize_payment never processed credit.reserved customers-1" in found[next(iter(found))]


def test_credit_held_for_an_order_that_is_not_approved_is_reported() -> None:
    evidence = consistent()
    evidence.orders[0]["state"] = "REJECTED"
    evidence.orders[0]["rejection_reason"] = "no answer in time: the order saga passed its deadline"
    found = failing(evidence)
    assert "held credit = totals of approved orders" in found
    assert "nothing charged for a rejected order" in found  # authorized, never refunded


def test_unpublished_rows_dead_letters_and_5xx_are_reported() -> None:
    evidence = consistent()
    evidence.outbox["orders"][3]["published_at"] = None
    evidence.dead_letters["orders"].append(
        {"consumer": "orders.approve_order", "event_type": "payment.authorized", "reason": "handler", "error": "boom"}
    )
    evidence.http_5xx.append({"request": "POST /orders", "replica": "orders-1", "at": 1.0, "status": 500, "body": ""})
    assert set(failing(evidence)) == {"every outbox row published", "no dead letters", "no HTTP 5xx from the shop"}


def test_a_lost_response_is_settled_by_the_order_found_in_the_database() -> None:
    evidence = consistent()
    evidence.sagas[1].order_id, evidence.sagas[1].placed = None, "unknown"
    evidence.sagas.append(Saga(2, "success", "c0", placed="unknown", total=Decimal(0)))
    assert reconcile(evidence) == {"unknown: placed": 1, "unknown: not placed": 1}
    assert evidence.sagas[1].order_id == "o1"
    assert failing(evidence) == {}


def test_an_order_no_saga_placed_is_reported() -> None:
    evidence = consistent()
    evidence.orders.append(
        {"id": "o9", "customer_id": "c0", "total": "1009.00", "state": "REJECTED", "rejection_reason": "x"}
    )
    assert "sagas end as their flow (or their deadline) says" in failing(evidence)


def test_a_scheduled_row_is_exempt_from_id_order() -> None:
    evidence = consistent()
    later = T0 + timedelta(seconds=30)
    deadline = outbox_row(5, "orders", "s1", "order.deadline_passed", "o1", available_at=later)
    evidence.outbox["orders"].insert(1, {**deadline, "id": 0})  # written first, published last
    evidence.records["orders"].append(Record(0, 10, "s1", deadline["event_id"], "order.deadline_passed"))
    assert failing(evidence) == {}


def test_a_cancel_whose_answer_was_lost_may_have_cancelled() -> None:
    evidence = consistent()
    evidence.sagas[0].flow = "cancel-after-approval"
    evidence.orders[0]["state"] = "CANCELLED"
    evidence.sagas[0].cancel = "cancel timed out"
    assert "sagas end as their flow (or their deadline) says" in failing(evidence)  # no cancel went out
    evidence.sagas[0].cancel_sent = True
    assert "sagas end as their flow (or their deadline) says" not in failing(evidence)


async def test_the_blackhole_proxy_holds_bytes_without_closing_the_connection() -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(100):
            writer.write(data)
            await writer.drain()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    proxy = await BlackholeProxy(("127.0.0.1", server.sockets[0].getsockname()[1])).start()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(b"a")
        assert await asyncio.wait_for(reader.read(1), 5) == b"a"
        assert len(proxy.upstream_ports) == 1
        proxy.blackhole()
        writer.write(b"b")
        done, pending = await asyncio.wait([asyncio.ensure_future(reader.read(1))], timeout=0.5)
        assert not done and not reader.at_eof()  # nothing arrives, nothing is closed
        proxy.resume()
        assert await asyncio.wait_for(next(iter(pending)), 5) == b"b"
    finally:
        writer.close()
        await proxy.stop()
        server.close()
