"""Scale-out end to end: service processes on loopback ports sharing one real Redis.

Replica A runs one worker, replica B two uvicorn workers (`--workers 2`), so a
session also moves between the processes of one replica. Every test builds its own
sessions; the last one stops and restarts Redis.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from tests.api_support import assert_same_predictions
from tests.redis_server import RedisServer, free_port, needs_redis, running_redis

pytestmark = [needs_redis, pytest.mark.redis, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
TEXT = "the cat and the dog went home . they were very good and i think we should go now"
# One token each: the words of concurrent feeds (their order is decided by the race).
WORDS = [
    "cat",
    "dog",
    "house",
    "car",
    "tree",
    "water",
    "food",
    "love",
    "home",
    "time",
    "day",
    "night",
    "year",
    "world",
]


class Replica:
    """`python -m service` on a free loopback port, with the Redis session store."""

    def __init__(self, models: Path, redis_url: str, workers: int = 1) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "NEXTWORD_HOST": "127.0.0.1",
            "NEXTWORD_PORT": str(self.port),
            "NEXTWORD_MODELS_DIR": str(models),
            "NEXTWORD_SESSION_STORE": redis_url,
            "NEXTWORD_WORKERS": str(workers),
            "NEXTWORD_PROVIDERS": "CPUExecutionProvider",
            "NEXTWORD_INTRA_OP_THREADS": "1",
            "NEXTWORD_LOG_LEVEL": "warning",
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service"], cwd=ROOT, env=env, start_new_session=True
        )

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"replica on port {self.port} exited with {self.proc.returncode}"
                )
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"replica on port {self.port} not ready after {timeout} s")

    def kill(self) -> None:
        """SIGKILL the whole process group (uvicorn's workers too): no shutdown at all."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    yield from running_redis()


@pytest.fixture(scope="module")
def replicas(tiny_artifacts: Path, redis_server: RedisServer) -> Iterator[tuple[str, str]]:
    """The URLs of replica A (one worker) and replica B (two workers)."""
    started = [Replica(tiny_artifacts, redis_server.url, workers) for workers in (1, 2)]
    try:
        for replica in started:
            replica.wait_ready()
        yield started[0].url, started[1].url
    finally:
        for replica in started:
            replica.stop()


def post(url: str, path: str, body: dict[str, Any], status: int = 200) -> dict[str, Any]:
    r = httpx.post(url + path, json=body, timeout=30)
    assert r.status_code == status, r.text
    return r.json()


def reference(url: str, text: str, k: int = 5) -> dict[str, Any]:
    """The single-process answer: POST /v1/predict on the whole text."""
    return post(url, "/v1/predict", {"text": text, "k": k})


def test_session_fed_alternately_on_two_replicas(replicas: tuple[str, str]) -> None:
    a, b = replicas
    words = TEXT.split()
    session = post(a, "/v1/sessions", {"text": words[0], "k": 8}, 201)
    sid = session["session_id"]
    for i, word in enumerate(words[1:], start=1):
        url = b if i % 2 else a
        got = post(url, f"/v1/sessions/{sid}/feed", {"text": word, "k": 8})
        want = reference(a, " ".join(words[: i + 1]), k=8)
        assert got["tokens"] == want["tokens"] == i + 1
        assert_same_predictions(got["predictions"], want["predictions"])
    info = httpx.get(f"{b}/v1/sessions/{sid}", timeout=10).json()
    assert info["tokens"] == len(words)
    # A prefix-only request (no new word) on the other replica: same as the reference.
    got = post(a, f"/v1/sessions/{sid}/feed", {"text": "", "k": 8, "prefix": "h"})
    want = post(b, "/v1/predict", {"text": TEXT, "k": 8, "prefix": "h"})
    assert_same_predictions(got["predictions"], want["predictions"])
    assert httpx.delete(f"{b}/v1/sessions/{sid}", timeout=10).status_code == 204
    assert httpx.get(f"{a}/v1/sessions/{sid}", timeout=10).status_code == 404


def test_the_writers_words_travel_between_replicas(replicas: tuple[str, str]) -> None:
    a, b = replicas
    # Long enough for the memory to mix; the name a few words back (never an echo).
    text = (
        "hello Zorblax , i am here . Zorblax went home . then Zorblax came to see the house "
        "and the garden , and it was a good day for me . then"
    )
    sid = post(a, "/v1/sessions", {"text": text, "k": 10}, 201)["session_id"]
    more = "Zorblax came home and said"
    got = post(b, f"/v1/sessions/{sid}/feed", {"text": more, "k": 10})
    want = reference(a, text + " " + more, k=10)
    assert "Zorblax" in [p["word"] for p in got["predictions"]]
    assert_same_predictions(got["predictions"], want["predictions"])
    assert httpx.delete(f"{a}/v1/sessions/{sid}/memory", timeout=10).status_code == 204
    info = httpx.get(f"{b}/v1/sessions/{sid}", timeout=10).json()
    assert info["memory"]["words"] == 0


async def test_replica_killed_mid_stream_loses_nothing(
    tiny_artifacts: Path, redis_server: RedisServer, replicas: tuple[str, str]
) -> None:
    """A stream on a replica that dies (SIGKILL) continues on another with every word."""
    _, b = replicas
    victim = Replica(tiny_artifacts, redis_server.url)
    try:
        victim.wait_ready()
        words = TEXT.split()
        half = len(words) // 2
        ws_url = victim.url.replace("http", "ws") + "/v1/stream"
        async with websockets.connect(ws_url) as ws:
            ready = json.loads(await ws.recv())
            sid = ready["session_id"]
            for word in words[:half]:
                await ws.send(json.dumps({"text": word}))
                answer = json.loads(await ws.recv())
                assert answer["type"] == "predictions", answer
            # One more word in flight when the replica dies: applied whole or not at all.
            await ws.send(json.dumps({"text": words[half]}))
            victim.kill()
            with pytest.raises(websockets.ConnectionClosed):
                await ws.recv()
    finally:
        victim.kill()
    info = httpx.get(f"{b}/v1/sessions/{sid}", timeout=10).json()
    assert info["tokens"] in (half, half + 1)
    done = info["tokens"]
    async with websockets.connect(f"{b.replace('http', 'ws')}/v1/stream?session_id={sid}") as ws:
        ready = json.loads(await ws.recv())
        assert ready["type"] == "ready" and ready["tokens"] == done
        for word in words[done:]:
            await ws.send(json.dumps({"text": word}))
            answer = json.loads(await ws.recv())
    assert answer["tokens"] == len(words)
    assert_same_predictions(answer["predictions"], reference(b, TEXT)["predictions"])


async def test_concurrent_feeds_through_both_replicas_lose_no_update(
    replicas: tuple[str, str],
) -> None:
    """Feeds of one session racing through A and B: each applied exactly once, in some order."""
    a, b = replicas
    sid = post(a, "/v1/sessions", {"text": ""}, 201)["session_id"]
    words = WORDS * 2  # 28 feeds, 14 through each replica
    async with httpx.AsyncClient(timeout=60) as client:

        async def feed(i: int, word: str) -> httpx.Response:
            url = a if i % 2 else b
            return await client.post(f"{url}/v1/sessions/{sid}/feed", json={"text": word, "k": 5})

        responses = await asyncio.gather(*(feed(i, w) for i, w in enumerate(words)))
    assert [r.status_code for r in responses] == [200] * len(words), [r.text for r in responses]
    answers = [r.json() for r in responses]
    reached = sorted(answer["tokens"] for answer in answers)
    assert reached == list(range(1, len(words) + 1))  # distinct: each applied once
    final = httpx.get(f"{a}/v1/sessions/{sid}", timeout=10).json()
    assert final["tokens"] == len(words)
    # The order the store serialised them in: each answer is the reference of its prefix.
    order = [word for _, word in sorted(zip((x["tokens"] for x in answers), words))]
    for answer in answers:
        want = reference(b, " ".join(order[: answer["tokens"]]))
        assert_same_predictions(answer["predictions"], want["predictions"])


def test_redis_down_gives_503_then_recovers(
    redis_server: RedisServer, replicas: tuple[str, str]
) -> None:
    a, b = replicas
    sid = post(a, "/v1/sessions", {"text": "i am"}, 201)["session_id"]
    redis_server.stop()
    try:
        for url in (a, b):
            ready = httpx.get(f"{url}/readyz", timeout=10)
            assert ready.status_code == 503
            for r in (
                httpx.post(f"{url}/v1/sessions", json={"text": "hello"}, timeout=10),
                httpx.post(f"{url}/v1/sessions/{sid}/feed", json={"text": "home"}, timeout=10),
                httpx.get(f"{url}/v1/sessions/{sid}", timeout=10),
            ):
                assert r.status_code == 503, r.text
                assert r.headers["content-type"].startswith("application/json")
                error = r.json()["error"]
                assert error["code"] == "store_unavailable" and "Redis" in error["message"]
            # Stateless predictions need no store.
            assert httpx.post(f"{url}/v1/predict", json={"text": "i am"}, timeout=10).is_success
    finally:
        redis_server.start()  # same port, empty: no persistence in the tests
    for url in (a, b):
        deadline = time.monotonic() + 15
        while httpx.get(f"{url}/readyz", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "no recovery after Redis came back"
            time.sleep(0.1)
        session = post(url, "/v1/sessions", {"text": "i am"}, 201)
        fed = post(url, f"/v1/sessions/{session['session_id']}/feed", {"text": "coming home"})
        assert fed["tokens"] == 4
        assert_same_predictions(
            fed["predictions"], reference(url, "i am coming home")["predictions"]
        )
    # The old session went with the old Redis (no persistence): a clean 404.
    assert httpx.get(f"{a}/v1/sessions/{sid}", timeout=10).status_code == 404
