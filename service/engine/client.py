"""How an API process reaches the engine: over ZeroMQ, or in its own process.

Both clients have one interface, `EngineClient`: `call(request)` sends one request and
returns an awaitable of its `EngineOutput`; cancelling the wait (the HTTP or WebSocket client
went away) aborts the request. `ZmqClient` gathers the requests of one event-loop tick into
one frame (`list[EngineRequest]`, msgpack) and reads the engine's frames of outputs in one
task; a call costs one future (no task, no coroutine), resolved in one pass per frame.
`InprocClient` runs an `EngineCore` on the caller's loop: for tests and `nextword predict`.

Sockets (the engine binds, API processes connect; `address` is an ipc:// prefix):

    <address>-in    engine ROUTER  <-  DEALER of each API process   requests
    <address>-out   engine ROUTER  ->  DEALER of each API process   outputs

Each API process gives both of its sockets the same random identity, so the engine's
output ROUTER sends every answer back to the process that asked. When the engine process
dies (and the supervisor starts another), `ZmqClient` fails the requests it had pending with
`EngineRestarting`, opens new sockets and waits for the new engine (see its docstring).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import secrets
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Protocol

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message, recv_monitor_message

from service.config import Settings
from service.contract.protocol import (
    AbortRequest,
    DeleteRequest,
    EngineCall,
    EngineOutput,
    EngineRequest,
    PingRequest,
    StepRequest,
    output_decoder,
    request_encoder,
)
from service.errors import BadInput, EngineRestarting, NotReady, error_from_code

if TYPE_CHECKING:  # the API side never imports onnxruntime
    from service.engine.core import EngineCore

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 120.0  # the engine loads and verifies every model first
PING_TIMEOUT_S = 2.0
RESTART_RETRY_AFTER_S = 1.0  # what a client is told to wait while the engine restarts


def socket_addresses(address: str) -> tuple[str, str]:
    """The engine's (requests, outputs) socket addresses for an address prefix."""
    return f"{address}-in", f"{address}-out"


class EngineClient(Protocol):
    """What the API side needs of the engine."""

    models: list[dict[str, Any]]  # the engine's description of its models

    def call(self, request: EngineCall) -> Awaitable[EngineOutput]:
        """Send one request; its answer is awaited. The caller sets its `request_id`
        (`next_id`), which an abort of the same request names; cancelling the task that
        awaits it (or the awaitable, where it is a future) aborts the request."""
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


class _Answer(asyncio.Future[EngineOutput]):
    """The one future of a `ZmqClient` call: the API awaits it, the client's reader sets it.

    Cancelling it (the awaiting task was cancelled, or `wait_for` timed out) aborts the
    request: `cancel` is overridden rather than a done-callback added, so that an answered
    call schedules nothing more than its waiter's wake-up.
    """

    __slots__ = ("client", "request_id", "changes")

    def __init__(self, loop: asyncio.AbstractEventLoop, client: ZmqClient, request_id: int) -> None:
        super().__init__(loop=loop)
        self.client = client
        self.request_id = request_id
        self.changes = False  # whether the request changes a session's state

    def cancel(self, msg: Any = None) -> bool:
        if not super().cancel(msg):
            return False
        self.client._abandon(self)
        return True


class ZmqClient:
    """The engine in its own process, over ZeroMQ; requests batched per event-loop tick.

    Engine restarts. A monitor on the output socket sees the engine's connection close (the
    process died: the supervisor starts another). Then every request waiting for an answer
    fails with `EngineRestarting` (`maybe_applied` when it had been sent, changes a session
    and the store is durable), the sockets are replaced (so nothing queued for the dead
    engine reaches the new one late), and the client pings until the new engine answers.
    A request made meanwhile waits up to `restart_wait_s` for it, then fails with
    `EngineRestarting` too, not applied (never sent).
    """

    def __init__(self, address: str, restart_wait_s: float = 5.0, durable: bool = False) -> None:
        self.address = address
        self.restart_wait_s = restart_wait_s
        self.durable = durable  # sessions outlive the engine (Redis): a lost step may be applied
        self.models: list[dict[str, Any]] = []
        self.restarts = 0  # engine restarts this client has seen
        self._ids = itertools.count(1)
        self._waiting: dict[int, _Answer] = {}  # by request id: sent or queued, unanswered
        self._outbox: list[EngineRequest] = []
        self._aborted: list[int] = []
        self._flush_scheduled = False
        self._reader: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._up: asyncio.Event | None = None  # set while the engine answers
        self._open_sockets()

    def _open_sockets(self) -> None:
        identity = secrets.token_bytes(8)
        requests_at, outputs_at = socket_addresses(self.address)
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
        # The engine's end of the output socket closes when its process dies.
        self._monitor = self._receiver.get_monitor_socket(
            zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED
        )

    def _close_sockets(self) -> None:
        if self._sender.closed:
            return  # closed when the engine went away, not reopened yet
        self._receiver.disable_monitor()
        self._monitor.close(linger=0)
        self._sender.close()
        self._receiver.close()
        self._context.term()
        self._async_context.term()

    def _start_tasks(self) -> None:
        assert self._loop is not None
        self._reader = self._loop.create_task(self._read(), name="engine-outputs")
        self._watcher = self._loop.create_task(self._watch(), name="engine-watch")

    @classmethod
    async def connect(
        cls,
        address: str,
        timeout: float = CONNECT_TIMEOUT_S,
        restart_wait_s: float = 5.0,
        durable: bool = False,
    ) -> ZmqClient:
        """Connect and wait until the engine answers a ping (it describes its models)."""
        client = cls(address, restart_wait_s, durable)
        client._loop = asyncio.get_running_loop()
        client._up = asyncio.Event()
        client._start_tasks()
        try:
            await client._await_engine(timeout)
        except BaseException:
            await client.close()
            raise
        return client

    async def _await_engine(self, timeout: float | None = None) -> None:
        """Ping until the engine answers (it has bound its sockets, and knows this process)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            # Until the engine's output socket knows this process, an answer is dropped
            # (ROUTER_MANDATORY on its side): ping again until one arrives.
            try:
                output = await asyncio.wait_for(self._send(PingRequest(self.next_id())), 0.25)
                break
            except asyncio.TimeoutError:
                if deadline is not None and time.monotonic() > deadline:
                    raise NotReady(f"the engine at {self.address} did not answer") from None
        if output.error is None:
            self.models = json.loads(output.message)
        assert self._up is not None
        self._up.set()

    def next_id(self) -> int:
        return next(self._ids)

    async def ping(self) -> None:
        if self._up is not None and not self._up.is_set():
            raise NotReady("the engine process is restarting")
        try:
            output = await asyncio.wait_for(self._send(PingRequest(self.next_id())), PING_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise NotReady("the engine process does not answer") from None
        if output.error is not None:
            raise error_from_code(output.error, output.message)
        self.models = json.loads(output.message)

    def call(self, request: EngineCall) -> Awaitable[EngineOutput]:
        up = self._up
        if up is not None and not up.is_set():
            return self._call_when_up(request, up)
        return self._send(request)

    async def _call_when_up(self, request: EngineCall, up: asyncio.Event) -> EngineOutput:
        """The engine is restarting: wait for it a bounded time, then send. Nothing was
        sent if it fails."""
        try:
            await asyncio.wait_for(up.wait(), self.restart_wait_s)
        except asyncio.TimeoutError:
            raise EngineRestarting(
                f"the engine process is restarting (waited {self.restart_wait_s:g} s); "
                "this request was not applied: retry",
                retry_after_s=RESTART_RETRY_AFTER_S,
            ) from None
        return await self._send(request)

    def _send(self, request: EngineCall) -> _Answer:
        """Queue `request` for this tick's frame; its answer is the returned future."""
        loop = self._loop or asyncio.get_running_loop()
        future = _Answer(loop, self, request.request_id)
        if isinstance(request, StepRequest):
            future.changes = request.session_id is not None
        else:
            future.changes = isinstance(request, DeleteRequest)
        self._waiting[request.request_id] = future
        self._outbox.append(request)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return future

    def _abandon(self, future: _Answer) -> None:
        """A call's future was cancelled: abort its request, if it is still owed an answer."""
        if self._waiting.pop(future.request_id, None) is not None:
            self._aborted.append(future.request_id)
            self._schedule_flush(future.get_loop())

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
        data: bytes | None
        try:
            data = request_encoder.encode(batch)
        except Exception:
            data = self._encode_apart(batch)
        if data is not None:
            self._sender.send(data, copy=False)

    def _encode_apart(self, batch: list[EngineRequest]) -> bytes | None:
        """A frame that failed to encode: its requests that cannot be encoded (a string
        that is not UTF-8) fail with `BadInput`, never sent; the others' frame (None: none)."""
        log.exception("a frame of %d requests could not be encoded", len(batch))
        kept: list[EngineRequest] = []
        for request in batch:
            try:
                request_encoder.encode([request])
            except Exception:
                request_id = getattr(request, "request_id", None)
                future = None if request_id is None else self._waiting.pop(request_id, None)
                if future is not None:
                    future.set_exception(BadInput("this request holds text that is not UTF-8"))
                continue
            kept.append(request)
        return request_encoder.encode(kept) if kept else None

    def _deliver(self, frame: bytes | memoryview) -> None:
        try:
            outputs = output_decoder.decode(frame)
        except Exception:
            log.exception("undecodable frame from the engine")
            return
        pop = self._waiting.pop
        for output in outputs:
            future = pop(output.request_id, None)
            if future is not None:  # not cancelled (that pops it): still pending
                future.set_result(output)

    async def _read(self) -> None:
        while True:
            frame = await self._receiver.recv(copy=False)
            self._deliver(frame.buffer)

    async def _watch(self) -> None:
        """Each time the engine's connection closes: fail what it held, and reconnect."""
        assert self._loop is not None
        lost = False
        while True:
            if not lost:
                event = await recv_monitor_message(self._monitor)
                if event["event"] != zmq.EVENT_DISCONNECTED:
                    continue
            self.restarts += 1
            log.warning("the engine process went away: failing its requests, reconnecting")
            await self._engine_lost()
            self._open_sockets()
            self._reader = self._loop.create_task(self._read(), name="engine-outputs")
            await self._await_engine()
            lost = self._lost_meanwhile()
            if not lost:
                log.info("reconnected to the restarted engine")

    def _lost_meanwhile(self) -> bool:
        """Whether the connection events queued while reconnecting end with a disconnect.

        While a killed engine's process is torn down, its listening socket can outlive its
        connections for a moment: the new sockets may connect to it and be dropped, and then
        connect to the new engine. Such a disconnect, followed by a connect, is stale; one
        that comes last means the new engine died too.
        """
        monitor: zmq.Socket[bytes] = zmq.Socket.shadow(self._monitor.underlying)
        lost = False
        while True:
            try:
                frames = monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return lost
            lost = parse_monitor_message(frames)["event"] == zmq.EVENT_DISCONNECTED

    async def _engine_lost(self) -> None:
        assert self._up is not None and self._reader is not None
        self._up.clear()
        self._reader.cancel()
        await asyncio.wait([self._reader])
        # Answers the engine sent before it died may still be queued: deliver them.
        receiver: zmq.Socket[bytes] = zmq.Socket.shadow(self._receiver.underlying)
        while True:
            try:
                frame = receiver.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            self._deliver(frame.buffer)
        unsent = {request.request_id for request in self._outbox if hasattr(request, "request_id")}
        self._outbox = []
        self._aborted = []
        waiting, self._waiting = self._waiting, {}
        for request_id, future in waiting.items():
            if future.done():
                continue
            maybe = self.durable and future.changes and request_id not in unsent
            future.set_exception(
                EngineRestarting(
                    "the engine process died while this request was pending; it is being "
                    + (
                        "restarted: it may have been applied (compare the session's tokens)"
                        if maybe
                        else "restarted: it was not applied, retry"
                    ),
                    retry_after_s=RESTART_RETRY_AFTER_S,
                    maybe_applied=maybe,
                )
            )
        self._close_sockets()

    async def close(self) -> None:
        for task in (self._watcher, self._reader):
            if task is not None:
                task.cancel()
                await asyncio.wait([task])
        self._reader = self._watcher = None
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(NotReady("the connection to the engine was closed"))
        self._waiting.clear()
        self._close_sockets()


async def connect_engine(settings: Settings) -> EngineClient:
    """The engine named by the settings: its process, or a new one in this process."""
    if settings.engine_address:
        return await ZmqClient.connect(
            settings.engine_address,
            restart_wait_s=settings.engine_restart_wait_s,
            durable=settings.session_store != "memory",
        )
    return await InprocClient.start(settings)
