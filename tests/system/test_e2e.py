"""End to end: `python -m service` on a loopback port, driven by httpx and `websockets`."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.api_support import TEXTS, assert_same_predictions
from tests.live_server import LiveServer
from tests.paths import ROOT as REPO_ROOT

ROOT = REPO_ROOT
START_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def server(tiny_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real server over the tiny models; stopped with SIGTERM (graceful) at the end."""
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    live = LiveServer(tiny_artifacts, log_path).start(START_TIMEOUT_S)
    try:
        yield f"127.0.0.1:{live.port}"
    finally:
        status = live.stop(30)
    output = log_path.read_text()
    # uvicorn re-raises the signal after a graceful shutdown: the exit status is -SIGTERM.
    assert status in (0, -signal.SIGTERM), output
    assert "predictor closed" in output and "Application shutdown complete" in output, output
    assert "Traceback" not in output, output


def test_rest(server: str) -> None:
    with httpx.Client(base_url=f"http://{server}", timeout=10) as http:
        assert http.get("/healthz").json() == {"status": "ok"}
        assert http.get("/v1/models").json()["default"] == "lstm"
        whole = http.post("/v1/predict", json={"text": TEXTS[0]}).json()
        r = http.post("/v1/sessions", json={"text": " ".join(TEXTS[0].split()[:2])})
        assert r.status_code == 201
        sid = r.json()["session_id"]
        fed = http.post(
            f"/v1/sessions/{sid}/feed", json={"text": " ".join(TEXTS[0].split()[2:])}
        ).json()
        assert fed["tokens"] == whole["tokens"]
        assert_same_predictions(fed["predictions"], whole["predictions"])
        assert http.get(f"/v1/sessions/{sid}").json()["tokens"] == whole["tokens"]
        assert http.delete(f"/v1/sessions/{sid}").status_code == 204
        assert http.get(f"/v1/sessions/{sid}").status_code == 404
        r = http.post(
            "/v1/predict", content=b"not json", headers={"content-type": "application/json"}
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_input"
        r = http.post("/v1/predict", json={"text": "x" * 2_000_000})
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
        metrics = http.get("/metrics").text
        assert (
            'nextword_http_requests_total{method="POST",route="/v1/predict",status="200"}'
            in metrics
        )


async def predict(http: httpx.AsyncClient, text: str, model: str = "lstm") -> dict[str, Any]:
    r = await http.post("/v1/predict", json={"text": text, "model": model})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def receive(ws: Any) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 10))
    return message


async def test_stream_word_by_word(server: str) -> None:
    words = TEXTS[2].split()
    async with (
        httpx.AsyncClient(base_url=f"http://{server}", timeout=10) as http,
        connect(f"ws://{server}/v1/stream?model=gru") as ws,
    ):
        ready = await receive(ws)
        assert ready["type"] == "ready" and ready["model"] == "gru"
        for n, word in enumerate(words):
            await ws.send(json.dumps({"text": word, "id": n}))
            answer = await receive(ws)
            whole = await predict(http, " ".join(words[: n + 1]), "gru")
            assert answer["id"] == n and answer["tokens"] == whole["tokens"]
            assert_same_predictions(answer["predictions"], whole["predictions"])


async def test_stream_bad_frames_in_band_then_oversize_closes_1009(server: str) -> None:
    async with connect(f"ws://{server}/v1/stream", max_size=None) as ws:
        sid = (await receive(ws))["session_id"]
        await ws.send("not json")
        assert (await receive(ws))["error"]["code"] == "bad_input"
        await ws.send(b"\x00\x01binary")
        assert (await receive(ws))["error"]["code"] == "bad_input"
        await ws.send(json.dumps({"text": "i am", "k": 1000, "id": "k"}))
        error = await receive(ws)
        assert error["type"] == "error" and error["id"] == "k"
        await ws.send(json.dumps({"text": "i am", "id": "ok"}))
        assert (await receive(ws))["tokens"] == 2
        # Past the 64 KiB frame limit, yet small enough to be sent whole before the server
        # closes (a 2 MB frame could still be in flight then: a reset, not a close frame).
        await ws.send(json.dumps({"text": "x" * 100_000}))
        with pytest.raises(ConnectionClosed) as closed:
            while True:  # an error message may come first, then the close
                await receive(ws)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    async with connect(f"ws://{server}/v1/stream?session_id={sid}") as ws:
        assert (await receive(ws))["tokens"] == 2  # the session survived


async def test_stream_unknown_session_gets_an_error_then_4404(server: str) -> None:
    async with connect(f"ws://{server}/v1/stream?session_id=nope") as ws:
        error = await receive(ws)
        assert error["type"] == "error" and error["error"]["code"] == "unknown_session"
        with pytest.raises(ConnectionClosed) as closed:
            await receive(ws)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4404


async def test_64_concurrent_streams_equal_each_alone(server: str) -> None:
    """64 sessions streaming at once (batched together) == each text predicted alone."""
    jobs = [
        ("lstm" if i % 2 else "gru", TEXTS[i % len(TEXTS)].split()[: 2 + i % 6]) for i in range(64)
    ]

    async def stream(model: str, words: list[str]) -> list[dict[str, Any]]:
        async with connect(f"ws://{server}/v1/stream?model={model}") as ws:
            await receive(ws)
            for n, word in enumerate(words):  # pipelined: all sent, then all read
                await ws.send(json.dumps({"text": word, "id": n}))
            return [await receive(ws) for _ in words]

    results = await asyncio.gather(*(stream(model, words) for model, words in jobs))
    async with httpx.AsyncClient(base_url=f"http://{server}", timeout=10) as http:
        for (model, words), answers in zip(jobs, results):
            assert [a["id"] for a in answers] == list(range(len(words)))
            for n, answer in enumerate(answers):
                alone = await predict(http, " ".join(words[: n + 1]), model)
                assert answer["tokens"] == alone["tokens"]
                assert_same_predictions(answer["predictions"], alone["predictions"])
