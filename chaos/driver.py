"""The load: sagas of every flow placed through the shop's HTTP API, retried only where safe.

`POST /orders` takes no client-chosen id or idempotency key, so a retry of a request whose
response was lost could place a second order. Only a request that never left (connection
refused) is retried; a lost response is an unknown outcome, settled at the end by finding the
order in the orders database (every saga's total is unique: its integer part is the saga's
sequence number). `POST /orders/{id}/cancel` is safe to retry: a second cancel answers 409.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import httpx

from chaos.shop import Shop

FLOWS = {
    "success": 0.35,
    "credit-limit-exceeded": 0.15,
    "unknown-customer": 0.10,
    "payment-declined": 0.15,
    "cancel-after-approval": 0.25,
}
"""The walkthrough's flows (demo_shop.walkthrough.FLOWS) and their share of the load. The deadline
flow needs payments to stay silent for 30 s (a fixed ORDER_DEADLINE, no hook to shorten it or to
hold one payment): it is not driven, but any saga a fault keeps past its deadline ends that way."""
EXPECTED = {
    "success": "APPROVED",
    "credit-limit-exceeded": "REJECTED",
    "unknown-customer": "REJECTED",
    "payment-declined": "REJECTED",
    "cancel-after-approval": "CANCELLED",
}
REASON = {
    "credit-limit-exceeded": "credit limit exceeded",
    "unknown-customer": "not found",
    "payment-declined": "payment declined",
}
RICH, POOR = 8, 3
"""Customers with a limit no order reaches, and customers whose 50.00 every order exceeds."""
BASE = 1000
"""Totals are BASE + sequence number (unique per saga), plus cents: .13 is always declined."""


class Unsent(Exception):
    """The request never reached a server (every attempt was refused)."""


class Unknown(Exception):
    """The request was sent but its response was lost: it may or may not have happened."""


@dataclass
class Saga:
    seq: int
    flow: str
    customer_id: str
    total: Decimal
    order_id: str | None = None
    placed: str = "not yet"
    """"201", "unknown" (response lost, or a 5xx), "unsent", or another status."""
    cancel: str | None = None
    cancel_sent: bool = False
    """A cancel went out: without its answer, the order may be APPROVED or CANCELLED."""


@dataclass
class Driver:
    shop: Shop
    sagas_wanted: int
    rate: float
    seed: int = 7
    sagas: list[Saga] = field(default_factory=list)
    http_5xx: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    """The driver's own failures (not the shop's), reported with the result."""
    requests: int = 0
    refused: int = 0
    lost: int = 0
    customers: dict[str, list[str]] = field(default_factory=dict)
    started: float = 0.0
    _rr: int = 0
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        # A fresh connection per request: a refused connect is then a request that surely never left.
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(45, connect=3, pool=None),
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=0),
        )

    async def close(self) -> None:
        await self.client.aclose()

    async def call(
        self, method: str, service: str, path: str, body: Any = None, *, give_up: float = 120
    ) -> httpx.Response:
        """Send to a replica of `service`, round robin; retry only what surely was not sent."""
        deadline = time.monotonic() + give_up
        pause = 0.2
        while True:
            replicas = self.shop.of(service)
            self._rr += 1
            replica = replicas[self._rr % len(replicas)]
            self.requests += 1
            try:
                response = await self.client.request(method, replica.url + path, json=body)
            except (httpx.ConnectError, httpx.ConnectTimeout):
                self.refused += 1
                if time.monotonic() > deadline:
                    raise Unsent(f"{method} {path}: refused for {give_up}s") from None
                # Backing off: hundreds of waiting sagas retrying fast would starve the harness itself.
                await asyncio.sleep(pause * self.rng.uniform(0.5, 1.5))
                pause = min(2.0, pause * 2)
                continue
            except httpx.TransportError as error:
                self.lost += 1
                raise Unknown(f"{method} {path} on {replica.name}: {type(error).__name__}: {error}") from None
            if response.status_code >= 500:
                self.http_5xx.append(
                    {
                        "at": round(time.monotonic() - self.started, 1),
                        "request": f"{method} {path}",
                        "replica": replica.name,
                        "status": response.status_code,
                        "body": response.text[:300],
                    }
                )
            return response

    async def setup_customers(self) -> None:
        for kind, count, limit in (("rich", RICH, "100000000.00"), ("poor", POOR, "50.00")):
            self.customers[kind] = []
            for i in range(count):
                response = await self.call(
                    "POST", "customers", "/customers", {"name": f"{kind} {i}", "credit_limit": limit}
                )
                assert response.status_code == 201, response.text
                self.customers[kind].append(response.json()["id"])

    def new_saga(self) -> Saga:
        seq = len(self.sagas)
        flow = self.rng.choices(list(FLOWS), weights=list(FLOWS.values()))[0]
        cents = "13" if flow == "payment-declined" else self.rng.choice(["00", "25", "50", "99"])
        if flow == "unknown-customer":
            customer = f"ghost-{seq}"
        else:
            customer = self.rng.choice(self.customers["poor" if flow == "credit-limit-exceeded" else "rich"])
        saga = Saga(seq, flow, customer, Decimal(f"{BASE + seq}.{cents}"))
        self.sagas.append(saga)
        return saga

    def burst(self, count: int) -> None:
        """Place `count` sagas at once (heavy traffic for the relay)."""
        for _ in range(count):
            self._tasks.append(asyncio.create_task(self.run_saga(self.new_saga())))

    def placed_or_pending(self) -> int:
        """Sagas whose order was placed (201) or whose POST has not been answered yet.

        Those whose response was lost count only once found placed: the total is met in sagas
        that surely ran, not in attempts.
        """
        return sum(1 for s in self.sagas if s.placed in ("201", "not yet"))

    async def run(self, faults_done: asyncio.Event) -> None:
        """Place sagas at the offered rate until `sagas_wanted` are placed and the last fault is over."""
        interval = 1.0 / self.rate
        next_at = time.monotonic()
        while self.placed_or_pending() < self.sagas_wanted or not faults_done.is_set():
            self._tasks.append(asyncio.create_task(self.run_saga(self.new_saga())))
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        for outcome in await asyncio.gather(*self._tasks, return_exceptions=True):
            if isinstance(outcome, Exception):
                self.errors.append(f"{type(outcome).__name__}: {outcome}")

    async def run_saga(self, saga: Saga) -> None:
        body = {"customer_id": saga.customer_id, "total": str(saga.total)}
        try:
            response = await self.call("POST", "orders", "/orders", body)
        except Unknown:
            saga.placed = "unknown"
            return
        except Unsent:
            saga.placed = "unsent"
            return
        # A 5xx leaves the outcome unknown too (the transaction may have committed): not retried.
        saga.placed = "unknown" if response.status_code >= 500 else str(response.status_code)
        if response.status_code != 201:
            return
        saga.order_id = response.json()["id"]
        if saga.flow == "cancel-after-approval":
            await self.cancel_when_approved(saga)

    async def cancel_when_approved(self, saga: Saga, timeout: float = 150) -> None:
        deadline = time.monotonic() + timeout
        state, pause = "PENDING", 0.5
        while state == "PENDING" and time.monotonic() < deadline:
            await asyncio.sleep(pause)
            pause = min(3.0, pause * 1.5)  # a saga held up by a fault is not polled into the ground
            try:
                response = await self.call("GET", "orders", f"/orders/{saga.order_id}")
            except (Unknown, Unsent):
                continue
            if response.status_code == 200:
                state = response.json()["state"]
        if state != "APPROVED":
            saga.cancel = f"not cancelled: order {state}"
            return
        while time.monotonic() < deadline:
            saga.cancel_sent = True
            try:
                response = await self.call("POST", "orders", f"/orders/{saga.order_id}/cancel")
            except (Unknown, Unsent):
                await asyncio.sleep(0.5)
                continue  # a second cancel cannot cancel twice: it answers 409
            if response.status_code >= 500:
                await asyncio.sleep(0.5)
                continue  # recorded as a violation; retried, as a cancel may be
            if response.status_code == 200:
                saga.cancel = "cancelled"
            elif response.status_code == 409 and "CANCELLED" in response.text:
                saga.cancel = "cancelled"  # an earlier attempt went through
            else:
                saga.cancel = f"cancel answered {response.status_code}: {response.text[:120]}"
            return
        saga.cancel = "cancel timed out"
