"""A REST request whose client leaves is cancelled (service/api/disconnects.py): the
middleware alone with fake ASGI peers, then a real server whose engine drops the steps; so
is a stream message whose client leaves (service/api/stream.py) on that server."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect

from service.api.disconnects import ABANDONED, CancelOnDisconnect
from tests.live_server import LiveServer


class Peer:
    """The server side of one request: a body, then a disconnect when `leave` is set."""

    def __init__(self) -> None:
        self.leave = asyncio.Event()
        self.answered = asyncio.Event()
        self.sent: list[dict[str, Any]] = []
        self.bodies = 0

    async def receive(self) -> dict[str, Any]:
        if self.bodies == 0:
            self.bodies += 1
            return {"type": "http.request", "body": b"{}", "more_body": False}
        # As uvicorn: after the body, only a disconnect or the end of the response.
        leave = asyncio.ensure_future(self.leave.wait())
        answered = asyncio.ensure_future(self.answered.wait())
        await asyncio.wait([leave, answered], return_when=asyncio.FIRST_COMPLETED)
        leave.cancel()
        answered.cancel()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            self.answered.set()


async def answer(send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def test_a_handler_whose_client_leaves_is_cancelled() -> None:
    cancelled = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        try:
            await asyncio.Event().wait()  # the engine never answers
        except asyncio.CancelledError:
            cancelled.set()
            raise

    peer = Peer()
    scope: dict[str, Any] = {"type": "http"}
    serving = asyncio.ensure_future(CancelOnDisconnect(app)(scope, peer.receive, peer.send))
    await asyncio.sleep(0.01)
    assert not serving.done()
    peer.leave.set()
    await asyncio.wait_for(serving, 10)  # returns, no exception: nobody to answer
    assert cancelled.is_set() and scope[ABANDONED] and peer.sent == []


async def test_an_answered_request_is_not_cancelled_and_errors_propagate() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await answer(send)
        await asyncio.sleep(0.01)  # after the answer the server's receive() ends at once

    peer = Peer()
    scope: dict[str, Any] = {"type": "http"}
    await asyncio.wait_for(CancelOnDisconnect(app)(scope, peer.receive, peer.send), 10)
    assert [m["type"] for m in peer.sent] == ["http.response.start", "http.response.body"]
    assert ABANDONED not in scope

    async def failing(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await CancelOnDisconnect(failing)({"type": "http"}, Peer().receive, Peer().send)


async def test_the_app_still_sees_the_disconnect_through_receive() -> None:
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        try:
            seen.append((await receive())["type"])  # a route that listens itself
        finally:
            seen.append("done")

    peer = Peer()
    serving = asyncio.ensure_future(
        CancelOnDisconnect(app)({"type": "http"}, peer.receive, peer.send)
    )
    await asyncio.sleep(0.01)
    peer.leave.set()
    await asyncio.wait_for(serving, 10)
    assert seen[-1] == "done"


async def test_a_cancellation_from_the_server_goes_on_up() -> None:
    cancelled = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    peer = Peer()
    scope: dict[str, Any] = {"type": "http"}
    serving = asyncio.ensure_future(CancelOnDisconnect(app)(scope, peer.receive, peer.send))
    await asyncio.sleep(0.01)
    serving.cancel()  # the server's, the client still there
    with pytest.raises(asyncio.CancelledError):
        await serving
    assert cancelled.is_set() and ABANDONED not in scope


async def test_an_abandoned_request_leaves_its_task_uncancelled() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await asyncio.Event().wait()

    async def serve_then_go_on() -> int:
        peer = Peer()
        asyncio.get_running_loop().call_later(0.01, peer.leave.set)
        await CancelOnDisconnect(app)({"type": "http"}, peer.receive, peer.send)
        await asyncio.sleep(0)  # the task goes on: no cancellation pending
        task = asyncio.current_task()
        assert task is not None
        return task.cancelling()

    assert await asyncio.wait_for(serve_then_go_on(), 10) == 0


# --- end to end ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    # One token a chunk: a 2,000-token text takes 2,000 batches, long after its client left.
    live = LiveServer(
        tiny_artifacts,
        tmp_path_factory.mktemp("disconnects") / "server.log",
        NEXTWORD_PREFILL_CHUNK="1",
    ).start()
    try:
        yield live
    finally:
        live.stop()


def scrape(server: LiveServer) -> dict[str, float]:
    """Steps by outcome, tokens run and the queue depth, summed over models."""
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "nextword_steps_total":
                key = f"steps_{sample.labels['outcome']}"
            elif sample.name in ("nextword_tokens_total", "nextword_queue_depth"):
                key = sample.name
            else:
                continue
            found[key] = found.get(key, 0.0) + sample.value
    return found


def settle(server: LiveServer, before: dict[str, float]) -> tuple[dict[str, float], float]:
    """The metrics once the queue is empty and a step was cancelled since `before` (or after
    two minutes), and the steps cancelled since."""
    deadline = time.monotonic() + 120
    while True:
        now = scrape(server)
        settled = now.get("nextword_queue_depth", 0) == 0
        cancelled = now.get("steps_cancelled", 0) - before.get("steps_cancelled", 0)
        if settled and cancelled >= 1 or time.monotonic() > deadline:
            return now, cancelled
        time.sleep(0.2)


def test_abandoned_long_predicts_stop_early_and_leave_the_queue_empty(
    server: LiveServer,
) -> None:
    before = scrape(server)
    text = "the " * 2000
    body = ('{"text": "%s", "k": 5}' % text).encode()  # noqa: UP031
    request = (
        b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    ) + body
    clients = 8
    socks = [
        socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in range(clients)
    ]
    for sock in socks:
        sock.sendall(request)
    time.sleep(0.3)
    for sock in socks:
        sock.close()  # gone before any answer
    now, cancelled = settle(server, before)
    tokens = now.get("nextword_tokens_total", 0) - before.get("nextword_tokens_total", 0)
    ran = now.get("steps_ok", 0) - before.get("steps_ok", 0)
    assert cancelled >= 1, (now, before)
    assert ran <= clients - cancelled  # a cancelled step is never also answered
    assert tokens < clients * 2000, (tokens, now)
    assert (
        httpx.post(f"{server.url}/v1/predict", json={"text": "the"}, timeout=30).status_code == 200
    )
    assert "Traceback" not in server.log()


def test_stream_clients_that_leave_during_a_long_step_abort_it(server: LiveServer) -> None:
    # The stream reads the server's receive queue directly (no reader task): the queue must
    # still tell the answering loop at once, even with a message waiting behind the step.
    before = scrape(server)
    clients = 8

    async def leave() -> None:
        ws = await connect(f"ws://127.0.0.1:{server.port}/v1/stream", ping_interval=None)
        assert json.loads(await ws.recv())["type"] == "ready"
        await ws.send(json.dumps({"text": "the " * 2000, "id": 1}))
        await ws.send(json.dumps({"text": "cat", "id": 2}))
        await asyncio.sleep(0.3)
        ws.transport.abort()  # gone before any answer

    async def run() -> None:
        await asyncio.gather(*(leave() for _ in range(clients)))

    asyncio.run(run())
    now, cancelled = settle(server, before)
    tokens = now.get("nextword_tokens_total", 0) - before.get("nextword_tokens_total", 0)
    assert cancelled >= 1, (now, before)
    assert tokens < clients * 2000, (tokens, now)
    assert "Traceback" not in server.log()
