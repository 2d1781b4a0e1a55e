"""What the routes depend on: the app's `Predictor`, through one-line dependencies."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, cast

from fastapi import Depends
from starlette.requests import HTTPConnection

from service.api.auth import OWNER
from service.api.predictor import OwnedPredictor, Predictor
from service.config import Settings
from service.errors import NotReady

PredictorFactory = Callable[[Settings], Awaitable[Predictor]]


def get_predictor(connection: HTTPConnection) -> Predictor:
    """The app's predictor as the request's API key sees it, for HTTP and WebSocket routes."""
    predictor: Predictor | None = getattr(connection.app.state, "predictor", None)
    if predictor is None:
        raise NotReady("the service is starting or shutting down")
    owner = connection.scope.get(OWNER)
    return cast(Predictor, OwnedPredictor(predictor, owner)) if owner else predictor


PredictorDep = Annotated[Predictor, Depends(get_predictor)]
