"""The explorer's web app: thin pages over `TraceStore`, the services' tables and `Choreography`.

    app = create_app("sqlite+aiosqlite:///choreo-trace.db", discover("demo_shop"))
    uvicorn.run(app, host="127.0.0.1", port=8700)

Every page is HTML rendered on the server; the only script polls the list and asks before an
action. Bad input is a 4xx with a one-line reason, never a 5xx.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup
from sqlalchemy import Text, cast, func, select
from starlette.exceptions import HTTPException

from choreo import dlq, outbox
from choreo.envelope import utcnow
from choreo.exceptions import ChoreoError, ConfigurationError
from choreo.explorer import svg
from choreo.graph import Choreography
from choreo.service import Service
from choreo.tables import dead_letter_table, outbox_table
from choreo.tracing import MIN_PREFIX, Hop, SagaState, SagaTrace, TraceStore

log = logging.getLogger("choreo.explorer")

HERE = Path(__file__).parent
TOKEN_ENV = "CHOREO_UI_TOKEN"
COOKIE = "choreo_ui_token"
WINDOWS = {"15m": "last 15 minutes", "1h": "last hour", "24h": "last 24 hours", "7d": "last 7 days", "all": "all time"}
SPANS = {"15m": timedelta(minutes=15), "1h": timedelta(hours=1), "24h": timedelta(days=1), "7d": timedelta(days=7)}
PAGE = 50
LAG_RETRY = 60.0
"""Seconds before asking an unreachable Kafka for consumer lag again."""
_SAGA_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
# scheme://user:password@ -> scheme://user:***@, wherever a URL shows up in a payload or header.
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s\"']*):(?P<password>[^@/\s\"']+)@")


def mask_urls(text: str) -> str:
    """Replace the password of every URL in `text` by `***`."""
    return _URL_PASSWORD.sub(r"\g<head>:***@", text)


def _pretty(raw: bytes | str | None) -> str:
    if raw is None:
        return ""
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
    with suppress(ValueError):
        text = json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    return mask_urls(text)


def _since(window: str, now: datetime) -> datetime | None:
    span = SPANS.get(window)
    return None if span is None else now - span


class Explorer:
    """What the pages read: the trace store, the services (for dead letters and health), the graph."""

    def __init__(self, store: TraceStore, services: list[Service], *, allow_actions: bool = False) -> None:
        self.store = store
        self.services = {service.name: service for service in services}
        self.choreography = Choreography(services) if services else None
        # The choreography is static: check it once, not per page.
        self.report = self.choreography.check() if self.choreography else None
        self.allow_actions = allow_actions
        self.saga_types: list[str] = []
        self.lag_failures: dict[str, tuple[float, str]] = {}
        self.env = Environment(
            loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(), auto_reload=False
        )
        self.env.filters["ms"] = svg.ms
        self.env.filters["when"] = lambda at: at.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] if at else ""

    def render(self, request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
        """A page, with what every page needs."""
        page = self.env.get_template(template).render(
            request=request, services=list(self.services), allow_actions=self.allow_actions, **context
        )
        return HTMLResponse(page, status_code=status)

    # -- the saga list ---------------------------------------------------------------------------

    def filters(self, request: Request) -> dict[str, Any]:
        """The list's filters from the query string; 400 on a value that cannot be."""
        params = request.query_params
        state_name = params.get("state") or None
        try:
            state = SagaState(state_name) if state_name else None
        except ValueError:
            raise HTTPException(400, f"unknown state {state_name!r}; use one of {', '.join(SagaState)}") from None
        window = params.get("window") or "24h"
        if window not in WINDOWS:
            raise HTTPException(400, f"unknown window {window!r}; use one of {', '.join(WINDOWS)}")
        saga = params.get("saga") or None
        if saga is not None and self.saga_types and saga not in self.saga_types:
            raise HTTPException(400, f"unknown saga type {saga!r}; known: {', '.join(self.saga_types)}")
        service = params.get("service") or None
        if service is not None and self.services and service not in self.services:
            raise HTTPException(400, f"unknown service {service!r}; known: {', '.join(self.services)}")
        return {"state": state, "window": window, "saga": saga, "service": service}

    async def listing(self, request: Request) -> dict[str, Any]:
        """Counts and the first page of sagas for the filters in `request`."""
        chosen = self.filters(request)
        now = utcnow()
        since = _since(chosen["window"], now)
        where = {"saga": chosen["saga"], "service": chosen["service"], "since": since, "now": now}
        counts = await self.store.state_counts(**where)
        rows = await self.store.summaries(state=chosen["state"], limit=PAGE, **where)
        return {"chosen": chosen, "counts": counts, "rows": rows, "now": now, "query": request.url.query}

    async def find(self, text: str) -> list[str]:
        """Saga ids for a lookup: an id or unique prefix, else a business key in the services' outboxes."""
        if not text or len(text) > 200:
            raise HTTPException(400, "look up a saga id (4+ characters) or a business key (at most 200 characters)")
        if _SAGA_ID.match(text):
            try:
                found = await self.store.resolve(text)
            except ConfigurationError as error:
                raise HTTPException(400, str(error)) from None
            if found is not None:
                return [found]
        pattern = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        ids: dict[str, None] = {}
        for service in self.services.values():
            c = outbox_table.c
            async with service.engine.connect() as conn:
                # bytea has no LIKE on PostgreSQL; SQLite compares a BLOB as text.
                postgres = conn.dialect.name == "postgresql"
                payload = func.convert_from(c.payload, "UTF8") if postgres else cast(c.payload, Text)
                query = select(c.saga_id).where(payload.like(pattern, escape="\\"))
                for saga_id in (await conn.execute(query.distinct().limit(20))).scalars():
                    ids.setdefault(saga_id, None)
        return list(ids)

    # -- one saga ------------------------------------------------------------------------------

    async def payloads(self, trace: SagaTrace) -> dict[str, str]:
        """Event id -> payload as stored in its producer's outbox (kept for the outbox retention)."""
        by_service: dict[str, list[str]] = {}
        for hop in trace.hops():
            by_service.setdefault(hop.event.producer, []).append(hop.event.event_id)
        found: dict[str, str] = {}
        for name, event_ids in by_service.items():
            service = self.services.get(name)
            if service is None:
                continue
            c = outbox_table.c
            async with service.engine.connect() as conn:
                rows = await conn.execute(select(c.event_id, c.payload).where(c.event_id.in_(event_ids)))
                found.update({event_id: _pretty(payload) for event_id, payload in rows})
        return found

    async def lag(self, service: Service) -> tuple[int | None, str]:
        """The service's consumer lag in total, and per partition (or why it is unknown)."""
        if not service.subscribed_topics:
            return 0, "consumes nothing"
        failed_at, reason = self.lag_failures.get(service.name, (0.0, ""))
        if time.monotonic() - failed_at < LAG_RETRY:
            return None, reason  # Kafka was unreachable a moment ago: don't wait on it at every refresh
        try:
            lags = await service.transport.group_lag(service.group_id, service.subscribed_topics, timeout=2.0)
        except Exception as error:  # Kafka down, or a broker without the admin API: the rest still shows
            reason = f"unknown: {type(error).__name__}: {error}"[:200]
            self.lag_failures[service.name] = (time.monotonic(), reason)
            return None, reason
        return sum(lags.values()), ", ".join(f"{where}: {n}" for where, n in sorted(lags.items()) if n) or "none"

    def waiting(self, trace: SagaTrace) -> dict[str, list[str]]:
        """For each hop where an unfinished saga stopped: the handlers that react to its event."""
        if self.choreography is None or trace.ended_by is not None:
            return {}
        by_name = {event.event_name: event for event in self.choreography.events}
        found = {}
        for hop in trace.stopped_at:
            event_type = by_name.get(hop.event.event_type)
            handlers = self.choreography.handlers_of(event_type) if event_type else []
            done = {child.event.handler for child in hop.children} | {d.consumer for d in hop.dead_letters}
            found[hop.event.event_id] = [h.name for h in handlers if h.name not in done]
        return found

    def remaining(self, trace: SagaTrace) -> list[list[str]]:
        """The declared paths from where the saga stopped to an end, compensations included."""
        if self.choreography is None or trace.ended_by is not None or trace.declaration is None:
            return []
        saga = next((s for _, s in self.choreography.sagas if s.name == trace.declaration.name), None)
        if saga is None:
            return []
        seen = {hop.event.event_type for hop in trace.hops() if hop.seen}
        stopped = {hop.event.event_type for hop in trace.stopped_at}
        paths: dict[tuple[str, ...], None] = {}
        for run in self.choreography.runs(saga, limit=500):
            names = {event.event_name for event in run.events}
            if not seen <= names:
                continue
            for leaf in run.leaves():
                path = [event.event_name for event in run.path_to(leaf)]
                cut = max((i for i, name in enumerate(path) if name in stopped), default=-1)
                if cut >= 0 and path[cut + 1 :]:
                    paths.setdefault(tuple(path[cut:]), None)
        return [list(path) for path in paths][:12]


def _rows(roots: list[Hop]) -> list[tuple[Hop, int]]:
    """Hops depth first with their depth: the causal tree as `choreo trace` prints it."""
    return [(hop, hop.depth) for root in roots for hop in root.walk()]


def create_app(
    store: TraceStore | str,
    services: list[Service] | None = None,
    *,
    token: str | None = None,
    allow_actions: bool = False,
    start_services: bool = True,
) -> FastAPI:
    """The explorer over a trace store (or its URL) and the services whose tables it reads."""
    trace_store = TraceStore(store) if isinstance(store, str) else store
    explorer = Explorer(trace_store, list(services or []), allow_actions=allow_actions)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await trace_store.open()
        await trace_store.summarize_missing()
        explorer.saga_types = [d.name for d in await trace_store.declarations()]
        if start_services:
            for service in explorer.services.values():
                await service.start(kafka=False)  # the database alone: replays wait for the service's relay
        try:
            yield
        finally:
            if start_services:
                for service in explorer.services.values():
                    await service.stop()
            await trace_store.close()

    app = FastAPI(title="choreo explorer", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.explorer = explorer
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    @app.middleware("http")
    async def require_token(request: Request, call_next: Any) -> Response:
        if token is None:
            response: Response = await call_next(request)
            return response
        given = request.query_params.get("token") or request.cookies.get(COOKIE) or ""
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer "):
            given = header[7:].strip()
        if not hmac.compare_digest(given.encode(), token.encode()):
            return PlainTextResponse(
                "401: this explorer needs its token (?token=..., or Authorization: Bearer ...)", status_code=401
            )
        response = await call_next(request)
        if request.query_params.get("token"):
            response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
        return response

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> Response:
        if request.url.path.startswith("/rows"):
            return PlainTextResponse(str(error.detail), status_code=error.status_code)
        return explorer.render(request, "error.html", status=error.status_code, message=error.detail)

    @app.get("/", response_class=HTMLResponse)
    async def saga_list(request: Request) -> Response:
        lookup = (request.query_params.get("q") or "").strip()
        if lookup:
            found = await explorer.find(lookup)
            if len(found) == 1:
                return RedirectResponse(f"/sagas/{found[0]}", status_code=303)
            if not found:
                raise HTTPException(404, f"no saga has the id, id prefix or business key {lookup!r}")
            traces = [s for s in await trace_store.summaries(limit=10_000) if s.saga_id in found]
            return explorer.render(request, "matches.html", lookup=lookup, rows=traces, now=utcnow())
        return explorer.render(
            request, "sagas.html", **await explorer.listing(request), saga_types=explorer.saga_types, windows=WINDOWS
        )

    @app.get("/rows", response_class=HTMLResponse)
    async def saga_rows(request: Request) -> Response:
        return explorer.render(request, "_rows.html", **await explorer.listing(request))

    @app.get("/sagas/{saga_id}", response_class=HTMLResponse)
    async def saga_page(request: Request, saga_id: str) -> Response:
        if not _SAGA_ID.match(saga_id):
            raise HTTPException(400, f"{saga_id!r} is not a saga id: letters, digits and - . _ : only")
        trace = await trace_store.trace(saga_id)
        if trace is None:
            if len(saga_id) < MIN_PREFIX:
                raise HTTPException(404, f"no saga {saga_id!r} (a prefix needs at least {MIN_PREFIX} characters)")
            try:
                full = await trace_store.resolve(saga_id)
            except ConfigurationError as error:
                raise HTTPException(400, str(error)) from None
            if full is None:
                raise HTTPException(404, f"no saga {saga_id!r} in the trace database")
            return RedirectResponse(f"/sagas/{full}", status_code=307)
        waiting = explorer.waiting(trace)
        return explorer.render(
            request,
            "saga.html",
            trace=trace,
            timeline=Markup(svg.timeline(trace, waiting)),  # built from escaped parts
            rows=_rows(trace.roots),
            payloads=await explorer.payloads(trace),
            waiting=waiting,
            remaining=explorer.remaining(trace),
            mask=mask_urls,
        )

    def service_named(name: str) -> Service:
        service = explorer.services.get(name)
        if service is None:
            raise HTTPException(404, f"no service {name!r}; known: {', '.join(explorer.services) or 'none'}")
        return service

    @app.get("/dead-letters", response_class=HTMLResponse)
    async def letters_page(request: Request, status: str = "parked") -> Response:
        if status not in (*dlq.STATUSES, "all"):
            raise HTTPException(400, f"unknown status {status!r}; use parked, replayed, discarded or all")
        found = {}
        for name, service in explorer.services.items():
            found[name] = await dlq.letters(service, status=None if status == "all" else status, limit=200)
        return explorer.render(request, "dead_letters.html", letters=found, wanted=status)

    @app.get("/dead-letters/{service_name}/{letter_id}", response_class=HTMLResponse)
    async def letter_page(request: Request, service_name: str, letter_id: int) -> Response:
        service = service_named(service_name)
        found = await dlq.letters(service, ids=[letter_id], status=None)
        if not found:
            raise HTTPException(404, f"{service_name} has no dead letter {letter_id}")
        letter = found[0]
        headers = {name: mask_urls(str(value)) for name, value in letter.headers.items()}
        return explorer.render(
            request,
            "letter.html",
            service=service_name,
            letter=letter,
            headers=headers,
            payload=_pretty(letter.payload),
            error=mask_urls(letter.error),
            traceback=mask_urls(letter.traceback or ""),
            done=request.query_params.get("done"),
        )

    @app.post("/dead-letters/{service_name}/{letter_id}/{action}")
    async def letter_action(request: Request, service_name: str, letter_id: int, action: str) -> Response:
        if action not in ("replay", "discard"):
            raise HTTPException(404, f"no action {action!r}; use replay or discard")
        if not explorer.allow_actions:
            raise HTTPException(403, "actions are off: start `choreo ui` with --allow-actions")
        service = service_named(service_name)
        found = await dlq.letters(service, ids=[letter_id], status=None)
        if not found:
            raise HTTPException(404, f"{service_name} has no dead letter {letter_id}")
        client = request.client.host if request.client else "?"
        try:
            if action == "replay":
                outcome = ",".join(r.outcome for r in await dlq.replay(service, found))
            else:
                outcome = "discarded" if await dlq.discard(service, found) else "not-parked"
        except ChoreoError as error:
            raise HTTPException(409, str(error)) from None
        log.warning("dead letter %s/%s: %s by %s -> %s", service_name, letter_id, action, client, outcome)
        return RedirectResponse(f"/dead-letters/{service_name}/{letter_id}?done={action}:{outcome}", status_code=303)

    @app.get("/health", response_class=HTMLResponse)
    async def health_page(request: Request) -> Response:
        now = utcnow()
        services = list(explorer.services.values())
        # Lag comes from the broker (the group's committed offsets), each service at once.
        lags = await asyncio.gather(*(explorer.lag(service) for service in services))
        rows = []
        for service, (lag, lag_note) in zip(services, lags, strict=True):
            async with service.engine.connect() as conn:
                backlog, oldest = await outbox.backlog(conn, now)
                parked = await conn.scalar(select(func.count()).where(dead_letter_table.c.status == "parked"))
            rows.append(
                {
                    "service": service.name,
                    "backlog": backlog,
                    "oldest": (now - oldest) if oldest else None,
                    "lag": lag,
                    "lag_note": lag_note,
                    "parked": int(parked or 0),
                }
            )
        return explorer.render(request, "health.html", rows=rows, now=now)

    @app.get("/graph", response_class=HTMLResponse)
    async def graph_page(request: Request, window: str = "1h") -> Response:
        report = explorer.report
        if explorer.choreography is None or report is None:
            raise HTTPException(
                404, "no choreography: start `choreo ui` with the app's module, e.g. `choreo ui demo_shop`"
            )
        if window not in WINDOWS or window == "all":
            raise HTTPException(400, f"unknown window {window!r}; use one of 15m, 1h, 24h, 7d")
        now = utcnow()
        since = now - SPANS[window]
        emitted: dict[tuple[str, str], svg.EdgeTraffic] = {}
        for _, handler, effect, seconds in await trace_store.hop_latencies(since):
            emitted.setdefault((handler, effect), svg.EdgeTraffic()).latencies.append(seconds)
        failed = await trace_store.dead_letter_counts(since)
        minutes = SPANS[window] / timedelta(minutes=1)
        drawing = svg.graph(explorer.choreography, emitted, failed, report.problems, minutes)
        return explorer.render(
            request,
            "graph.html",
            graph=Markup(drawing),  # built from escaped parts
            report=report,
            window=window,
            windows={k: v for k, v in WINDOWS.items() if k != "all"},
        )

    return app
