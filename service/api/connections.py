"""Connection limits of an API process, at the protocol level (below the ASGI app).

uvicorn's own protocols, with what they lack on an open network:

- a header deadline: a request (or WebSocket upgrade) whose headers are not complete
  `header_timeout_s` after its first byte (or after the connection opened) is closed,
  with 408 if a request had begun; slow-loris connections are not held;
- a cap on a request's head (request line and headers together, `max_header_bytes`):
  httptools keeps an unfinished header in memory whatever its length, so the bytes of a
  head still incomplete are counted as they arrive, and past the cap the request gets 431
  and the connection is closed (the deadline bounds time, this bounds bytes). A body is
  held to 64 KB by uvicorn's flow control and to the body limit by `BodySizeLimit`;
- a cap on open connections (HTTP and WebSocket together), total and per client address,
  checked when the connection opens: over it, 503 (total) or 429 (per address), closed;
- a WebSocket whose client does not read: once the send buffer is over the high-water
  mark for `ws_send_timeout_s`, the connection is aborted (a close frame cannot reach
  a client that does not read); an unanswered ping or a close that cannot be delivered
  also ends in an abort instead of holding the socket;
- a text frame that is not UTF-8 closes the stream with 1007 and one log line (uvicorn
  logs a traceback at ERROR for each);
- an upgrade request refused by the WebSocket parser (a request line over 8 KB: 414,
  header fields too large: 431) gets its answer and is closed (uvicorn drops it).

Beside the limits, the WebSocket protocol's receive queue is a `ReceiveQueue` that the
stream's answering task reads directly (scope extension `DIRECT_RECEIVE`): no reader task
between uvicorn and the app, no running-loop lookup per message, reading paused only when
`READ_AHEAD` messages wait, and the app told of a disconnect the moment it is queued. The
stream's answers go the other way as bytes (`WebSocketProtocol.send_text`, scope extension
`DIRECT_SEND`): framed here, without an ASGI message, Starlette's state checks or the
middleware's send wrappers. And the client's frames are split here (`read_frames`): an
unfragmented text frame is unmasked and queued at once; every other frame (control frames,
binary, fragments, frames over the size limit, anything malformed) goes whole to the
`websockets` parser, which answers it as it always did.

`LimitedConfig` carries the limits to the API processes (it is pickled with the config).
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
import time
from dataclasses import dataclass
from typing import Any, cast

import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import apply_mask
from websockets.protocol import State

from service.api.inbox import (
    DIRECT_RECEIVE,
    DIRECT_SEND,
    READ_AHEAD,
    RECEIVED_AT,
    Message,
    ReceiveQueue,
)

log = logging.getLogger(__name__)

LOG_EVERY_S = 10.0
LINGER_S = 2.0  # a refused request's connection drops what the client still sends this long


@dataclass(frozen=True)
class ConnectionLimits:
    """The limits of one API process (0 = no limit)."""

    header_timeout_s: float = 10.0
    max_header_bytes: int = 0
    max_connections: int = 0
    max_connections_per_client: int = 0
    ws_send_timeout_s: float = 20.0


class LimitedConfig(uvicorn.Config):
    """uvicorn's config, with these protocols and the limits they enforce."""

    def __init__(self, *args: Any, limits: ConnectionLimits, **kwargs: Any) -> None:
        kwargs.setdefault("http", HttpProtocol)
        kwargs.setdefault("ws", WebSocketProtocol)
        super().__init__(*args, **kwargs)
        self.limits = limits


def limits_of(config: uvicorn.Config) -> ConnectionLimits:
    return getattr(config, "limits", None) or ConnectionLimits()


class OpenConnections:
    """The open connections of this process, by client address."""

    def __init__(self) -> None:
        self.hosts: dict[object, str] = {}  # transport -> client host
        self.by_host: dict[str, int] = {}
        self.refused = 0  # since the last log line
        self.logged_at = float("-inf")

    def admit(self, transport: object, host: str, limits: ConnectionLimits) -> int:
        """Count a new connection: 0, or the status that refuses it (503, 429)."""
        if limits.max_connections and len(self.hosts) >= limits.max_connections:
            return 503
        count = self.by_host.get(host, 0)
        if limits.max_connections_per_client and count >= limits.max_connections_per_client:
            return 429
        self.hosts[transport] = host
        self.by_host[host] = count + 1
        return 0

    def log_refusal(self, now: float, host: str, status: int) -> None:
        """Log refused connections, at most once per LOG_EVERY_S (not once each: a flood)."""
        self.refused += 1
        if now - self.logged_at >= LOG_EVERY_S:
            log.warning(
                "%d connection(s) refused: too many open connections (last: %s, %d; open: %d)",
                self.refused,
                host,
                status,
                len(self.hosts),
            )
            self.refused = 0
            self.logged_at = now

    def release(self, transport: object) -> None:
        """Forget a connection (any number of times)."""
        host = self.hosts.pop(transport, None)
        if host is None:
            return
        left = self.by_host[host] - 1
        if left:
            self.by_host[host] = left
        else:
            del self.by_host[host]


OPEN = OpenConnections()


def plain_response(status: int, code: str, message: str, *extra: bytes) -> bytes:
    """A complete JSON error response that closes the connection."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    return b"".join(
        [
            STATUS_LINE[status],
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            *extra,
            b"connection: close\r\n\r\n",
            body,
        ]
    )


REFUSALS = {
    503: plain_response(
        503, "too_many_connections", "too many open connections", b"retry-after: 1\r\n"
    ),
    429: plain_response(
        429,
        "too_many_connections",
        "too many open connections from this address",
        b"retry-after: 1\r\n",
    ),
}
TIMEOUT_408 = plain_response(408, "request_timeout", "request headers not received in time")
HEADERS_431 = plain_response(
    431, "headers_too_large", "the request line and headers are over the size limit"
)


class HttpProtocol(HttpToolsProtocol):
    """httptools' protocol with a header deadline and the connection caps."""

    header_timer: asyncio.TimerHandle | None = None
    request_begun = False
    # Bytes of the head being received (request line and headers, not complete yet); None
    # while a body is read. A chunk in which a message ends holds the next head's first
    # bytes but is not counted: at most one read (256 KB) escapes the count.
    head_bytes: int | None = 0
    message_ended = False
    discarding = False  # refused: what still arrives is read and dropped until the close

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.limits = limits_of(self.config)
        host = self.client[0] if self.client else ""
        refused = OPEN.admit(transport, host, self.limits)
        if refused:
            OPEN.log_refusal(self.loop.time(), host, refused)
            transport.write(REFUSALS[refused])
            transport.close()
            return
        self.start_header_timer()

    def start_header_timer(self) -> None:
        if self.header_timer is None and self.limits.header_timeout_s:
            self.header_timer = self.loop.call_later(
                self.limits.header_timeout_s, self.header_timeout
            )

    def stop_header_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def data_received(self, data: bytes) -> None:
        if self.discarding:
            return
        self.message_ended = False
        super().data_received(data)
        if self.head_bytes is None or self.message_ended or self.transport.is_closing():
            return
        self.head_bytes += len(data)
        cap = self.limits.max_header_bytes
        if cap and self.head_bytes > cap:
            self.stop_header_timer()
            self.transport.write(HEADERS_431)
            self.linger()

    def linger(self) -> None:
        """Close after an answer, reading (and dropping) what still comes for `LINGER_S`:
        closing a socket with unread bytes resets it, and the client would lose the answer
        (a lingering close, as nginx and Apache do it)."""
        self.discarding = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)

    def header_timeout(self) -> None:
        self.header_timer = None
        if self.transport.is_closing():
            return
        idle = self.cycle is None or self.cycle.response_complete
        if idle and self.request_begun:
            self.transport.write(TIMEOUT_408)
        self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.request_begun = True
        self.start_header_timer()

    def on_headers_complete(self) -> None:
        self.stop_header_timer()
        self.request_begun = False
        self.head_bytes = None  # the body follows: bounded by flow control and BodySizeLimit
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.head_bytes = 0  # the next request's head starts
        self.message_ended = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.stop_header_timer()
        OPEN.release(self.transport)
        super().connection_lost(exc)


# The first byte of an unfragmented text frame: FIN, no extension bits, opcode 1 (text).
TEXT_FIN = 0x81
MASKED = 0x80  # in the second byte: a client's frame is masked (RFC 6455 5.3)
SHORT_HEADERS = [bytes((TEXT_FIN, n)) for n in range(126)]  # a server's, by payload length
END_OF_HEAD = b"\r\n\r\n"
ENDING = (State.CLOSING, State.CLOSED)  # a close sent or received: websockets reads on


def text_frame(data: bytes) -> bytes:
    """A server's (unmasked) unfragmented text frame of `data`."""
    n = len(data)
    if n < 126:
        return SHORT_HEADERS[n] + data
    if n < 65536:
        return struct.pack("!BBH", TEXT_FIN, 126, n) + data
    return struct.pack("!BBQ", TEXT_FIN, 127, n) + data


class WebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's WebSocket protocol that answers refused upgrades and drops non-readers,
    splits the client's frames itself (`read_frames`) and sends the stream's answers
    directly (`send_text`)."""

    send_timer: asyncio.TimerHandle | None = None
    abort_timer: asyncio.TimerHandle | None = None
    # Whether `read_frames` splits what the client sends (from the read after its upgrade
    # request on, while the `websockets` parser stands between two frames).
    framing = False
    # While framing: the start of a text frame not received whole yet, and how many bytes
    # it needs before it can be read further (its header's, or the whole frame's).
    pending: bytearray
    needed = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # uvicorn's asyncio.Queue looks up the running loop (a getpid() system call on
        # Python 3.11) in every `get`; a ReceiveQueue is bound to the loop given once, and
        # the stream reads it without a task of its own in between (see `handle_connect`).
        self.queue = ReceiveQueue(self.loop, READ_AHEAD)  # type: ignore[assignment]
        self.pending = bytearray()

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        if self.handshake_initiated and not self.close_sent:
            # The app's task has not run yet: it finds this protocol in its scope, takes
            # messages straight from `self.queue` through `receive` and sends its answers
            # through `send_text` (`service.api.stream`).
            extensions = cast(Any, self.scope)["extensions"]
            extensions[DIRECT_RECEIVE] = self
            extensions[DIRECT_SEND] = self

    def data_received(self, data: bytes) -> None:
        if self.framing:
            self.read_frames(data)
            return
        upgrading = not self.handshake_initiated
        super().data_received(data)
        if not self.handshake_initiated:
            if self.conn.handshake_exc is not None:
                # The parser refused the request (414, 431, not HTTP) and wrote its answer,
                # which uvicorn never sends: send it, then close.
                self.transport.write(b"".join(self.conn.data_to_send()))
                self.transport.close()
            return
        # uvicorn hands over the upgrade request alone, in one call: when this read held
        # exactly the request, the parser now waits for the first frame's first byte, and
        # from the next read on the frames can be split here. Not with an extension
        # (per-message deflate: `websockets` inflates) or without a size limit.
        self.framing = (
            upgrading
            and not self.close_sent
            and data.find(END_OF_HEAD) == len(data) - len(END_OF_HEAD)
            and not self.conn.reader.buffer
            and not self.conn.extensions
            # The parser's state read here (websockets >= 15); a size limit to hold to.
            and getattr(self.conn, "max_message_size", None) is not None
            and hasattr(self.conn, "current_size")
        )

    def read_frames(self, data: bytes) -> None:
        """Split the client's bytes into frames: an unfragmented, masked text frame within
        the size limit is unmasked and queued here (what uvicorn would queue, without the
        `websockets` parser's generators and `Frame` objects); any other frame received
        whole goes whole to `websockets`, which answers it as before (pings, pongs, closes,
        fragments, binary frames, protocol errors, 1009 for a frame over the limit). A text
        frame not received whole waits in `pending`, which grows by each read without being
        parsed again until it holds `needed` bytes (parsing it whole at each read would cost
        a frame sent in small pieces the square of its length). From the first bytes that
        are not a whole frame for `websockets` (or once our close is sent, or its connection
        is no longer open), it parses everything: the bytes it is given, in order, are
        always the client's byte stream.

        One difference: uvicorn handles none of a read's frames when one of them fails the
        connection; here the text frames before the bad one are queued, then the disconnect
        (which cancels the stream's answering at once: they are never answered). So a text
        that is not UTF-8 read with a later bad frame closes with 1007 here, with the bad
        frame's code (1002, 1009) there; and pings read after a text that is not UTF-8 are
        answered there (after the 1007), not here: closed either way."""
        conn = self.conn
        if self.close_sent or conn.state in ENDING:
            # Our close is sent (the app's `websocket.close`): `websockets` reads on for the
            # client's close, and answers its pings meanwhile; a text is dropped either way.
            # (Before the app accepts, CONNECTING, frames are read as when OPEN.)
            self.framing = False
            if self.pending:
                data = bytes(self.pending) + data
                self.pending = bytearray()
            super().data_received(data)
            return
        if self.pending:
            self.pending += data
            if len(self.pending) < self.needed:
                return
            data = bytes(self.pending)
            self.pending = bytearray()
        limit = cast(int, conn.max_message_size)
        size = len(data)
        at = 0
        while at < size:
            if size - at < 2:
                self.hold(data, at, 2)  # a header's first byte
                return
            first = data[at]
            second = data[at + 1]
            # An unfragmented masked text frame, not inside a fragmented message.
            text = first == TEXT_FIN and bool(second & MASKED) and conn.current_size is None
            length = second & 0x7F
            head = at + 2
            if length >= 126:
                wide = 2 if length == 126 else 8
                if size - head < wide:
                    if not text:
                        break  # websockets reads it (and fails it at once if it is wrong)
                    self.hold(data, at, 2 + wide)
                    return
                length = int.from_bytes(data[head : head + wide], "big")
                head += wide
            end = head + 4 + length  # a client's frame has a 4-byte mask key
            if text and length <= limit:  # queued here
                if end > size:
                    self.hold(data, at, end - at)  # bounded by the limit
                    return
                payload = apply_mask(data[head + 4 : end], data[head : head + 4])
                self.queue_message(payload, True)
                if self.close_sent:
                    self.framing = False  # not UTF-8: closed (1007), the rest dropped
                    return
                at = end
                continue
            if end > size:
                break
            # One whole frame (unless malformed: then websockets fails the connection).
            super().data_received(data[at:end])
            at = end
            if conn.parser_exc is not None:
                # Failed and closed (1002, 1009, ...): the rest of the read is dropped, as
                # the parser would have dropped it.
                self.framing = False
                return
            if conn.state is not State.OPEN:
                # Closing: websockets reads (or discards) the rest. (Before the accept, a
                # close received leaves it CONNECTING: a control frame then ends framing.)
                self.framing = False
                break
        if at < size:
            self.framing = False  # websockets parses from here on
            super().data_received(data[at:])

    def hold(self, data: bytes, at: int, needed: int) -> None:
        """Keep `data[at:]`, the start of a frame, until it holds `needed` bytes."""
        self.pending = bytearray(data[at:])
        self.needed = needed

    def handle_parser_exception(self) -> None:
        if self.conn.close_sent is None:
            # A frame failed before the app accepted (CONNECTING): `websockets` sends no
            # close then, and uvicorn's handler asserts that it did (a traceback at ERROR
            # from asyncio for each such connection, the connection closed all the same).
            # Closed here (with what websockets wrote before: pongs); `connection_lost`
            # tells the app (1006), as for a client gone.
            self.transport.write(b"".join(self.conn.data_to_send()))
            self.close_sent = True
            self.transport.close()
            return
        super().handle_parser_exception()

    def send_receive_event_to_app(self) -> None:
        # uvicorn's, but decoding a text frame once, stamping the message with its arrival
        # time, and pausing reading only when READ_AHEAD messages wait (not after each one).
        frames = self.frames
        data = frames[0] if len(frames) == 1 else b"".join(frames)
        self.frames = []
        self.queue_message(data, self.curr_msg_data_type == "text")

    def queue_message(self, data: bytes, text: bool) -> None:
        """Queue a received message for the app (dropped once our close is sent)."""
        if self.close_sent:
            return  # past our close: dropped, while reading on for the client's close
        now = time.perf_counter()
        message: Message
        if text:
            try:
                message = {"type": "websocket.receive", "text": data.decode(), RECEIVED_AT: now}
            except UnicodeDecodeError:
                if self.conn.state is not State.OPEN:
                    # The client's close, parsed with this frame, is being answered.
                    return
                # uvicorn logs this with a traceback (at ERROR) for every such frame: a
                # client's mistake, told in one line.
                client = "%s:%d" % self.client if self.client else "?"  # noqa: UP031
                log.info("%s - WebSocket closed (1007): a text frame is not UTF-8", client)
                self.conn.send_close(1007)
                self.handle_parser_exception()
                return
        else:
            message = {"type": "websocket.receive", "bytes": data, RECEIVED_AT: now}
        queue: ReceiveQueue = self.queue  # type: ignore[assignment]
        queue.last_received = self.loop.time()
        queue.put_nowait(message)
        if len(queue) >= READ_AHEAD and not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    async def send_text(self, data: bytes) -> None:
        """Send `data` (UTF-8) as one text message: what uvicorn's `send` does with a
        `websocket.send` of text, framed here. Raises `ClientDisconnected` (an `OSError`)
        when the connection is no longer open (the client left or closed, or we closed)."""
        if not self.writable.is_set():
            await self.writable.wait()  # the client reads slowly (`send_timed_out` aborts)
        conn = self.conn
        if self.disconnected or self.close_sent or conn.state is not State.OPEN:
            raise ClientDisconnected
        if conn.extensions:  # per-message deflate: websockets compresses and frames
            conn.send_text(data)
            self.transport.write(b"".join(conn.data_to_send()))
        else:
            self.transport.write(text_frame(data))

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.send_timer is None:
            timeout = limits_of(self.config).ws_send_timeout_s
            self.send_timer = self.loop.call_later(timeout, self.send_timed_out)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.send_timer is not None:
            self.send_timer.cancel()
            self.send_timer = None

    def send_timed_out(self) -> None:
        self.send_timer = None
        client = "%s:%d" % self.client if self.client else "?"  # noqa: UP031
        log.info("%s - WebSocket dropped: the client does not read (send buffer full)", client)
        self.transport.abort()

    def abort_later(self) -> None:
        """Abort if the connection is not gone soon (a close waits for the buffer to drain)."""
        if self.abort_timer is None:
            self.abort_timer = self.loop.call_later(self.close_timeout + 1.0, self.transport.abort)

    def keepalive_timeout(self) -> None:
        super().keepalive_timeout()
        self.abort_later()

    async def send(self, message: Any) -> None:
        await super().send(message)
        if message["type"] == "websocket.close":
            self.abort_later()

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self.send_timer, self.abort_timer):
            if timer is not None:
                timer.cancel()
        self.send_timer = self.abort_timer = None
        OPEN.release(self.transport)
        super().connection_lost(exc)
