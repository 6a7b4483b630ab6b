"""What every HTTP app of the shop shares: starting services in the lifespan, /health, and
serving one service alone (`python -m demo_shop.<service>`)."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from choreo import ChoreoError, ConfigurationError, Service, SetupError
from choreo.cli import exit_status, show_tracebacks
from choreo.health import metrics, readiness
from choreo.settings import LOG_FORMAT, log_level_from_env


class Problem(BaseModel):
    """The body of every 4xx answer but 422: what went wrong, in words."""

    detail: str


def problems(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for error answers with a `Problem` body."""
    meaning = {
        400: "The body is not JSON",
        404: "No such resource",
        409: "The resource is not in a state that allows this",
    }
    return {code: {"model": Problem, "description": meaning[code]} for code in codes}


def keep_http_promises(app: FastAPI) -> None:
    """What every app of the shop answers beyond its routes, as its OpenAPI document says.

    A 405 lists in `Allow` every method the path supports (Starlette names only the first
    route's), and a 422 for a body that is not text (FastAPI would fail to encode the raw bytes
    it quotes back, and answer 500) quotes them decoded with replacement characters.
    """

    app.add_middleware(_AllowEveryMethod, app_of_routes=app)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        errors = [
            {**e, "input": e["input"].decode(errors="replace")} if isinstance(e.get("input"), bytes) else e
            for e in error.errors()
        ]
        return await request_validation_exception_handler(request, RequestValidationError(errors, body=error.body))


class _AllowEveryMethod:
    """Rewrites `Allow` on a 405 to every documented method of the path.

    Plain ASGI rather than `@app.middleware("http")`: only the start of a 405 is touched, and
    every other response passes through without the task and memory stream per request that
    Starlette's BaseHTTPMiddleware adds.
    """

    def __init__(self, app: ASGIApp, app_of_routes: FastAPI) -> None:
        self.app = app
        self.routes = app_of_routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_allow(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 405:
                allow = ", ".join(_documented_methods(self.routes, scope["path"])).encode()
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"allow"]
                message = {**message, "headers": [*headers, (b"allow", allow)]}
            await send(message)

        await self.app(scope, receive, send_with_allow)


def _documented_methods(app: FastAPI, path: str) -> list[str]:
    for template, operations in app.openapi()["paths"].items():
        if compile_path(template)[0].match(path):
            return sorted(method.upper() for method in operations)
    return []


OnStarted = Callable[[Service, float], None]
"""Called after each service started, with the seconds it took (for progress displays)."""


def lifespan(
    services: Sequence[Service], on_started: OnStarted | None = None
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """A FastAPI lifespan that starts `services` (concurrently) and stops them on shutdown."""

    @asynccontextmanager
    async def run(_app: FastAPI) -> AsyncIterator[None]:
        async def start(service: Service) -> None:
            began = time.monotonic()
            await service.start()
            if on_started is not None:
                on_started(service, time.monotonic() - began)

        # Concurrently: each start waits for its consumer group to be joined, seconds per service.
        outcomes = await asyncio.gather(*(start(s) for s in services), return_exceptions=True)
        try:
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome
            yield
        finally:
            for service in reversed(services):
                await service.stop()

    return run


def health_router(services: Sequence[Service]) -> APIRouter:
    """`/health` (readiness), `/health/live` (liveness) and `/metrics` (Prometheus) of this process."""
    router = APIRouter(tags=["health"])

    @router.get(
        "/health",
        summary="Readiness: every service runs and reaches its database",
        responses={503: {"description": "A service is not ready; `services` says which and why"}},
    )
    async def health() -> JSONResponse:
        report = {service.name: await _readiness(service) for service in services}
        ready = all(state["ready"] for state in report.values())
        return JSONResponse(
            {"status": "ok" if ready else "unavailable", "services": report},
            status_code=200 if ready else 503,
        )

    @router.get("/health/live", summary="Liveness: the process answers")
    async def live() -> dict[str, str]:
        return {"status": "ok"}

    @router.get(
        "/metrics",
        summary="Outbox backlog, consumer lag and handler counters (Prometheus)",
        response_class=PlainTextResponse,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    async def exposition() -> PlainTextResponse:
        texts = [await metrics(service) for service in services if _started(service)]
        return PlainTextResponse("".join(texts), media_type="text/plain; version=0.0.4")

    return router


def _started(service: Service) -> bool:
    try:
        service.engine  # noqa: B018 - raises until the service has started
    except SetupError:
        return False
    return True


async def _readiness(service: Service) -> dict[str, Any]:
    if not _started(service):
        return {"ready": False, "status": "starting"}
    return await readiness(service)


def create_service_app(service: Service, routers: Sequence[APIRouter], *, title: str, description: str) -> FastAPI:
    """The HTTP app of one service running alone: its routers, /health, and its lifespan."""
    app = FastAPIOffline(title=title, description=description, lifespan=lifespan([service]))
    keep_http_promises(app)
    for router in routers:
        app.include_router(router)
    app.include_router(health_router([service]))
    return app


def serve_service(service: Service, app: FastAPI, *, default_port: int) -> None:
    """Run one service with its HTTP app, configured by the environment (see `--help`)."""
    variables = [
        (
            f"CHOREO_{service.name.upper()}_DATABASE_URL or DATABASE_URL",
            f"its own database (default sqlite+aiosqlite:///{service.name}.db)",
        ),
        ("KAFKA_BOOTSTRAP_SERVERS", "Kafka (default localhost:9092); more in CHOREO_KAFKA_*"),
        ("HOST, PORT", f"HTTP listen address (default 127.0.0.1:{default_port})"),
        ("LOG_LEVEL", "debug, info (default), warning, error"),
    ]
    width = max(len(name) for name, _ in variables) + 3
    usage = (
        f"usage: python -m demo_shop.{service.name}\n\n"
        f"Runs the {service.name} service alone, configured by environment variables:\n"
        + "".join(f"  {name.ljust(width)}{meaning}\n" for name, meaning in variables)
    )
    if any(arg in ("-h", "--help") for arg in sys.argv[1:]):
        print(usage)
        return
    if sys.argv[1:]:
        print(f"unexpected arguments {sys.argv[1:]}; configure with environment variables\n\n{usage}", file=sys.stderr)
        sys.exit(2)
    raw_port = os.environ.get("PORT", str(default_port))
    try:
        if not raw_port.isdigit() or not 0 < int(raw_port) < 65536:
            raise ConfigurationError(f"PORT={raw_port!r} is not a TCP port number")
        level = log_level_from_env()
        logging.basicConfig(level=level.upper(), format=LOG_FORMAT)
        sys.exit(asyncio.run(_serve(service, app, os.environ.get("HOST", "127.0.0.1"), int(raw_port), level)))
    except ChoreoError as error:
        # One line, the reason and what to change; the traceback only when asked for.
        if show_tracebacks():
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(exit_status(error))


async def _serve(service: Service, app: FastAPI, host: str, port: int, level: str) -> int:
    # The service starts before the HTTP server, so a dependency that stays away ends the
    # process with one line instead of a failed ASGI lifespan's traceback. The app's own
    # lifespan then finds it started, and stops it on shutdown.
    await service.start()
    import uvicorn

    await uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=level)).serve()
    return 0
