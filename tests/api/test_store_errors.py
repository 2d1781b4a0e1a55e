"""The session store failing (down, full, contended): what the API answers.

Stateless `/v1/predict` never depends on the session store; error bodies never name an
internal address; contention past the retries is a 503 `contended` with Retry-After.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from service.api.errors import close_code
from service.contract.artifact import ModelArtifact
from service.engine.runtime import OrtModel
from service.engine.scheduler import Step, StepBatcher
from service.errors import Contended, StepFailed, StoreUnavailable, error_from_code
from service.store import MemorySessionStore, SessionRecord
from tests.live_server import LiveServer
from tests.redis_server import RedisServer, free_port, needs_redis, running_redis

CPU = ["CPUExecutionProvider"]
# What an error body must never hold: an address, a port, a URL of an internal service.
ADDRESS = re.compile(r"\d+\.\d+\.\d+\.\d+|localhost|redis://|:\d{2,5}\b|\.sock\b|ipc://")


def engine_store(client: TestClient) -> Any:
    """The session store of the engine running inside the test app."""
    return client.app.state.predictor.engine.core.store  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("no redis-server binary")
    yield from running_redis()


@needs_redis
@pytest.mark.redis
@pytest.mark.slow
async def test_predict_is_served_while_the_session_store_is_down(
    tiny_artifacts: Path, tmp_path: Path, redis_server: RedisServer
) -> None:
    """A real service on Redis; Redis stops; predictions sharing batches with session steps."""
    server = LiveServer(
        tiny_artifacts,
        tmp_path / "server.log",
        NEXTWORD_SESSION_STORE=redis_server.url,
        NEXTWORD_LOG_LEVEL="warning",
    ).start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            created = await http.post("/v1/sessions", json={"text": "i am"})
            assert created.status_code == 201, created.text
            sid = created.json()["session_id"]

            # Hung (SIGSTOP: connections open, no answer): predictions are not held up.
            assert redis_server.proc is not None
            redis_server.proc.send_signal(signal.SIGSTOP)
            try:
                feeds = [
                    asyncio.ensure_future(
                        http.post(f"/v1/sessions/{sid}/feed", json={"text": "coming"})
                    )
                    for _ in range(2)
                ]
                await asyncio.sleep(0.1)  # the feeds' batch is waiting on Redis
                predicts = await asyncio.gather(
                    *(http.post("/v1/predict", json={"text": f"the dog {i}"}) for i in range(16))
                )
                assert all(r.status_code == 200 for r in predicts)
                # Answered while the session steps still wait on the hung Redis.
                assert not any(f.done() for f in feeds)
            finally:
                redis_server.proc.send_signal(signal.SIGCONT)
            fed = await asyncio.gather(*feeds)
            assert [r.status_code for r in fed] == [200, 200], [r.text for r in fed]
            assert sorted(r.json()["tokens"] for r in fed) == [3, 4]

            # Stopped (connections refused).
            redis_server.stop()

            def session_calls() -> list[Any]:
                return [
                    http.post(f"/v1/sessions/{sid}/feed", json={"text": "coming"}),
                    http.post("/v1/sessions", json={"text": "hello"}),
                    http.get(f"/v1/sessions/{sid}"),
                    http.delete(f"/v1/sessions/{sid}"),
                ]

            for _ in range(3):  # rounds of concurrent requests: they share the engine's batches
                predicts = [
                    http.post("/v1/predict", json={"text": f"the cat and the dog {i}"})
                    for i in range(16)
                ]
                answers = await asyncio.gather(*predicts, *session_calls(), *session_calls())
                for answer in answers[:16]:
                    assert answer.status_code == 200, answer.text
                    assert answer.json()["predictions"]
                for answer in answers[16:]:
                    assert answer.status_code == 503, answer.text
                    assert answer.headers["retry-after"] == "1"
                    error = answer.json()["error"]
                    assert error["code"] == "store_unavailable", error
                    assert not ADDRESS.search(error["message"]), error
            ready = await http.get("/readyz")
            assert ready.status_code == 503
            assert not ADDRESS.search(ready.text), ready.text
        # The operator finds the address in the log instead.
        assert f"127.0.0.1:{redis_server.port}" in server.log()
    finally:
        server.stop()
        if redis_server.proc is None:
            redis_server.start()


@needs_redis
@pytest.mark.redis
async def test_store_errors_name_no_address_and_log_it_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from service.store.redis import RedisSessionStore

    port = free_port()  # nothing listens there
    store = RedisSessionStore.from_url(f"redis://127.0.0.1:{port}/3", timeout_s=0.5)
    try:
        caplog.set_level(logging.DEBUG, logger="service.store.redis")
        for call in (store.ping(), store.get_many(["a"]), store.get("a"), store.count()):
            with pytest.raises(StoreUnavailable) as raised:
                await call
            assert "Redis" in raised.value.message and "unreachable" in raised.value.message
            assert not ADDRESS.search(raised.value.message), raised.value.message
            assert str(port) not in str(raised.value)
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1, warnings  # once per outage, then at debug
        assert f"127.0.0.1:{port}/3" in warnings[0].getMessage()
    finally:
        await store.close()


@needs_redis
@pytest.mark.redis
async def test_a_full_store_names_no_address(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    from service.store.redis import RedisSessionStore

    store = RedisSessionStore.from_url(redis_server.url, timeout_s=1.0)
    now = 0.0
    record = SessionRecord(
        "full", "lstm", tuple(np.zeros((1, 8), np.float32) for _ in range(4)), 1, now, now
    )
    try:
        await store._redis.config_set("maxmemory-policy", "noeviction")
        await store._redis.config_set("maxmemory", "1")  # every write is refused: OOM
        with pytest.raises(StoreUnavailable) as raised:
            await store.put_many([record], [None])
        assert "full" in raised.value.message and not ADDRESS.search(raised.value.message)
        assert str(redis_server.port) in caplog.text  # logged for the operator
    finally:
        await store._redis.config_set("maxmemory", "0")
        await store.close()


class ConflictingStore(MemorySessionStore):
    """Another writer always wins: every compare-and-set write of an existing session loses."""

    async def put_many(
        self, records: list[SessionRecord], expected: list[int | None]
    ) -> list[bool]:
        new = [r for r, version in zip(records, expected) if version is None]
        written = iter(await super().put_many(new, [None] * len(new)) if new else [])
        return [next(written) if version is None else False for version in expected]


async def test_contention_past_the_retries_is_contended_not_a_run_failure(
    tiny_artifacts: Path,
) -> None:
    model = OrtModel(ModelArtifact.load(tiny_artifacts / "gru"), CPU)
    batcher = StepBatcher(model, ConflictingStore(), max_retries=3, max_wait_ms=0)
    await batcher.start()
    try:
        await batcher.step(Step([4], session_id="s", create=True))
        with pytest.raises(Contended) as raised:
            await batcher.step(Step([5], session_id="s"))
        error = raised.value
        assert isinstance(error, StepFailed)  # still a failed step: nothing was applied
        assert (error.code, error.status) == ("contended", 503)
        assert (await batcher.step(Step([6]))).tokens == 1  # stateless steps unaffected
    finally:
        await batcher.stop()


def test_contended_crosses_the_engine_boundary_and_maps_to_retry_later() -> None:
    error = error_from_code("contended", "the session kept changing")
    assert isinstance(error, Contended) and isinstance(error, StepFailed)
    assert close_code(error) == 1013  # try again later, as every other 503
    assert close_code(StepFailed("x")) == 1011


def test_contended_feed_is_a_503_with_retry_after(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    sid = client.post("/v1/sessions", json={"text": "i am"}).json()["session_id"]
    store = engine_store(client)

    async def always_lose(records: list[SessionRecord], expected: list[int | None]) -> list[bool]:
        return [False] * len(records)

    monkeypatch.setattr(store, "put_many", always_lose)
    r = client.post(f"/v1/sessions/{sid}/feed", json={"text": "coming"})
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "contended"
    assert client.post("/v1/predict", json={"text": "i am"}).status_code == 200
    monkeypatch.undo()
    info = client.get(f"/v1/sessions/{sid}").json()
    assert info["tokens"] == 2  # the contended step was not applied


def test_contended_message_on_the_websocket_keeps_the_connection(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = engine_store(client)
    with client.websocket_connect("/v1/stream") as ws:
        ready = ws.receive_json()
        assert ready["type"] == "ready"

        async def always_lose(
            records: list[SessionRecord], expected: list[int | None]
        ) -> list[bool]:
            return [False] * len(records)

        monkeypatch.setattr(store, "put_many", always_lose)
        ws.send_json({"text": "i am", "id": 1})
        answer = ws.receive_json()
        assert answer["type"] == "error" and answer["id"] == 1
        assert answer["error"]["code"] == "contended"
        monkeypatch.undo()
        ws.send_json({"text": "i am", "id": 2})
        answer = ws.receive_json()
        assert answer["type"] == "predictions" and answer["tokens"] == 2


def test_contended_on_connect_closes_with_try_again_later(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    sid = client.post("/v1/sessions", json={"text": "i am"}).json()["session_id"]

    async def always_lose(records: list[SessionRecord], expected: list[int | None]) -> list[bool]:
        return [False] * len(records)

    monkeypatch.setattr(engine_store(client), "put_many", always_lose)
    with client.websocket_connect(f"/v1/stream?session_id={sid}") as ws:
        answer = ws.receive_json()
        assert answer["type"] == "error" and answer["error"]["code"] == "contended"
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
        assert closed.value.code == 1013
