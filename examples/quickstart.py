"""Two services, one saga: orders asks customers for credit, by events alone."""

import uuid

from sqlalchemy.orm import registry
from sqlmodel import Field, SQLModel

from choreo import Event, Service, Tx

# -- the events: the published language between the services ----------------------------------


class OrderCreated(Event, name="order.created", topic="orders"):
    order_id: str
    customer_id: str
    total_cents: int


class CreditReserved(Event, name="credit.reserved", topic="customers"):
    order_id: str


class CreditLimitExceeded(Event, name="credit.limit_exceeded", topic="customers"):
    order_id: str


# -- each service's own tables -----------------------------------------------------------------
# A service creates the tables of the metadata it is given in its own database. SQLModel.metadata
# would hold both services' tables, so each gets its own registry; a process running a single
# service may pass metadata=SQLModel.metadata.


class CustomersTable(SQLModel, registry=registry()):
    pass


class Customer(CustomersTable, table=True):
    id: str = Field(primary_key=True)
    available_cents: int


class OrdersTable(SQLModel, registry=registry()):
    pass


class Order(OrdersTable, table=True):
    id: str = Field(primary_key=True)
    state: str = "PENDING"


# -- the services: database and Kafka come from the environment (see Configuration) ------------

customers = Service("customers", metadata=CustomersTable.metadata)
orders = Service("orders", metadata=OrdersTable.metadata)
orders.saga("order", starts=OrderCreated, ends={CreditReserved, CreditLimitExceeded})


@customers.on(OrderCreated)
async def reserve_credit(event: OrderCreated, tx: Tx) -> CreditReserved | CreditLimitExceeded:
    customer = await tx.session.get(Customer, event.customer_id, with_for_update=True)
    if customer is None or customer.available_cents < event.total_cents:
        return CreditLimitExceeded(order_id=event.order_id)
    customer.available_cents -= event.total_cents
    return CreditReserved(order_id=event.order_id)


@orders.on(CreditReserved, CreditLimitExceeded)
async def decide(event: CreditReserved | CreditLimitExceeded, tx: Tx) -> None:
    order = await tx.session.get(Order, event.order_id, with_for_update=True)
    assert order is not None
    order.state = "APPROVED" if isinstance(event, CreditReserved) else "REJECTED"


async def place_order(customer_id: str, total_cents: int) -> str:
    """The order row and order.created commit together: the saga starts (e.g. from POST /orders)."""
    async with orders.transaction() as tx:
        order = Order(id=str(uuid.uuid4()))
        tx.session.add(order)
        tx.emit(OrderCreated(order_id=order.id, customer_id=customer_id, total_cents=total_cents))
    return order.id


async def order_state(order_id: str) -> str | None:
    """A read of the service's own table (e.g. from GET /orders/{id})."""
    async with orders.session() as session:
        order = await session.get(Order, order_id)
    return order.state if order else None
