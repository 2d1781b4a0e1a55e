"""The engine process: an `EngineCore` on its event loop, fed by an input thread.

    input thread    ROUTER <address>-in: receive a frame and every other frame already
                    queued behind it, decode them (msgpack), hand them to the loop in one call
    event loop      the schedulers: gather a batch, run it (ORT, in the scheduler's executor
                    thread), write the sessions, answer; the answers of one tick for one API
                    process form one frame, encoded once and sent on ROUTER <address>-out
                    at the end of the tick (a non-blocking send)

Receiving blocks, so it has a thread of its own. Frames that queued while the thread waited
for the GIL (the loop or a run held it) go to the loop together: one hand-off, one
acquisition of the GIL and one wake-up of the loop per burst, not per frame. Sending
does not (no high-water mark): it stays on the loop, where a frame is complete, because an
output thread cost a queue hand-off, a thread wake-up and GIL contention per frame for
an encoding that takes ~0.2 us per answer. Stopping (SIGTERM or SIGINT, or
"stop" on the supervisor's control pipe, or that pipe closing): stop taking frames, answer
every step already received, then exit.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Hashable
from functools import partial
from multiprocessing.connection import Connection

import zmq

from service import heap, metrics
from service.config import Settings
from service.contract.protocol import (
    EngineOutput,
    EngineRequest,
    output_encoder,
    request_decoder,
)
from service.engine.client import socket_addresses
from service.engine.core import EngineCore
from service.engine.threads import name_os_thread
from service.errors import OutcomeUnknown

log = logging.getLogger(__name__)

# The most frames one hand-off carries: a bound on what one call of the loop takes in, so
# that a flood of frames still lets the loop run its batches between hand-offs.
DRAIN_FRAMES = 64

Received = list[tuple[bytes, list[EngineRequest]]]  # (API process, its frame's requests)


class EngineCoreProc:
    """One engine core served over ZeroMQ."""

    def __init__(self, settings: Settings, address: str) -> None:
        self.settings = settings
        self.address = address
        self.context = zmq.Context()
        self._outbound: zmq.Socket[bytes] | None = None  # used on the event loop only
        self._frames: dict[bytes, list[EngineOutput]] = {}
        self._flush_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.core: EngineCore | None = None
        self._taking = True

    async def serve(self, control: Connection | None = None) -> None:
        """Load the models, bind the sockets, serve until told to stop, then drain.

        With a `control` pipe (a supervised engine) the models' description is sent on it
        once serving, and "stop" or its closing stops the engine; without one, SIGTERM or
        SIGINT does.
        """
        loop = self._loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        if control is None:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, stop.set)
        self.core = await EngineCore.start(self.settings)
        heap.settle()  # the models are loaded: what the engine keeps for life
        requests_at, outputs_at = socket_addresses(self.address)
        inbound = self.context.socket(zmq.ROUTER)
        inbound.setsockopt(zmq.RCVHWM, 0)
        inbound.bind(requests_at)
        outbound = self.context.socket(zmq.ROUTER)
        outbound.setsockopt(zmq.SNDHWM, 0)
        outbound.setsockopt(zmq.ROUTER_MANDATORY, 1)  # an unknown peer raises, not drops
        outbound.bind(outputs_at)
        self._outbound = outbound
        reader = threading.Thread(
            target=self._receive, args=(inbound,), name="engine-input", daemon=True
        )
        reader.start()
        log.info("engine ready at %s", self.address)
        if control is not None:
            control.send(self.core.describe())
            threading.Thread(
                target=self._watch, args=(control, stop), name="engine-control", daemon=True
            ).start()
        await stop.wait()
        log.info("engine: stopping (answering the steps already received)")
        self._taking = False
        await self.core.close()
        self._flush()
        self._outbound = None
        outbound.close(linger=1000)  # what is queued still goes out (term waits for it)
        await asyncio.to_thread(self.context.term)  # ends the input thread's receive
        await asyncio.to_thread(reader.join, 5.0)
        log.info("engine stopped")

    def _watch(self, control: Connection, stop: asyncio.Event) -> None:
        """Until the supervisor says stop, or its pipe closes (it is gone)."""
        name_os_thread("nw-control")
        try:
            while control.recv() != "stop":
                pass
        except (EOFError, OSError):
            pass
        assert self._loop is not None
        self._loop.call_soon_threadsafe(stop.set)

    # --- input thread ----------------------------------------------------------------

    def _receive(self, socket: zmq.Socket[bytes]) -> None:
        name_os_thread("nw-input")
        loop = self._loop
        assert loop is not None
        try:
            while True:
                frames = [socket.recv_multipart(copy=False)]
                while len(frames) < DRAIN_FRAMES:  # what queued meanwhile: the same hand-off
                    try:
                        frames.append(socket.recv_multipart(zmq.NOBLOCK, copy=False))
                    except zmq.Again:
                        break
                received: Received = []
                for parts in frames:
                    if len(parts) != 2:  # (identity, frame) from a peer of ours; else none
                        log.warning("engine: message of %d parts dropped", len(parts))
                        continue
                    identity, frame = parts
                    try:
                        requests = request_decoder.decode(frame.buffer)
                    except Exception as exc:  # a peer that speaks another protocol
                        log.warning("engine: undecodable frame dropped (%s)", exc)
                        continue
                    received.append((identity.bytes, requests))
                if received:
                    loop.call_soon_threadsafe(self._accept, received)
        except zmq.ContextTerminated:
            pass
        finally:
            socket.close(linger=0)

    def _accept(self, received: Received) -> None:
        """Take frames in the order they arrived (an API process's frames keep theirs)."""
        assert self.core is not None
        if not self._taking:
            return  # stopping: the API processes were stopped first; nothing new arrives
        handle = self.core.handle
        for identity, requests in received:
            handle(requests, partial(self._reply, identity), identity)
        metrics.TALLY.inc(metrics.ENGINE_HANDOFFS)
        metrics.TALLY.inc(metrics.ENGINE_FRAMES, len(received))
        metrics.TALLY.inc(metrics.ENGINE_REQUESTS, sum(len(r) for _, r in received))

    # --- answers, one frame per API process and tick ----------------------------------

    def _reply(self, identity: Hashable, output: EngineOutput) -> None:
        assert isinstance(identity, bytes)
        outputs = self._frames.get(identity)
        if outputs is None:  # this tick's first answer for that API process
            outputs = self._frames[identity] = []
            if not self._flush_scheduled and self._loop is not None:
                self._flush_scheduled = True
                self._loop.call_soon(self._flush)
        outputs.append(output)

    def _flush(self) -> None:
        """End of the tick: each API process's answers go out as one frame."""
        self._flush_scheduled = False
        frames, self._frames = self._frames, {}
        socket = self._outbound
        if socket is None:
            return  # not serving (yet, or any more)
        for identity, outputs in frames.items():
            # Encoded before the first part goes: a failure must not leave a message half
            # sent (the next frame would be taken as its rest) nor drop the other frames.
            data = _encode(outputs)
            try:
                socket.send(identity, zmq.SNDMORE | zmq.NOBLOCK)
                socket.send(data, zmq.NOBLOCK)
            except zmq.ZMQError as exc:  # that API process is gone (ROUTER_MANDATORY)
                log.debug("engine: %d answers for a departed peer dropped (%s)", len(outputs), exc)


def _encode(outputs: list[EngineOutput]) -> bytes:
    """A frame of answers; an answer that cannot be encoded (a string that is not UTF-8)
    is replaced by its request's failure, `OutcomeUnknown` (a step's session was written),
    so that every request of the frame is still answered."""
    try:
        return output_encoder.encode(outputs)
    except Exception:
        log.exception("engine: a frame of %d answers could not be encoded", len(outputs))
    return output_encoder.encode([_encodable(output) for output in outputs])


def _encodable(output: EngineOutput) -> EngineOutput:
    try:
        output_encoder.encode([output])
    except Exception:
        error = OutcomeUnknown("the engine could not send this answer; it may have been applied")
        return EngineOutput(output.request_id, error=error.code, message=error.message)
    return output


def run_engine(settings: Settings, address: str, control: Connection | None = None) -> None:
    """Entry point of the engine process (`control`: the supervisor's pipe, if supervised)."""
    from service.logs import configure_logging

    configure_logging(settings.log_level, "engine")
    serve = EngineCoreProc(settings, address).serve(control)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it on Linux
        asyncio.run(serve)
    else:
        uvloop.run(serve)
