"""What the routes depend on: the app's `Predictor`, through one-line dependencies."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends
from starlette.requests import HTTPConnection

from service.api.predictor import Predictor
from service.config import Settings
from service.errors import NotReady

PredictorFactory = Callable[[Settings], Awaitable[Predictor]]


def get_predictor(connection: HTTPConnection) -> Predictor:
    """The app's predictor, for HTTP and WebSocket routes."""
    predictor: Predictor | None = getattr(connection.app.state, "predictor", None)
    if predictor is None:
        raise NotReady("the service is starting or shutting down")
    return predictor


PredictorDep = Annotated[Predictor, Depends(get_predictor)]
