"""The WebSocket `/v1/stream?model=&session_id=&k=`: one session per connection.

    server, on connect    {"type": "ready", "session_id", "model", "tokens", "predictions"}
    client                {"text": str, "k"?: int, "prefix"?: str, "id"?: any}
                          {"type": "reset", "k"?: int, "prefix"?: str, "id"?: any}
    server, per message   {"type": "predictions", "session_id", "tokens", "predictions", "id"}
                          {"type": "error", "error": {"code", "message"}, "id"}

Messages are answered one at a time, in the order received. A bad message (binary,
not JSON, wrong fields, text too long) is answered in-band and the connection stays
open. Close codes: 4404 for an unknown session (after an error message), 1009 for a
frame over `max_ws_message_bytes`, 4000 + the HTTP status for other refusals on
connect, 1013 (try again later) when overloaded, 1011 on an internal error.

Reading and answering are two tasks of one task group, so that a client that leaves
while its step waits in a batch is noticed at once and the step is cancelled.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Annotated, Any

import anyio
import pydantic_core
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import Field, ValidationError
from starlette.types import Message

from service import metrics
from service.api_deps import EngineClient, NotReady
from service.api_schemas import MAX_K, TEXT_DOC, StreamMessageBase
from service.config import Settings
from service.errors import BadInput, NextwordError, Overloaded, StoreUnavailable, UnknownSession

log = logging.getLogger(__name__)

CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL = 1011
CLOSE_TRY_AGAIN = 1013
DEFAULT_K = 5
# Messages read ahead of the one being answered; past this the reader waits, and
# TCP flow control slows the client down.
READ_AHEAD = 32


def close_code(error: NextwordError) -> int:
    """The WebSocket close code for an error that ends a connection."""
    if isinstance(error, Overloaded | StoreUnavailable | NotReady):
        return CLOSE_TRY_AGAIN
    if error.status < 500:
        return 4000 + error.status  # 4404 unknown session or model, 4422 bad input
    return CLOSE_INTERNAL


def parse_k(raw: str | None) -> int:
    """The `k` query parameter: an integer in 1..50, 5 when absent."""
    if raw is None or raw == "":
        return DEFAULT_K
    if not raw.isascii() or not raw.isdigit() or not 1 <= int(raw) <= MAX_K:
        raise BadInput(f"k must be an integer in 1..{MAX_K}, got {raw[:20]!r}")
    return int(raw)


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
        value = pydantic_core.from_json(text)
    except ValueError:
        return None
    return value.get("id") if isinstance(value, dict) else None


def validation_message(exc: ValidationError) -> str:
    """One line naming each bad field, without echoing the input."""
    parts = []
    for err in exc.errors(include_input=False, include_url=False):
        loc = ".".join(str(part) for part in err["loc"])
        parts.append(f"{loc}: {err['msg']}" if loc else err["msg"])
    return "; ".join(parts)


class StreamConnection:
    """One client of `/v1/stream`: opens or resumes its session, then answers messages."""

    def __init__(
        self,
        websocket: WebSocket,
        predictor: EngineClient,
        message_model: type[StreamMessageBase],
        max_message_bytes: int,
    ) -> None:
        self.websocket = websocket
        self.predictor = predictor
        self.message_model = message_model
        self.max_message_bytes = max_message_bytes
        self.session_id = ""
        self.k = DEFAULT_K

    async def serve(self) -> None:
        """The whole life of the connection."""
        await self.websocket.accept()
        metrics.WS_CONNECTIONS.inc()
        try:
            if await self.open_session():
                await self.exchange()
        except WebSocketDisconnect:
            pass  # the client left while we were sending
        finally:
            metrics.WS_CONNECTIONS.dec()

    async def open_session(self) -> bool:
        """Create or resume the session and send `ready`; False if the connection was closed."""
        params = self.websocket.query_params
        model = params.get("model") or None
        session_id = params.get("session_id") or None
        try:
            self.k = parse_k(params.get("k"))
            if session_id is None:
                answer = await self.predictor.create_session("", k=self.k, model=model)
            else:
                answer = await self.predictor.feed(session_id, "", k=self.k)
                if model is not None and answer["model"] != model:
                    raise BadInput(
                        f"session {session_id!r} uses model {answer['model']!r}, not {model!r}"
                    )
        except NextwordError as exc:
            await self.send_error(exc, None)
            await self.websocket.close(close_code(exc), reason=exc.code)
            return False
        self.session_id = answer["session_id"]
        await self.send(
            {
                "type": "ready",
                "session_id": self.session_id,
                "model": answer["model"],
                "tokens": answer["tokens"],
                "predictions": answer["predictions"],
            }
        )
        return True

    async def exchange(self) -> None:
        """Read and answer until either side ends the connection."""
        to_answer, inbox = anyio.create_memory_object_stream[tuple[float, Message]](READ_AHEAD)
        async with anyio.create_task_group() as tasks:

            async def read_then_stop() -> None:
                await self.read(to_answer)
                tasks.cancel_scope.cancel()  # the client left: cancel its pending step

            async def answer_then_stop() -> None:
                await self.answer(inbox)
                tasks.cancel_scope.cancel()  # we closed the connection: stop reading

            tasks.start_soon(read_then_stop)
            tasks.start_soon(answer_then_stop)

    async def read(self, to_answer: MemoryObjectSendStream[tuple[float, Message]]) -> None:
        """Queue each frame with the time it arrived, until the client disconnects."""
        async with to_answer:
            while True:
                message = await self.websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                await to_answer.send((time.perf_counter(), message))

    async def answer(self, inbox: MemoryObjectReceiveStream[tuple[float, Message]]) -> None:
        """Answer queued frames in order, until one ends the connection or the client leaves."""
        async with inbox:
            async for received_at, message in inbox:
                try:
                    keep_open = await self.answer_one(message)
                except WebSocketDisconnect:
                    return  # the client left while we were answering
                except Exception:
                    log.exception("stream %s: message failed", self.session_id)
                    await self.send(
                        {
                            "type": "error",
                            "id": None,
                            "error": {"code": "internal", "message": "internal error"},
                        }
                    )
                    await self.websocket.close(CLOSE_INTERNAL, reason="internal")
                    return
                metrics.WS_MESSAGE_SECONDS.observe(time.perf_counter() - received_at)
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
            await self.websocket.close(CLOSE_TOO_BIG, reason="message too big")
            return False
        try:
            request = self.message_model.model_validate_json(text)
        except ValidationError as exc:
            await self.send_error(BadInput(validation_message(exc)), message_id(text))
            return True
        k = self.k if request.k is None else request.k
        try:
            if request.type == "reset":
                answer = await self.predictor.reset(self.session_id, k=k, prefix=request.prefix)
            else:
                assert request.text is not None  # the model validator requires it
                answer = await self.predictor.feed(
                    self.session_id, request.text, k=k, prefix=request.prefix
                )
        except UnknownSession as exc:  # expired or deleted while connected
            await self.send_error(exc, request.id)
            await self.websocket.close(close_code(exc), reason=exc.code)
            return False
        except NextwordError as exc:
            await self.send_error(exc, request.id)
            return True
        await self.send(
            {
                "type": "predictions",
                "session_id": self.session_id,
                "tokens": answer["tokens"],
                "predictions": answer["predictions"],
                "id": request.id,
            }
        )
        return True

    async def send_error(self, error: NextwordError, message_id: Any) -> None:
        """An in-band error answer."""
        await self.send(
            {
                "type": "error",
                "error": {"code": error.code, "message": error.message},
                "id": message_id,
            }
        )

    async def send(self, payload: dict[str, Any]) -> None:
        """Send one JSON message and count it by type."""
        await self.websocket.send_text(
            json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
        )
        metrics.WS_MESSAGES.labels(payload["type"]).inc()


def stream_router(settings: Settings) -> APIRouter:
    """The `/v1/stream` route; message texts hold at most `settings.max_text_chars`."""
    Text = Annotated[str | None, Field(max_length=settings.max_text_chars, description=TEXT_DOC)]

    class StreamMessage(StreamMessageBase):
        __doc__ = StreamMessageBase.__doc__
        text: Text = None

    router = APIRouter()

    @router.websocket("/v1/stream")
    async def stream(websocket: WebSocket) -> None:
        """Stream words, get predictions: see the module docstring for the protocol."""
        predictor: EngineClient | None = getattr(websocket.app.state, "predictor", None)
        if predictor is None:
            await websocket.close(CLOSE_TRY_AGAIN, reason="not ready")
            return
        connection = StreamConnection(
            websocket, predictor, StreamMessage, settings.max_ws_message_bytes
        )
        await connection.serve()

    return router
