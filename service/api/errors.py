"""Every failure as the client sees it: one place maps errors to HTTP and WebSocket answers.

    error                  HTTP                     WebSocket (when it ends a connection)
    BadInput               422 (400: body not JSON) 4422
    UnknownModel           404                      4404
    UnknownSession         404                      4404
    Overloaded             503 + Retry-After        1013 (try again later)
    StoreUnavailable       503 + Retry-After        1013 (OutcomeUnknown too)
    NotReady               503 + Retry-After        1013
    EngineRestarting       503 + Retry-After        1013 (on connect; in-band on a message)
    Contended              503 + Retry-After        1013
    StepFailed             500                      1011
    anything else          500 "internal"           1011

`ANSWERS` is that table; an error class not in it answers as its nearest listed base.
Every HTTP error body is `{"error": {"code", "message", ...}}` (plus the error's `details()`,
e.g. `retry_after_ms`); on the WebSocket the same object
is sent in-band as `{"type": "error", "error": {...}, "id"}` before any close (a message
that fails with a retryable error is answered in-band and the connection stays open).
A 405 lists in `Allow` the methods of every route of the path, not only the first one's.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import compile_path

from service.errors import (
    BadInput,
    Contended,
    NextwordError,
    NotReady,
    Overloaded,
    StepFailed,
    StoreUnavailable,
    UnknownModel,
    UnknownSession,
)

log = logging.getLogger(__name__)

BODY_TOO_LARGE = "nextword.body_too_large"  # scope mark set by the body-size middleware
CLOSE_INTERNAL = 1011
CLOSE_TRY_AGAIN = 1013
RETRY_AFTER_S = 1


@dataclass(frozen=True)
class Answer:
    """How an error is answered: HTTP `Retry-After` (seconds, or None) and WebSocket close."""

    retry_after_s: int | None
    close: int


ANSWERS: dict[type[NextwordError], Answer] = {
    BadInput: Answer(None, 4422),
    UnknownModel: Answer(None, 4404),
    UnknownSession: Answer(None, 4404),
    Overloaded: Answer(RETRY_AFTER_S, CLOSE_TRY_AGAIN),
    StoreUnavailable: Answer(RETRY_AFTER_S, CLOSE_TRY_AGAIN),
    NotReady: Answer(RETRY_AFTER_S, CLOSE_TRY_AGAIN),
    Contended: Answer(RETRY_AFTER_S, CLOSE_TRY_AGAIN),
    StepFailed: Answer(None, CLOSE_INTERNAL),
}
# Only for an error class outside the table: a 4xx closes with 4000 + status, else 1011.
_UNLISTED_5XX = Answer(None, CLOSE_INTERNAL)


def answer_for(error_class: type[NextwordError]) -> Answer:
    """The row of `ANSWERS` for an error class: its own, or its nearest listed base's."""
    for cls in error_class.__mro__:
        answer = ANSWERS.get(cls)
        if answer is not None:
            return answer
    status = error_class.status
    return Answer(None, 4000 + status) if status < 500 else _UNLISTED_5XX


def answer_of(error: NextwordError) -> Answer:
    """The row of `ANSWERS` for an error (see `answer_for`)."""
    return answer_for(type(error))


def close_code(error: NextwordError) -> int:
    """The WebSocket close code for an error that ends a connection."""
    return answer_of(error).close


def retry_after_s(error: NextwordError) -> int | None:
    """Seconds the client should wait before retrying (None: not to be retried as is): the
    error's own figure (an `Overloaded` measured from the queue's drain rate), else the
    table's."""
    seconds = answer_of(error).retry_after_s
    own = getattr(error, "retry_after_s", None)
    if seconds is not None and own:
        return max(1, math.ceil(own))
    return seconds


def retry_headers(error: NextwordError) -> dict[str, str] | None:
    """`Retry-After` for an error the client should retry later, else None."""
    seconds = retry_after_s(error)
    return None if seconds is None else {"Retry-After": str(seconds)}


def _route_table(app: Any) -> list[tuple[re.Pattern[str], frozenset[str]]]:
    """(path regex, methods) of every HTTP route of the app, included routers flattened."""
    try:  # FastAPI >= 0.13x keeps included routers nested: flatten them
        from fastapi.routing import iter_route_contexts

        routes: Any = iter_route_contexts(app.router.routes)
    except ImportError:  # older FastAPI: app.routes is already flat
        routes = app.routes
    table = []
    for route in routes:
        methods, path = getattr(route, "methods", None), getattr(route, "path", None)
        if methods and isinstance(path, str):
            table.append((compile_path(path)[0], frozenset(methods)))
    return table


def allowed_methods(request: Request) -> list[str]:
    """The methods of every route whose path matches the request's (for `Allow` on a 405).

    Starlette answers a 405 with the methods of the first route whose path matches; a path
    served by several routes (`GET` and `DELETE /v1/sessions/{id}`) needs all of them.
    """
    app = request.app
    table = getattr(app.state, "nextword_route_table", None)
    if table is None:
        table = app.state.nextword_route_table = _route_table(app)
    path = request.scope["path"]
    root = request.scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :] or "/"
    methods: set[str] = set()
    for regex, route_methods in table:
        if regex.match(path):
            methods |= route_methods
    return sorted(methods)


def error_response(
    status: int,
    code: str,
    message: str,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    """The one shape of every error answer."""
    return JSONResponse(
        {"error": {"code": code, "message": message, **extra}}, status_code=status, headers=headers
    )


def describe_validation_errors(errors: Any) -> tuple[str, list[dict[str, Any]]]:
    """A one-line message and JSON-safe details (never echoing the input) of pydantic errors."""
    details = []
    for err in errors:
        msg = err["msg"]
        if err["type"] == "json_invalid":
            msg = f"body is not valid JSON ({err.get('ctx', {}).get('error', 'decode error')})"
        details.append(
            {"loc": [str(part) for part in err.get("loc", ())], "msg": msg, "type": err["type"]}
        )
    message = "; ".join(
        f"{'.'.join(d['loc'])}: {d['msg']}" if d["loc"] else d["msg"] for d in details
    )
    return message, details


def install_error_handlers(app: FastAPI) -> None:
    """Map every failure to `{"error": {"code", "message"}}` with its status."""

    async def nextword_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, NextwordError)
        if exc.status >= 500:
            log.warning("%s %s: %s (%s)", request.method, request.url.path, exc.code, exc.message)
        return error_response(
            exc.status, exc.code, exc.message, retry_headers(exc), **exc.details()
        )

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = exc.errors()
        # A body that is not JSON at all is a bad request; a JSON body with wrong
        # fields is unprocessable.
        status = 400 if any(err["type"] == "json_invalid" for err in errors) else 422
        message, details = describe_validation_errors(errors)
        return error_response(status, "bad_input", message, details=details)

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        if request.scope.get(BODY_TOO_LARGE):
            return error_response(
                413, "too_large", "request body too large", {"Connection": "close"}
            )
        headers = exc.headers
        if exc.status_code == 405:
            methods = allowed_methods(request)
            if methods:
                headers = {**(headers or {}), "Allow": ", ".join(methods)}
        if exc.status_code == 400:
            code = "bad_input"  # e.g. a body FastAPI cannot parse
        else:
            code = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_").replace("-", "_")
        return error_response(exc.status_code, code, str(exc.detail), headers)

    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal", "internal error")

    app.add_exception_handler(NextwordError, nextword_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
