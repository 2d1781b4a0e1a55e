"""Every route a step can end by ends it exactly once, into its sink (service/engine/scheduler.py).

The steps are queued as the engine core queues a frame (`StepBatcher.submit_many` with a
sink, no future), on the fake runner of `test_batcher`; the sink records every ending and
fails a step that ends twice.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import pytest

from service.engine.scheduler import Step, StepBatcher, StepResult
from service.engine.steps import Outcome
from service.errors import Contended, Overloaded, StepFailed, UnknownSession
from service.store import MemorySessionStore, SessionRecord
from tests.engine.test_batcher import CountingStore, FakeRunner


class Endings:
    """A sink that records each step's outcome, and each step's count of endings."""

    def __init__(self) -> None:
        self.outcome: dict[int, Outcome] = {}
        self.count: dict[int, int] = {}
        self.calls = 0
        self.ended = asyncio.Event()

    def __call__(self, steps: list[Step], outcomes: list[Outcome]) -> None:
        assert len(steps) == len(outcomes)
        self.calls += 1
        for step, outcome in zip(steps, outcomes):
            assert step.done
            self.count[step.tag] = self.count.get(step.tag, 0) + 1
            self.outcome[step.tag] = outcome
        self.ended.set()

    async def until(self, tags: list[int]) -> None:
        while not all(tag in self.count for tag in tags):
            self.ended.clear()
            await asyncio.wait_for(self.ended.wait(), 10)

    def once_each(self, tags: list[int]) -> None:
        assert {tag: self.count.get(tag, 0) for tag in tags} == dict.fromkeys(tags, 1)


@pytest.fixture
def runner() -> FakeRunner:
    return FakeRunner()


@pytest.fixture
def store() -> CountingStore:
    return CountingStore()


@pytest.fixture
async def batcher(runner: FakeRunner, store: CountingStore) -> AsyncIterator[StepBatcher]:
    b = StepBatcher(runner, store, max_batch=64, max_wait_ms=1.0, max_queue=100)
    await b.start()
    yield b
    await b.stop()


def steps(tags: range, session: str | None = None, **fields: object) -> list[Step]:
    return [Step([4 + t % 5], session_id=session, client="c", tag=t, **fields) for t in tags]  # type: ignore[arg-type]


async def test_answered_failed_and_refused_steps_end_once(batcher: StepBatcher) -> None:
    sink = Endings()
    created = [Step([4], session_id=f"s{t}", create=True, client="c", tag=t) for t in range(3)]
    batcher.submit_many(created, sink)
    await sink.until([0, 1, 2])
    fed = [Step([5], session_id=f"s{t}", client="c", tag=10 + t) for t in range(3)]
    unknown = Step([5], session_id="nobody", client="c", tag=20)
    batcher.submit_many([*fed, unknown, *steps(range(30, 34))], sink)
    await sink.until([10, 11, 12, 20, 30, 31, 32, 33])
    sink.once_each([0, 1, 2, 10, 11, 12, 20, 30, 31, 32, 33])
    assert all(isinstance(sink.outcome[t], StepResult) for t in (10, 11, 12, 30, 31, 32, 33))
    assert isinstance(sink.outcome[20], UnknownSession)
    # One call per group that ends together, not per step: the creates; then in one batch
    # the unknown one, the stateless answers (before the write) and the sessions' answers.
    assert sink.calls == 4
    # Over its share: refused at once, into the sink, never queued.
    batcher.shares.cap = 2
    batcher.shares.admit("c", batcher.name)
    batcher.shares.admit("c", batcher.name)
    batcher.submit_many(steps(range(40, 42)), sink)
    sink.once_each([40, 41])
    assert all(isinstance(sink.outcome[t], Overloaded) for t in (40, 41))
    batcher.shares.release_many(["c", "c"], answered=0)
    assert batcher.shares.held == {}  # every step gave its share back


async def test_cancelled_steps_end_once_queued_or_during_their_run(
    batcher: StepBatcher, runner: FakeRunner, store: CountingStore
) -> None:
    sink = Endings()
    batcher.submit_many([Step([4], session_id="a", create=True, tag=0)], sink)
    await sink.until([0])
    runner.gate = threading.Event()
    runner.entered.clear()
    running = steps(range(1, 3)) + steps(range(3, 4), session="a")
    batcher.submit_many(running, sink)
    assert await asyncio.to_thread(runner.entered.wait, 10)
    queued = steps(range(10, 13))
    batcher.submit_many(queued, sink)
    for step in (running[0], running[2], queued[1]):
        batcher.cancel(step)
        batcher.cancel(step)  # a second cancel ends nothing
    runner.gate.set()
    await sink.until([1, 2, 3, 10, 11, 12])
    await batcher.step(Step([], session_id="a"))  # the loop has moved past them all
    tags = [0, 1, 2, 3, 10, 11, 12]
    sink.once_each(tags)
    assert [sink.outcome[t] is None for t in tags] == [0, 1, 0, 1, 0, 1, 0]
    assert (await store.get("a")).tokens == 1  # the cancelled step was not written
    assert batcher.shares.held == {}


async def test_retried_and_contended_steps_end_once(
    runner: FakeRunner, store: CountingStore
) -> None:
    b = StepBatcher(runner, store, max_retries=2, max_wait_ms=0)
    await b.start()
    sink = Endings()
    b.submit_many([Step([4], session_id=s, create=True, tag=i) for i, s in enumerate("ab")], sink)
    await sink.until([0, 1])
    bumps = 0

    async def bump_a(records: list[SessionRecord]) -> None:
        # Another writer moves "a" on before every write: its step retries, then gives up;
        # "b" moves once, so its step is written on its first retry.
        nonlocal bumps
        bumps += 1
        for name in ("a", "b") if bumps == 1 else ("a",):
            record = await MemorySessionStore.get(store, name)
            await MemorySessionStore.put_many(store, [record], [record.version])

    store.before_put = bump_a
    b.submit_many(steps(range(10, 11), session="a") + steps(range(11, 12), session="b"), sink)
    await sink.until([10, 11])
    store.before_put = None
    sink.once_each([0, 1, 10, 11])
    assert isinstance(sink.outcome[10], Contended)
    assert isinstance(sink.outcome[11], StepResult)
    assert b.shares.held == {}
    await b.stop()


async def test_a_failed_run_and_a_batch_that_raised_end_their_steps_once(
    batcher: StepBatcher, runner: FakeRunner, store: CountingStore
) -> None:
    sink = Endings()
    batcher.submit_many([Step([4], session_id="a", create=True, tag=0)], sink)
    await sink.until([0])
    runner.fail = lambda tokens: True
    batcher.submit_many(steps(range(1, 3)) + steps(range(3, 4), session="a"), sink)
    await sink.until([1, 2, 3])
    runner.fail = lambda tokens: False
    assert all(isinstance(sink.outcome[t], StepFailed) for t in (1, 2, 3))

    async def broken(ids: list[str]) -> list[SessionRecord | None]:
        raise RuntimeError("a bug in the store (test)")  # not a NextwordError

    store.get_many = broken  # type: ignore[method-assign]
    batcher.submit_many(steps(range(10, 12)) + steps(range(12, 13), session="a"), sink)
    await sink.until([10, 11, 12])
    sink.once_each([0, 1, 2, 3, 10, 11, 12])
    assert all(isinstance(sink.outcome[t], StepFailed) for t in (10, 11, 12))
    assert batcher.shares.held == {}


@pytest.mark.parametrize("drain", [True, False])
async def test_steps_in_flight_and_queued_at_stop_end_once(
    runner: FakeRunner, store: CountingStore, drain: bool
) -> None:
    b = StepBatcher(runner, store, max_batch=2, max_wait_ms=0)
    await b.start()
    sink = Endings()
    runner.gate = threading.Event()
    b.submit_many(steps(range(6)), sink)
    assert await asyncio.to_thread(runner.entered.wait, 10)
    stopping = asyncio.ensure_future(b.stop(drain=drain))
    await asyncio.sleep(0.01)
    late = steps(range(10, 11))
    b.submit_many(late, sink)  # refused: stopping
    runner.gate.set()
    await stopping
    tags = [0, 1, 2, 3, 4, 5, 10]
    sink.once_each(tags)
    assert isinstance(sink.outcome[10], Overloaded)
    if drain:
        assert all(isinstance(sink.outcome[t], StepResult) for t in range(6))
    else:
        assert all(isinstance(sink.outcome[t], StepFailed) for t in (0, 1))  # cut short
        assert all(isinstance(sink.outcome[t], Overloaded) for t in range(2, 6))  # queued
    assert b.shares.held == {}
