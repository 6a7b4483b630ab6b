"""Two toy services playing a small saga: a shop places orders, a stock service reserves items."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import MetaData
from sqlalchemy.orm import registry
from sqlmodel import Field, SQLModel, select

from choreo import Event, KafkaSettings, Service, Tx


class OrderPlaced(Event, name="toy.order_placed", topic="toy-orders"):
    order_id: str
    sku: str
    quantity: int


class OrderConfirmed(Event, name="toy.order_confirmed", topic="toy-orders"):
    order_id: str


class StockReserved(Event, name="toy.stock_reserved", topic="toy-stock"):
    order_id: str


class OutOfStock(Event, name="toy.out_of_stock", topic="toy-stock"):
    order_id: str


class Numbered(Event, name="toy.numbered", topic="toy-numbers"):
    """For ordering tests: `seq` counts up per `lane`."""

    lane: str
    seq: int


shop_metadata = MetaData()
stock_metadata = MetaData()


class ShopTable(SQLModel, registry=registry(metadata=shop_metadata)):
    pass


class StockTable(SQLModel, registry=registry(metadata=stock_metadata)):
    pass


class ToyOrder(ShopTable, table=True):
    id: str = Field(primary_key=True)
    status: str = "PENDING"


class StockItem(StockTable, table=True):
    sku: str = Field(primary_key=True)
    available: int


class Reservation(StockTable, table=True):
    """One row per reservation made: a second effect of one event would show up here."""

    id: int | None = Field(default=None, primary_key=True)
    order_id: str
    quantity: int


class Arrival(StockTable, table=True):
    """Numbered events in the order the handler saw them."""

    id: int | None = Field(default=None, primary_key=True)
    lane: str
    seq: int


@dataclass
class Toy:
    shop: Service
    stock: Service


def make_toy(shop_db: str, stock_db: str, kafka: KafkaSettings | None = None) -> Toy:
    """Fresh services (handlers registered on new objects) for one test."""
    shop = Service("shop", database_url=shop_db, kafka=kafka, metadata=shop_metadata)
    stock = Service("stock", database_url=stock_db, kafka=kafka, metadata=stock_metadata)
    shop.declare(OrderPlaced, Numbered)

    @shop.on(StockReserved)
    async def confirm(event: StockReserved, tx: Tx) -> OrderConfirmed:
        order = await tx.session.get(ToyOrder, event.order_id)
        assert order is not None
        order.status = "CONFIRMED"
        return OrderConfirmed(order_id=event.order_id)

    @shop.on(OutOfStock)
    async def reject(event: OutOfStock, tx: Tx) -> None:
        order = await tx.session.get(ToyOrder, event.order_id)
        assert order is not None
        order.status = "REJECTED"

    @stock.on(OrderPlaced)
    async def reserve(event: OrderPlaced, tx: Tx) -> StockReserved | OutOfStock:
        item = await tx.session.get(StockItem, event.sku, with_for_update=True)
        if item is None or item.available < event.quantity:
            return OutOfStock(order_id=event.order_id)
        item.available -= event.quantity
        tx.session.add(Reservation(order_id=event.order_id, quantity=event.quantity))
        return StockReserved(order_id=event.order_id)

    @stock.on(Numbered)
    async def record_arrival(event: Numbered, tx: Tx) -> None:
        tx.session.add(Arrival(lane=event.lane, seq=event.seq))

    return Toy(shop, stock)


async def place_order(shop: Service, order_id: str, sku: str, quantity: int) -> str:
    """Start a saga the way an HTTP endpoint would; returns the saga id."""
    async with shop.transaction() as tx:
        tx.session.add(ToyOrder(id=order_id))
        tx.emit(OrderPlaced(order_id=order_id, sku=sku, quantity=quantity))
        return tx.saga_id


async def add_stock(stock: Service, sku: str, available: int) -> None:
    async with stock.transaction() as tx:
        tx.session.add(StockItem(sku=sku, available=available))


async def order_status(shop: Service, order_id: str) -> str | None:
    async with shop.transaction() as tx:
        order = await tx.session.get(ToyOrder, order_id)
        return order.status if order else None


async def reservations(stock: Service) -> list[Reservation]:
    async with stock.transaction() as tx:
        return list((await tx.session.execute(select(Reservation))).scalars())
