"""HTTP API of the customers service: create customers and show their credit."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated

from fastapi import APIRouter, FastAPI, HTTPException, Path, Response
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from sqlmodel import col, select

from choreo import Service, Tx
from demo_shop.customers import handlers
from demo_shop.customers.handlers import add_customer
from demo_shop.customers.models import Customer, Reservation, ReservationState
from demo_shop.money import PositiveAmount
from demo_shop.web import create_service_app, problems

PathId = Annotated[str, Path(min_length=1, max_length=64, description="The customer id")]


class NewCustomer(BaseModel):
    """`POST /customers` body."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
    credit_limit: PositiveAmount = Field(description='How much open orders may hold, a string like "500.00"')


class ReservationOut(BaseModel):
    """Credit held (or once held) by one order."""

    order_id: str
    amount: Decimal
    state: ReservationState
    created_at: datetime
    released_at: datetime | None
    release_reason: str | None


class CustomerOut(BaseModel):
    """A customer with their credit and reservations."""

    id: str
    name: str
    credit_limit: Decimal
    credit_reserved: Decimal
    available_credit: Decimal
    reservations: list[ReservationOut]


def _out(customer: Customer, reservations: list[Reservation]) -> CustomerOut:
    return CustomerOut(
        id=customer.id,
        name=customer.name,
        credit_limit=customer.credit_limit,
        credit_reserved=customer.credit_reserved,
        available_credit=customer.available_credit,
        reservations=[ReservationOut.model_validate(r, from_attributes=True) for r in reservations],
    )


def create_router(customers: Service) -> APIRouter:
    """The `/customers` endpoints, working on `customers`' database."""
    router = APIRouter(prefix="/customers", tags=["customers"])

    @router.post("", status_code=201, summary="Create a customer with a credit limit", responses=problems(400))
    async def post_customer(body: NewCustomer, response: Response) -> CustomerOut:
        customer = await add_customer(customers, body.name, body.credit_limit)
        response.headers["Location"] = f"/customers/{customer.id}"
        return _out(customer, [])

    @router.get(
        "/{customer_id}", summary="A customer: credit limit, available credit, reservations", responses=problems(404)
    )
    async def get_customer(customer_id: PathId) -> CustomerOut:

        async def read(tx: Tx) -> CustomerOut | None:
            customer = await tx.session.get(Customer, customer_id)
            if customer is None:
                return None
            reservations = await tx.session.execute(
                select(Reservation)
                .where(col(Reservation.customer_id) == customer_id)
                .order_by(col(Reservation.created_at))
            )
            return _out(customer, list(reservations.scalars()))

        # Reads go through run_transaction too: one whose connection the database drops is retried.
        found = await customers.run_transaction(read)
        if found is None:
            raise HTTPException(404, f"customer {customer_id!r} not found")
        return found

    return router


def create_app(customers: Service = handlers.service) -> FastAPI:
    """The customers service alone: its API, /health, and the service itself in the lifespan."""
    return create_service_app(
        customers,
        [create_router(customers)],
        title="demo shop: customers",
        description="Customers, their credit limits, and the credit each order reserves.",
    )
