"""HTTP of the payments service: no public API, only `/health` for orchestrators."""

from __future__ import annotations

from fastapi import FastAPI

from choreo import Service
from demo_shop.payments import handlers
from demo_shop.web import create_service_app


def create_app(payments: Service = handlers.service) -> FastAPI:
    """The payments service alone: /health, and the service itself in the lifespan."""
    return create_service_app(
        payments,
        [],
        title="demo shop: payments",
        description="Authorizes and refunds payments; reacts to events only.",
    )
