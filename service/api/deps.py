"""What the routes depend on: the app's `Predictor`, through one-line dependencies."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, cast

from fastapi import Depends
from starlette.requests import HTTPConnection

from service.api.auth import OWNER, client_address
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
    if owner:
        return cast(Predictor, OwnedPredictor(predictor, owner))
    # An open service: queue shares (and session quotas, when set) per client address.
    address = f"addr:{client_address(connection.scope)}"
    quota = address if predictor.settings.max_sessions_per_key > 0 else ""
    return cast(Predictor, OwnedPredictor(predictor, "", quota, client=address))


PredictorDep = Annotated[Predictor, Depends(get_predictor)]
