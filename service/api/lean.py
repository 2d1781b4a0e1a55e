"""The hot case of a REST route without FastAPI's request and response models.

FastAPI spends most of a small request's time outside the route: `json.loads`, a pydantic
model built and validated from the dict, the answer validated against `response_model` and
encoded again. For `POST /v1/predict` and `POST /v1/sessions/{id}/feed` a route of class
`LeanRoute` first tries a fast handler (`lean(...)` attaches it to the endpoint): the body
decoded by msgspec straight into a strict Struct with the same types and limits as the
pydantic body, the predictor called, its answer encoded once by msgspec.

Whatever the fast handler does not accept exactly (another content type, a body msgspec
refuses, a path parameter or header over its limit) it hands back (`None`), and the route
runs FastAPI's own handler on the same request (its body is cached): every refusal is
FastAPI's and pydantic's, exactly as the OpenAPI document describes it. msgspec's strict
decoding accepts a subset of what the pydantic bodies accept (strict types, unknown fields
refused) and decodes it to the same values, so the two paths answer alike where both can.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from typing import Annotated, Any, Optional, TypeVar

import msgspec
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

from service.contract.limits import MAX_K, MAX_NAME_CHARS, MAX_PREFIX_CHARS

FastHandler = Callable[[Request], Awaitable[Response | None]]
Endpoint = TypeVar("Endpoint", bound=Callable[..., Any])

_FAST = "__nextword_fast__"
JSON = "application/json"
encode = msgspec.json.Encoder().encode


def lean(fast: FastHandler) -> Callable[[Endpoint], Endpoint]:
    """Give an endpoint a fast handler, tried first when its route is a `LeanRoute`."""

    def attach(endpoint: Endpoint) -> Endpoint:
        setattr(endpoint, _FAST, fast)
        return endpoint

    return attach


class LeanRoute(APIRoute):
    """A FastAPI route that tries its endpoint's fast handler before FastAPI's own."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        full = super().get_route_handler()
        fast: FastHandler | None = getattr(self.endpoint, _FAST, None)
        if fast is None:
            return full

        async def handler(request: Request) -> Response:
            response = await fast(request)
            return await full(request) if response is None else response

        return handler


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
