"""Real demo-shop sagas behind a running explorer, for the explorer's HTTP and browser tests.

`LiveShop.start(directory)` runs, on an event loop of its own thread:

1. an overdue saga: orders and customers only (payments is down), so `credit.reserved` waits;
2. the shop with all three services, the trace collector and the explorer (served by uvicorn on
   a free port, with `--allow-actions`): a success, a credit-limit rejection, a payment declined
   (compensated) and an order whose payment fails while the card processor is "unreachable"
   (dead-lettered at the first failure). The outage ends once the sagas have run, so a replay
   from the page completes that saga.

The collector stores the order saga with a 2-second deadline (the services keep the demo's
30 s, so the overdue saga's deadline event does not fire during the tests): the payments-down
saga is overdue 2 s after it started.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import uvicorn

from choreo.consumer import Handler
from choreo.explorer import create_app
from choreo.testing import settle
from choreo.tracing import TraceCollector, TraceStore
from demo_shop.shop import Shop
from tests.demo_support import api_client
from tests.toy3 import traced_in_memory

T = TypeVar("T")
DECLARED_DEADLINE = timedelta(seconds=2)
UNLUCKY_TOTAL = "66.60"
"""The total whose payment fails while the card processor is down."""


@dataclass
class Outage:
    """The card processor is unreachable while `on`: payments fails on the unlucky total."""

    on: bool = True

    def wrap(self, handler: Handler) -> Handler:
        original = handler.func

        async def flaky(event: Any, tx: Any) -> Any:
            if self.on and str(event.amount) == UNLUCKY_TOTAL:
                raise RuntimeError("card processor unreachable")
            return await original(event, tx)

        return dataclasses.replace(handler, func=flaky, max_attempts=1)


@dataclass
class LiveShop:
    """The running shop, collector and explorer; `ids` are saga ids by flow name."""

    directory: Path
    url: str = ""
    ids: dict[str, str] = field(default_factory=dict)
    orders: dict[str, str] = field(default_factory=dict)
    outage: Outage = field(default_factory=Outage)
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    _stop: asyncio.Event | None = None
    _thread: threading.Thread | None = None
    _ready: Future[None] = field(default_factory=Future)

    @property
    def trace_url(self) -> str:
        return f"sqlite+aiosqlite:///{self.directory}/trace.db"

    def store(self) -> TraceStore:
        return TraceStore(self.trace_url)

    def run(self, coro: Awaitable[T], timeout: float = 30) -> T:
        """Run a coroutine on the shop's loop and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    @classmethod
    def start(cls, directory: Path) -> LiveShop:
        live = cls(directory)
        live._thread = threading.Thread(target=live.loop.run_until_complete, args=(live._main(),), daemon=True)
        live._thread.start()
        live._ready.result(120)
        return live

    def stop(self) -> None:
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(30)

    def collector(self) -> TraceCollector:
        declared = Shop.in_directory(self.directory, order_deadline=DECLARED_DEADLINE)
        return TraceCollector(list(declared), self.trace_url)

    async def _main(self) -> None:
        try:
            await self._overdue_saga()
            await self._serve()
        except BaseException as error:
            if not self._ready.done():
                self._ready.set_exception(error)
            raise

    async def _overdue_saga(self) -> None:
        shop = Shop.in_directory(self.directory)
        async with traced_in_memory(self.collector(), shop.orders, shop.customers), api_client(shop) as client:
            ada = (await client.post("/customers", json={"name": "Ada", "credit_limit": "500.00"})).json()["id"]
            order = await client.post("/orders", json={"customer_id": ada, "total": "30.00"})
            self._remember("overdue", order.json())
            await settle(shop.orders, shop.customers)
        self.customers = {"ada": ada}

    async def _serve(self) -> None:
        shop = Shop.in_directory(self.directory)
        shop.payments.handlers = [
            self.outage.wrap(h) if h.name == "payments.authorize_payment" else h for h in shop.payments.handlers
        ]
        self._stop = asyncio.Event()
        async with traced_in_memory(self.collector(), *shop), api_client(shop) as client:
            ada = self.customers["ada"]
            bob = (await client.post("/customers", json={"name": "Bob", "credit_limit": "50.00"})).json()["id"]
            for name, customer, total in [
                ("success", ada, "120.00"),
                ("credit-limit", bob, "75.00"),
                ("compensated", ada, "113.13"),
                ("dead-letter", ada, UNLUCKY_TOTAL),
            ]:
                order = await client.post("/orders", json={"customer_id": customer, "total": total})
                self._remember(name, order.json())
                await settle(*shop)
            self.outage.on = False  # the processor is back: a replay now goes through
            app = create_app(self.trace_url, list(shop), allow_actions=True, start_services=False)
            port = _free_port()
            server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
            serving = asyncio.create_task(server.serve())
            while not server.started:
                await asyncio.sleep(0.02)
            self.url = f"http://127.0.0.1:{port}"
            self.shop = shop
            self._ready.set_result(None)
            await self._stop.wait()
            server.should_exit = True
            await serving

    def _remember(self, name: str, order: dict[str, Any]) -> None:
        self.ids[name] = order["saga_id"]
        self.orders[name] = order["id"]

    def wait_overdue(self) -> None:
        """Sleep until the overdue saga is past its declared deadline."""
        time.sleep(max(0.0, DECLARED_DEADLINE.total_seconds() + 0.2 - (time.monotonic() - self._started)))

    _started: float = field(default_factory=time.monotonic)
    customers: dict[str, str] = field(default_factory=dict)
    shop: Shop | None = None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def eventually(check: Callable[[], bool], timeout: float = 10) -> bool:
    """Poll `check` until true or `timeout`; returns its last answer."""
    deadline = time.monotonic() + timeout
    while not check() and time.monotonic() < deadline:
        time.sleep(0.05)
    return check()
