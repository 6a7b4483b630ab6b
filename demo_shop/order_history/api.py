"""HTTP API of the order history: `GET /customers/{id}/orders`, answered from the read model alone."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated

from fastapi import APIRouter, FastAPI, Path
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select

from choreo import Service
from demo_shop.order_history import handlers
from demo_shop.order_history.models import OrderHistory
from demo_shop.web import create_service_app

PathId = Annotated[str, Path(min_length=1, max_length=64, description="The customer id")]


class OrderSummary(BaseModel):
    """One order as the events told it: its state, amounts, payment and the saga's times."""

    order_id: str
    saga_id: str
    state: str
    total: Decimal | None
    currency: str | None
    credit_refused: str | None
    payment: str | None
    payment_id: str | None
    paid: Decimal | None
    payment_declined: str | None
    rejection_reason: str | None
    placed_at: datetime | None
    credit_reserved_at: datetime | None
    credit_released_at: datetime | None
    paid_at: datetime | None
    refunded_at: datetime | None
    approved_at: datetime | None
    rejected_at: datetime | None
    cancelled_at: datetime | None

    @classmethod
    def of(cls, row: OrderHistory) -> OrderSummary:
        """The summary of one row."""
        return cls.model_validate({**row.model_dump(), "state": row.state, "payment": row.payment})


def router(service: Service) -> APIRouter:
    """The order history's routes, reading `service`'s database."""
    routes = APIRouter(tags=["order history"])

    @routes.get("/customers/{customer_id}/orders")
    async def customer_orders(customer_id: PathId) -> list[OrderSummary]:
        """A customer's orders, oldest first; unknown customers have none."""
        async with AsyncSession(service.engine) as session:
            rows = await session.execute(
                select(OrderHistory)
                .where(col(OrderHistory.customer_id) == customer_id)
                .order_by(col(OrderHistory.placed_at), col(OrderHistory.order_id))
            )
            return [OrderSummary.of(row) for row in rows.scalars()]

    return routes


def create_app(service: Service = handlers.service) -> FastAPI:
    """The order history service's HTTP app, with its consumer started by the lifespan."""
    return create_service_app(
        service,
        [router(service)],
        title="Order history",
        description="A read model of the shop's orders, built only from their events.",
    )
