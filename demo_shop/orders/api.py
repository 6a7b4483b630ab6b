"""HTTP API of the orders service: place, read, list and cancel orders."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated

from fastapi import APIRouter, FastAPI, HTTPException, Path, Query, Response
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from sqlmodel import col, select

from choreo import Service, Tx
from demo_shop.money import PositiveAmount
from demo_shop.orders import handlers
from demo_shop.orders.handlers import OrderConflict, OrderNotFound, cancel_order, place_order
from demo_shop.orders.models import Order, OrderState
from demo_shop.web import create_service_app, problems

Id = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64)]
PathId = Annotated[str, Path(min_length=1, max_length=64, description="The order id")]


class PlaceOrder(BaseModel):
    """`POST /orders` body."""

    model_config = ConfigDict(extra="forbid")

    customer_id: Id = Field(description="Id of the customer placing the order")
    total: PositiveAmount = Field(description='Order total, a string like "120.00" (totals ending in .13 are declined)')


class OrderOut(BaseModel):
    """An order as the API shows it."""

    id: str
    customer_id: str
    total: Decimal
    state: OrderState
    rejection_reason: str | None
    saga_id: str
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, order: Order) -> OrderOut:
        return cls.model_validate(order, from_attributes=True)


def create_router(orders: Service) -> APIRouter:
    """The `/orders` endpoints, working on `orders`' database."""
    router = APIRouter(prefix="/orders", tags=["orders"])

    @router.post("", status_code=201, summary="Place an order: starts the order saga", responses=problems(400))
    async def post_order(body: PlaceOrder, response: Response) -> OrderOut:
        order = await place_order(orders, body.customer_id, body.total)
        response.headers["Location"] = f"/orders/{order.id}"
        return OrderOut.of(order)

    @router.get("", summary="List orders, newest first")
    async def list_orders(
        state: Annotated[OrderState | None, Query(description="Only orders in this state")] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> list[OrderOut]:
        query = select(Order).order_by(col(Order.created_at).desc()).limit(limit)
        if state is not None:
            query = query.where(col(Order.state) == state.value)

        async def read(tx: Tx) -> list[OrderOut]:
            return [OrderOut.of(order) for order in (await tx.session.execute(query)).scalars()]

        return await orders.run_transaction(read)

    @router.get("/{order_id}", summary="One order, with its state and rejection reason", responses=problems(404))
    async def get_order(order_id: PathId) -> OrderOut:
        order = await orders.run_transaction(lambda tx: tx.session.get(Order, order_id))
        if order is None:
            raise HTTPException(404, f"order {order_id!r} not found")
        return OrderOut.of(order)

    @router.post(
        "/{order_id}/cancel",
        summary="Cancel an approved order: refunds its payment and releases its credit",
        responses=problems(404, 409),
    )
    async def post_cancel(order_id: PathId) -> OrderOut:
        try:
            return OrderOut.of(await cancel_order(orders, order_id))
        except OrderNotFound as missing:
            raise HTTPException(404, str(missing)) from None
        except OrderConflict as conflict:
            raise HTTPException(409, str(conflict)) from None

    return router


def create_app(orders: Service = handlers.service) -> FastAPI:
    """The orders service alone: its API, /health, and the service itself in the lifespan."""
    return create_service_app(
        orders,
        [create_router(orders)],
        title="demo shop: orders",
        description="Places orders and follows each order saga to APPROVED, REJECTED or CANCELLED.",
    )
