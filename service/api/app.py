"""The HTTP edge of the service: FastAPI app factory, REST routes of API v1, error mapping.

The API knows one thing, the `Predictor` (which reaches the engine through an
`EngineClient`); the lifespan starts and closes it. Errors are raised as typed `NextwordError`s below and translated here,
once: every error answer is JSON `{"error": {"code", "message"}}` with a 4xx status
for bad input (never a 5xx). The WebSocket protocol lives in `service/api_stream.py`.

Run it with `nextword serve`, or `uvicorn --factory service.api:create_app`.
"""

# No `from __future__ import annotations` here: FastAPI must resolve the request
# classes that `v1_router` defines locally, which string annotations would hide.
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from http import HTTPStatus
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Path, Request, Response
from fastapi.responses import JSONResponse
from pydantic import Field
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from service.api.deps import PredictorDep, PredictorFactory, get_predictor
from service.api.errors import BODY_TOO_LARGE, error_response, install_error_handlers
from service.api.predictor import Predictor
from service.api.schemas import (
    TEXT_DOC,
    ErrorResponse,
    FeedRequestBase,
    ModelsResponse,
    PredictRequestBase,
    PredictResponse,
    SessionInfo,
    SessionRequestBase,
    SessionResponse,
    Status,
)
from service.api.stream import stream_router
from service.config import Settings
from service.contract.limits import MAX_SESSION_ID_CHARS
from service.errors import NotReady
from service.supervisor import all_processes_up, report_up

log = logging.getLogger(__name__)

VERSION = "1"


SessionId = Annotated[str, Path(max_length=MAX_SESSION_ID_CHARS, description="A session's id.")]

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": HTTPStatus(status).phrase}
    for status in (404, 422, 503)
}


def v1_router(settings: Settings) -> APIRouter:
    """The REST routes of API v1; request texts hold at most `settings.max_text_chars`."""
    Text = Annotated[str, Field(max_length=settings.max_text_chars, description=TEXT_DOC)]

    class PredictRequest(PredictRequestBase):
        __doc__ = PredictRequestBase.__doc__
        text: Text

    class SessionRequest(SessionRequestBase):
        __doc__ = SessionRequestBase.__doc__
        text: Text = ""

    class FeedRequest(FeedRequestBase):
        __doc__ = FeedRequestBase.__doc__
        text: Text

    router = APIRouter(prefix="/v1", responses=ERRORS)

    @router.get("/models", response_model=ModelsResponse, tags=["models"])
    async def list_models(predictor: PredictorDep) -> dict[str, Any]:
        """The loaded models and the default one."""
        return {"default": predictor.default_model, "models": predictor.models()}

    @router.post("/predict", response_model=PredictResponse, tags=["predict"])
    async def predict(body: PredictRequest, predictor: PredictorDep) -> dict[str, Any]:
        """Predict the next word of a whole text (stateless)."""
        return await predictor.predict(body.text, k=body.k, model=body.model, prefix=body.prefix)

    @router.post("/sessions", response_model=SessionResponse, status_code=201, tags=["sessions"])
    async def create_session(
        predictor: PredictorDep, response: Response, body: SessionRequest | None = None
    ) -> dict[str, Any]:
        """Start a session (optionally with a first text); answers its first predictions."""
        body = body or SessionRequest()
        answer = await predictor.create_session(
            body.text, k=body.k, model=body.model, prefix=body.prefix
        )
        response.headers["Location"] = f"/v1/sessions/{answer['session_id']}"
        return answer

    @router.post("/sessions/{session_id}/feed", response_model=SessionResponse, tags=["sessions"])
    async def feed(
        session_id: SessionId, body: FeedRequest, predictor: PredictorDep
    ) -> dict[str, Any]:
        """Append whole words to a session's context; answers the next-word predictions."""
        return await predictor.feed(session_id, body.text, k=body.k, prefix=body.prefix)

    @router.get("/sessions/{session_id}", response_model=SessionInfo, tags=["sessions"])
    async def session_info(session_id: SessionId, predictor: PredictorDep) -> dict[str, Any]:
        """A session's model, token count and timestamps."""
        return await predictor.session_info(session_id)

    @router.delete(
        "/sessions/{session_id}", status_code=204, response_class=Response, tags=["sessions"]
    )
    async def delete_session(session_id: SessionId, predictor: PredictorDep) -> Response:
        """Forget a session."""
        await predictor.delete_session(session_id)
        return Response(status_code=204)

    return router


def ops_router(settings: Settings) -> APIRouter:
    """Liveness, readiness and metrics: for orchestrators and Prometheus."""
    router = APIRouter(tags=["operations"])

    @router.get("/healthz", response_model=Status)
    async def healthz() -> dict[str, str]:
        """200 while the process lives."""
        return {"status": "ok"}

    @router.get("/readyz", response_model=Status, responses={503: {"model": ErrorResponse}})
    async def readyz(request: Request) -> dict[str, str]:
        """200 once the models are loaded and the session store answers, else 503."""
        predictor = get_predictor(request)
        if not predictor.ready:
            raise NotReady("models are loading")
        if not all_processes_up():
            raise NotReady("not every process of the service is up")
        await predictor.check_ready()
        return {"status": "ok"}

    @router.get("/metrics", response_class=Response)
    async def prometheus_metrics() -> Response:
        """Prometheus text format."""
        return Response(metrics.render(settings.metrics_dir), media_type=metrics.CONTENT_TYPE)

    return router


# --- request size -----------------------------------------------------------------


def body_limit(settings: Settings) -> int:
    """Largest request body: the longest allowed text, fully JSON-escaped, plus room."""
    return 12 * settings.max_text_chars + 4096  # "\ud83d\ude00" is 12 bytes for 1 character


class BodySizeLimit:
    """ASGI middleware: a request body over `limit` bytes gets a JSON 413."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
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
        return error_response(413, "too_large", f"request body over the {self.limit}-byte limit")


# --- metrics -----------------------------------------------------------------------

KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class RequestMetrics:
    """ASGI middleware: latency and count of every HTTP request, by route template."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

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
            method = scope["method"] if scope["method"] in KNOWN_METHODS else "OTHER"
            metrics.HTTP_REQUEST_SECONDS.labels(method, route).observe(time.perf_counter() - start)
            metrics.HTTP_REQUESTS.labels(method, route, str(status)).inc()


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
on connect closes with 4404, an over-size frame with 1009.
"""


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
        report_up()  # to the supervisor, when this is one of its API processes
        try:
            yield
        finally:
            # New requests get 503 from here on; steps already queued are finished.
            app.state.predictor = None
            await predictor.close()
            log.info("predictor closed")

    app = FastAPI(
        title="nextword",
        version=VERSION,
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.add_middleware(BodySizeLimit, limit=body_limit(settings))
    app.add_middleware(RequestMetrics)
    install_error_handlers(app)
    app.include_router(ops_router(settings))
    app.include_router(v1_router(settings))
    app.include_router(stream_router(settings))
    return app
