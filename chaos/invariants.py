"""What must hold once the shop is quiet, checked straight from its databases and its topics.

`gather` reads everything once; `check` is pure (a unit test feeds it a hand-made `Evidence`),
and returns, per invariant, the list of violations (empty: it holds).
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from chaos.driver import BASE, EXPECTED, REASON, Saga
from choreo.deadletters import topic_for
from choreo.envelope import EVENT_ID, EVENT_TYPE

TERMINAL = {"APPROVED", "REJECTED", "CANCELLED"}


@dataclass
class Record:
    """One Kafka record, as the checks need it."""

    partition: int
    offset: int
    key: str | None
    event_id: str
    event_type: str


@dataclass
class Evidence:
    """Everything the checks read: rows by service, records by topic (without the run's prefix)."""

    orders: list[dict[str, Any]]
    customers: list[dict[str, Any]]
    reservations: list[dict[str, Any]]
    payments: list[dict[str, Any]]
    outbox: dict[str, list[dict[str, Any]]]
    inbox: dict[str, set[tuple[str, str]]]
    dead_letters: dict[str, list[dict[str, Any]]]
    records: dict[str, list[Record]]
    handlers: dict[str, dict[str, set[str]]]
    """Per service: handler (inbox consumer) name -> the wire names it handles."""
    topics_of: dict[str, str] = field(default_factory=dict)
    """Wire name -> topic."""
    sagas: list[Saga] = field(default_factory=list)
    http_5xx: list[dict[str, Any]] = field(default_factory=list)
    crashes: list[str] = field(default_factory=list)


def check(ev: Evidence) -> dict[str, list[str]]:
    """Each invariant's violations, by invariant name."""
    results = {
        "every order terminal": _terminal(ev),
        "sagas end as their flow (or their deadline) says": _outcomes(ev),
        "held credit = totals of approved orders": _credit(ev),
        "one authorization per approved order, one refund per cancelled order": _payments(ev),
        "nothing charged for a rejected order": _nothing_charged(ev),
        "every outbox row published": _published(ev),
        "every published outbox row is on its topic": _on_topic(ev),
        "every event in the inbox of each handler subscribed to it": _inboxes(ev),
        "per-key order on every topic": _per_key_order(ev),
        "no dead letters": _dead_letters(ev),
        "no HTTP 5xx from the shop": [
            f"{e['request']} on {e['replica']} at {e['at']}s: {e['status']} {e['body']}" for e in ev.http_5xx
        ],
        "no service process crashed on its own": ev.crashes,
    }
    return results


def _terminal(ev: Evidence) -> list[str]:
    return [f"order {o['id']} still {o['state']}" for o in ev.orders if o["state"] not in TERMINAL]


def _by_seq(ev: Evidence) -> dict[int, dict[str, Any]]:
    return {int(Decimal(o["total"])) - BASE: o for o in ev.orders}


def reconcile(ev: Evidence) -> dict[str, int]:
    """Give each saga whose response was lost the order it did (or did not) place."""
    found = _by_seq(ev)
    counts: Counter[str] = Counter()
    for saga in ev.sagas:
        if saga.placed in ("unknown", "unsent"):
            order = found.get(saga.seq)
            counts[f"{saga.placed}: {'placed' if order else 'not placed'}"] += 1
            if order is not None:
                saga.order_id = order["id"]
    return dict(counts)


def _outcomes(ev: Evidence) -> list[str]:
    problems = []
    by_seq = _by_seq(ev)
    known = {s.seq for s in ev.sagas}
    problems += [
        f"order {o['id']} (total {o['total']}) was placed by no saga" for seq, o in by_seq.items() if seq not in known
    ]
    by_id = {o["id"]: o for o in ev.orders}
    for saga in ev.sagas:
        if saga.order_id is None:
            if saga.placed not in ("unknown", "unsent"):
                problems.append(f"saga {saga.seq} ({saga.flow}): POST /orders answered {saga.placed}")
            continue
        order = by_id.get(saga.order_id)
        if order is None:
            problems.append(f"saga {saga.seq}: order {saga.order_id} answered 201 but is not in the orders database")
            continue
        expected = {EXPECTED[saga.flow]}
        if saga.flow == "cancel-after-approval" and saga.cancel != "cancelled":
            # Never cancelled (e.g. a lost response placed it unseen), or cancelled unanswered.
            expected = {"APPROVED", "CANCELLED"} if saga.cancel_sent else {"APPROVED"}
        reason = order["rejection_reason"] or ""
        if order["state"] == "REJECTED" and "deadline" in reason:
            continue  # a fault held the saga past its deadline: a legitimate end
        if order["state"] not in expected or (saga.flow in REASON and REASON[saga.flow] not in reason):
            problems.append(
                f"saga {saga.seq} ({saga.flow}) order {saga.order_id}: {order['state']} {reason!r}, "
                f"expected {' or '.join(sorted(expected))}" + (f" (cancel: {saga.cancel})" if saga.cancel else "")
            )
    return problems


def _credit(ev: Evidence) -> list[str]:
    approved: dict[str, Decimal] = defaultdict(Decimal)
    for order in ev.orders:
        if order["state"] == "APPROVED":
            approved[order["customer_id"]] += Decimal(order["total"])
    held: dict[str, Decimal] = defaultdict(Decimal)
    for reservation in ev.reservations:
        if reservation["state"] == "RESERVED":
            held[reservation["customer_id"]] += Decimal(reservation["amount"])
    problems = []
    for customer in ev.customers:
        cid, reserved = customer["id"], Decimal(customer["credit_reserved"])
        if not reserved == held[cid] == approved[cid]:
            problems.append(
                f"customer {cid}: credit_reserved {reserved}, RESERVED reservations {held[cid]}, "
                f"approved orders {approved[cid]}"
            )
        if reserved > Decimal(customer["credit_limit"]):
            problems.append(f"customer {cid}: {reserved} reserved over a limit of {customer['credit_limit']}")
    return problems


def _emitted(ev: Evidence, service: str, event_type: str) -> Counter[str]:
    """Per order id, how many `event_type` events `service` wrote to its outbox."""
    return Counter(
        json.loads(row["payload"])["order_id"] for row in ev.outbox.get(service, []) if row["event_type"] == event_type
    )


def _payments(ev: Evidence) -> list[str]:
    authorized = _emitted(ev, "payments", "payment.authorized")
    refunded = _emitted(ev, "payments", "payment.refunded")
    payment = {p["order_id"]: p for p in ev.payments}
    problems = []
    for order in ev.orders:
        oid, state = order["id"], order["state"]
        if state in ("APPROVED", "CANCELLED"):
            if authorized[oid] != 1:
                problems.append(f"{state} order {oid}: {authorized[oid]} payment.authorized events")
            wanted = "AUTHORIZED" if state == "APPROVED" else "REFUNDED"
            got = payment.get(oid, {}).get("state")
            if got != wanted:
                problems.append(f"{state} order {oid}: payment {got}, expected {wanted}")
        if state == "CANCELLED" and refunded[oid] != 1:
            problems.append(f"CANCELLED order {oid}: {refunded[oid]} payment.refunded events")
        if state == "APPROVED" and refunded[oid]:
            problems.append(f"APPROVED order {oid}: refunded {refunded[oid]} times")
    return problems


def _nothing_charged(ev: Evidence) -> list[str]:
    authorized = _emitted(ev, "payments", "payment.authorized")
    refunded = _emitted(ev, "payments", "payment.refunded")
    payment = {p["order_id"]: p for p in ev.payments}
    problems = []
    for order in ev.orders:
        if order["state"] != "REJECTED":
            continue
        oid = order["id"]
        if payment.get(oid, {}).get("state") == "AUTHORIZED":
            problems.append(f"REJECTED order {oid}: payment still AUTHORIZED")
        if authorized[oid] != refunded[oid]:
            problems.append(f"REJECTED order {oid}: {authorized[oid]} authorized, {refunded[oid]} refunded")
        if "payment declined" in (order["rejection_reason"] or "") and authorized[oid]:
            problems.append(f"declined order {oid} was authorized")
    return problems


def _published(ev: Evidence) -> list[str]:
    return [
        f"{service} outbox row {row['id']} ({row['event_type']}, key {row['key']}) unpublished"
        for service, rows in ev.outbox.items()
        for row in rows
        if row["published_at"] is None
    ]


def _on_topic(ev: Evidence) -> list[str]:
    on_wire = {(topic, r.event_id) for topic, records in ev.records.items() for r in records}
    return [
        f"{service} outbox row {row['id']} ({row['event_type']}) marked published but not on topic {row['topic']}"
        for service, rows in ev.outbox.items()
        for row in rows
        if row["published_at"] is not None and (row["topic"], row["event_id"]) not in on_wire
    ]


def _inboxes(ev: Evidence) -> list[str]:
    problems = []
    for service, handlers in ev.handlers.items():
        inbox = ev.inbox.get(service, set())
        for handler, wire_names in handlers.items():
            missing = [
                f"{r.event_type} {r.event_id}"
                for name in sorted(wire_names)
                for r in ev.records.get(ev.topics_of[name], [])
                if r.event_type == name and (handler, r.event_id) not in inbox
            ]
            problems += [f"{handler} never processed {m}" for m in missing]
    return problems


def _per_key_order(ev: Evidence) -> list[str]:
    """Per key, the first occurrence of each event on the topic follows its producer's outbox id order.

    Duplicates (at-least-once) are allowed; an inversion never is. Scheduled rows (deadlines)
    are published when due, not in id order, so only rows due when written are compared.
    """
    problems = []
    by_key: dict[tuple[str, str | None], list[Record]] = defaultdict(list)
    for topic, records in ev.records.items():
        for record in records:
            by_key[(topic, record.key)].append(record)
    for service, rows in ev.outbox.items():
        expected: dict[tuple[str, str | None], list[str]] = defaultdict(list)
        for row in sorted(rows, key=lambda r: r["id"]):
            if row["available_at"] <= row["created_at"]:
                expected[(row["topic"], row["key"])].append(row["event_id"])
        for (topic, key), ids in expected.items():
            records = by_key.get((topic, key), [])
            partitions = {r.partition for r in records}
            if len(partitions) > 1:
                problems.append(f"{topic} key {key}: on partitions {sorted(partitions)}")
            rank = {event_id: i for i, event_id in enumerate(ids)}
            seen: list[str] = []
            for record in sorted(records, key=lambda r: (r.partition, r.offset)):
                if record.event_id in rank and record.event_id not in seen:
                    seen.append(record.event_id)
            firsts = [rank[e] for e in seen]
            if firsts != sorted(firsts):
                problems.append(
                    f"{topic} key {key} (from {service}): first occurrences in outbox positions {firsts}, "
                    f"expected ascending (event ids {seen})"
                )
    return problems


def _dead_letters(ev: Evidence) -> list[str]:
    problems = [
        f"{service}: {d['consumer']} parked {d['event_type']} ({d['reason']}): {d['error'][:200]}"
        for service, letters in ev.dead_letters.items()
        for d in letters
    ]
    problems += [
        f"{len(records)} records on dead-letter topic {topic}"
        for topic, records in ev.records.items()
        if topic.endswith(".dead-letters") and records
    ]
    return problems


# -- reading -----------------------------------------------------------------------------------


async def read_databases(connect: Any, urls: Mapping[str, str]) -> dict[str, Any]:
    """Rows of every table the checks need, from each service's database."""

    async def rows(service: str, query: str) -> list[dict[str, Any]]:
        conn = await connect(urls[service])
        try:
            return [dict(r) for r in await conn.fetch(query)]
        finally:
            await conn.close()

    found: dict[str, Any] = {
        "orders": await rows("orders", "SELECT id, customer_id, total::text, state, rejection_reason FROM orders"),
        "customers": await rows("customers", "SELECT id, credit_limit::text, credit_reserved::text FROM customers"),
        "reservations": await rows("customers", "SELECT order_id, customer_id, amount::text, state FROM reservations"),
        "payments": await rows("payments", "SELECT order_id, state, amount::text FROM payments"),
        "outbox": {},
        "inbox": {},
        "dead_letters": {},
    }
    for service in urls:
        found["outbox"][service] = await rows(
            service,
            "SELECT id, event_id, topic, key, event_type, payload, created_at, available_at, published_at"
            " FROM choreo_outbox",
        )
        found["inbox"][service] = {
            (r["consumer"], r["event_id"]) for r in await rows(service, "SELECT consumer, event_id FROM choreo_inbox")
        }
        found["dead_letters"][service] = await rows(
            service, "SELECT consumer, event_type, reason, error FROM choreo_dead_letter"
        )
    return found


async def read_topics(bootstrap: str, prefix: str, topics: Iterable[str]) -> dict[str, list[Record]]:
    """Every record of `topics` (named without `prefix`), from the beginning, with a plain consumer."""
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [prefix + t for t in topics if prefix + t in existing]
        described = await admin.describe_topics(wanted) if wanted else []
    finally:
        await admin.close()
    partitions = [TopicPartition(d["topic"], p["partition"]) for d in described for p in d["partitions"]]
    records: dict[str, list[Record]] = {t: [] for t in topics}
    if not partitions:
        return records
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    try:
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        remaining = {tp for tp in partitions if ends[tp] > 0}
        deadline = asyncio.get_running_loop().time() + 120
        while remaining:
            if asyncio.get_running_loop().time() > deadline:
                raise RuntimeError(f"could not read {sorted(map(str, remaining))} to their end")
            batch = await consumer.getmany(timeout_ms=1000)
            for tp, messages in batch.items():
                for m in messages:
                    headers = {k: v.decode() for k, v in m.headers}
                    records[tp.topic.removeprefix(prefix)].append(
                        Record(
                            m.partition,
                            m.offset,
                            m.key.decode() if m.key else None,
                            headers.get(EVENT_ID, ""),
                            headers.get(EVENT_TYPE, ""),
                        )
                    )
                    if m.offset + 1 >= ends[tp]:
                        remaining.discard(tp)
        return records
    finally:
        await consumer.stop()


def handler_map() -> tuple[dict[str, dict[str, set[str]]], dict[str, str]]:
    """Each demo service's handlers and the wire names they handle; each wire name's topic."""
    from demo_shop.customers import handlers as customers
    from demo_shop.orders import handlers as orders
    from demo_shop.payments import handlers as payments

    handlers: dict[str, dict[str, set[str]]] = {}
    topics: dict[str, str] = {}
    for module in (orders, customers, payments):
        service = module.service
        handlers[service.name] = {}
        for handler in service.handlers:
            handlers[service.name][handler.name] = {t.event_name for t in handler.event_types}
            topics.update({t.event_name: t.event_topic for t in handler.event_types})
    return handlers, topics


def dead_letter_topics(services: Iterable[str]) -> list[str]:
    return [topic_for(s) for s in services]
