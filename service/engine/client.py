"""How an API process reaches the engine: over ZeroMQ, or in its own process.

Both clients have one interface, `EngineClient`: `call(request)` sends one request and
waits for its `EngineOutput`; cancelling the wait (the HTTP or WebSocket client went away)
aborts the request. `ZmqClient` gathers the requests of one event-loop tick into one frame
(`list[EngineRequest]`, msgpack) and reads the engine's frames of outputs in one task.
`InprocClient` runs an `EngineCore` on the caller's loop: for tests and `nextword predict`.

Sockets (the engine binds, API processes connect; `address` is an ipc:// prefix):

    <address>-in    engine ROUTER  <-  DEALER of each API process   requests
    <address>-out   engine ROUTER  ->  DEALER of each API process   outputs

Each API process gives both of its sockets the same random identity, so the engine's
output ROUTER sends every answer back to the process that asked.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import secrets
import time
from typing import TYPE_CHECKING, Any, Protocol

import zmq
import zmq.asyncio

from service.config import Settings
from service.contract.protocol import (
    AbortRequest,
    EngineCall,
    EngineOutput,
    EngineRequest,
    PingRequest,
    output_decoder,
    request_encoder,
)
from service.errors import NotReady, error_from_code

if TYPE_CHECKING:  # the API side never imports onnxruntime
    from service.engine.core import EngineCore

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 120.0  # the engine loads and verifies every model first
PING_TIMEOUT_S = 2.0


def socket_addresses(address: str) -> tuple[str, str]:
    """The engine's (requests, outputs) socket addresses for an address prefix."""
    return f"{address}-in", f"{address}-out"


class EngineClient(Protocol):
    """What the API side needs of the engine."""

    models: list[dict[str, Any]]  # the engine's description of its models

    async def call(self, request: EngineCall) -> EngineOutput:
        """Send one request and wait for its answer; the caller sets its `request_id`
        (`next_id`), which an abort of the same request names."""
        ...

    def next_id(self) -> int:
        """A request id unique within this client."""
        ...

    async def ping(self) -> None:
        """Raise `NotReady` or `StoreUnavailable` when the engine cannot serve."""
        ...

    async def close(self) -> None:
        """Release what the client holds (an in-process engine drains first)."""
        ...


class InprocClient:
    """The engine core in this process, behind the `EngineClient` interface."""

    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self.models = core.describe()
        self._ids = itertools.count(1)

    @classmethod
    async def start(cls, settings: Settings) -> InprocClient:
        """Start an engine core in this process (imports onnxruntime)."""
        from service.engine.core import EngineCore

        return cls(await EngineCore.start(settings))

    def next_id(self) -> int:
        return next(self._ids)

    async def call(self, request: EngineCall) -> EngineOutput:
        future: asyncio.Future[EngineOutput] = asyncio.get_running_loop().create_future()

        def reply(output: EngineOutput) -> None:
            if not future.done():
                future.set_result(output)

        self.core.handle([request], reply, self)
        try:
            return await future
        except asyncio.CancelledError:
            self.core.handle([AbortRequest([request.request_id])], reply, self)
            raise

    async def ping(self) -> None:
        await self.core.store.ping()

    async def close(self) -> None:
        await self.core.close()


class ZmqClient:
    """The engine in its own process, over ZeroMQ; requests batched per event-loop tick."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.models: list[dict[str, Any]] = []
        identity = secrets.token_bytes(8)
        requests_at, outputs_at = socket_addresses(address)
        # Sends happen on the event loop and never block (no high-water mark): a plain
        # socket. Outputs are awaited: an asyncio socket of its own context.
        self._context = zmq.Context()
        self._sender = self._context.socket(zmq.DEALER)
        self._sender.setsockopt(zmq.IDENTITY, identity)
        self._sender.setsockopt(zmq.SNDHWM, 0)
        self._sender.setsockopt(zmq.LINGER, 0)
        self._sender.connect(requests_at)
        self._async_context = zmq.asyncio.Context()
        self._receiver = self._async_context.socket(zmq.DEALER)
        self._receiver.setsockopt(zmq.IDENTITY, identity)
        self._receiver.setsockopt(zmq.RCVHWM, 0)
        self._receiver.setsockopt(zmq.LINGER, 0)
        self._receiver.connect(outputs_at)
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[EngineOutput]] = {}
        self._outbox: list[EngineRequest] = []
        self._aborted: list[int] = []
        self._flush_scheduled = False
        self._reader: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    async def connect(cls, address: str, timeout: float = CONNECT_TIMEOUT_S) -> ZmqClient:
        """Connect and wait until the engine answers a ping (it describes its models)."""
        client = cls(address)
        client._loop = asyncio.get_running_loop()
        client._reader = client._loop.create_task(client._read(), name="engine-outputs")
        deadline = time.monotonic() + timeout
        while True:
            # Until the engine's output socket knows this process, an answer is dropped
            # (ROUTER_MANDATORY on its side): ping again until one arrives.
            try:
                output = await asyncio.wait_for(client._ping_once(), 0.25)
                break
            except asyncio.TimeoutError:
                if time.monotonic() > deadline:
                    await client.close()
                    raise NotReady(f"the engine at {address} did not answer") from None
        if output.error is None:
            client.models = json.loads(output.message)
        return client

    def next_id(self) -> int:
        return next(self._ids)

    async def _ping_once(self) -> EngineOutput:
        return await self.call(PingRequest(self.next_id()))

    async def ping(self) -> None:
        try:
            output = await asyncio.wait_for(self._ping_once(), PING_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise NotReady("the engine process does not answer") from None
        if output.error is not None:
            raise error_from_code(output.error, output.message)
        self.models = json.loads(output.message)

    async def call(self, request: EngineCall) -> EngineOutput:
        loop = self._loop or asyncio.get_running_loop()
        future: asyncio.Future[EngineOutput] = loop.create_future()
        request_id = request.request_id
        self._waiting[request_id] = future
        self._outbox.append(request)
        self._schedule_flush(loop)
        try:
            return await future
        except asyncio.CancelledError:
            if self._waiting.pop(request_id, None) is not None:
                self._aborted.append(request_id)
                self._schedule_flush(loop)
            raise

    def _schedule_flush(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Send what this tick gathered as one frame."""
        self._flush_scheduled = False
        batch = self._outbox
        if self._aborted:
            batch.append(AbortRequest(self._aborted))
            self._aborted = []
        if not batch:
            return
        self._outbox = []
        self._sender.send(request_encoder.encode(batch), copy=False)

    async def _read(self) -> None:
        while True:
            frame = await self._receiver.recv(copy=False)
            try:
                outputs = output_decoder.decode(frame.buffer)
            except Exception:
                log.exception("undecodable frame from the engine")
                continue
            for output in outputs:
                future = self._waiting.pop(output.request_id, None)
                if future is not None and not future.done():
                    future.set_result(output)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.wait([self._reader])
            self._reader = None
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(NotReady("the connection to the engine was closed"))
        self._waiting.clear()
        self._sender.close()
        self._receiver.close()
        self._context.term()
        self._async_context.term()


async def connect_engine(settings: Settings) -> EngineClient:
    """The engine named by the settings: its process, or a new one in this process."""
    if settings.engine_address:
        return await ZmqClient.connect(settings.engine_address)
    return await InprocClient.start(settings)
