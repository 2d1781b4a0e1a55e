"""The per-batch passes of a common batch (scheduler.py, residency.py): each one forms the
same batch, keeps the same steps and leaves the same entries as the per-step code it
stands in for, which still serves every other case."""

from __future__ import annotations

import asyncio
import random
from collections import deque
from collections.abc import AsyncIterator, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from service.contract.artifact import ModelArtifact
from service.contract.protocol import EngineOutput, output_encoder
from service.engine.batching import Bounds, take
from service.engine.core import _FrameAnswers
from service.engine.pool import StatePool, _distinct
from service.engine.residency import Residency
from service.engine.runtime import OrtModel
from service.engine.scheduler import Step, StepBatcher
from service.engine.steps import BatchResults, Outcome, StepRun
from service.store.memory import MemorySessionStore
from tests.engine.test_batcher import FakeRunner


def queue(rng: random.Random, n: int, sessions: int, odd: float) -> list[Step]:
    """`n` session steps over `sessions` sessions; with probability `odd` each is one the
    common batch does not take as it is (cancelled, long, in progress, empty)."""
    steps = []
    for _ in range(n):
        step = Step([1] * rng.randint(1, 3), session_id=f"s{rng.randrange(sessions)}")
        if rng.random() < odd:
            kind = rng.randrange(4)
            if kind == 0:
                step.done = True
            elif kind == 1:
                step.tokens = [1] * rng.randint(5, 30)  # longer than a chunk
            elif kind == 2:
                step.row = StepRun(step, None)
            else:
                step.tokens = []
        steps.append(step)
    return steps


@pytest.mark.parametrize("seed", range(40))
def test_a_common_batch_is_the_batch_take_forms(seed: int) -> None:
    rng = random.Random(seed)
    batcher = StepBatcher(
        FakeRunner(), MemorySessionStore(3600.0, 100), max_batch=rng.choice([4, 8, 16])
    )
    batcher.prefill_chunk = 4
    batcher.max_batch_tokens = rng.choice([8, 20, 64])
    batcher.max_prefill_tokens = 8
    for _ in range(6):
        pending = queue(rng, rng.randint(0, 24), rng.choice([4, 100]), rng.choice([0.0, 0.1]))
        stateless = [Step([1, 2])] * rng.choice([0, 0, 3])
        batcher._pending, batcher._stateless = deque(pending), deque(stateless)
        got = batcher._take(sessions=True)
        want_pending, want_stateless = deque(pending), deque(stateless)
        bounds = Bounds(batcher.max_batch, batcher.max_batch_tokens, batcher.max_prefill_tokens)
        want = take(want_pending, want_stateless, bounds, batcher._cost, batcher._gone)
        assert got == want.steps
        assert list(batcher._pending) == list(want_pending)
        assert list(batcher._stateless) == list(want_stateless)
        assert batcher._long_taken == want.long_tokens


def test_the_common_pass_is_taken_for_plain_queues() -> None:
    batcher = StepBatcher(FakeRunner(), MemorySessionStore(3600.0, 100), max_batch=8)
    batcher._pending = deque(Step([1, 2], session_id=f"s{i}") for i in range(5))
    assert batcher._take_common() is not None and not batcher._pending
    same = [Step([1], session_id="a"), Step([2], session_id="a")]
    batcher._pending = deque(same)
    assert batcher._take_common() is None and len(batcher._pending) == 2


@pytest.fixture(scope="module")
def lstm(tiny_artifacts: Path) -> OrtModel:
    return OrtModel(ModelArtifact.load(tiny_artifacts / "lstm"), ["CPUExecutionProvider"])


@pytest.fixture
async def pooled(lstm: OrtModel) -> AsyncIterator[StepBatcher]:
    batcher = StepBatcher(
        lstm,
        MemorySessionStore(3600.0, 1000),
        pool=StatePool(lstm, 64),
        keep_states=True,
        max_wait_ms=0,
    )
    await batcher.start()
    yield batcher
    await batcher.stop()


async def test_a_retry_of_the_last_step_in_a_common_batch_is_not_applied_again(
    pooled: StepBatcher,
) -> None:
    """The per-batch check sees a step's id matching its session's last step's (the batch
    is then taken step by step); steps without ids on sessions without them stay common."""
    await pooled.step(Step([5, 6], session_id="a", create=True))
    await pooled.step(Step([5], session_id="b", create=True))
    first = await pooled.step(Step([7], session_id="a", step_id="m1"))
    plain = await pooled.step(Step([8], session_id="b"))  # "" and "": no retry
    assert plain.tokens == 2
    again = await pooled.step(Step([7], session_id="a", step_id="m1"))
    assert again.tokens == first.tokens == 3
    np.testing.assert_array_equal(again.ids, first.ids)
    np.testing.assert_allclose(again.probs, first.probs, atol=1e-6)
    later = await pooled.step(Step([7], session_id="a", step_id="m2"))
    assert later.tokens == 4


def test_commit_of_resident_sessions_keeps_the_entries_order_and_rows(lstm: OrtModel) -> None:
    pool = StatePool(lstm, 64)
    residency = Residency(pool, MemorySessionStore(3600.0, 100))
    rows = pool.take(12).reshape(6, 2)
    residency.commit(["a", "b", "c"], [1, 1, 1], [0.0, 0.0, 0.0], rows[:3])
    residency.commit(["a", "b"], [2, 2], [0.0, 0.0], rows[3:5])  # all resident
    assert list(residency._entries) == ["c", "a", "b"]
    residency.commit(["c", "d"], [2, 1], [0.0, 0.0], rows[5:].repeat(2, axis=0))  # one new
    assert list(residency._entries) == ["a", "b", "c", "d"]
    assert residency.entry("a") == (2, int(rows[3, 0]), 0.0)
    assert residency.entry("d") == (1, int(rows[5, 0]), 0.0)
    # The caller still holds every row it took; the entries hold theirs once more each.
    held = np.concatenate([residency.holders(), rows.ravel()])
    pool.check_counts(held)


def encode_into(frames: list[bytes], output: EngineOutput) -> None:
    frames.append(output_encoder.encode(output))


async def test_a_common_batchs_answers_are_the_bytes_of_its_steps_answered_one_by_one(
    pooled: StepBatcher,
) -> None:
    """`_FrameAnswers` answers a batch's columns with the frames it makes step by step,
    with typed words named or none."""
    for i in range(3):
        await pooled.step(Step([5], session_id=f"w{i}", create=True))
    ended: list[tuple[list[Step], Sequence[Outcome]]] = []
    done = asyncio.Event()

    def sink(steps: list[Step], outcomes: Sequence[Outcome]) -> None:
        ended.append((steps, outcomes))
        done.set()

    steps = [Step([6 + i], session_id=f"w{i}", k=3 + i) for i in range(3)]
    for i, step in enumerate(steps):
        step.tag = 40 + i
    pooled.submit_many(steps, sink)
    await done.wait()
    [(answered, results)] = ended
    assert isinstance(results, BatchResults) and len(results) == 3
    named = BatchResults(
        results.ids, results.probs, results.ks, results.mixed, [("a",), (), ("b", "c")],
        results.written,
    )  # fmt: skip
    for batch in (results, named):
        frames: dict[str, list[bytes]] = {"columns": [], "steps": []}
        for how, outcomes in (("columns", batch), ("steps", list(batch))):
            pending = {step.tag: step for step in answered}
            reply = partial(encode_into, frames[how])
            _FrameAnswers(reply, pooled.name, pending, pooled)(answered, outcomes)
            assert not pending  # every step answered left the table
        assert frames["columns"] == frames["steps"] and len(frames["steps"]) == 3


@pytest.mark.parametrize("seed", range(5))
def test_the_rows_freed_are_listed_once_each_in_order(seed: int) -> None:
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, 50 if seed else 2, size=rng.integers(2, 300))
    np.testing.assert_array_equal(_distinct(rows), np.unique(rows))
