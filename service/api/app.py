"""The app of an API process: the factory, its lifespan and its middleware.

The API knows one thing, the `Predictor` (which reaches the engine through an
`EngineClient`); the lifespan starts and closes it. Routes are in `routes` (REST) and
`stream` (WebSocket); errors are translated to answers once, in `errors`.

Run it with `nextword serve`, or `uvicorn --factory service.api:create_app` (the engine
then runs inside that process).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.telemetry import TelemetryConfig
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import heap, metrics
from service.api.auth import AccessControl, ApiKeys, Limiter, RateLimiter
from service.api.deps import PredictorFactory
from service.api.disconnects import ABANDONED, CancelOnDisconnect
from service.api.errors import BODY_TOO_LARGE, error_response, install_error_handlers
from service.api.lean import install_direct_routes
from service.api.predictor import Predictor
from service.api.process import api_link, report_up
from service.api.rate_limit import SharedRateLimiter
from service.api.routes import STATIC_DIR, PageFiles, ops_router, page_router, v1_router
from service.api.stream import stream_router
from service.config import Settings
from service.store import redis_client

log = logging.getLogger(__name__)

VERSION = "1"
NO_OPENTELEMETRY: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False}
# A rate check waits this long for Redis at most, then the process's own bucket answers.
RATE_LIMIT_TIMEOUT_S = 0.5


# --- request size -----------------------------------------------------------------


def body_limit(settings: Settings) -> int:
    """Largest request body: the longest allowed text, fully JSON-escaped, plus room."""
    return 12 * settings.max_text_chars + 4096  # "\ud83d\ude00" is 12 bytes for 1 character


def content_length(scope: Scope) -> str | None:
    """The request's first Content-Length header, if any (what `Headers(scope).get` finds:
    ASGI header names are lower case; read straight from the list, a third of its cost)."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            return str(value, "latin-1")
    return None


class BodySizeLimit:
    """ASGI middleware: a request body over `limit` bytes gets a JSON 413."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = content_length(scope)
        if (
            declared is not None
            and declared.isascii()
            and declared.isdigit()
            and (len(declared) > 18 or int(declared) > self.limit)  # int(): at most 4,300 digits
        ):
            await self.too_large()(scope, receive, send)
            return
        received = 0

        async def receive_within_limit() -> Message:
            # A body without Content-Length is counted as it arrives; going over
            # fails the body read, and the HTTP error handler sees the mark.
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    scope[BODY_TOO_LARGE] = True
                    raise HTTPException(413)
            return message

        await self.app(scope, receive_within_limit, send)

    def too_large(self) -> JSONResponse:
        # Closed after the answer: the rest of the body is never read.
        return error_response(
            413,
            "too_large",
            f"request body over the {self.limit}-byte limit",
            headers={"Connection": "close"},
        )


# --- metrics -----------------------------------------------------------------------

KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class RequestMetrics:
    """ASGI middleware: latency and count of every HTTP request, by route template."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        # Children by label values: bounded (route templates, known methods, statuses).
        self._latency: dict[tuple[str, str], Any] = {}
        self._count: dict[tuple[str, str, int], Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            # The router leaves the matched route in the scope: label by its template
            # (bounded cardinality), never by the raw path.
            route = getattr(scope.get("route"), "path", "<unmatched>")
            if scope.get(ABANDONED):
                status = 499  # the client closed the connection before the answer
            method = scope["method"] if scope["method"] in KNOWN_METHODS else "OTHER"
            tally = metrics.TALLY
            tally.observe(self.latency(method, route), time.perf_counter() - start)
            tally.inc(self.count(method, route, status))

    def latency(self, method: str, route: str) -> Any:
        """The latency histogram's child of a route (labels() takes a lock: looked up once)."""
        child = self._latency.get((method, route))
        if child is None:
            child = self._latency[method, route] = metrics.HTTP_REQUEST_SECONDS.labels(
                method, route
            )
        return child

    def count(self, method: str, route: str, status: int) -> Any:
        """The request counter's child of a route and status."""
        child = self._count.get((method, route, status))
        if child is None:
            child = self._count[method, route, status] = metrics.HTTP_REQUESTS.labels(
                method, route, str(status)
            )
        return child


# --- documentation -----------------------------------------------------------------

DOCS_ASSETS = "/static/docs"  # Swagger UI, vendored under static/docs (see its README.md)


def install_docs(app: FastAPI) -> None:
    """`/docs`: Swagger UI from the package's own files (no CDN: works offline)."""

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - API documentation",
            swagger_js_url=f"{root}{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_ASSETS}/favicon-32x32.png",
            # No online validator badge: it would send the document's URL to swagger.io.
            swagger_ui_parameters={"validatorUrl": None},
        )


# --- the app -----------------------------------------------------------------------

DESCRIPTION = """\
Next-word predictions from recurrent language models (LSTM, GRU) served with ONNX Runtime.

A session keeps the model's recurrent state: each new word costs one step, whatever
the length of the text so far. Stream words over the WebSocket `/v1/stream`: on
connect the server sends `{"type": "ready", "session_id", "model", "tokens",
"predictions"}`; each message `{"text", "k"?, "prefix"?, "id"?}` (or `{"type":
"reset"}`) is answered, in order, by `{"type": "predictions", "session_id",
"tokens", "predictions", "id"}`; a bad message by `{"type": "error", "error":
{"code", "message"}, "id"}` (the connection stays open). An unknown `session_id`
on connect closes with 4404, an over-size frame with 1009, a text frame that is not
UTF-8 with 1007.

A message sent again with the same `id` and text as the session's last step (a retry
after `outcome_unknown` or a lost connection) is answered, not applied twice; a REST feed
does the same with an `Idempotency-Key` header.

A request line and headers over `NEXTWORD_MAX_HEADER_BYTES` (32 KiB) together get 431
`headers_too_large` and the connection is closed. A REST request whose client disconnects
before its answer is cancelled: its step in the engine is dropped (or stops at its next
chunk).

If the engine process crashes, the service restarts it in place: connections stay open,
and a message pending meanwhile is answered `{"type": "error", "error": {"code":
"engine_restarting", "retry_after_ms", "maybe_applied"}, "id"}` (REST: 503 with
`Retry-After`). With `maybe_applied` true, send an empty text first: its `tokens` shows
whether the message was applied. With the memory store the sessions are lost: the next
message is answered `unknown_session` and the connection closes with 4404; start a new
session and feed it the text again.
"""


def rate_limiter(settings: Settings) -> Limiter | None:
    """The per-key rate: one bucket per key in Redis with a Redis session store (this
    process's share of the rate as the fallback), else this process's share alone."""
    if not settings.rate_limit:
        return None
    share = settings.rate_limit / (settings.api_processes() if api_link() else 1)
    burst = settings.rate_burst or max(1.0, 2 * settings.rate_limit)
    local = RateLimiter(rate=share, burst=burst)
    if settings.session_store == "memory":
        log.info("rate limits: per API process (%.3g/s each; no Redis store)", share)
        return local
    client = redis_client(settings.session_store, timeout_s=RATE_LIMIT_TIMEOUT_S)
    log.info("rate limits: global, one bucket per key in the Redis session store")
    return SharedRateLimiter(client, settings.rate_limit, burst, fallback=local)


def create_app(
    settings: Settings | None = None, predictor_factory: PredictorFactory | None = None
) -> FastAPI:
    """Build the app; its lifespan starts the predictor (`Predictor.start` by default)."""
    settings = settings or Settings()
    start = predictor_factory or Predictor.start

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.predictor = None
        predictor = await start(settings)
        app.state.predictor = predictor
        if api_link() is not None:  # an API process of `nextword serve`, not a test's app
            heap.settle()
        report_up()  # to the supervisor, when this is one of its API processes
        try:
            yield
        finally:
            # New requests get 503 from here on; steps already queued are finished.
            app.state.predictor = None
            await predictor.close()
            log.info("predictor closed")
            if isinstance(app.state.rate_limiter, SharedRateLimiter):
                await app.state.rate_limiter.close()

    app = FastAPI(
        title="nextword",
        version=VERSION,
        description=DESCRIPTION,
        lifespan=lifespan,
        # The service's telemetry is its Prometheus metrics and its log; FastAPI's own
        # OpenTelemetry bridge, on by default, asks the global providers (environment
        # lookups) on every request and connection to learn that none is configured.
        telemetry=NO_OPENTELEMETRY,
        # /docs is served from the package's files (install_docs); no ReDoc (a CDN script).
        docs_url=None,
        redoc_url=None,
    )
    app.add_middleware(BodySizeLimit, limit=body_limit(settings))
    keys = ApiKeys.parse(settings.api_keys)
    app.state.rate_limiter = rate_limiter(settings)
    app.add_middleware(
        AccessControl,
        keys=keys,
        limiter=app.state.rate_limiter,
        protect_metrics=settings.protect_metrics,
    )
    app.add_middleware(CancelOnDisconnect)  # a client that leaves aborts its step
    app.add_middleware(RequestMetrics)  # outermost: refusals are counted too
    install_error_handlers(app)
    app.include_router(ops_router(settings))
    v1 = v1_router(settings)
    app.include_router(v1)
    install_direct_routes(app.router, v1.routes)  # predict and feed ahead of the matching
    app.include_router(stream_router(settings))
    app.include_router(page_router())
    install_docs(app)
    app.mount("/static", PageFiles(directory=STATIC_DIR), name="static")
    return app
