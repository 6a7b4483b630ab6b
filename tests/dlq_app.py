"""A one-service app for the `choreo dlq` commands: its handler fails until `BROKEN` is cleared."""

from __future__ import annotations

from choreo import Event, RetryPolicy, Service, Tx


class Entry(Event, name="ledger.entry", topic="ledger"):
    amount: int


class Booked(Event, name="ledger.booked", topic="ledger-out"):
    amount: int


BROKEN = {"yes": True}

ledger = Service("ledger", retry=RetryPolicy(max_attempts=2, initial_backoff=0.001, max_backoff=0.002))


@ledger.on(Entry)
async def book(event: Entry, tx: Tx) -> Booked:
    if BROKEN["yes"]:
        raise RuntimeError("the ledger is closed")
    return Booked(amount=event.amount)
