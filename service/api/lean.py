"""The hot case of a REST route without FastAPI's routing, request and response models.

FastAPI spends most of a small request's time outside the route: matching the path against
the included routers, `json.loads`, a pydantic model built and validated from the dict, the
answer validated against `response_model` and encoded again. For `POST /v1/predict` and
`POST /v1/sessions/{id}/feed` the endpoint has a fast handler (`lean(...)` attaches it),
which `DirectRoutes`, the router's own middleware, tries before the router matches
anything: the body decoded by msgspec straight into a strict Struct with the same types and
limits as the pydantic body, the predictor called, its answer encoded once by msgspec.

`DirectRoutes` sits where the router is, inside every middleware of the app (keys, rate
limits, body limit, disconnects, metrics) and inside the exception handlers: those see the
same request, and the scope holds the same `route`, `endpoint` and `path_params` as the
router would have set. Whatever the fast handler does not accept exactly (another content
type, a body msgspec refuses, a path parameter or header over its limit) it hands back
(`None`), and the router runs FastAPI's own handler on the same request (the body read is
replayed): every refusal is FastAPI's and pydantic's, exactly as the OpenAPI document
describes it. msgspec's strict decoding accepts a subset of what the pydantic bodies accept
(strict types, unknown fields refused) and decodes it to the same values, so the two paths
answer alike where both can.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Annotated, Any, Optional, TypeVar

import msgspec
from fastapi.routing import APIRoute, APIRouter
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.contract.limits import MAX_K, MAX_NAME_CHARS, MAX_PREFIX_CHARS

FastHandler = Callable[[Request], Awaitable[Response | None]]
Endpoint = TypeVar("Endpoint", bound=Callable[..., Any])

_FAST = "__nextword_fast__"
JSON = "application/json"
encode = msgspec.json.Encoder().encode


def lean(fast: FastHandler) -> Callable[[Endpoint], Endpoint]:
    """Give an endpoint a fast handler, tried first by `DirectRoutes`."""

    def attach(endpoint: Endpoint) -> Endpoint:
        setattr(endpoint, _FAST, fast)
        return endpoint

    return attach


class DirectRequest(Request):
    """A request that keeps the body a fast handler read, to replay it to the router."""

    body_read: bytes | None = None

    async def body(self) -> bytes:
        """The whole body (read once)."""
        body = self.body_read = await super().body()
        return body


def route_path(scope: Scope) -> str:
    """The path the routes match: the request's path without the app's `root_path` (as
    Starlette's router takes it)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if not root or not path.startswith(root):
        return path
    if path == root:
        return ""
    return path[len(root) :] if path[len(root)] == "/" else path


class DirectRoutes:
    """The router's middleware: a request for a route whose endpoint has a fast handler is
    answered by it, without the router's matching (`install_direct_routes`)."""

    def __init__(self, app: ASGIApp, router: APIRouter, routes: Iterable[BaseRoute]) -> None:
        self.app = app
        self.router = router
        self.routes = [
            (route, fast, frozenset(route.methods or ()))
            for route in routes
            if isinstance(route, APIRoute) and (fast := getattr(route.endpoint, _FAST, None))
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            method = scope["method"]
            path = route_path(scope)
            for route, fast, methods in self.routes:
                if method in methods and (match := route.path_regex.match(path)) is not None:
                    await self.answer(route, fast, match.groupdict(), scope, receive, send)
                    return
        await self.app(scope, receive, send)

    async def answer(
        self,
        route: APIRoute,
        fast: FastHandler,
        params: dict[str, str],
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        """Answer with the fast handler, or hand the request (its body replayed) to the
        router."""
        convert = route.param_convertors
        # What the router would set (the metrics label requests by `route`).
        scope.setdefault("router", self.router)
        scope["endpoint"] = route.endpoint
        scope["path_params"] = {name: convert[name].convert(v) for name, v in params.items()}
        scope["route"] = route
        request = DirectRequest(scope, receive, send)
        response = await fast(request)
        if response is not None:
            await response(scope, receive, send)
            return
        body = request.body_read
        if body is None:
            await self.app(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def install_direct_routes(router: APIRouter, routes: Iterable[BaseRoute]) -> None:
    """Answer the `routes` (of `router`) that have a fast handler ahead of its matching."""
    router.middleware_stack = DirectRoutes(router.middleware_stack, router, routes)


def json_body(request: Request) -> bool:
    """Whether the request says its body is plain `application/json` (the fast case)."""
    value = request.headers.get("content-type")
    return value is not None and value.partition(";")[0].strip().lower() == JSON


def json_response(answer: dict[str, Any], status_code: int = 200) -> Response:
    """An answer encoded once, as FastAPI would send it (`application/json`)."""
    return Response(encode(answer), status_code=status_code, media_type=JSON)


def body_decoders(
    max_text_chars: int,
) -> tuple[msgspec.json.Decoder[Any], msgspec.json.Decoder[Any]]:
    """Strict decoders of the predict and feed bodies (`service.api.schemas`), `text` at
    most `max_text_chars` characters long."""
    Text = Annotated[str, msgspec.Meta(max_length=max_text_chars)]
    K = Annotated[int, msgspec.Meta(ge=1, le=MAX_K)]  # 20.0 too is 20 to pydantic: slow path
    Name = Annotated[str, msgspec.Meta(max_length=MAX_NAME_CHARS)]
    Prefix = Annotated[str, msgspec.Meta(max_length=MAX_PREFIX_CHARS)]
    common: list[tuple[str, Any, Any]] = [
        ("k", K, 5),
        ("prefix", Optional[Prefix], None),  # noqa: UP045 (built at run time)
        ("adapt", Optional[bool], None),  # noqa: UP045
    ]
    predict = msgspec.defstruct(
        "PredictBody",
        [("text", Text), *common, ("model", Optional[Name], None)],  # noqa: UP045
        forbid_unknown_fields=True,
        gc=False,
    )
    feed = msgspec.defstruct(
        "FeedBody", [("text", Text), *common], forbid_unknown_fields=True, gc=False
    )
    return msgspec.json.Decoder(predict), msgspec.json.Decoder(feed)


async def decoded(request: Request, decoder: msgspec.json.Decoder[Any]) -> Any:
    """The request's body as the decoder's Struct, or None when the fast path does not apply."""
    if not json_body(request):
        return None
    body = await request.body()
    try:
        return decoder.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
        return None
