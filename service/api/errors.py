"""Every failure as the client sees it: one place maps errors to HTTP and WebSocket answers.

    error                  HTTP                     WebSocket (when it ends a connection)
    BadInput               422 (400: body not JSON) 4422
    UnknownModel           404                      4404
    UnknownSession         404                      4404
    Overloaded             503 + Retry-After        1013 (try again later)
    StoreUnavailable       503 + Retry-After        1013
    NotReady               503 + Retry-After        1013
    StepFailed             500                      1011
    anything else          500 "internal"           1011

Every HTTP error body is `{"error": {"code", "message"}}`; on the WebSocket the same object
is sent in-band as `{"type": "error", "error": {...}, "id"}` before any close.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from service.errors import NextwordError, NotReady, Overloaded, StoreUnavailable

log = logging.getLogger(__name__)

BODY_TOO_LARGE = "nextword.body_too_large"  # scope mark set by the body-size middleware
CLOSE_INTERNAL = 1011
CLOSE_TRY_AGAIN = 1013
RETRY_LATER = (Overloaded, StoreUnavailable, NotReady)


def close_code(error: NextwordError) -> int:
    """The WebSocket close code for an error that ends a connection."""
    if isinstance(error, RETRY_LATER):
        return CLOSE_TRY_AGAIN
    if error.status < 500:
        return 4000 + error.status  # 4404 unknown session or model, 4422 bad input
    return CLOSE_INTERNAL


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
        retry = {"Retry-After": "1"} if isinstance(exc, RETRY_LATER) else None
        if exc.status >= 500:
            log.warning("%s %s: %s (%s)", request.method, request.url.path, exc.code, exc.message)
        return error_response(exc.status, exc.code, exc.message, retry)

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
            return error_response(413, "too_large", "request body too large")
        if exc.status_code == 400:
            code = "bad_input"  # e.g. a body FastAPI cannot parse
        else:
            code = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_").replace("-", "_")
        return error_response(exc.status_code, code, str(exc.detail), exc.headers)

    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal", "internal error")

    app.add_exception_handler(NextwordError, nextword_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
