"""`EngineCore.handle`: a frame's steps taken in one pass, each request answered once,
on the tiny models, in process (no sockets)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from service.config import Settings
from service.contract.protocol import AbortRequest, EngineOutput, PingRequest, StepRequest
from service.engine.core import EngineCore


@pytest.fixture
async def core(tiny_artifacts: Path) -> AsyncIterator[EngineCore]:
    settings = Settings(
        models_dir=tiny_artifacts, providers="CPUExecutionProvider", intra_op_threads=1
    )
    engine = await EngineCore.start(settings)
    yield engine
    await engine.close()


class Replies:
    """The frame's `reply`: every output, by request id; a second answer fails the test."""

    def __init__(self) -> None:
        self.by_id: dict[int, EngineOutput] = {}
        self.arrived = asyncio.Event()

    def __call__(self, output: EngineOutput) -> None:
        assert output.request_id not in self.by_id, f"{output.request_id} answered twice"
        self.by_id[output.request_id] = output
        self.arrived.set()

    async def until(self, ids: set[int]) -> None:
        while not ids <= set(self.by_id):
            self.arrived.clear()
            await asyncio.wait_for(self.arrived.wait(), 10)


async def test_a_frame_of_mixed_requests_is_answered_once_each(core: EngineCore) -> None:
    replies = Replies()
    frame = [
        StepRequest(1, "lstm", [5, 6], 3, "a", create=True),
        StepRequest(2, "gru", [5, 6], 3),
        StepRequest(3, "nope", [5], 3),
        StepRequest(4, "lstm", [5], 3, prefix_slips=np.ones(2, np.float32).tobytes()),
        StepRequest(5, "lstm", [7], 3, "b", create=True),
        AbortRequest([5]),  # the step before it in the same frame is cancelled
        StepRequest(6, "lstm", [5, 6], 3),
        PingRequest(7),
    ]
    core.handle(frame, replies, "api-1")
    await replies.until({1, 2, 3, 4, 6, 7})
    await asyncio.sleep(0.05)  # any late answer would arrive by now
    assert set(replies.by_id) == {1, 2, 3, 4, 6, 7}  # 5 was aborted: no answer
    assert replies.by_id[3].error == "unknown_model"
    assert replies.by_id[4].error == "bad_input"
    for request_id, model in ((1, "lstm"), (2, "gru"), (6, "lstm")):
        answer = replies.by_id[request_id]
        assert answer.error is None and answer.model == model and len(answer.ids) == 3
        assert answer.tokens == 2
    assert replies.by_id[1].ids == replies.by_id[6].ids  # the same text, stateless or not
    assert core._pending["api-1"] == {}  # every step left the pending table
    # The aborted session was never created.
    later = Replies()
    core.handle([StepRequest(8, "lstm", [7], 3, "b")], later, "api-1")
    await later.until({8})
    assert later.by_id[8].error == "unknown_session"
