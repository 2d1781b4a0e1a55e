"""Connection limits of `nextword serve` (service/api/connections.py, the stream's Origin and
idle checks), against a real server on a loopback port: raw sockets and `websockets`."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import websockets
from websockets.asyncio.client import connect

from service.api.connections import ConnectionLimits, OpenConnections
from service.api.stream import allowed_origins, origin_allowed
from tests.live_server import LiveServer

UPGRADE = (
    "Upgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


@pytest.fixture(scope="module")
def server(tiny_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    log = tmp_path_factory.mktemp("limits") / "server.log"
    live = LiveServer(
        tiny_artifacts,
        log,
        NEXTWORD_HEADER_TIMEOUT_S="1",
        NEXTWORD_MAX_CONNECTIONS="6",
        NEXTWORD_MAX_CONNECTIONS_PER_CLIENT="0",
        NEXTWORD_WS_IDLE_TIMEOUT_S="1.5",
        NEXTWORD_WS_SEND_TIMEOUT_S="1",
    ).start()
    try:
        yield live
    finally:
        live.stop()


def raw(server: LiveServer) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Everything until the server closes (a timeout fails the test)."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def ws_url(server: LiveServer) -> str:
    return f"ws://127.0.0.1:{server.port}/v1/stream"


def read_response(sock: socket.socket) -> bytes:
    """One whole HTTP response (headers and a Content-Length body), however it was split."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
         if line.lower().startswith(b"content-length:")),
        0,
    )  # fmt: skip
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def test_half_sent_headers_get_408_and_idle_connections_are_closed(server: LiveServer) -> None:
    half, idle = raw(server), raw(server)
    with half, idle:
        half.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finished
        assert read_all(half).startswith(b"HTTP/1.1 408 ")
        assert read_all(idle) == b""  # nothing sent: closed without an answer
    upgrade = raw(server)
    with upgrade:
        upgrade.sendall(b"GET /v1/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
        assert read_all(upgrade).startswith(b"HTTP/1.1 408 ")


def test_complete_requests_are_not_cut_by_the_header_deadline(server: LiveServer) -> None:
    sock = raw(server)
    with sock:
        for _ in range(2):  # keep-alive: the deadline starts again with each request
            time.sleep(0.6)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response(sock).startswith(b"HTTP/1.1 200 ")


def test_an_over_long_upgrade_request_line_gets_its_414(server: LiveServer) -> None:
    sock = raw(server)
    with sock:
        path = "/v1/stream?x=" + "a" * 9000
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n{UPGRADE}".encode())
        assert read_all(sock).startswith(b"HTTP/1.1 414 ")


def test_connections_over_the_cap_get_503_and_the_cap_frees_up(server: LiveServer) -> None:
    held = [raw(server) for _ in range(6)]
    try:
        time.sleep(0.2)
        extra = raw(server)
        with extra:
            answer = read_all(extra)
        assert answer.startswith(b"HTTP/1.1 503 ")
        assert b"too_many_connections" in answer
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.3)
    sock = raw(server)
    with sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(sock).startswith(b"HTTP/1.1 200 ")


def test_per_client_cap_counts_open_connections_by_address() -> None:
    limits = ConnectionLimits(max_connections=3, max_connections_per_client=2)
    open_ = OpenConnections()
    assert [open_.admit(k, "a", limits) for k in ("a1", "a2", "a3")] == [0, 0, 429]
    assert open_.admit("b1", "b", limits) == 0
    assert open_.admit("c1", "c", limits) == 503
    open_.release("a1")
    open_.release("a1")  # twice: no effect
    assert open_.admit("a4", "a", limits) == 0
    assert open_.by_host == {"a": 2, "b": 1}


def test_origin_is_same_origin_by_default_or_listed() -> None:
    def ws(**headers: str) -> Any:
        return SimpleNamespace(headers=headers)

    same = allowed_origins("")
    assert origin_allowed(ws(host="api.example:8000"), same)  # no Origin: not a browser
    assert origin_allowed(ws(host="api.example:8000", origin="https://API.example:8000"), same)
    assert not origin_allowed(ws(host="api.example:8000", origin="https://evil.example"), same)
    listed = allowed_origins("https://app.example, http://localhost:3000/")
    assert origin_allowed(ws(host="api.example", origin="http://localhost:3000"), listed)
    assert not origin_allowed(ws(host="api.example", origin="https://api.example"), listed)
    assert origin_allowed(ws(host="x", origin="https://any.example"), allowed_origins("*"))


def test_a_websocket_from_another_origin_is_refused_with_403(server: LiveServer) -> None:
    async def probe() -> None:
        with pytest.raises(websockets.InvalidStatus) as refused:
            await connect(ws_url(server), origin="https://evil.example")  # type: ignore[arg-type]
        assert refused.value.response.status_code == 403
        own = f"http://127.0.0.1:{server.port}"
        async with connect(ws_url(server), origin=own) as ws:  # type: ignore[arg-type]
            assert json.loads(await ws.recv())["type"] == "ready"

    asyncio.run(probe())


def test_an_idle_websocket_is_closed_after_answering(server: LiveServer) -> None:
    async def probe() -> None:
        async with connect(ws_url(server)) as ws:
            assert json.loads(await ws.recv())["type"] == "ready"
            for i in range(3):  # messages keep it open
                await asyncio.sleep(0.8)
                await ws.send(json.dumps({"text": "the cat ", "id": i}))
                assert json.loads(await ws.recv())["id"] == i
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 30)
            assert ws.close_code == 1000
            assert ws.close_reason == "idle timeout"

    asyncio.run(probe())


def test_a_client_that_does_not_read_is_dropped(server: LiveServer) -> None:
    async def probe() -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", server.port))
        # max_queue=1: the client stops reading from the socket once a message waits.
        ws = await connect(ws_url(server) + "?k=50", sock=sock, max_queue=1, ping_interval=None)
        # Cheap messages (no new word: one step each) with big answers (k=50): the server
        # fills its send buffer in seconds, however busy the machine.
        message = json.dumps({"text": ""})
        deadline = time.monotonic() + 120
        with pytest.raises(websockets.ConnectionClosed):
            while time.monotonic() < deadline:
                await ws.send(message)
                await asyncio.sleep(0)
        ws.transport.abort()

    asyncio.run(probe())
    assert "the client does not read" in server.log()


def test_a_client_that_pipelines_and_leaves_logs_no_traceback(server: LiveServer) -> None:
    async def probe() -> None:
        for _ in range(3):
            ws = await connect(ws_url(server))
            await ws.recv()
            for i in range(100):
                await ws.send(json.dumps({"text": "the cat sat on the mat ", "id": i}))
            ws.transport.abort()
        await asyncio.sleep(1.0)

    asyncio.run(probe())
    assert "Traceback" not in server.log()


def test_a_head_over_the_byte_cap_gets_431_and_is_closed(server: LiveServer) -> None:
    # 40 KB of one header, never finished: refused for its bytes, not at the deadline.
    upgrade = b"GET /v1/stream HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    for start in (b"GET /healthz HTTP/1.1\r\n", upgrade):
        sock = raw(server)
        with sock:
            sock.sendall(start + b"Host: x\r\nX-Big: " + b"a" * 40_000)
            answer = read_all(sock)
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
        assert b"headers_too_large" in answer


def test_many_headers_under_the_byte_cap_are_served(server: LiveServer) -> None:
    sock = raw(server)
    with sock:
        headers = "".join(f"X-H{i}: {'v' * 200}\r\n" for i in range(100))  # ~21 KB
        sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
        assert read_response(sock).startswith(b"HTTP/1.1 200 ")
        # The count starts again with each request of a keep-alive connection.
        sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
        assert read_response(sock).startswith(b"HTTP/1.1 200 ")


def test_a_declared_body_over_the_limit_gets_413_and_the_connection_closes(
    server: LiveServer,
) -> None:
    sock = raw(server)
    with sock:
        sock.sendall(
            b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000000\r\n\r\n" + b"{" * 1000
        )
        answer = read_all(sock)  # closed: the 100 MB are never read
    assert answer.startswith(b"HTTP/1.1 413 ")


def test_a_text_frame_that_is_not_utf8_closes_with_1007_and_one_log_line(
    server: LiveServer,
) -> None:
    async def probe() -> None:
        async with connect(ws_url(server)) as ws:
            assert json.loads(await ws.recv())["type"] == "ready"
            await ws.send(b'{"text": "\xff\xfe"}', text=True)
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 30)
            assert ws.close_code == 1007

    asyncio.run(probe())
    deadline = time.monotonic() + 10
    while "is not UTF-8" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "a text frame is not UTF-8" in server.log()
    assert "Traceback" not in server.log()


def test_a_content_length_of_thousands_of_digits_is_refused(server: LiveServer) -> None:
    sock = raw(server)
    with sock:
        sock.sendall(
            b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + b"9" * 5000 + b"\r\n\r\n{}"
        )
        answer = read_all(sock)
    assert answer.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 413 ")), answer[:200]
    assert "Traceback" not in server.log()


def test_content_length_is_read_as_starlette_reads_it() -> None:
    from starlette.datastructures import Headers

    from service.api.app import content_length

    for headers in (
        [],
        [(b"host", b"x"), (b"content-type", b"application/json")],
        [(b"content-length", b"12")],
        [(b"host", b"x"), (b"content-length", b"0012"), (b"content-length", b"7")],
        [(b"content-length", "\u00e9".encode("latin-1"))],
    ):
        scope = {"type": "http", "headers": headers}
        assert content_length(scope) == Headers(scope=scope).get("content-length"), headers
