"""The REST routes of API v1, the operations routes and the pages; the WebSocket is in `stream`.

No `from __future__ import annotations` here: FastAPI must resolve the request classes
that `v1_router` defines locally, which string annotations would hide.
"""

from http import HTTPStatus
from pathlib import Path as FilePath
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Request, Response
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from pydantic import Field

from service import metrics
from service.api.deps import PredictorDep, get_predictor
from service.api.lean import body_decoders, decoded, json_response, lean
from service.api.process import all_processes_up
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
from service.config import Settings
from service.contract.limits import MAX_SESSION_ID_CHARS
from service.errors import NotReady

SessionId = Annotated[str, Path(max_length=MAX_SESSION_ID_CHARS, description="A session's id.")]
MAX_IDEMPOTENCY_KEY_CHARS = 128
IdempotencyKey = Annotated[
    str | None,
    Header(
        max_length=MAX_IDEMPOTENCY_KEY_CHARS,
        description="The client's id for this feed. Sent again with the same text (a retry "
        "after `outcome_unknown`, a timeout or a lost connection), the feed is answered as "
        "the first was and not applied a second time, if it was the session's last step.",
    ),
]

# Every status a route can answer is declared (schemathesis checks it in the tests); the
# body of each is `ErrorResponse`. What the codes mean: `service.errors`, `service.api.errors`.
ERROR_DOCS = {
    400: "The body is not JSON (code `bad_input`).",
    401: "With API keys configured: no key, or not a valid one (`unauthorized`).",
    404: "No such model or session (`unknown_model`, `unknown_session`).",
    413: "The body is over the size limit (`too_large`); the connection is closed.",
    422: "A field or parameter is not acceptable (`bad_input`).",
    429: "Over the key's request rate (`rate_limited`, with `retry_after_ms`): retry after "
    "`Retry-After` seconds.",
    500: "The model run failed (`step_failed`; no session was changed) or an internal error.",
    503: "Retry after `Retry-After` seconds: overloaded (the model's queue is full, or this "
    "key, or this address without keys, holds its share of it: `Retry-After` then comes from "
    "the queue's measured drain rate), session store unavailable (Redis down, not answering, "
    "or written behind by more than its window; nothing was applied), the store not "
    "answering a write in time (`outcome_unknown`: the step may have been applied; resend it "
    "with the same `Idempotency-Key`), the session contended by concurrent "
    "writers, the service starting or stopping, or its engine process restarting after a "
    "crash (`overloaded`, `store_unavailable`, `outcome_unknown`, `contended`, `not_ready`, "
    "`engine_restarting`). An `engine_restarting` answer carries `retry_after_ms` and "
    "`maybe_applied`: false, the request was not applied; true (a session step that reached "
    "the engine, sessions kept in Redis), it may have been: the session's `tokens` "
    "(`GET /v1/sessions/{id}`) tells which before a retry.",
}
RETRY_AFTER_HEADER = {
    "Retry-After": {
        "description": "Seconds to wait before retrying.",
        "schema": {"type": "integer"},
    }
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a route that can answer these error statuses."""
    return {
        status: {
            "model": ErrorResponse,
            "description": f"{HTTPStatus(status).phrase}. {ERROR_DOCS[status]}",
            **({"headers": RETRY_AFTER_HEADER} if status in (429, 503) else {}),
        }
        for status in statuses
    }


# A body: 400 not JSON, 413 too large, 422 wrong fields; a step: 500 run failed.
# Any /v1 route: 401 without a valid key (when keys are set), 429 over the rate.
STEP_ERRORS = errors(400, 401, 404, 413, 422, 429, 500, 503)
SESSION_ERRORS = errors(401, 404, 422, 429, 500, 503)  # a session id in the path, no body
LOCATION_HEADER = {
    "Location": {"description": "The new session's URL.", "schema": {"type": "string"}}
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

    # The hot routes have a fast handler, tried ahead of the app's routing (service.api.lean,
    # `install_direct_routes`); what it does not take exactly, FastAPI's handler answers
    # (every refusal is the documented one).
    router = APIRouter(prefix="/v1")
    predict_body, feed_body = body_decoders(settings.max_text_chars)

    async def fast_predict(request: Request) -> Response | None:
        body = await decoded(request, predict_body)
        if body is None:
            return None
        answer = await get_predictor(request).predict(
            body.text, k=body.k, model=body.model, prefix=body.prefix, adapt=body.adapt
        )
        return json_response(answer)

    async def fast_feed(request: Request) -> Response | None:
        session_id = request.path_params.get("session_id", "")
        key = request.headers.get("idempotency-key")
        if len(session_id) > MAX_SESSION_ID_CHARS or (
            key is not None and len(key) > MAX_IDEMPOTENCY_KEY_CHARS
        ):
            return None
        body = await decoded(request, feed_body)
        if body is None:
            return None
        answer = await get_predictor(request).feed(
            session_id,
            body.text,
            k=body.k,
            prefix=body.prefix,
            adapt=body.adapt,
            request_key=key,
        )
        return json_response(answer)

    @router.get(
        "/models",
        response_model=ModelsResponse,
        tags=["models"],
        responses=errors(401, 429, 500, 503),
    )
    async def list_models(predictor: PredictorDep) -> dict[str, Any]:
        """The loaded models and the default one."""
        return {"default": predictor.default_model, "models": predictor.models()}

    @router.post(
        "/predict", response_model=PredictResponse, tags=["predict"], responses=STEP_ERRORS
    )
    @lean(fast_predict)
    async def predict(body: PredictRequest, predictor: PredictorDep) -> dict[str, Any]:
        """Predict the next word of a whole text (stateless)."""
        return await predictor.predict(
            body.text, k=body.k, model=body.model, prefix=body.prefix, adapt=body.adapt
        )

    @router.post(
        "/sessions",
        response_model=SessionResponse,
        status_code=201,
        tags=["sessions"],
        responses={201: {"headers": LOCATION_HEADER}, **STEP_ERRORS},
    )
    async def create_session(
        predictor: PredictorDep, response: Response, body: SessionRequest | None = None
    ) -> dict[str, Any]:
        """Start a session (optionally with a first text); answers its first predictions."""
        body = body or SessionRequest()
        answer = await predictor.create_session(
            body.text, k=body.k, model=body.model, prefix=body.prefix, adapt=body.adapt
        )
        response.headers["Location"] = f"/v1/sessions/{answer['session_id']}"
        return answer

    @router.post(
        "/sessions/{session_id}/feed",
        response_model=SessionResponse,
        tags=["sessions"],
        responses=STEP_ERRORS,
    )
    @lean(fast_feed)
    async def feed(
        session_id: SessionId,
        body: FeedRequest,
        predictor: PredictorDep,
        idempotency_key: IdempotencyKey = None,
    ) -> dict[str, Any]:
        """Append whole words to a session's context; answers the next-word predictions."""
        return await predictor.feed(
            session_id,
            body.text,
            k=body.k,
            prefix=body.prefix,
            adapt=body.adapt,
            request_key=idempotency_key,
        )

    @router.get(
        "/sessions/{session_id}",
        response_model=SessionInfo,
        tags=["sessions"],
        responses=SESSION_ERRORS,
    )
    async def session_info(session_id: SessionId, predictor: PredictorDep) -> dict[str, Any]:
        """A session's model, token count, timestamps and the size of its memory."""
        return await predictor.session_info(session_id)

    @router.delete(
        "/sessions/{session_id}",
        status_code=204,
        response_class=Response,
        tags=["sessions"],
        responses=SESSION_ERRORS,
    )
    async def delete_session(session_id: SessionId, predictor: PredictorDep) -> Response:
        """Forget a session."""
        await predictor.delete_session(session_id)
        return Response(status_code=204)

    @router.delete(
        "/sessions/{session_id}/memory",
        status_code=204,
        response_class=Response,
        tags=["sessions"],
        responses=SESSION_ERRORS,
    )
    async def forget_words(session_id: SessionId, predictor: PredictorDep) -> Response:
        """Forget the words the session remembers of its writer (adaptation); its context,
        and so its next predictions from the model, stay."""
        await predictor.forget_words(session_id)
        return Response(status_code=204)

    return router


def ops_router(settings: Settings) -> APIRouter:
    """Liveness, readiness and metrics: for orchestrators and Prometheus."""
    router = APIRouter(tags=["operations"])

    @router.get("/healthz", response_model=Status)
    async def healthz() -> dict[str, str]:
        """200 while the process lives."""
        return {"status": "ok"}

    @router.get("/readyz", response_model=Status, responses=errors(503))
    async def readyz(request: Request) -> dict[str, str]:
        """200 once the models are loaded and the session store answers, else 503."""
        predictor = get_predictor(request)
        if not predictor.ready:
            raise NotReady("models are loading")
        if not all_processes_up():
            raise NotReady("not every process of the service is up")
        await predictor.check_ready()
        return {"status": "ok"}

    @router.get("/metrics", response_class=Response, responses=errors(401))
    async def prometheus_metrics() -> Response:
        """Prometheus text format."""
        return Response(metrics.render(settings.metrics_dir), media_type=metrics.CONTENT_TYPE)

    return router


STATIC_DIR = FilePath(__file__).resolve().parent / "static"
NO_CACHE = {"Cache-Control": "no-cache"}  # revalidated (ETag) on each load: upgrades show at once


class PageFiles(StaticFiles):
    """The pages' scripts and styles, from the package (no CDN: works offline)."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers.update(NO_CACHE)
        return response


def page_router() -> APIRouter:
    """The live typing page at `/` and the operations view at `/ops` (files under `/static`)."""
    router = APIRouter(include_in_schema=False)

    @router.get("/")
    async def typing_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers=NO_CACHE)

    @router.get("/ops")
    async def operations_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "ops.html", headers=NO_CACHE)

    return router
