"""The baseline of the end-to-end benchmark: a bare WebSocket app with /v1/stream's framing.

Same framework (FastAPI on uvicorn) and same messages as the service, and no model:
on connect it sends a `ready` message; each client message is parsed as JSON and
answered with a fixed five-prediction `predictions` message (the `id` echoed). What
the service adds on top of this (validation, the batcher, the model, the store) is
what `benchmarks.bench_e2e` measures as "ours / bare". Run it with as many processes as
the service has API processes (uvicorn shares one listening socket among them, as
`nextword serve` does):

    uvicorn benchmarks.bare_ws_app:app --port 8001 --workers 2

It is also the REST baseline of `benchmarks.bench_rest`: `POST /v1/predict` is a plain
FastAPI JSON endpoint (a pydantic body, a dict answer through a response model) that
answers the same five predictions.

`GET /readyz` answers 200 once a process serves; with `BARE_WS_READY_DIR` set, each process
also writes a file named by its pid there at start, so that a harness can wait for all.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from pydantic import BaseModel, Field

PREDICTIONS = [
    {"word": "the", "probability": 0.0521},
    {"word": "to", "probability": 0.0312},
    {"word": "a", "probability": 0.0287},
    {"word": "and", "probability": 0.0203},
    {"word": "of", "probability": 0.0158},
]


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Mark this process as serving (see the module docstring)."""
    ready_dir = os.environ.get("BARE_WS_READY_DIR")
    if ready_dir:
        (Path(ready_dir) / str(os.getpid())).touch()
    yield


app = FastAPI(title="bare WebSocket baseline", lifespan=lifespan)


@app.get("/readyz")
async def readyz() -> dict[str, str]:
    """200 while this process serves."""
    return {"status": "ready"}


class PredictBody(BaseModel):
    """What the service's predict takes (in short)."""

    text: str = Field(max_length=10_000)
    k: int = Field(5, ge=1, le=50)
    model: str | None = None
    prefix: str | None = None


class Prediction(BaseModel):
    """One word and its probability."""

    word: str
    probability: float


class PredictAnswer(BaseModel):
    """What the service's predict answers."""

    model: str
    tokens: int
    predictions: list[Prediction]


@app.post("/v1/predict", response_model=PredictAnswer)
async def predict(body: PredictBody) -> dict[str, object]:
    """The same five predictions for any text: the cost of FastAPI's JSON endpoint alone."""
    return {"model": "bare", "tokens": len(body.text.split()), "predictions": PREDICTIONS}


def dumps(payload: dict[str, object]) -> str:
    """JSON as the service writes it."""
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


@app.websocket("/v1/stream")
async def stream(websocket: WebSocket) -> None:
    """Answer every message with the same five predictions."""
    await websocket.accept()
    session_id = secrets.token_urlsafe(16)
    tokens = 0
    await websocket.send_text(
        dumps(
            {
                "type": "ready",
                "session_id": session_id,
                "model": "bare",
                "tokens": tokens,
                "predictions": PREDICTIONS,
            }
        )
    )
    try:
        while True:
            message = json.loads(await websocket.receive_text())
            tokens += 1
            await websocket.send_text(
                dumps(
                    {
                        "type": "predictions",
                        "session_id": session_id,
                        "tokens": tokens,
                        "predictions": PREDICTIONS,
                        "id": message.get("id"),
                    }
                )
            )
    except WebSocketDisconnect:
        pass
