"""Scale-out end to end: service processes on loopback ports sharing one real Redis, then
the same tests on a local Redis Cluster (three primaries, each with a replica).

Replica A runs one worker, replica B two uvicorn workers (`--workers 2`), so a
session also moves between the processes of one replica. Every test builds its own
sessions; the last one stops and restarts Redis (the single node only).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from benchmarks.lib.server import ServerProcess
from tests.api_support import assert_same_predictions
from tests.live_server import LiveServer
from tests.paths import ROOT as REPO_ROOT
from tests.redis_cluster import (
    SINGLE_OR_CLUSTER,
    RedisCluster,
    single_or_cluster,
)
from tests.redis_server import RedisServer, free_port, needs_redis

pytestmark = [needs_redis, pytest.mark.redis, pytest.mark.slow]

ROOT = REPO_ROOT
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


class Replica(LiveServer):
    """`python -m service` on a free loopback port with the Redis session store, started at
    once (several start side by side; `wait_ready` each)."""

    def __init__(
        self, models: Path, redis_url: str, workers: int = 1, env: dict[str, str] | None = None
    ) -> None:
        port = free_port()
        super().__init__(
            models,
            Path(tempfile.gettempdir()) / f"nextword-replica-{port}.log",
            port=port,
            workers=workers,
            NEXTWORD_SESSION_STORE=redis_url,
            NEXTWORD_LOG_LEVEL="warning",
            **(env or {}),
        )
        ServerProcess.start(self)


@pytest.fixture(scope="module", params=SINGLE_OR_CLUSTER)
def redis_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RedisServer | RedisCluster]:
    yield from single_or_cluster(request, tmp_path_factory)


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


def test_a_keys_rate_holds_across_replicas(
    tiny_artifacts: Path, redis_server: RedisServer | RedisCluster
) -> None:
    """One key's requests spread over three API processes (replica A, and B's two workers)
    take one bucket in Redis: its burst, once, not once per process. The rate (one request
    per 1,000 s) refills nothing while the test runs."""
    key = "k" * 20
    env = {
        "NEXTWORD_API_KEYS": f"alice:{key},bob:{'b' * 20}",
        "NEXTWORD_RATE_LIMIT": "0.001",
        "NEXTWORD_RATE_BURST": "6",
    }
    started = [Replica(tiny_artifacts, redis_server.url, workers, env) for workers in (1, 2)]
    try:
        for replica in started:
            replica.wait_ready()
        statuses = []
        for i in range(18):
            r = httpx.post(
                f"{started[i % 2].url}/v1/predict",
                json={"text": "i am"},
                headers={"Authorization": f"Bearer {key}"},
                timeout=30,
            )
            statuses.append(r.status_code)
            if r.status_code == 429:
                assert r.json()["error"]["code"] == "rate_limited"
                assert int(r.headers["Retry-After"]) > 100  # 1/rate away
        assert statuses.count(200) == 6 and statuses.count(429) == 12, statuses
        other = httpx.post(
            f"{started[1].url}/v1/predict",
            json={"text": "i am"},
            headers={"Authorization": f"Bearer {'b' * 20}"},
            timeout=30,
        )
        assert other.status_code == 200  # another key has a bucket of its own
    finally:
        for replica in started:
            replica.stop()


def test_redis_down_gives_503_then_recovers(
    redis_server: RedisServer, replicas: tuple[str, str]
) -> None:
    if isinstance(redis_server, RedisCluster):
        pytest.skip("stops the one Redis; a cluster primary's failover is tested below")
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


async def test_retries_after_a_frozen_redis_never_apply_a_word_twice(
    tiny_artifacts: Path, tmp_path: Path
) -> None:
    """Streams that resend a message (same `id`) until it is answered; Redis frozen
    (SIGSTOP) meanwhile: a write sent before the freeze is applied when Redis resumes, and
    its retry must be recognised. No session may hold more words than it acknowledged."""
    redis = RedisServer()
    redis.start()
    live = LiveServer(
        tiny_artifacts,
        tmp_path / "server.log",
        NEXTWORD_SESSION_STORE=redis.url,
        NEXTWORD_SESSION_STORE_TIMEOUT_S="0.3",
    )
    try:
        live.start()
        uri = f"ws://127.0.0.1:{live.port}/v1/stream"
        acked: dict[str, int] = {}
        errors: dict[str, int] = {}
        frozen = asyncio.Event()
        thawed = asyncio.Event()

        async def stream(words: int) -> None:
            async with websockets.connect(uri) as ws:
                sid = json.loads(await ws.recv())["session_id"]
                acked[sid] = 0
                for i in range(words):
                    if i == words // 3:
                        await frozen.wait()  # every stream types across the freeze
                    message = json.dumps({"text": WORDS[i % len(WORDS)], "id": i})
                    while True:  # resent, same id, until answered
                        await ws.send(message)
                        answer = json.loads(await ws.recv())
                        if answer["type"] == "predictions":
                            assert answer["id"] == i
                            acked[sid] = answer["tokens"]
                            break
                        code = answer["error"]["code"]
                        errors[code] = errors.get(code, 0) + 1
                        await asyncio.sleep(0.05)

        streams = asyncio.gather(*(stream(30) for _ in range(8)))
        await asyncio.sleep(1.0)
        assert redis.proc is not None
        os.kill(redis.proc.pid, signal.SIGSTOP)
        frozen.set()
        await asyncio.sleep(2.0)
        os.kill(redis.proc.pid, signal.SIGCONT)
        thawed.set()
        await asyncio.wait_for(streams, 240)
        assert errors, "the freeze failed no step: the test tested nothing"
        async with httpx.AsyncClient(base_url=live.url, timeout=30) as http:
            for sid, words in acked.items():
                stored = (await http.get(f"/v1/sessions/{sid}")).json()["tokens"]
                assert stored == words == 30, (sid, stored, words, errors)
    finally:
        if redis.proc is not None and redis.proc.poll() is None:
            os.kill(redis.proc.pid, signal.SIGCONT)
        live.stop()
        redis.stop()


def test_a_cluster_primarys_failover_costs_at_most_the_step_in_flight(
    redis_server: RedisServer | RedisCluster, replicas: tuple[str, str]
) -> None:
    """SIGKILL of the primary that holds a session, fed word by word through both replicas:
    refused steps are retryable 503s, and every word is applied once; at most the last
    acknowledged one is lost, if the replica had not received it (asynchronous replication)."""
    if not isinstance(redis_server, RedisCluster):
        pytest.skip("a Redis Cluster's failover")
    a, b = replicas
    words = TEXT.split()
    sid = post(a, "/v1/sessions", {"text": words[0]}, 201)["session_id"]
    primary = redis_server.primary_of(f"nextword:session:{{{sid}}}")
    replica = redis_server.replica_of(primary)
    refused = 0
    try:
        for i, word in enumerate(words[1:], start=1):
            if i == len(words) // 2:
                primary.kill()
            while True:
                r = httpx.post(  # resent with its key: a write whose outcome was unknown
                    f"{b if i % 2 else a}/v1/sessions/{sid}/feed",  # is recognised
                    json={"text": word},
                    headers={"Idempotency-Key": f"word-{i}"},
                    timeout=30,
                )
                if r.status_code != 503:
                    break
                assert r.json()["error"]["code"] in (
                    "store_unavailable",
                    "outcome_unknown",
                    "engine_restarting",
                )
                assert "Retry-After" in r.headers
                refused += 1
                time.sleep(0.2)
            assert r.status_code == 200, r.text
        assert replica.role() == "master"
    finally:
        if primary.proc is None:
            primary.start()  # back as the new primary's replica
            redis_server.wait_healthy()
    tokens = httpx.get(f"{a}/v1/sessions/{sid}", timeout=10).json()["tokens"]
    assert tokens in (len(words) - 1, len(words))
    assert refused > 0  # the slot was down until the replica took over
