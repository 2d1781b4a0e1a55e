"""`nextword serve` as a whole: the engine and API processes, supervised (service/supervisor.py)."""

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

import httpx
import psutil
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from benchmarks.bench_restart import crash_under_load, single_token_words
from service.client import Client
from service.supervisor import describe_exit, restart_delay
from tests.paths import ROOT as REPO_ROOT
from tests.redis_server import RedisServer, free_port, needs_redis, running_redis

pytestmark = pytest.mark.slow

ROOT = REPO_ROOT


class Service:
    """`python -m service` with its own process group, logging to a file."""

    def __init__(self, models: Path, log_path: Path, workers: int = 2, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        environment = {
            **os.environ,
            "NEXTWORD_MODELS_DIR": str(models),
            "NEXTWORD_PROVIDERS": "CPUExecutionProvider",
            "NEXTWORD_INTRA_OP_THREADS": "1",
            "NEXTWORD_WORKERS": str(workers),
            **env,
        }
        with log_path.open("w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "service", "--port", str(self.port)],
                cwd=ROOT,
                env=environment,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"service exited:\n{self.log()}"
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        pytest.fail(f"not ready after {timeout} s:\n{self.log()}")

    def children(self) -> dict[str, list[psutil.Process]]:
        """The engine and API processes, by role."""
        roles: dict[str, list[psutil.Process]] = {"engine": [], "api": []}
        for child in psutil.Process(self.proc.pid).children():
            if "resource_tracker" in " ".join(child.cmdline()):
                continue  # multiprocessing's helper, not ours
            # Spawned children name their target in the pipe handshake only: tell them
            # apart by who listens on the port.
            listening = any(c.laddr and c.laddr.port == self.port for c in child.net_connections())
            roles["api" if listening else "engine"].append(child)
        return roles

    def stop(self, timeout: float = 40.0) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the whole group, as a terminal would
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                pytest.fail(f"did not stop on SIGTERM:\n{self.log()}")
        return self.proc.returncode


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    yield from running_redis()


@pytest.fixture
def service(tiny_artifacts: Path, tmp_path: Path) -> Iterator[Service]:
    service = Service(tiny_artifacts, tmp_path / "serve.log")
    try:
        service.wait_ready()
        yield service
    finally:
        service.stop()


def test_two_api_processes_one_engine_and_one_metrics_view(service: Service) -> None:
    roles = service.children()
    assert len(roles["engine"]) == 1 and len(roles["api"]) == 2, roles
    session = httpx.post(f"{service.url}/v1/sessions", json={"text": "i am"}).json()
    sid = session["session_id"]
    for n in range(20):  # a new connection each time: both API processes serve the session
        r = httpx.post(f"{service.url}/v1/sessions/{sid}/feed", json={"text": "coming"})
        assert r.status_code == 200 and r.json()["tokens"] == 3 + n, r.text
    served = [p for p in roles["api"] if p.cpu_times().user > 0]
    assert len(served) == 2
    metrics = httpx.get(f"{service.url}/metrics").text
    feeds = [
        line
        for line in metrics.splitlines()
        if line.startswith("nextword_http_requests_total")
        and "/v1/sessions/{session_id}/feed" in line
    ]
    assert feeds and sum(float(line.split()[-1]) for line in feeds) == 20.0, feeds
    assert "nextword_batch_size_count" in metrics  # the engine's own metrics, same view
    assert "nextword_active_sessions 1.0" in metrics


def test_a_dead_api_process_is_replaced(service: Service) -> None:
    victim = service.children()["api"][0]
    victim.kill()
    victim.wait(10)
    deadline = time.monotonic() + 60
    while len(service.children()["api"]) < 2 or "all 2 API processes" not in service.log()[-2000:]:
        assert time.monotonic() < deadline, service.log()
        time.sleep(0.2)
    service.wait_ready()
    assert "died with exit code" in service.log()
    r = httpx.post(f"{service.url}/v1/predict", json={"text": "i am"})
    assert r.status_code == 200


@needs_redis
def test_a_dead_engine_is_restarted_and_every_stream_keeps_its_connection_and_its_words(
    tiny_artifacts: Path, tmp_path: Path, redis: RedisServer
) -> None:
    service = Service(
        tiny_artifacts,
        tmp_path / "serve.log",
        NEXTWORD_SESSION_STORE=redis.url,
        NEXTWORD_MAX_WAIT_MS="20",  # steps wait for their batch: some are pending at the kill
    )
    try:
        service.wait_ready()
        words = single_token_words(tiny_artifacts)
        result = asyncio.run(crash_under_load(service.url, service.proc.pid, 12, words, 2.0, 2.0))
        assert result["ready_again_s"] is not None, service.log()
        assert result["problems"] == [] and result["hung"] == 0, result
        assert result["kept"] == result["answering"] == 12, result  # no connection closed
        assert result["exact"] == 12, result  # no acknowledged word lost, none applied twice
        assert set(result["errors"]) <= {"engine_restarting", "engine_restarting/maybe"}, result
        assert result["probe_statuses"].get("readyz 503", 0) > 0, result  # not ready meanwhile
        assert set(result["probe_statuses"]) == {"readyz 503", "readyz 200", "healthz 200"}
        assert service.proc.poll() is None
        assert "died (killed by SIGKILL): restarting it" in service.log()
        metrics = httpx.get(f"{service.url}/metrics").text
        assert "nextword_engine_restarts_total 1.0" in metrics
        assert len(service.children()["engine"]) == 1
    finally:
        service.stop()


def test_with_the_memory_store_the_sessions_are_lost_and_the_client_starts_anew(
    tiny_artifacts: Path, tmp_path: Path
) -> None:
    service = Service(tiny_artifacts, tmp_path / "serve.log", workers=1)
    try:
        service.wait_ready()
        with Client(service.url) as client, client.stream(k=3) as stream:
            stream.send("i am")
            first_id = stream.session_id

            async def raw() -> tuple[dict[str, object], int | None]:
                async with connect(f"ws://127.0.0.1:{service.port}/v1/stream") as ws:
                    json.loads(await ws.recv())
                    service.children()["engine"][0].kill()
                    service.wait_ready()
                    await ws.send(json.dumps({"text": "coming", "id": 1}))
                    answer = json.loads(await ws.recv())
                    try:
                        await ws.recv()
                    except ConnectionClosed as closed:
                        return answer, None if closed.rcvd is None else closed.rcvd.code
                    return answer, None

            # The documented answer for a stream whose session went with the engine.
            answer, close = asyncio.run(raw())
            assert answer["type"] == "error" and answer["id"] == 1, answer
            assert answer["error"]["code"] == "unknown_session", answer  # type: ignore[index]
            assert close == 4404
            # The client starts a new session and feeds it the text it had fed.
            result = stream.send("coming home")
            assert stream.session_id != first_id
            assert result.tokens == 4  # "i am" again, then "coming home"
            assert stream.renewals == 1
            direct = client.predict("i am coming home", k=3)
            assert result.words == direct.words
    finally:
        service.stop()


def test_repeated_engine_deaths_stop_the_service_loudly(
    tiny_artifacts: Path, tmp_path: Path
) -> None:
    service = Service(tiny_artifacts, tmp_path / "serve.log", NEXTWORD_ENGINE_RESTARTS="1")
    try:
        service.wait_ready()
        service.children()["engine"][0].kill()  # the one allowed restart
        deadline = time.monotonic() + 60
        while "up again" not in service.log():
            assert time.monotonic() < deadline and service.proc.poll() is None, service.log()
            time.sleep(0.1)
        service.wait_ready()
        roles = service.children()
        roles["engine"][0].kill()
        assert service.proc.wait(60) == 1
        assert "2 times within 300 s: stopping the service" in service.log()
        _, alive = psutil.wait_procs(roles["api"], timeout=30)
        assert not alive  # no API process is left serving without an engine
    finally:
        service.stop()


def test_sigterm_answers_every_received_message_then_closes_1001(
    tiny_artifacts: Path, tmp_path: Path
) -> None:
    # Each step waits up to 150 ms for its batch to fill: SIGTERM lands mid-stream.
    service = Service(tiny_artifacts, tmp_path / "serve.log", workers=1, NEXTWORD_MAX_WAIT_MS="150")
    try:
        service.wait_ready()
        answers, close_code = asyncio.run(stream_then_terminate(service))
        assert [a["id"] for a in answers] == list(range(20)), answers
        assert all(a["type"] == "predictions" for a in answers)
        assert close_code == 1001
        assert service.proc.wait(30) in (0, -signal.SIGTERM)
        assert "Traceback" not in service.log(), service.log()
    finally:
        service.stop()


async def stream_then_terminate(service: Service) -> tuple[list[dict[str, object]], int | None]:
    async with connect(f"ws://127.0.0.1:{service.port}/v1/stream", compression=None) as ws:
        json.loads(await ws.recv())
        for n in range(20):
            await ws.send(json.dumps({"text": "cat", "id": n}))
        await asyncio.sleep(0.5)  # a few answered; the rest received and waiting
        os.killpg(service.proc.pid, signal.SIGTERM)
        answers = []
        try:
            while True:
                answers.append(json.loads(await asyncio.wait_for(ws.recv(), 20)))
        except ConnectionClosed as closed:
            return answers, None if closed.rcvd is None else closed.rcvd.code


def test_restarts_back_off_and_deaths_are_named() -> None:
    assert [restart_delay(n) for n in range(1, 8)] == [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 10.0]
    assert describe_exit(-signal.SIGKILL) == "killed by SIGKILL"
    assert describe_exit(1) == "exit code 1"


def test_the_restart_benchmark_runs_and_writes_its_table(
    tiny_artifacts: Path, tmp_path: Path
) -> None:
    out = tmp_path / "restart.json"
    command = [
        *(sys.executable, "-m", "benchmarks.bench_restart", "--store", "memory"),
        *("--models", str(tiny_artifacts), "--streams", "4", "--runs", "1"),
        *("--warmup", "1", "--after", "1", "--out", str(out)),
    ]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    (result,) = json.loads(out.read_text())["runs"]
    assert result["ready_again_s"] is not None and result["hung"] == 0, result
    # The memory store loses the sessions: each stream is told so and closed with 4404.
    assert result["closed"] == {"4404": 4}, result
    assert "| 1 | 4 |" in out.with_suffix(".txt").read_text()
