"""The WebSocket `/v1/stream?model=&session_id=&k=&adapt=`: one session per connection.

    server, on connect    {"type": "ready", "session_id", "model", "tokens", "predictions"}
    client                {"text": str, "k"?: int, "prefix"?: str, "adapt"?: bool, "id"?: any}
                          {"type": "reset", "k"?: int, "prefix"?: str, "id"?: any}

`adapt` (the query parameter for the whole stream, a message's field for one answer): mix
the writer's own words into the predictions or not; absent, the session's default.
    server, per message   {"type": "predictions", "session_id", "tokens", "predictions", "id"}
                          {"type": "error", "error": {"code", "message"}, "id"}

Messages are answered one at a time, in the order received. A message with the same `id`
and text as the last step applied to the session is its retry: answered, not applied again. A bad message (binary,
not JSON, wrong fields, text too long) is answered in-band and the connection stays
open; so is a retryable failure (`rate_limited`, `overloaded`, `engine_restarting` while
the engine process restarts after a crash, with `retry_after_ms` and `maybe_applied`). Close codes (`service.api.errors.close_code`): 4404 for an unknown session (after an
error message), 1009 for a frame over `max_ws_message_bytes`, 4000 + the HTTP status for
other refusals on connect, 1013 (try again later) when overloaded, 1011 on an internal
error, 1001 when the server drains on shutdown (after answering what it had received),
1000 "idle timeout" after `ws_idle_timeout_s` without a client message, 1007 for a text frame
that is not UTF-8. An `Origin` not in
`allowed_origins` (same origin by default) is refused with HTTP 403 before the upgrade.

The hot path is per message: one msgspec decode into a Struct, one `Predictor.feed`, one
msgspec encode, its bytes handed to our uvicorn protocol (`service.api.inbox.Sender`, in the
scope), which frames and writes them (on another server: Starlette's `WebSocket.send`). A
connection has one task for its whole life (not one per message), started by the ASGI app's
task, which then waits for it: the answering loop. It takes messages straight from the
server's receive queue (`service.api.inbox.ReceiveQueue`, which our uvicorn protocol offers
in the scope; on another server a read-ahead task fills one), and the queue cancels it the
moment a disconnect is queued, which aborts the pending step in the engine. A drain (or the
idle timeout) queues `END` behind what was received: those messages are answered, then the
stream closes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Annotated, Any, Literal, Optional, cast

import msgspec
from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from starlette.types import Message

from service import metrics
from service.api.auth import OWNER, Limiter, client_address
from service.api.deps import get_predictor
from service.api.errors import close_code
from service.api.inbox import (
    DIRECT_RECEIVE,
    DIRECT_SEND,
    LEFT,
    RECEIVED_AT,
    ReceiveQueue,
    Receiver,
    Sender,
)
from service.api.predictor import Predictor
from service.api.schemas import TEXT_DOC
from service.config import Settings
from service.contract.limits import DEFAULT_K, MAX_K, MAX_PREFIX_CHARS
from service.errors import (
    BadInput,
    NextwordError,
    NotReady,
    RateLimited,
    UnknownSession,
)

log = logging.getLogger(__name__)

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL = 1011
CLOSE_TRY_AGAIN = 1013
RECEIVE = "websocket.receive"
# Queued by a drain or the idle timeout: answer what came before it, then close.
END: Message = {"type": "nextword.end"}

# The open connections of this process, so that a shutdown can drain them.
OPEN_STREAMS: set[StreamConnection] = set()

_encode = msgspec.json.Encoder().encode
_SENT: dict[str, Any] = {}  # message type -> its child of WS_MESSAGES (labels() costs a lock)
_loose = msgspec.json.Decoder()


def parse_k(raw: str | None) -> int:
    """The `k` query parameter: an integer in 1..50, 5 when absent."""
    if raw is None or raw == "":
        return DEFAULT_K
    digits = raw.lstrip("0") or "0"
    # The length before int(), which refuses over 4,300 digits with a ValueError.
    if not raw.isascii() or not raw.isdigit() or len(digits) > 2 or not 1 <= int(digits) <= MAX_K:
        raise BadInput(f"k must be an integer in 1..{MAX_K}, got {raw[:20]!r}")
    return int(digits)


def parse_adapt(raw: str | None) -> bool | None:
    """The `adapt` query parameter: true or false for the whole stream; absent: None."""
    if raw is None or raw == "":
        return None
    value = raw.strip().lower()
    if value not in ("true", "false", "1", "0"):
        raise BadInput(f"adapt must be true or false, got {raw[:20]!r}")
    return value in ("true", "1")


def over_size(text: str, limit: int) -> bool:
    """Whether `text` takes more than `limit` bytes as UTF-8 (encoding only when unclear)."""
    if len(text) > limit:
        return True  # at least one byte per character
    if 4 * len(text) <= limit:
        return False  # at most four bytes per character
    return len(text.encode("utf-8", "surrogatepass")) > limit


def message_id(text: str) -> Any:
    """The `id` of a message that failed validation, if it has one, to echo it."""
    try:
        value = _loose.decode(text)
    except (msgspec.DecodeError, RecursionError):
        return None
    return value.get("id") if isinstance(value, dict) else None


def message_decoder(max_text_chars: int) -> msgspec.json.Decoder[Any]:
    """A strict decoder of client messages whose `text` holds at most `max_text_chars`."""
    Text = Annotated[str, msgspec.Meta(max_length=max_text_chars, description=TEXT_DOC)]
    # 20.0 is the integer 20 to JSON Schema (and to the REST bodies): accepted, checked below.
    K = (
        Annotated[int, msgspec.Meta(ge=1, le=MAX_K)]
        | Annotated[float, msgspec.Meta(ge=1, le=MAX_K)]
    )
    Prefix = Annotated[str, msgspec.Meta(max_length=MAX_PREFIX_CHARS)]

    message = msgspec.defstruct(
        "StreamMessage",
        [
            ("type", Literal["text", "reset"], "text"),
            ("text", Optional[Text], None),  # noqa: UP045 (built at run time)
            ("k", Optional[K], None),  # noqa: UP045
            ("prefix", Optional[Prefix], None),  # noqa: UP045
            ("adapt", Optional[bool], None),  # noqa: UP045
            ("id", Any, None),
        ],
        forbid_unknown_fields=True,
        gc=False,
    )
    return msgspec.json.Decoder(message)


def has_lone_surrogate(text: str) -> bool:
    """Whether a decoded string holds a UTF-16 surrogate (not a character: not text)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


class ReadAhead:
    """A `Receiver` for servers that offer none (`TestClient`, plain uvicorn): a task reads
    the ASGI `receive` into a `ReceiveQueue`, waiting while `READ_AHEAD` messages wait."""

    def __init__(self, websocket: WebSocket) -> None:
        loop = asyncio.get_running_loop()
        self.queue = ReceiveQueue(loop)
        self._task = loop.create_task(self._read(websocket, loop))

    async def receive(self) -> Message:
        """The next message."""
        return await self.queue.get()

    async def _read(self, websocket: WebSocket, loop: asyncio.AbstractEventLoop) -> None:
        queue = self.queue
        while True:
            message = await websocket.receive()
            if message["type"] == LEFT:
                queue.put_nowait(message)
                return
            message[RECEIVED_AT] = time.perf_counter()
            queue.last_received = loop.time()
            await queue.put(message)

    def close(self) -> None:
        """Stop reading."""
        self._task.cancel()


class StreamConnection:
    """One client of `/v1/stream`: opens or resumes its session, then answers messages."""

    def __init__(
        self,
        websocket: WebSocket,
        predictor: Predictor,
        decoder: msgspec.json.Decoder[Any],
        max_message_bytes: int,
        idle_timeout_s: float = 0.0,
    ) -> None:
        self.websocket = websocket
        self.idle_timeout_s = idle_timeout_s
        self._idle_timer: asyncio.TimerHandle | None = None
        self.predictor = predictor
        # The rate buckets (Redis's or this process's), and whose this connection's messages take.
        self.limiter: Limiter | None = getattr(websocket.app.state, "rate_limiter", None)
        self.bucket = websocket.scope.get(OWNER) or client_address(websocket.scope)
        self.decoder = decoder
        self.max_message_bytes = max_message_bytes
        self.session_id = ""
        self.k = DEFAULT_K
        self.adapt: bool | None = None  # the stream's `adapt` (None: the session's default)
        self.gone = False  # the client left: the answering loop was cancelled for it
        self._draining = False  # the server shuts down (or the client idles): END is queued
        self._closing = (CLOSE_GOING_AWAY, "server shutting down")  # the close after draining
        self.receiver: Receiver | None = None  # where messages come from, once exchanging
        # Where answers go when the server offers it (our uvicorn protocol), else None:
        # through `websocket.send`.
        extensions = websocket.scope.get("extensions") or {}
        self.sender: Sender | None = extensions.get(DIRECT_SEND)
        self._answering: asyncio.Task[Any] | None = None

    async def serve(self) -> None:
        """The whole life of the connection."""
        await self.websocket.accept()
        metrics.WS_CONNECTIONS.inc()
        OPEN_STREAMS.add(self)
        try:
            if await self.open_session():
                await self.exchange()
        except WebSocketDisconnect:
            pass  # the client left while we were sending
        finally:
            OPEN_STREAMS.discard(self)
            metrics.WS_CONNECTIONS.dec()

    async def open_session(self) -> bool:
        """Create or resume the session and send `ready`; False if the connection was closed."""
        params = self.websocket.query_params
        model = params.get("model") or None
        session_id = params.get("session_id") or None
        try:
            self.k = parse_k(params.get("k"))
            self.adapt = parse_adapt(params.get("adapt"))
            if session_id is None:
                answer = await self.predictor.create_session(
                    "", k=self.k, model=model, adapt=self.adapt
                )
            else:
                answer = await self.predictor.feed(session_id, "", k=self.k, adapt=self.adapt)
                if model is not None and answer["model"] != model:
                    raise BadInput(
                        f"session {session_id!r} uses model {answer['model']!r}, not {model!r}"
                    )
        except NextwordError as exc:
            await self.send_error(exc, None)
            await self.websocket.close(close_code(exc), reason=exc.code)
            return False
        self.session_id = answer["session_id"]
        answer["type"] = "ready"
        await self.send(answer)
        return True

    async def exchange(self) -> None:
        """Read and answer until either side ends the connection."""
        loop = asyncio.get_running_loop()
        extensions = self.websocket.scope.get("extensions") or {}
        direct = extensions.get(DIRECT_RECEIVE)
        receiver = self.receiver = cast(Receiver, direct) if direct else ReadAhead(self.websocket)
        queue = receiver.queue
        # The answering loop is a task of its own rather than this one (the ASGI app's, under
        # some twenty frames of middleware): it is resumed twice per message, and resuming a
        # task resumes every coroutine frame on its stack. Cancelling this task cancels it.
        self._answering = loop.create_task(self.answer())
        if queue.left:
            self.client_left()
        else:
            queue.on_disconnect = self.client_left
        if self._draining:
            queue.put_nowait(END)  # drained while the session opened
        if self.idle_timeout_s:
            queue.last_received = loop.time()
            self._idle_timer = loop.call_later(self.idle_timeout_s, self.check_idle)
        try:
            await self._answering
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if not self.gone or (current is not None and current.cancelling()):
                raise
            # cancelled for the client that left: done
        finally:
            queue.on_disconnect = None
            if isinstance(receiver, ReadAhead):
                receiver.close()
            if self._idle_timer is not None:
                self._idle_timer.cancel()

    def client_left(self) -> None:
        """The client is gone: cancel the answering loop, which aborts its pending step."""
        self.gone = True
        if self._answering is not None:
            self._answering.cancel()

    def check_idle(self) -> None:
        """Close a stream without a client message for `idle_timeout_s` (timer callback)."""
        loop = asyncio.get_running_loop()
        assert self.receiver is not None  # the timer starts with the exchange
        queue = self.receiver.queue
        left = queue.last_received + self.idle_timeout_s - loop.time()
        if not queue.empty():
            # Messages still waiting are not idleness: one read can queue thousands (a
            # client that pipelines), and answering them may take longer than the timeout.
            left = self.idle_timeout_s
        if left > 0:
            self._idle_timer = loop.call_later(left, self.check_idle)
            return
        self._idle_timer = None
        if not self._draining:
            self._closing = (CLOSE_NORMAL, "idle timeout")
            self.drain()  # answers what was received, then closes

    def drain(self) -> None:
        """Stop answering: answer the messages already received, then close (1001 unless
        the idle timeout set another code)."""
        if self._draining:
            return
        self._draining = True
        if self.receiver is not None:
            self.receiver.queue.put_nowait(END)

    async def close(self, code: int, reason: str) -> None:
        """Close the connection from our side (its disconnect is not the client leaving)."""
        if self.receiver is not None:
            self.receiver.queue.on_disconnect = None
        await self.websocket.close(code, reason=reason)

    async def answer(self) -> None:
        """Answer received messages in order, until one ends the connection or the client
        leaves."""
        assert self.receiver is not None
        receive = self.receiver.receive
        now = time.perf_counter
        while True:
            message = await receive()
            kind = message["type"]
            if kind != RECEIVE:
                if kind == LEFT:
                    self.gone = True
                else:  # END
                    await self.close(*self._closing)
                return
            try:
                keep_open = await self.answer_one(message)
            except WebSocketDisconnect:
                return  # the client left while we were answering
            except Exception:
                log.exception("stream: message failed")
                await self.send(
                    {
                        "type": "error",
                        "id": None,
                        "error": {"code": "internal", "message": "internal error"},
                    }
                )
                await self.close(CLOSE_INTERNAL, "internal")
                return
            metrics.TALLY.observe(metrics.WS_MESSAGE_SECONDS, now() - message[RECEIVED_AT])
            if not keep_open:
                return

    async def answer_one(self, message: Message) -> bool:
        """Answer one frame; False when the connection was closed."""
        text = message.get("text")
        if text is None:
            await self.send_error(BadInput("binary frames are not accepted: send JSON text"), None)
            return True
        if over_size(text, self.max_message_bytes):
            error = BadInput(f"message over the {self.max_message_bytes}-byte limit")
            await self.send_error(error, None)
            await self.close(CLOSE_TOO_BIG, "message too big")
            return False
        try:
            request = self.decoder.decode(text)
        except (msgspec.ValidationError, msgspec.DecodeError, RecursionError) as exc:
            await self.send_error(BadInput(str(exc)), message_id(text))
            return True
        problem = self.problem(request, "\\u" in text)
        if problem is not None:
            await self.send_error(BadInput(problem), request.id)
            return True
        if self.limiter is not None:
            wait = await self.limiter.admit(self.bucket)
            if wait > 0:
                await self.send_error(
                    RateLimited("over this key's message rate; retry later", wait), request.id
                )
                return True
        k = self.k if request.k is None else request.k
        # A message's `id` names its step: sent again with the same text, it is a retry.
        key = None if request.id is None else _encode(request.id).decode()
        try:
            if request.type == "reset":
                answer = await self.predictor.reset(
                    self.session_id, k=k, prefix=request.prefix, request_key=key
                )
            else:
                adapt = self.adapt if request.adapt is None else request.adapt
                answer = await self.predictor.feed(
                    self.session_id,
                    request.text,
                    k=k,
                    prefix=request.prefix,
                    adapt=adapt,
                    request_key=key,
                )
        except UnknownSession as exc:  # expired or deleted while connected
            await self.send_error(exc, request.id)
            await self.close(close_code(exc), exc.code)
            return False
        except NextwordError as exc:
            await self.send_error(exc, request.id)
            return True
        answer["type"] = "predictions"
        answer["id"] = request.id
        del answer["model"]
        await self.send(answer)
        return True

    @staticmethod
    def problem(request: Any, escapes: bool = True) -> str | None:
        """What is wrong with a decoded message beyond its field types, if anything.
        `escapes`: whether its JSON may hold a `\\u` escape (without one, its strings hold
        no lone surrogate: a received text frame is valid UTF-8)."""
        if request.type == "text" and request.text is None:
            return 'a message needs "text" (or "type": "reset")'
        if request.type == "reset" and request.text is not None:
            return 'a "reset" message takes no "text"'
        if isinstance(request.k, float):
            if not request.k.is_integer():
                return f"k must be an integer from 1 to {MAX_K}, not {request.k!r}"
            request.k = int(request.k)
        if not escapes:
            return None
        for name in ("text", "prefix"):
            value = getattr(request, name)
            if value is not None and has_lone_surrogate(value):
                return f"{name} holds an unpaired UTF-16 surrogate"
        return None

    async def send_error(self, error: NextwordError, message_id: Any) -> None:
        """An in-band error answer."""
        body: dict[str, Any] = {"code": error.code, "message": error.message, **error.details()}
        await self.send({"type": "error", "error": body, "id": message_id})

    async def send(self, payload: dict[str, Any]) -> None:
        """Send one JSON message and count it by type; `WebSocketDisconnect` when the
        connection is no longer open."""
        data = _encode(payload)
        sender = self.sender
        if sender is None:
            await self.websocket.send({"type": "websocket.send", "text": data.decode()})
        else:
            try:
                await sender.send_text(data)
            except OSError:  # as Starlette's `WebSocket.send` tells it
                raise WebSocketDisconnect(1006) from None
        kind = payload["type"]
        counter = _SENT.get(kind)
        if counter is None:
            counter = _SENT[kind] = metrics.WS_MESSAGES.labels(kind)
        metrics.TALLY.inc(counter)


async def drain_streams(timeout: float) -> None:
    """Answer what every open stream has received, close each with 1001 (shutdown)."""
    streams = list(OPEN_STREAMS)
    for stream in streams:
        stream.drain()
    deadline = time.monotonic() + timeout
    while OPEN_STREAMS and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    if streams:
        log.info("drained %d WebSocket streams (%d left)", len(streams), len(OPEN_STREAMS))


def allowed_origins(setting: str) -> frozenset[str]:
    """`NEXTWORD_ALLOWED_ORIGINS` as a set of lower-case origins ("*" = any)."""
    return frozenset(o.strip().rstrip("/").lower() for o in setting.split(",") if o.strip())


def origin_allowed(websocket: WebSocket, allowed: frozenset[str]) -> bool:
    """Whether a WebSocket's `Origin` may connect: listed, or (none listed) same-origin.

    No `Origin` (a client other than a browser) is always allowed: the header protects
    browsers' users from other sites' pages, not the server from clients.
    """
    origin = websocket.headers.get("origin")
    if origin is None or "*" in allowed:
        return True
    origin = origin.strip().rstrip("/").lower()
    if allowed:
        return origin in allowed
    host = websocket.headers.get("host", "").lower()
    return bool(host) and origin.partition("://")[2] == host


def stream_router(settings: Settings) -> APIRouter:
    """The `/v1/stream` route; message texts hold at most `settings.max_text_chars`."""
    decoder = message_decoder(settings.max_text_chars)
    allowed = allowed_origins(settings.allowed_origins)
    router = APIRouter()

    @router.websocket("/v1/stream")
    async def stream(websocket: WebSocket) -> None:
        """Stream words, get predictions: see the module docstring for the protocol."""
        try:
            predictor = get_predictor(websocket)  # as the connection's API key sees it
        except NotReady:
            await websocket.close(CLOSE_TRY_AGAIN, reason="not ready")
            return
        if not origin_allowed(websocket, allowed):
            log.info("stream: Origin %r refused", websocket.headers.get("origin", "")[:200])
            await websocket.close(CLOSE_POLICY)  # before accept: HTTP 403
            return
        connection = StreamConnection(
            websocket,
            predictor,
            decoder,
            settings.max_ws_message_bytes,
            settings.ws_idle_timeout_s,
        )
        await connection.serve()

    return router
