"""The three services together: configured copies for one process, and the combined HTTP app."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from choreo import KafkaSettings, Service
from demo_shop.customers import api as customers_api
from demo_shop.customers import handlers as customers_handlers
from demo_shop.orders import api as orders_api
from demo_shop.orders import handlers as orders_handlers
from demo_shop.payments import handlers as payments_handlers
from demo_shop.web import OnStarted, health_router, keep_http_promises, lifespan

SERVICES: dict[str, Service] = {
    s.name: s for s in (orders_handlers.service, customers_handlers.service, payments_handlers.service)
}
"""The services as declared, configured from the environment when they start."""


@dataclass(frozen=True)
class Shop:
    """The orders, customers and payments services of one shop."""

    orders: Service
    customers: Service
    payments: Service

    def __iter__(self) -> Iterator[Service]:
        return iter((self.orders, self.customers, self.payments))

    @classmethod
    def build(
        cls,
        database_urls: Mapping[str, str],
        kafka: KafkaSettings | None = None,
        *,
        order_deadline: timedelta | None = None,
    ) -> Shop:
        """Fresh services on the given databases (by service name) and Kafka settings."""
        deadlines = {"order": order_deadline} if order_deadline else None
        return cls(
            **{
                name: service.clone(database_url=database_urls[name], kafka=kafka, deadlines=deadlines)
                for name, service in SERVICES.items()
            }
        )

    @classmethod
    def in_directory(
        cls, data_dir: Path, kafka: KafkaSettings | None = None, *, order_deadline: timedelta | None = None
    ) -> Shop:
        """Fresh services with SQLite files `<data_dir>/<service>.db`."""
        urls = {name: f"sqlite+aiosqlite:///{data_dir / name}.db" for name in SERVICES}
        return cls.build(urls, kafka, order_deadline=order_deadline)

    def create_app(self, *, on_started: OnStarted | None = None) -> FastAPI:
        """One HTTP app for the whole shop: orders and customers APIs, /health, all three services."""
        # The API docs' scripts and styles come from the fastapi-offline wheel, not a CDN.
        app = FastAPIOffline(
            title="choreo demo shop",
            description=(
                "Orders, customers and payments playing the order saga by events alone. "
                "Place an order with POST /orders; follow it with GET /orders/{id}."
            ),
            lifespan=lifespan(list(self), on_started),
        )
        keep_http_promises(app)
        app.include_router(orders_api.create_router(self.orders))
        app.include_router(customers_api.create_router(self.customers))
        app.include_router(health_router(list(self)))
        return app
