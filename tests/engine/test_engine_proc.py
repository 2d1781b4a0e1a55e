"""The engine in its own process, reached over ZeroMQ (service.engine.proc, engine.client)."""

from __future__ import annotations

import asyncio
import multiprocessing
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
import zmq

from service.api.predictor import Predictor
from service.config import Settings
from service.contract.protocol import (
    EngineOutput,
    InfoRequest,
    StepRequest,
    output_decoder,
    request_encoder,
)
from service.engine.client import ZmqClient, socket_addresses
from service.engine.proc import EngineCoreProc, run_engine
from service.errors import BadInput, EngineRestarting, NotReady, OutcomeUnknown
from tests.api_support import TEXTS, assert_same_predictions


def engine_settings(models: Path, **overrides: Any) -> Settings:
    return Settings(
        models_dir=models, providers="CPUExecutionProvider", intra_op_threads=1, **overrides
    )


class EngineProcess:
    """`run_engine` in a child process, with its control pipe (as the supervisor has)."""

    def __init__(self, settings: Settings, address: str | None = None) -> None:
        self.dir = tempfile.TemporaryDirectory(prefix="nextword-test-")
        self.address = address or f"ipc://{self.dir.name}/engine"
        context = multiprocessing.get_context("spawn")
        self.control, theirs = context.Pipe()
        self.process = context.Process(target=run_engine, args=(settings, self.address, theirs))
        self.process.start()
        theirs.close()
        assert self.control.poll(120), "the engine did not start"
        self.models = self.control.recv()

    def stop(self) -> int | None:
        if self.process.is_alive():
            self.control.send("stop")
            self.process.join(30)
        self.dir.cleanup()
        return self.process.exitcode


@pytest.fixture(scope="module")
def engine(tiny_artifacts: Path) -> Iterator[EngineProcess]:
    proc = EngineProcess(engine_settings(tiny_artifacts, max_wait_ms=5.0))
    yield proc
    assert proc.stop() == 0


@pytest.fixture
async def client(engine: EngineProcess) -> AsyncIterator[ZmqClient]:
    client = await ZmqClient.connect(engine.address)
    yield client
    await client.close()


async def test_the_engine_describes_its_models(engine: EngineProcess, client: ZmqClient) -> None:
    assert sorted(m["name"] for m in engine.models) == ["gru", "lstm"]
    assert client.models == engine.models
    await client.ping()


async def test_answers_over_zeromq_equal_the_in_process_engine(
    engine: EngineProcess, tiny_artifacts: Path
) -> None:
    remote = await Predictor.start(engine_settings(tiny_artifacts, engine_address=engine.address))
    local = await Predictor.start(engine_settings(tiny_artifacts))
    try:
        for model in ("lstm", "gru"):
            session = await remote.create_session(model=model, k=8)
            for i, word in enumerate(TEXTS[1].split()):
                got = await remote.feed(session["session_id"], word, k=8)
                want = await local.predict(" ".join(TEXTS[1].split()[: i + 1]), model=model, k=8)
                assert got["tokens"] == want["tokens"]
                assert_same_predictions(got["predictions"], want["predictions"])
            info = await remote.session_info(session["session_id"])
            assert info["model"] == model and info["tokens"] == len(TEXTS[1].split())
    finally:
        await remote.close()
        await local.close()


async def test_requests_of_one_tick_travel_in_one_frame_and_batch(
    engine: EngineProcess, client: ZmqClient
) -> None:
    sent: list[bytes] = []
    send = client._sender.send

    def record(frame: Any, *args: Any, **kwargs: Any) -> Any:
        sent.append(bytes(frame))
        return send(frame, *args, **kwargs)

    client._sender.send = record  # type: ignore[method-assign]
    vocab_ids = list(range(10, 74))
    calls = [client.call(StepRequest(client.next_id(), "lstm", [i, i + 1], 5)) for i in vocab_ids]
    outputs = await asyncio.gather(*calls)
    assert len(sent) == 1  # 64 requests, one frame
    assert all(o.error is None and len(o.ids) == 5 and o.tokens == 2 for o in outputs)
    assert len({o.request_id for o in outputs}) == 64


async def test_an_aborted_request_is_not_applied(engine: EngineProcess, client: ZmqClient) -> None:
    created = await client.call(
        StepRequest(client.next_id(), "gru", [], 5, "abort-me", create=True)
    )
    assert created.error is None
    long_text = [int(t) for t in np.random.default_rng(0).integers(10, 100, 2000)]
    # Steps of one session run one batch after another: the two long ones keep the
    # engine busy while the abort of the third arrives.
    first = [
        asyncio.ensure_future(
            client.call(StepRequest(client.next_id(), "gru", long_text, 5, "abort-me"))
        )
        for _ in range(2)
    ]
    third = asyncio.ensure_future(
        client.call(StepRequest(client.next_id(), "gru", [5, 6], 5, "abort-me"))
    )
    await asyncio.sleep(0)  # the three requests leave in this tick's frame
    third.cancel()  # the abort follows in the next frame
    with pytest.raises(asyncio.CancelledError):
        await third
    assert [o.tokens for o in await asyncio.gather(*first)] == [2000, 4000]
    await asyncio.sleep(0.2)
    info = await client.call(InfoRequest(client.next_id(), "abort-me"))
    assert info.tokens == 4000


async def test_a_call_is_one_future_and_cancelling_its_waiter_aborts_it(
    engine: EngineProcess, client: ZmqClient
) -> None:
    # The API awaits a call inside the request's own task: no task or coroutine per call,
    # and that task's cancellation (the client went away) reaches the engine as an abort.
    created = await client.call(StepRequest(client.next_id(), "gru", [], 5, "gone", create=True))
    assert created.error is None
    long_text = [int(t) for t in np.random.default_rng(1).integers(10, 100, 2000)]
    first = [
        client.call(StepRequest(client.next_id(), "gru", long_text, 5, "gone")) for _ in range(2)
    ]
    tasks = len(asyncio.all_tasks())
    third = client.call(StepRequest(client.next_id(), "gru", [5, 6], 5, "gone"))
    assert isinstance(third, asyncio.Future)
    assert len(asyncio.all_tasks()) == tasks

    async def request_task() -> EngineOutput:
        return await third

    waiter = asyncio.ensure_future(request_task())
    await asyncio.sleep(0)  # the three requests leave in this tick's frame
    waiter.cancel()  # the abort follows in the next frame
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert third.cancelled()
    assert [o.tokens for o in await asyncio.gather(*first)] == [2000, 4000]
    await asyncio.sleep(0.2)
    info = await client.call(InfoRequest(client.next_id(), "gone"))
    assert info.tokens == 4000


async def test_errors_travel_as_codes(client: ZmqClient) -> None:
    unknown = await client.call(StepRequest(client.next_id(), "transformer", [1], 5))
    assert unknown.error == "unknown_model" and "transformer" in unknown.message
    missing = await client.call(StepRequest(client.next_id(), "lstm", [5], 5, "no-such-session"))
    assert missing.error == "unknown_session"


async def test_a_bad_frame_is_dropped_and_the_engine_goes_on(
    engine: EngineProcess, client: ZmqClient
) -> None:
    context = zmq.Context()
    rogue = context.socket(zmq.DEALER)
    rogue.connect(socket_addresses(engine.address)[0])
    rogue.send(b"\x00not msgpack")
    rogue.send(msgspec.msgpack.encode([["not", "a", "request"]]))
    rogue.close(linger=1000)
    context.term()
    answer = await client.call(StepRequest(client.next_id(), "lstm", [5, 6], 3))
    assert answer.error is None and len(answer.ids) == 3


def test_frames_that_arrive_together_keep_their_order_and_a_bad_one_drops_alone(
    engine: EngineProcess,
) -> None:
    """A burst of frames reaches the engine's loop in one hand-off: one session's steps,
    one frame each and sent back to back, still apply in the order sent, and an undecodable
    frame among them is the only one lost."""
    context = zmq.Context()
    requests_at, outputs_at = socket_addresses(engine.address)
    identity = b"burst-01"
    answers = context.socket(zmq.DEALER)
    answers.setsockopt(zmq.IDENTITY, identity)
    answers.connect(outputs_at)
    sender = context.socket(zmq.DEALER)
    sender.setsockopt(zmq.IDENTITY, identity)
    sender.connect(requests_at)
    try:
        got: dict[int, EngineOutput] = {}
        # The engine's output socket answers only a peer it knows: ask until it does.
        for attempt in range(100):
            sender.send(request_encoder.encode([StepRequest(1000 + attempt, "lstm", [], 3)]))
            if answers.poll(200):
                break
        while answers.poll(200):
            answers.recv()
        sender.send(request_encoder.encode([StepRequest(1, "lstm", [], 3, "burst", create=True)]))
        words = list(range(10, 30))
        for i, word in enumerate(words, start=2):
            sender.send(request_encoder.encode([StepRequest(i, "lstm", [word], 3, "burst")]))
            if i == 10:
                sender.send(b"\x00not msgpack")
        while len(got) < len(words) + 1:
            assert answers.poll(30_000), f"answers missing: got {sorted(got)}"
            for output in output_decoder.decode(answers.recv()):
                got[output.request_id] = output
        assert all(got[i].error is None for i in got)
        # Each step saw the one before it: the session's token count grew by one per frame.
        assert [got[i].tokens for i in range(1, len(words) + 2)] == list(range(len(words) + 1))
    finally:
        sender.close(linger=0)
        answers.close(linger=0)
        context.term()


def test_wire_format_is_compact() -> None:
    frame = request_encoder.encode([StepRequest(7, "lstm", [1, 2, 3], 5, "sid")])
    assert len(frame) < 40  # array-like: no field names on the wire
    output = output_decoder.decode(msgspec.msgpack.encode([EngineOutput(7, ids=[1], probs=[0.5])]))
    assert output[0].request_id == 7 and output[0].probs == [0.5]


async def test_a_client_outlives_its_engine_and_reconnects_to_the_next_one(
    tiny_artifacts: Path,
) -> None:
    # Each step waits 2 s for its batch to fill: the engine dies with the steps pending.
    settings = engine_settings(tiny_artifacts, max_wait_ms=2000.0)
    first = EngineProcess(settings)
    client = await ZmqClient.connect(first.address, restart_wait_s=0.3, durable=True)
    second = None
    try:

        def step(session_id: str | None = None) -> StepRequest:
            return StepRequest(client.next_id(), "lstm", [5, 6], 3, session_id=session_id)

        created = await client.call(
            StepRequest(client.next_id(), "lstm", [5], 3, session_id="s1", create=True)
        )
        assert created.error is None
        feed = asyncio.ensure_future(client.call(step("s1")))
        predict = asyncio.ensure_future(client.call(step()))
        await asyncio.sleep(0.2)  # both sent (a frame per tick), both waiting for a batch
        first.process.kill()
        with pytest.raises(EngineRestarting) as feed_lost:
            await feed
        # A session step that reached a durable store's engine may have been applied...
        assert feed_lost.value.maybe_applied
        with pytest.raises(EngineRestarting) as predict_lost:
            await predict
        assert not predict_lost.value.maybe_applied  # ...a stateless one changes nothing

        # While no engine answers: a request waits restart_wait_s, then fails unsent.
        with pytest.raises(EngineRestarting) as waited:
            await client.call(step("s1"))
        assert not waited.value.maybe_applied
        with pytest.raises(NotReady, match="restarting"):
            await client.ping()

        second = EngineProcess(settings, address=first.address)
        for _ in range(600):  # the client reconnects by itself
            try:
                output = await client.call(step())
                break
            except EngineRestarting:
                await asyncio.sleep(0.1)
        else:
            pytest.fail("the client never reconnected to the new engine")
        assert output.error is None and output.tokens == 2
        await client.ping()
        assert client.restarts == 1
        # The memory store died with the first engine: its session is unknown to the second.
        lost = await client.call(InfoRequest(client.next_id(), "s1"))
        assert lost.error == "unknown_session"
    finally:
        await client.close()
        if second is not None:
            assert second.stop() == 0
        first.stop()


class RecordingSocket:
    """The engine's output socket as `EngineCoreProc._flush` uses it: parts sent, by message."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []  # the message being sent (parts so far)
        self.messages: list[list[bytes]] = []

    def send(self, data: bytes, flags: int = 0) -> None:
        self.parts.append(bytes(data))
        if not flags & zmq.SNDMORE:
            self.messages.append(self.parts)
            self.parts = []


def test_an_answer_that_cannot_be_encoded_fails_alone_and_no_frame_is_cut() -> None:
    proc = EngineCoreProc(engine_settings(Path(tempfile.gettempdir())), "ipc:///unused")
    try:
        socket = RecordingSocket()
        proc._outbound = socket  # type: ignore[assignment]
        # A lone surrogate cannot be UTF-8: msgspec refuses to encode that answer.
        bad = EngineOutput(1, ids=[3], probs=[0.5], tokens=1, model="m", words=["\ud800"])
        good = EngineOutput(2, ids=[4], probs=[0.25], tokens=1, model="m")
        other = EngineOutput(7, ids=[5], probs=[0.125], tokens=1, model="m")
        proc._frames = {b"api-1": [bad, good], b"api-2": [other]}
        proc._flush()
    finally:
        proc.context.term()
    assert socket.parts == []  # no message left half sent (the next would follow it)
    frames = {parts[0]: output_decoder.decode(parts[1]) for parts in socket.messages}
    assert len(socket.messages) == 2 and set(frames) == {b"api-1", b"api-2"}
    failed, answered = frames[b"api-1"]
    assert failed.request_id == 1 and failed.error == OutcomeUnknown.code
    assert answered == good
    assert frames[b"api-2"] == [other]


class SentFrames:
    """The client's request socket as `ZmqClient._flush` uses it: the frames sent."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def send(self, data: bytes, copy: bool = True) -> None:
        self.frames.append(bytes(data))


async def test_a_request_that_cannot_be_encoded_fails_alone_and_the_others_are_sent() -> None:
    client = ZmqClient("ipc://" + tempfile.mkdtemp() + "/nowhere")
    sent = SentFrames()
    real, client._sender = client._sender, sent  # type: ignore[assignment]
    try:
        # A lone surrogate cannot be UTF-8: msgspec refuses to encode that request.
        bad = client.call(StepRequest(1, "m", [3], 5, typed=["\ud800"]))
        good = client.call(StepRequest(2, "m", [4], 5))
        with pytest.raises(BadInput):
            await asyncio.wait_for(bad, 5.0)
        assert len(sent.frames) == 1
        frame = msgspec.msgpack.decode(sent.frames[0], type=list[StepRequest])
        assert [r.request_id for r in frame] == [2]
        assert not good.done()  # still owed its answer, by the engine
        good.cancel()  # type: ignore[attr-defined]
    finally:
        client._sender = real
        await client.close()
