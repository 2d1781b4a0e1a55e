"""The WebSocket protocol's own frame reading and writing (`service.api.connections`), over a
real server and a raw socket: frames cut anywhere, mixed with control frames, fragments and
binary frames, over the limit or malformed, are answered as the `websockets` parser would."""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.frames import Frame, Opcode

from service.api.connections import text_frame
from tests.live_server import LiveServer

LIMIT = 4096  # NEXTWORD_MAX_WS_MESSAGE_BYTES of the server below
TEXT, BINARY, CONT, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA


@pytest.fixture(scope="module")
def server(tiny_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    log = tmp_path_factory.mktemp("frames") / "server.log"
    live = LiveServer(tiny_artifacts, log, NEXTWORD_MAX_WS_MESSAGE_BYTES=str(LIMIT)).start()
    try:
        yield live
    finally:
        live.stop()


def frame(opcode: int, payload: bytes, *, fin: bool = True, masked: bool = True) -> bytes:
    """A client's frame (masked, as RFC 6455 requires of clients, unless told otherwise)."""
    n = len(payload)
    first = (0x80 if fin else 0) | opcode
    bit = 0x80 if masked else 0
    if n < 126:
        head = bytes((first, bit | n))
    elif n < 65536:
        head = struct.pack("!BBH", first, bit | 126, n)
    else:
        head = struct.pack("!BBQ", first, bit | 127, n)
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def message(**fields: object) -> bytes:
    return frame(TEXT, json.dumps(fields).encode())


class RawClient:
    """A WebSocket client on a plain socket: it sends bytes as given, and reads frames."""

    def __init__(self, server: LiveServer) -> None:
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(
            b"GET /v1/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self.recv()
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101")
        opcode, payload = self.read()
        assert opcode == TEXT and json.loads(payload)["type"] == "ready"

    def recv(self) -> bytes:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError("the server closed the connection")
        return chunk

    def take(self, n: int) -> bytes:
        while len(self.buffer) < n:
            self.buffer += self.recv()
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def read(self) -> tuple[int, bytes]:
        """The next frame from the server (never masked): (opcode, payload)."""
        first, second = self.take(2)
        assert first & 0x80 and not first & 0x70 and not second & 0x80
        n = second & 0x7F
        if n == 126:
            n = struct.unpack("!H", self.take(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", self.take(8))[0]
        return first & 0x0F, self.take(n)

    def answers(self, count: int) -> list[dict[str, object]]:
        """The next `count` data messages (pongs skipped)."""
        got: list[dict[str, object]] = []
        while len(got) < count:
            opcode, payload = self.read()
            if opcode != PONG:
                assert opcode == TEXT
                got.append(json.loads(payload))
        return got

    def close_code(self) -> int:
        """The code of the server's close frame, skipping data frames before it."""
        while True:
            opcode, payload = self.read()
            if opcode == CLOSE:
                return int(struct.unpack("!H", payload[:2])[0])

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def client(server: LiveServer) -> Iterator[RawClient]:
    raw = RawClient(server)
    try:
        yield raw
    finally:
        raw.close()


def test_the_servers_text_frames_are_those_websockets_writes() -> None:
    for n in (0, 1, 125, 126, 127, 65535, 65536, 70000):
        data = b"x" * n
        expected = Frame(Opcode.TEXT, data).serialize(mask=False, extensions=[])
        assert text_frame(data) == expected


def test_messages_cut_at_every_byte_are_answered_in_order(client: RawClient) -> None:
    long_text = "the cat sat on the mat " * 10  # over 125 bytes: a 16-bit length
    stream = b"".join(
        [message(text="the", id=0), message(text=long_text, id=1), message(text="cat", id=2)]
    )
    for i in range(len(stream)):
        client.sock.sendall(stream[i : i + 1])
        time.sleep(0.001)  # one read per byte, mostly
    answers = client.answers(3)
    assert [a["id"] for a in answers] == [0, 1, 2]
    assert all(a["type"] == "predictions" for a in answers)
    assert answers[1]["tokens"] > answers[0]["tokens"] + 10  # type: ignore[operator]
    assert answers[2]["tokens"] == answers[1]["tokens"] + 1  # type: ignore[operator]


def test_control_fragments_and_binary_frames_between_text_frames_keep_their_order(
    client: RawClient,
) -> None:
    part1, part2 = b'{"text": "the', b' cat", "id": 2}'
    client.sock.sendall(
        b"".join(
            [
                message(text="a", id=1),
                frame(PING, b"hi"),
                frame(TEXT, part1, fin=False),
                frame(PING, b"again"),  # control frames may come between fragments
                frame(CONT, part2),
                frame(BINARY, b"\x00\x01"),
                message(text="dog", id=3),
            ]
        )
    )
    frames = [client.read() for _ in range(6)]
    pongs = [payload for opcode, payload in frames if opcode == PONG]
    assert pongs == [b"hi", b"again"]
    answers = [json.loads(payload) for opcode, payload in frames if opcode == TEXT]
    assert [(a["type"], a["id"]) for a in answers] == [
        ("predictions", 1),
        ("predictions", 2),
        ("error", None),
        ("predictions", 3),
    ]
    assert answers[1]["tokens"] == answers[0]["tokens"] + 2  # "the cat": one message
    assert answers[2]["error"]["code"] == "bad_input"  # type: ignore[index]


def test_a_text_frame_inside_a_fragmented_message_closes_with_1002(client: RawClient) -> None:
    client.sock.sendall(frame(TEXT, b'{"text": ', fin=False) + message(text="the"))
    assert client.close_code() == 1002


def test_an_unmasked_frame_closes_with_1002(client: RawClient) -> None:
    client.sock.sendall(message(text="the", id=1) + frame(TEXT, b'{"text": "a"}', masked=False))
    assert client.close_code() == 1002


def test_a_frame_over_the_limit_closes_with_1009_as_soon_as_its_header_arrives(
    client: RawClient,
) -> None:
    big = frame(TEXT, json.dumps({"text": "a" * LIMIT}).encode())
    client.sock.sendall(big[:8])  # the header and the mask key only
    assert client.close_code() == 1009


def test_a_frame_at_the_limit_in_pieces_is_read(client: RawClient) -> None:
    body = json.dumps({"text": "", "id": 7, "prefix": ""}).encode()
    body = body[:-1] + b" " * (LIMIT - len(body)) + b"}"  # exactly LIMIT bytes
    data = frame(TEXT, body)
    for i in range(0, len(data), 1000):
        client.sock.sendall(data[i : i + 1000])
        time.sleep(0.005)
    (answer,) = client.answers(1)
    assert (answer["type"], answer["id"]) == ("predictions", 7)


def test_a_close_from_the_client_is_echoed(client: RawClient) -> None:
    client.sock.sendall(message(text="the", id=1) + frame(CLOSE, struct.pack("!H", 1000)))
    assert client.close_code() == 1000


# --- the frame reader against the websockets parser, in process -----------------------


class RecordingTransport:
    """An asyncio transport that keeps what is written and whether it was closed."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {"peername": ("127.0.0.1", 1), "sockname": ("127.0.0.1", 2)}.get(name, default)

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        self.pauses += 1
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def can_write_eof(self) -> bool:
        return False

    pauses = 0  # how many times reading was paused
    paused = False


UPGRADE_REQUEST = (
    b"GET /v1/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)


def replay(
    chunks: list[bytes], framing: bool, close_before: int | None = None, early: int = 0
) -> tuple[list[tuple[object, ...]], bytes, bool]:
    """What an accepted `WebSocketProtocol` makes of `chunks` (the client's reads): the
    messages queued for the app, the bytes written back, and whether it closed. With
    `close_before`, the app closes the connection (1001) before that read; the first
    `early` reads come before the app accepts (the bytes written then include the 101)."""
    from uvicorn.server import ServerState

    from service.api.connections import ConnectionLimits, LimitedConfig, WebSocketProtocol

    async def run() -> tuple[list[tuple[object, ...]], bytes, bool]:
        loop = asyncio.get_running_loop()
        accepted = loop.create_future()
        done = loop.create_future()

        async def app(scope: object, receive: Any, send: Any) -> None:
            await receive()
            try:
                await send({"type": "websocket.accept"})
            finally:  # (an OSError when the client failed the connection before the accept)
                accepted.set_result(None)
            await done

        config = LimitedConfig(
            app, ws_max_size=LIMIT, log_level="warning", lifespan="off", limits=ConnectionLimits()
        )
        config.load()
        protocol = WebSocketProtocol(config, ServerState(), {}, loop)  # type: ignore[arg-type]
        transport = RecordingTransport()
        protocol.connection_made(transport)  # type: ignore[arg-type]
        protocol.data_received(UPGRADE_REQUEST)
        assert protocol.framing  # the read held exactly the upgrade request
        protocol.framing = framing
        for chunk in chunks[:early]:  # the client did not wait for the handshake's answer
            if not transport.closed:
                protocol.data_received(chunk)
        if transport.closed and early:
            protocol.connection_lost(None)  # as asyncio's transport does, soon after closing
        await accepted
        start = 0 if early else len(transport.written)
        for i, chunk in enumerate(chunks[early:], early):
            if i == close_before and not transport.closed:
                await protocol.send({"type": "websocket.close", "code": 1001})
            if transport.closed:
                break
            protocol.data_received(chunk)
        closed = transport.closed  # before the app returns (uvicorn closes then)
        queued = []
        while not protocol.queue.empty():
            message = await protocol.queue.get()
            queued.append((message["type"], message.get("text"), message.get("bytes")))
        done.set_result(None)
        await asyncio.gather(*protocol.tasks)
        for timer in (protocol.close_timer, protocol.abort_timer):
            if timer is not None:
                timer.cancel()  # our close's deadlines: not waited for here
        return queued, b"".join(transport.written[start:]), closed

    return asyncio.run(run())


def random_frames(rng: random.Random) -> list[bytes]:
    """A client's frames: mostly texts, with pings, pongs, fragmented texts and binary
    frames between them, sometimes a mistake, sometimes a close at the end."""
    frames: list[bytes] = []
    for _ in range(rng.randint(1, 12)):
        kind = rng.random()
        size = rng.choice([0, 5, 20, 125, 126, 300, 2000, LIMIT])
        text = json.dumps({"text": "é" * (size // 2)})[: max(size, 2)].encode()
        if kind < 0.5:
            frames.append(frame(TEXT, text))
        elif kind < 0.6:
            frames.append(frame(PING, os.urandom(rng.randint(0, 125))))
        elif kind < 0.65:
            frames.append(frame(PONG, os.urandom(rng.randint(0, 10))))
        elif kind < 0.8:
            cut = rng.randint(0, len(text))
            frames.append(frame(TEXT, text[:cut], fin=False))
            if rng.random() < 0.5:
                frames.append(frame(PING, b"between"))
            frames.append(frame(CONT, text[cut:]))
        elif kind < 0.9:
            frames.append(frame(BINARY, os.urandom(size)))
        else:
            mistake = rng.choice(["unmasked", "too big", "text in fragments", "bad utf-8"])
            if mistake == "unmasked":
                frames.append(frame(TEXT, b'{"text": "a"}', masked=False))
            elif mistake == "too big":
                frames.append(frame(TEXT, b"x" * (LIMIT + 1)))
            elif mistake == "text in fragments":
                frames.append(frame(TEXT, b"{", fin=False) + frame(TEXT, b"{}"))
            else:
                # Closed with 1007 at once: what follows does not matter (uvicorn parses a
                # whole read before it handles its frames: it may answer a ping after it).
                frames.append(frame(TEXT, b'{"text": "\xff"}'))
                return frames
    if rng.random() < 0.3:
        frames.append(frame(CLOSE, struct.pack("!H", 1000)))
    return frames


@pytest.mark.parametrize("seed", range(60))
def test_the_frame_reader_does_what_the_websockets_parser_does(seed: int) -> None:
    rng = random.Random(seed)
    stream = b"".join(random_frames(rng))
    cuts = sorted(rng.sample(range(1, len(stream)), min(len(stream) - 1, rng.randint(0, 30))))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
    framed = replay(chunks, framing=True)
    parsed = replay(chunks, framing=False)
    assert framed[1:] == parsed[1:]  # the same pongs and closes written, closed alike
    disconnect = ("websocket.disconnect", None, None)
    if disconnect not in parsed[0]:
        assert framed[0] == parsed[0]  # the same messages, in the same order
        return
    # A frame failed the connection: uvicorn handles none of the frames read with it,
    # the reader queues the texts before it (never answered: the disconnect follows).
    assert framed[0][-1] == parsed[0][-1] == disconnect
    assert framed[0].count(disconnect) == parsed[0].count(disconnect) == 1
    assert framed[0][: len(parsed[0]) - 1] == parsed[0][:-1]


@pytest.mark.parametrize("framing", [True, False])
def test_a_text_that_is_not_utf8_read_with_the_clients_close_ends_the_connection(
    framing: bool,
) -> None:
    # Through the parser the close is parsed (and answered) before the text is handled:
    # the text is dropped rather than closed with 1007 a second time.
    read = frame(TEXT, b'{"text": "\xff"}') + frame(CLOSE, struct.pack("!H", 1000))
    queued, written, closed = replay([read], framing)
    assert queued == [("websocket.disconnect", None, None)]
    assert closed and written[:2] == b"\x88\x02"


def test_with_per_message_deflate_the_answers_are_compressed_frames(
    tiny_artifacts: Path, tmp_path: Path
) -> None:
    from websockets.asyncio.client import connect

    live = LiveServer(
        tiny_artifacts, tmp_path / "server.log", NEXTWORD_WS_PER_MESSAGE_DEFLATE="true"
    ).start()

    async def talk() -> list[dict[str, Any]]:
        url = f"ws://127.0.0.1:{live.port}/v1/stream"
        async with connect(url, compression="deflate") as ws:
            assert ws.protocol.extensions  # negotiated: the server's frames are deflated
            assert json.loads(await ws.recv())["type"] == "ready"
            answers = []
            for i, word in enumerate(["the", "cat", "sat"]):
                await ws.send(json.dumps({"text": word, "id": i}))
                answers.append(json.loads(await ws.recv()))
            return answers

    try:
        answers = asyncio.run(talk())
    finally:
        live.stop()
    assert [(a["type"], a["id"]) for a in answers] == [("predictions", i) for i in range(3)]
    assert [a["tokens"] for a in answers] == [1, 2, 3]


def test_sending_after_the_clients_close_raises_an_os_error() -> None:
    from uvicorn.server import ServerState

    from service.api.connections import ConnectionLimits, LimitedConfig, WebSocketProtocol

    async def run() -> None:
        loop = asyncio.get_running_loop()
        accepted = loop.create_future()

        async def app(scope: object, receive: Any, send: Any) -> None:
            await receive()
            await send({"type": "websocket.accept"})
            accepted.set_result(None)

        config = LimitedConfig(app, ws_max_size=LIMIT, lifespan="off", limits=ConnectionLimits())
        config.load()
        protocol = WebSocketProtocol(config, ServerState(), {}, loop)  # type: ignore[arg-type]
        transport = RecordingTransport()
        protocol.connection_made(transport)  # type: ignore[arg-type]
        protocol.data_received(UPGRADE_REQUEST)
        await accepted
        await protocol.send_text(b'{"a": 1}')
        assert transport.written[-1] == b'\x81\x08{"a": 1}'
        protocol.data_received(frame(CLOSE, struct.pack("!H", 1000)))
        with pytest.raises(OSError):
            await protocol.send_text(b'{"a": 2}')
        await asyncio.gather(*protocol.tasks)

    asyncio.run(run())


# --- hostile shapes, against the websockets parser --------------------------------------


def raw_frame(
    first: int,
    payload: bytes,
    *,
    masked: bool = True,
    width: int = 0,
    declared: int | None = None,
    key: bytes | None = None,
) -> bytes:
    """A frame with every header field given: the first byte as is (FIN, RSV bits, opcode),
    the length in `width` bytes (0: the shortest form; 2 or 8: a longer one than needed)
    and `declared` as the length (default: the payload's, which may then be cut short)."""
    n = len(payload) if declared is None else declared
    bit = 0x80 if masked else 0
    if width == 0 and n < 126:
        head = bytes((first, bit | n))
    elif width in (0, 2) and n < 65536:
        head = struct.pack("!BBH", first, bit | 126, n)
    else:
        head = struct.pack("!BBQ", first, bit | 127, n)
    if not masked:
        return head + payload
    key = key or os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def hostile_frames(rng: random.Random) -> list[bytes]:
    """A client's frames with what RFC 6455 allows at its edges and what it forbids: long
    length forms, sizes at and over the limit, RSV bits, reserved opcodes, unmasked frames,
    fragments with control frames between them and UTF-8 cut between them, 2^63 lengths,
    bad closes, data after a close. A mistake that fails the connection may come anywhere;
    a text that is not UTF-8 ends the list (see `random_frames`)."""
    frames: list[bytes] = []
    fin_text = 0x80 | TEXT

    def raw(first: int, payload: bytes, **fields: Any) -> bytes:
        return raw_frame(first, payload, key=rng.randbytes(4), **fields)  # seeded

    for _ in range(rng.randint(1, 10)):
        size = rng.choice([0, 1, 125, 126, 127, 65535 % LIMIT, LIMIT - 1, LIMIT])
        text = ("é" * LIMIT).encode()[:size]
        if len(text) < size:
            text += b"a" * (size - len(text))
        if text.endswith(b"\xc3"):
            text = text[:-1] + b"a"
        shape = rng.randrange(24)
        if shape < 6:
            frames.append(raw(fin_text, text))
        elif shape == 6:  # a longer length form than needed (allowed)
            frames.append(raw(fin_text, text, width=rng.choice([2, 8])))
        elif shape == 7:
            frames.append(raw(fin_text, b"x" * (LIMIT + 1), width=rng.choice([0, 8])))
        elif shape == 8:  # an RSV bit without an extension
            frames.append(raw(fin_text | rng.choice([0x40, 0x20, 0x10]), text))
        elif shape == 9:  # a reserved opcode
            frames.append(raw(0x80 | rng.choice([3, 7, 0xB, 0xF]), text[:100]))
        elif shape == 10:  # unmasked: text, ping or close
            opcode = rng.choice([TEXT, PING, CLOSE])
            frames.append(raw(0x80 | opcode, b"\x03\xe8" * 3, masked=False))
        elif shape == 11:  # a length of 2^63 or more, then a few bytes
            declared = rng.choice([2**63, 2**64 - 1, 2**63 + 5])
            frames.append(raw(fin_text, b"abc", declared=declared, width=8))
        elif shape in (12, 13):  # fragments, control frames between them, UTF-8 cut
            parts = rng.randint(2, 4)
            cuts = sorted(rng.randint(0, len(text)) for _ in range(parts - 1))
            pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
            for i, piece in enumerate(pieces):
                last = i == len(pieces) - 1
                opcode = TEXT if i == 0 else CONT
                frames.append(raw((0x80 if last else 0) | opcode, piece))
                if not last and rng.random() < 0.5:
                    frames.append(raw(0x80 | rng.choice([PING, PONG]), rng.randbytes(3)))
        elif shape == 14:  # fragments that are not UTF-8 together (1007)
            frames.append(raw(TEXT, b'{"text": "\xc3'))
            frames.append(raw(0x80 | CONT, b'("}'))
            return frames  # as below: uvicorn may handle what follows in the read first
        elif shape == 15:  # fragments over the limit together (1009)
            frames.append(raw(TEXT, b"x" * (LIMIT // 2 + 1)))
            frames.append(raw(0x80 | CONT, b"x" * (LIMIT // 2)))
        elif shape == 16:  # a continuation without a start, or a data frame inside one
            if rng.random() < 0.5:
                frames.append(raw(0x80 | CONT, b"x"))
            else:
                frames.append(raw(TEXT, b"x") + raw(0x80 | BINARY, b"y"))
        elif shape == 17:  # a control frame too long, or fragmented
            if rng.random() < 0.5:
                frames.append(raw(0x80 | PING, b"p" * 126))
            else:
                frames.append(raw(PING, b"p"))
        elif shape == 18:
            frames.append(raw(0x80 | BINARY, rng.randbytes(rng.choice([0, 10, LIMIT]))))
        elif shape == 19:
            frames.append(raw(0x80 | rng.choice([PING, PONG]), rng.randbytes(rng.randint(0, 125))))
        elif shape == 20:  # a close, good or bad, then more data
            payload = rng.choice(
                [b"", struct.pack("!H", 1000), b"\x03", struct.pack("!H", 999), b"\x03\xe8\xff"]
            )
            frames.append(raw(0x80 | CLOSE, payload))
            frames.append(raw(fin_text, b'{"text": "late"}'))
            frames.append(raw(0x80 | PING, b"late"))
        elif shape == 21:  # garbage (not even a header that makes sense)
            frames.append(rng.randbytes(rng.randint(1, 20)))
        elif shape == 22:  # not UTF-8 in one frame: closed with 1007, the rest ignored
            frames.append(raw(fin_text, b'{"text": "\xed\xa0\x80"}'))
            return frames
        else:
            frames.append(raw(fin_text, b'{"text": "the", "id": 1}'))
    if rng.random() < 0.3:
        frames.append(raw(0x80 | CLOSE, struct.pack("!H", 1000)))
    return frames


def cut_reads(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    """The frames' bytes cut into reads: at random places, at every byte, or inside the
    headers and mask keys (a read that ends after 1 to 14 bytes of a frame)."""
    stream = b"".join(frames)
    how = rng.random()
    if how < 0.2 and len(stream) < 2000:
        return [stream[i : i + 1] for i in range(len(stream))]
    if how < 0.6:
        starts = [0]
        for data in frames:
            starts.append(starts[-1] + len(data))
        places = {s + rng.randint(1, 14) for s in starts}
    else:
        places = set(rng.sample(range(1, max(2, len(stream))), min(30, len(stream) // 2)))
    cuts = sorted(p for p in places if 0 < p < len(stream))
    return [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]


def assert_same_handling(
    chunks: list[bytes], close_before: int | None = None, early: int = 0
) -> None:
    """The reader and the websockets parser write the same bytes back, close alike and
    queue the same messages (but for a failure: the texts read before it may be queued too,
    never answered, as the disconnect follows them). The arguments are `replay`'s."""
    framed = replay(chunks, True, close_before, early)
    parsed = replay(chunks, False, close_before, early)
    assert framed[1:] == parsed[1:]
    disconnect = ("websocket.disconnect", None, None)
    if disconnect not in parsed[0]:
        assert framed[0] == parsed[0]
        return
    at, framed_at = parsed[0].index(disconnect), framed[0].index(disconnect)
    assert framed[0][framed_at:] == parsed[0][at:]
    assert framed[0][:at] == parsed[0][:at]
    assert all(kind == "websocket.receive" for kind, _, _ in framed[0][at:framed_at])


@pytest.mark.parametrize("seed", range(150))
def test_hostile_frames_are_handled_as_the_websockets_parser_handles_them(seed: int) -> None:
    rng = random.Random(1000 + seed)
    assert_same_handling(cut_reads(rng, hostile_frames(rng)))


@pytest.mark.parametrize("seed", range(40))
def test_frames_after_our_close_are_handled_as_the_websockets_parser_handles_them(
    seed: int,
) -> None:
    rng = random.Random(5000 + seed)
    chunks = cut_reads(rng, hostile_frames(rng) if seed % 2 else random_frames(rng))
    assert_same_handling(chunks, close_before=rng.randint(0, len(chunks) - 1))


@pytest.mark.parametrize("framing", [True, False])
def test_after_our_close_the_clients_close_read_with_a_text_ends_the_connection(
    framing: bool,
) -> None:
    # The app closed (a drain: 1001); the client had a message on the way, then echoes the
    # close. Its close is read (the connection ends now, not at the close timeout) and a
    # ping read with the text is answered.
    read = message(text="late") + frame(PING, b"hi") + frame(CLOSE, struct.pack("!H", 1001))
    queued, written, closed = replay([read], framing, close_before=0)
    assert queued == [("websocket.disconnect", None, None)]
    assert written.startswith(b"\x88\x02\x03\xe9")  # our close
    assert written.endswith(b"\x8a\x02hi")
    assert closed


def test_a_frame_read_a_byte_at_a_time_is_parsed_once_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # What is held is not parsed again at each read (the square of a frame's length for
    # a client that sends it in small pieces): once for its first byte, once for its
    # header, once whole.
    from service.api.connections import WebSocketProtocol

    holds: list[int] = []
    hold = WebSocketProtocol.hold

    def counting(self: WebSocketProtocol, data: bytes, at: int, needed: int) -> None:
        holds.append(needed)
        hold(self, data, at, needed)

    monkeypatch.setattr(WebSocketProtocol, "hold", counting)
    body = json.dumps({"text": "é" * (LIMIT // 2 - 10)}, ensure_ascii=False).encode()
    data = raw_frame(0x80 | TEXT, body, width=8)  # the longest header form
    queued, written, closed = replay([data[i : i + 1] for i in range(len(data))], True)
    assert queued == [("websocket.receive", body.decode(), None)]
    assert (written, closed) == (b"", False)
    assert holds == [2, 10, len(data)]


@pytest.mark.parametrize("first", [0x80 | TEXT, 0x80 | BINARY, 0x80 | PING, 0x80 | 0x3])
def test_a_wrong_frame_is_failed_on_its_first_two_bytes(first: int) -> None:
    # Unmasked (or a reserved opcode), its long length not sent yet: websockets fails it
    # at once, and so does the reader (it holds back only a text frame's header).
    head = raw_frame(first, b"", masked=first == 0x83, width=8)[:2]
    assert_same_handling([head])
    _, written, closed = replay([head], True)
    assert closed and written.startswith(b"\x88")


@pytest.mark.parametrize("seed", range(30))
def test_frames_sent_before_the_accept_are_handled_as_the_websockets_parser_handles_them(
    seed: int,
) -> None:
    rng = random.Random(7000 + seed)
    chunks = cut_reads(rng, hostile_frames(rng) if seed % 2 else random_frames(rng))
    assert_same_handling(chunks, early=rng.randint(1, len(chunks)))


def test_texts_sent_before_the_accept_keep_the_frame_reader_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A client that sends its first messages with its upgrade request (before the 101):
    # the reader queues them and reads on; none of them goes through websockets.
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

    parsed: list[bytes] = []
    parse = WebSocketsSansIOProtocol.data_received

    def counting(self: WebSocketsSansIOProtocol, data: bytes) -> None:
        parsed.append(data)
        parse(self, data)

    monkeypatch.setattr(WebSocketsSansIOProtocol, "data_received", counting)
    reads = [message(text="the", id=1), message(text="cat", id=2)]
    queued, written, closed = replay(reads, True, early=1)
    texts = [json.dumps({"text": "the", "id": 1}), json.dumps({"text": "cat", "id": 2})]
    assert queued == [("websocket.receive", text, None) for text in texts]
    assert written.startswith(b"HTTP/1.1 101") and not closed
    assert parsed == [UPGRADE_REQUEST]


async def accepted_protocol(limits: Any = None) -> tuple[Any, RecordingTransport, Any]:
    """A `WebSocketProtocol` over a `RecordingTransport`, its upgrade accepted by an app
    that then waits (it reads nothing more) until the returned future is set."""
    from uvicorn.server import ServerState

    from service.api.connections import ConnectionLimits, LimitedConfig, WebSocketProtocol

    loop = asyncio.get_running_loop()
    accepted = loop.create_future()
    done = loop.create_future()

    async def app(scope: object, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        accepted.set_result(None)
        await done

    config = LimitedConfig(
        app, ws_max_size=LIMIT, lifespan="off", limits=limits or ConnectionLimits()
    )
    config.load()
    protocol = WebSocketProtocol(config, ServerState(), {}, loop)  # type: ignore[arg-type]
    transport = RecordingTransport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    protocol.data_received(UPGRADE_REQUEST)
    await accepted
    return protocol, transport, done


@pytest.mark.parametrize("framing", [True, False])
def test_a_client_that_sends_faster_than_the_app_reads_is_paused(framing: bool) -> None:
    # Memory stays bounded: reading pauses once READ_AHEAD messages wait (a read's
    # messages are queued whole, as uvicorn does), and resumes when the app has taken them.
    from service.api.inbox import READ_AHEAD

    async def run() -> None:
        protocol, transport, done = await accepted_protocol()
        protocol.framing = framing
        texts = [message(text="the", id=i) for i in range(3 * READ_AHEAD)]
        protocol.data_received(b"".join(texts))  # one read: its messages queued whole
        assert len(protocol.queue) == 3 * READ_AHEAD
        assert transport.paused and transport.pauses == 1
        for _ in range(3 * READ_AHEAD):
            assert transport.paused
            await protocol.receive()
        assert not transport.paused
        done.set_result(None)
        await asyncio.gather(*protocol.tasks)

    asyncio.run(run())


def test_the_direct_sender_refuses_once_our_close_is_sent() -> None:
    async def run() -> None:
        protocol, transport, done = await accepted_protocol()
        await protocol.send({"type": "websocket.close", "code": 1001})
        written = len(transport.written)
        with pytest.raises(OSError):
            await protocol.send_text(b'{"a": 1}')
        assert len(transport.written) == written  # nothing after our close frame
        done.set_result(None)
        await asyncio.gather(*protocol.tasks)
        protocol.close_timer.cancel()
        protocol.abort_timer.cancel()

    asyncio.run(run())


def test_a_send_waiting_on_a_client_that_does_not_read_ends_when_the_timeout_aborts() -> None:
    from service.api.connections import ConnectionLimits

    async def run() -> None:
        protocol, transport, done = await accepted_protocol(
            ConnectionLimits(ws_send_timeout_s=0.05)
        )
        protocol.pause_writing()  # the send buffer is over its high-water mark
        sending = asyncio.ensure_future(protocol.send_text(b'{"a": 1}'))
        while not transport.closed:  # the send timer aborts the connection
            await asyncio.sleep(0.01)
        assert not sending.done() and transport.written[-1].startswith(b"HTTP/1.1 101")
        protocol.connection_lost(None)  # what asyncio's transport calls after its abort
        with pytest.raises(OSError):
            await sending
        assert transport.written[-1].startswith(b"HTTP/1.1 101")  # the answer never framed
        done.set_result(None)
        await asyncio.gather(*protocol.tasks)

    asyncio.run(run())


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (raw_frame(0x80 | 0x40 | TEXT, b'{"text": "a"}'), 1002),  # RSV1 without deflate
        (raw_frame(0x80 | 0x3, b"x"), 1002),  # a reserved opcode
        (raw_frame(0x80 | TEXT, b"abc", declared=2**63, width=8), 1009),
        (raw_frame(0x80 | PING, b"p" * 126), 1002),  # a control frame over 125 bytes
        (raw_frame(PING, b"p"), 1002),  # a fragmented control frame
        (raw_frame(0x80 | PING, b"p", masked=False), 1002),
        (raw_frame(0x80 | CONT, b"x"), 1002),  # a continuation of nothing
        (raw_frame(0x80 | CLOSE, b"\x03"), 1002),  # a close of one byte
        (raw_frame(0x80 | CLOSE, struct.pack("!H", 1000) + b"\xff"), 1007),
    ],
)
def test_wrong_frames_close_the_stream_with_their_code(
    client: RawClient, data: bytes, code: int
) -> None:
    client.sock.sendall(message(text="the", id=1))
    (answer,) = client.answers(1)
    assert answer["id"] == 1
    for i in range(len(data)):  # a byte at a time: the reader holds nothing wrong back
        try:
            client.sock.sendall(data[i : i + 1])
        except (BrokenPipeError, ConnectionResetError):
            break  # failed at the bytes sent so far: the server may close before the rest
    assert client.close_code() == code


def test_a_text_with_a_longer_length_form_than_needed_is_answered(client: RawClient) -> None:
    body = json.dumps({"text": "the", "id": 4}).encode()
    client.sock.sendall(
        raw_frame(0x80 | TEXT, body, width=8) + raw_frame(0x80 | TEXT, body, width=2)
    )
    assert [a["id"] for a in client.answers(2)] == [4, 4]


@pytest.mark.parametrize("framing", [True, False])
def test_a_wrong_frame_before_the_accept_closes_the_connection_quietly(framing: bool) -> None:
    # websockets sends no close while CONNECTING; uvicorn's handler asserted that it had
    # (an AssertionError out of data_received: asyncio logged it at ERROR, then closed).
    queued, written, closed = replay([frame(PING, b"hi") + raw_frame(0x83, b"x")], framing, early=1)
    assert queued == [("websocket.disconnect", None, None)]  # connection_lost's (1006)
    assert written == b"\x8a\x02hi" and closed  # the pong written before; no 101
