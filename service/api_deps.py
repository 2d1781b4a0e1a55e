"""What the routes depend on: the predictor interface and the one-line dependency to get it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Protocol

from fastapi import Depends
from starlette.requests import HTTPConnection

from service.config import Settings
from service.errors import NextwordError


class EngineClient(Protocol):
    """What the API needs from the predictor (`service.predictor.Predictor`)."""

    ready: bool
    default_model: str

    def models(self) -> list[dict[str, Any]]: ...

    async def predict(
        self, text: str, k: int = 5, model: str | None = None, prefix: str | None = None
    ) -> dict[str, Any]: ...

    async def create_session(
        self, text: str = "", k: int = 5, model: str | None = None, prefix: str | None = None
    ) -> dict[str, Any]: ...

    async def feed(
        self, session_id: str, text: str, k: int = 5, prefix: str | None = None
    ) -> dict[str, Any]: ...

    async def reset(
        self, session_id: str, k: int = 5, prefix: str | None = None
    ) -> dict[str, Any]: ...

    async def session_info(self, session_id: str) -> dict[str, Any]: ...

    async def delete_session(self, session_id: str) -> None: ...

    async def check_ready(self) -> None: ...

    async def close(self) -> None: ...


PredictorFactory = Callable[[Settings], Awaitable[EngineClient]]


class NotReady(NextwordError):
    """The predictor is not started yet, or is shutting down."""

    code = "not_ready"
    status = 503


async def start_predictor(settings: Settings) -> EngineClient:
    """Start the real predictor (imported here: tests may run the API on a fake one)."""
    from service.predictor import Predictor

    return await Predictor.start(settings)


def get_predictor(connection: HTTPConnection) -> EngineClient:
    """The app's predictor, for HTTP and WebSocket routes."""
    predictor: EngineClient | None = getattr(connection.app.state, "predictor", None)
    if predictor is None:
        raise NotReady("the service is starting or shutting down")
    return predictor


PredictorDep = Annotated[EngineClient, Depends(get_predictor)]
