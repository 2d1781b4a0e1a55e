"""StepBatcher with a fake runner (numpy, no ONNX Runtime, no HTTP)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import pytest
from prometheus_client import REGISTRY

from service.engine.runtime import State, StepOutput
from service.engine.scheduler import Step, StepBatcher, StepResult
from service.errors import Overloaded, StepFailed, StoreUnavailable, UnknownSession
from service.store import MemorySessionStore, SessionRecord

EOS = 2
VOCAB = 12


class FakeRunner:
    """A small recurrent "model" in numpy with the engine's run contract.

    Each layer: h <- tanh(0.5 h + x) (and c likewise, shifted); the output is a softmax
    of the top layer. Rows never mix, so a row in a batch equals the row alone.
    """

    name = "fake"
    revision = "0123456789abcdef"
    eos_id = EOS

    def __init__(self, layers: int = 2, hidden: int = 6, cells: int = 2) -> None:
        rng = np.random.default_rng(0)
        self.layers, self.hidden, self.cells = layers, hidden, cells
        self.embedding = rng.standard_normal((VOCAB, hidden)).astype(np.float32)
        self.decoder = (rng.standard_normal((hidden, VOCAB)) * 3).astype(np.float32)
        self.suggest = np.ones(VOCAB, dtype=bool)
        self.suggest[:3] = False  # <pad> <unk> </s>
        self.max_k = int(self.suggest.sum())
        self.calls: list[tuple[int, int, bool]] = []  # (batch, seq, want_probs)
        self.fail: Callable[[np.ndarray], bool] = lambda tokens: False
        self.wrong_rows = False
        self.gate: threading.Event | None = None  # when set, runs wait for it
        self.entered = threading.Event()
        zeros = tuple(np.zeros((layers, 1, hidden), np.float32) for _ in range(cells))
        self.start = self.run(np.array([[EOS]]), zeros, want_probs=True)
        self.calls.clear()
        self.entered.clear()

    def run(self, tokens: np.ndarray, state: State, want_probs: bool = False) -> StepOutput:
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(10), "test gate never opened"
        batch, seq = tokens.shape
        self.calls.append((batch, seq, want_probs))
        if self.fail(tokens):
            raise RuntimeError("the fake model failed")
        h = [s.copy() for s in state]
        for t in range(seq):
            x = self.embedding[tokens[:, t]]  # (B, H)
            for layer in range(self.layers):
                for c in range(self.cells):
                    h[c][layer] = np.tanh(0.5 * h[c][layer] + x + 0.1 * c)
                x = h[0][layer]
        logits = h[0][-1] @ self.decoder  # (B, V)
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        scores = probs * self.suggest
        ids = np.argsort(-scores, axis=1, kind="stable")[:, : self.max_k]
        if self.wrong_rows:
            ids, probs, h = ids[:-1], probs[:-1], [a[:, :-1] for a in h]
        return StepOutput(
            np.take_along_axis(scores, ids, axis=1).astype(np.float32),
            ids.astype(np.int64),
            probs.astype(np.float32) if want_probs else None,
            tuple(h),
        )


class CountingStore(MemorySessionStore):
    """The memory store, counting round trips and able to fail or interfere."""

    def __init__(self) -> None:
        super().__init__(ttl_s=3600.0, cap=1000)
        self.reads: list[list[str]] = []
        self.writes: list[list[str]] = []
        self.unavailable = False
        self.before_put: Callable[[list[SessionRecord]], Any] | None = None

    async def get_many(self, ids: list[str]) -> list[SessionRecord | None]:
        self.reads.append(list(ids))
        if self.unavailable:
            raise StoreUnavailable("store down (test)")
        return await super().get_many(ids)

    async def put_many(
        self, records: list[SessionRecord], expected: list[int | None]
    ) -> list[bool]:
        self.writes.append([r.session_id for r in records])
        if self.before_put is not None:
            await self.before_put(records)
        return await super().put_many(records, expected)


@pytest.fixture
def runner() -> FakeRunner:
    return FakeRunner()


@pytest.fixture
def store() -> CountingStore:
    return CountingStore()


@pytest.fixture
async def batcher(runner: FakeRunner, store: CountingStore) -> AsyncIterator[StepBatcher]:
    b = StepBatcher(runner, store, max_batch=64, max_wait_ms=5.0, max_queue=1000)
    await b.start()
    yield b
    await b.stop()


def alone(runner: FakeRunner, tokens: list[int], k: int = 5) -> tuple[list[int], np.ndarray]:
    """What the fake gives for [eos] + tokens run from a zero state in one go."""
    zeros = tuple(np.zeros((runner.layers, 1, runner.hidden), np.float32) for _ in range(2))
    out = runner.run(np.array([[EOS, *tokens]]), zeros)
    return out.topk_ids[0, :k].tolist(), out.topk_probs[0, :k]


def same(result: StepResult, want: tuple[list[int], np.ndarray]) -> None:
    assert result.ids.tolist() == want[0]
    np.testing.assert_allclose(result.probs, want[1], atol=1e-5)


async def new_session(b: StepBatcher, session_id: str, tokens: list[int] | None = None) -> None:
    await b.step(Step(tokens or [], session_id=session_id, create=True))


def texts(n: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, VOCAB, size=rng.integers(1, 9)).tolist() for _ in range(n)]


async def test_stateless_steps_are_batched_and_equal_each_alone(
    batcher: StepBatcher, runner: FakeRunner
) -> None:
    inputs = texts(64)
    results = await asyncio.gather(*(batcher.step(Step(t)) for t in inputs))
    assert max(b for b, _, _ in runner.calls) > 1  # really batched
    for tokens, result in zip(inputs, results):
        assert result.tokens == len(tokens) and result.record is None
        same(result, alone(runner, tokens))


async def test_sessions_fed_in_chunks_equal_the_whole_text(
    batcher: StepBatcher, runner: FakeRunner
) -> None:
    inputs = texts(32, seed=1)
    ids = [f"s{i}" for i in range(len(inputs))]
    await asyncio.gather(*(new_session(batcher, i) for i in ids))

    async def feed(session_id: str, tokens: list[int], seed: int) -> StepResult:
        rng = np.random.default_rng(seed)
        result = None
        i = 0
        while i < len(tokens):
            n = int(rng.integers(1, 4))
            result = await batcher.step(Step(tokens[i : i + n], session_id=session_id))
            i += n
        assert result is not None
        return result

    results = await asyncio.gather(*(feed(s, t, n) for n, (s, t) in enumerate(zip(ids, inputs))))
    for tokens, result in zip(inputs, results):
        assert result.tokens == len(tokens)
        same(result, alone(runner, tokens))


async def test_one_store_read_and_write_per_batch(
    batcher: StepBatcher, store: CountingStore, runner: FakeRunner
) -> None:
    ids = [f"s{i}" for i in range(40)]
    await asyncio.gather(*(new_session(batcher, i) for i in ids))
    store.reads.clear()
    store.writes.clear()
    runner.calls.clear()
    await asyncio.gather(*(batcher.step(Step([5], session_id=i)) for i in ids))
    assert len(store.reads) == len(store.writes)
    assert sorted(sum(store.reads, [])) == sorted(ids)
    assert len(store.reads) < len(ids)  # batches, not one read per step
    assert sum(b for b, _, _ in runner.calls) == len(ids)  # one-token steps: one run per row


async def test_same_session_never_twice_in_a_batch_and_in_order(
    batcher: StepBatcher, store: CountingStore, runner: FakeRunner
) -> None:
    await asyncio.gather(new_session(batcher, "a"), new_session(batcher, "b"))
    store.reads.clear()
    steps = [Step([3 + i % 5], session_id=s) for i in range(10) for s in ("a", "b")]
    results = await asyncio.gather(*(batcher.step(s) for s in steps))
    for read in store.reads:
        assert len(read) == len(set(read))
    a_tokens = [r.tokens for s, r in zip(steps, results) if s.session_id == "a"]
    assert a_tokens == list(range(1, 11))  # applied in the order submitted
    a_text = [s.tokens[0] for s in steps if s.session_id == "a"]
    same(results[-2], alone(runner, a_text))


async def test_prefix_only_step_reruns_the_last_token(
    batcher: StepBatcher, runner: FakeRunner
) -> None:
    await new_session(batcher, "a", [4, 5, 6])
    candidates = np.array([3, 7, 9, 11])
    result = await batcher.step(Step([], session_id="a", k=3, prefix_ids=candidates))
    zeros = tuple(np.zeros((runner.layers, 1, runner.hidden), np.float32) for _ in range(2))
    full = runner.run(np.array([[EOS, 4, 5, 6]]), zeros, want_probs=True).probs
    assert full is not None
    best = candidates[np.argsort(-full[0, candidates], kind="stable")[:3]]
    assert result.ids.tolist() == best.tolist()
    np.testing.assert_allclose(result.probs, full[0, best], atol=1e-6)
    assert result.tokens == 3  # a prefix is not consumed
    assert runner.calls[-1][2]  # the full distribution was fetched for this batch
    # ... and the context is unchanged: feeding the next word gives the whole text's answer.
    same(await batcher.step(Step([7], session_id="a")), alone(runner, [4, 5, 6, 7]))


async def test_probs_fetched_only_when_a_prefix_is_asked(
    batcher: StepBatcher, runner: FakeRunner
) -> None:
    await batcher.step(Step([4, 5]))
    assert runner.calls and not any(want for _, _, want in runner.calls)


async def test_reset_and_empty_steps_use_the_start_output(
    batcher: StepBatcher, runner: FakeRunner
) -> None:
    await new_session(batcher, "a", [4, 5])
    runner.calls.clear()
    reset = await batcher.step(Step([], session_id="a", fresh=True))
    empty = await batcher.step(Step([]))
    assert runner.calls == []  # no run needed for an empty context
    start = alone(runner, [])
    same(reset, start)
    same(empty, start)
    assert reset.tokens == 0
    same(await batcher.step(Step([6], session_id="a")), alone(runner, [6]))


async def test_failed_run_fails_every_step_and_keeps_states(
    batcher: StepBatcher, runner: FakeRunner, store: CountingStore
) -> None:
    await asyncio.gather(new_session(batcher, "a", [4]), new_session(batcher, "b", [5]))
    before = {s: (await store.get(s)) for s in ("a", "b")}
    runner.fail = lambda tokens: True
    results = await asyncio.gather(
        batcher.step(Step([6], session_id="a")),
        batcher.step(Step([7], session_id="b")),
        batcher.step(Step([8])),
        return_exceptions=True,
    )
    assert all(isinstance(r, StepFailed) for r in results)
    for s, old in before.items():
        now = await store.get(s)
        assert (now.version, now.tokens) == (old.version, old.tokens)
        for x, y in zip(now.state, old.state):
            np.testing.assert_array_equal(x, y)
    runner.fail = lambda tokens: False
    same(await batcher.step(Step([6], session_id="a")), alone(runner, [4, 6]))


async def test_wrong_number_of_rows_fails_the_batch(
    batcher: StepBatcher, runner: FakeRunner
) -> None:
    runner.wrong_rows = True
    with pytest.raises(StepFailed):
        await batcher.step(Step([4]))


async def test_cancelled_steps_are_dropped(
    batcher: StepBatcher, runner: FakeRunner, store: CountingStore
) -> None:
    await new_session(batcher, "a", [4])
    runner.gate = threading.Event()
    runner.entered.clear()
    blocker = asyncio.ensure_future(batcher.step(Step([5])))
    assert await asyncio.to_thread(runner.entered.wait, 10)  # the loop is busy running
    gone = asyncio.ensure_future(batcher.step(Step([6], session_id="a")))
    kept = asyncio.ensure_future(batcher.step(Step([7])))
    await asyncio.sleep(0)
    gone.cancel()
    runner.calls.clear()
    runner.gate.set()
    await blocker
    result = await kept
    assert sum(b for b, _, _ in runner.calls) == 2  # the blocker and kept, not gone
    assert gone.cancelled()
    same(result, alone(runner, [7]))
    assert (await store.get("a")).tokens == 1


async def test_unknown_session_fails_only_its_step(
    batcher: StepBatcher, runner: FakeRunner
) -> None:
    await new_session(batcher, "a")
    results = await asyncio.gather(
        batcher.step(Step([4], session_id="nope")),
        batcher.step(Step([4], session_id="a")),
        batcher.step(Step([], session_id="gone", fresh=True)),
        return_exceptions=True,
    )
    assert isinstance(results[0], UnknownSession)
    assert isinstance(results[1], StepResult) and results[1].tokens == 1
    assert isinstance(results[2], UnknownSession)


async def test_session_of_another_model_is_unknown(
    batcher: StepBatcher, store: CountingStore
) -> None:
    await new_session(batcher, "a")
    rec = await store.get("a")
    rec.model = "other"
    assert await store.put_many([rec], [rec.version]) == [True]
    with pytest.raises(UnknownSession):
        await batcher.step(Step([4], session_id="a"))


async def test_record_without_last_token(
    batcher: StepBatcher, store: CountingStore, runner: FakeRunner
) -> None:
    # A store that drops `last_token` can serve every step except one without new words.
    await new_session(batcher, "a", [4])
    rec = await store.get("a")
    rec.last_token = -1
    assert await store.put_many([rec], [rec.version]) == [True]
    with pytest.raises(StepFailed):
        await batcher.step(Step([], session_id="a"))
    same(await batcher.step(Step([5], session_id="a")), alone(runner, [4, 5]))
    assert (await batcher.step(Step([], session_id="a"))).tokens == 2


async def test_store_unavailable_fails_the_batch(
    batcher: StepBatcher, store: CountingStore
) -> None:
    await new_session(batcher, "a")
    store.unavailable = True
    with pytest.raises(StoreUnavailable):
        await batcher.step(Step([4], session_id="a"))
    store.unavailable = False
    assert (await batcher.step(Step([4], session_id="a"))).tokens == 1


async def test_conflicting_write_is_retried_on_the_new_state(
    batcher: StepBatcher, store: CountingStore, runner: FakeRunner
) -> None:
    await new_session(batcher, "a", [4])
    other = StepBatcher(runner, store, max_wait_ms=0)  # another replica, same store
    await other.start()
    interfered = False

    async def other_replica(records: list[SessionRecord]) -> None:
        # Between this batch's read and its write, the other replica feeds 9 to "a".
        nonlocal interfered
        if not interfered:
            interfered = True
            await other.step(Step([9], session_id="a"))

    store.before_put = other_replica
    result = await batcher.step(Step([5], session_id="a"))
    assert interfered and result.tokens == 3
    same(result, alone(runner, [4, 9, 5]))  # no lost update: 5 applied after 9
    await other.stop()


async def test_conflicts_give_up_after_max_retries(
    runner: FakeRunner, store: CountingStore
) -> None:
    b = StepBatcher(runner, store, max_retries=2, max_wait_ms=0)
    await b.start()
    await new_session(b, "a")

    async def always_bump(records: list[SessionRecord]) -> None:
        rec = await MemorySessionStore.get(store, "a")
        await MemorySessionStore.put_many(store, [rec], [rec.version])

    store.before_put = always_bump
    with pytest.raises(StepFailed):
        await b.step(Step([4], session_id="a"))
    assert len(store.writes) == 1 + 3  # the create, then the first try and two retries
    await b.stop()


async def test_full_queue_is_overloaded(runner: FakeRunner, store: CountingStore) -> None:
    b = StepBatcher(runner, store, max_batch=1, max_wait_ms=0, max_queue=2)
    await b.start()
    runner.gate = threading.Event()
    first = asyncio.ensure_future(b.step(Step([4])))
    assert await asyncio.to_thread(runner.entered.wait, 10)
    queued = [asyncio.ensure_future(b.step(Step([5]))) for _ in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(Overloaded):
        b.submit(Step([6]))
    assert b.queue_depth == 2
    runner.gate.set()
    await asyncio.gather(first, *queued)
    await b.stop()


async def test_stop_drains_in_flight_steps(runner: FakeRunner, store: CountingStore) -> None:
    b = StepBatcher(runner, store, max_batch=4, max_wait_ms=1.0)
    await b.start()
    runner.gate = threading.Event()
    futures = [b.submit(Step(t)) for t in texts(12, seed=3)]
    assert await asyncio.to_thread(runner.entered.wait, 10)
    stopping = asyncio.ensure_future(b.stop(drain=True))
    await asyncio.sleep(0)
    with pytest.raises(Overloaded):
        b.submit(Step([4]))  # no new steps once stopping
    runner.gate.set()
    await stopping
    assert all(f.done() and not f.cancelled() and f.exception() is None for f in futures)


async def test_stop_without_drain_fails_queued_steps(
    runner: FakeRunner, store: CountingStore
) -> None:
    b = StepBatcher(runner, store, max_batch=1, max_wait_ms=0)
    await b.start()
    runner.gate = threading.Event()
    futures = [b.submit(Step([4])) for _ in range(3)]
    assert await asyncio.to_thread(runner.entered.wait, 10)
    stopping = asyncio.ensure_future(b.stop(drain=False))
    await asyncio.sleep(0.01)
    runner.gate.set()
    await stopping
    assert all(f.done() for f in futures)
    errors = [f.exception() for f in futures]
    assert isinstance(errors[0], StepFailed)  # the step cut short
    assert all(isinstance(e, Overloaded) for e in errors[1:])  # the queued ones


async def test_metrics_count_steps_and_batches(batcher: StepBatcher) -> None:
    def value(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    ok = value("nextword_steps_total", model="fake", outcome="ok")
    errors = value("nextword_steps_total", model="fake", outcome="error")
    batches = value("nextword_batch_size_count", model="fake")
    await asyncio.gather(*(batcher.step(Step([4, 5])) for _ in range(5)))
    with pytest.raises(UnknownSession):
        await batcher.step(Step([4], session_id="nope"))
    assert value("nextword_steps_total", model="fake", outcome="ok") == ok + 5
    assert value("nextword_steps_total", model="fake", outcome="error") == errors + 1
    assert value("nextword_batch_size_count", model="fake") > batches
    assert value("nextword_queue_depth", model="fake") == 0


async def test_stateless_steps_do_not_need_the_store(
    batcher: StepBatcher, store: CountingStore, runner: FakeRunner
) -> None:
    await new_session(batcher, "a")
    store.unavailable = True
    stateless = batcher.submit(Step([4, 5]))
    session = batcher.submit(Step([4], session_id="a"))
    created = batcher.submit(Step([4], session_id="b", create=True))
    for future in (session, created):
        with pytest.raises(StoreUnavailable):
            await future
    same(await stateless, alone(runner, [4, 5]))
    store.unavailable = False


async def test_a_failed_write_fails_only_the_sessions_steps(
    batcher: StepBatcher, store: CountingStore, runner: FakeRunner
) -> None:
    async def down(records: list[SessionRecord]) -> None:
        raise StoreUnavailable("store down (test)")

    store.before_put = down
    stateless = batcher.submit(Step([6]))
    created = batcher.submit(Step([6], session_id="c", create=True))
    with pytest.raises(StoreUnavailable):
        await created
    same(await stateless, alone(runner, [6]))
    store.before_put = None


async def test_a_partly_written_batch_answers_the_steps_it_wrote(
    batcher: StepBatcher, store: CountingStore, runner: FakeRunner
) -> None:
    """A store that loses part of a batch's write (a Redis Cluster shard) says which records
    it stored: those steps are answered, the others fail with its 503."""
    from service.errors import PartlyWritten

    await new_session(batcher, "a")
    await new_session(batcher, "b")

    async def half(records: list[SessionRecord]) -> None:
        if len(records) < 2:
            return
        store.before_put = None
        kept = [r for r in records if r.session_id == "a"]
        assert await MemorySessionStore.put_many(store, kept, [1]) == [True]
        raise PartlyWritten("shard lost (test)", [r.session_id == "a" or None for r in records])

    store.before_put = half
    # One batch with both steps: queued before the scheduler wakes.
    fed_a = batcher.submit(Step([4], session_id="a"))
    fed_b = batcher.submit(Step([5], session_id="b"))
    assert (await fed_a).tokens == 1
    with pytest.raises(PartlyWritten):
        await fed_b
    assert store.writes[-1] == ["a", "b"]
    assert (await store.get("a")).tokens == 1 and (await store.get("b")).tokens == 0


# --- long steps: chunked prefill ------------------------------------------------------------


def long_texts(n: int, seed: int, low: int = 9, high: int = 60) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, VOCAB, size=rng.integers(low, high)).tolist() for _ in range(n)]


def batch_tokens(b: StepBatcher, runner: FakeRunner) -> list[int]:
    """Record the tokens each batch runs (summed over its runs), from now on."""
    seen: list[int] = []
    compute = b._compute

    def counting(rows: Any, holding: Any) -> None:
        before = len(runner.calls)
        compute(rows, holding)
        seen.append(sum(bt * t for bt, t, _ in runner.calls[before:]))

    b._compute = counting  # type: ignore[method-assign]
    return seen


@pytest.fixture
async def chunked(runner: FakeRunner, store: CountingStore) -> AsyncIterator[StepBatcher]:
    b = StepBatcher(
        runner,
        store,
        max_batch=64,
        max_wait_ms=1.0,
        prefill_chunk=4,
        max_batch_tokens=24,
        max_prefill_tokens=8,
    )
    await b.start()
    yield b
    await b.stop()


async def test_long_texts_run_in_chunks_and_equal_the_whole_text(
    chunked: StepBatcher, runner: FakeRunner, store: CountingStore
) -> None:
    # The same model (same weights), unchunked, in a batcher of its own.
    whole = StepBatcher(
        FakeRunner(), MemorySessionStore(3600.0, 1000), max_wait_ms=1.0, prefill_chunk=0
    )
    await whole.start()
    inputs = long_texts(12, seed=4)
    ids = [f"s{i}" for i in range(len(inputs))]
    await asyncio.gather(*(new_session(chunked, i) for i in ids))
    await asyncio.gather(*(new_session(whole, i) for i in ids))
    store.reads.clear()
    store.writes.clear()
    per_batch = batch_tokens(chunked, runner)
    runner.calls.clear()

    async def feed(b: StepBatcher, session_id: str, tokens: list[int], seed: int) -> StepResult:
        # A random split, each part up to 30 tokens: most run in several chunks.
        rng = np.random.default_rng(seed)
        result, i = None, 0
        while i < len(tokens):
            n = int(rng.integers(1, 30))
            result = await b.step(Step(tokens[i : i + n], session_id=session_id))
            i += n
        assert result is not None
        return result

    results, unchunked, stateless, stateless_whole = await asyncio.gather(
        asyncio.gather(*(feed(chunked, s, t, n) for n, (s, t) in enumerate(zip(ids, inputs)))),
        asyncio.gather(*(feed(whole, s, t, n) for n, (s, t) in enumerate(zip(ids, inputs)))),
        asyncio.gather(*(chunked.step(Step(t)) for t in inputs)),
        asyncio.gather(*(whole.step(Step(t)) for t in inputs)),
    )
    assert max(t for _, t, _ in runner.calls) <= 4  # no run longer than a chunk
    assert max(per_batch) <= 24  # the batch token bound
    for tokens, r, u, s, w in zip(inputs, results, unchunked, stateless, stateless_whole):
        assert r.tokens == u.tokens == s.tokens == len(tokens)
        same(r, alone(runner, tokens))
        same(s, alone(runner, tokens))
        assert r.ids.tolist() == u.ids.tolist() == s.ids.tolist() == w.ids.tolist()
        np.testing.assert_allclose(r.probs, u.probs, atol=1e-4)
        np.testing.assert_allclose(s.probs, w.probs, atol=1e-4)
        record = await store.get(r.record.session_id if r.record else "")
        assert record.tokens == len(tokens)
    # The state carried between a step's chunks never reaches the store before its end:
    # one read and one write per step, however many chunks.
    assert sorted(sum(store.reads, [])) == sorted(sum(store.writes, []))
    await whole.stop()


async def test_a_short_step_is_answered_before_a_long_one_finishes(
    chunked: StepBatcher, runner: FakeRunner, store: CountingStore
) -> None:
    await asyncio.gather(new_session(chunked, "long"), new_session(chunked, "short"))
    text = long_texts(1, seed=5, low=400, high=401)[0]
    long_session = chunked.submit(Step(text, session_id="long"))
    long_stateless = chunked.submit(Step(text))
    while not runner.calls:  # the long steps' first chunks are running
        await asyncio.sleep(0.001)
    short_session = await chunked.step(Step([5], session_id="short"))
    short_stateless = await chunked.step(Step([6, 7]))
    assert not long_session.done() and not long_stateless.done()
    same(short_session, alone(runner, [5]))
    same(short_stateless, alone(runner, [6, 7]))
    assert (await store.get("long")).tokens == 0  # nothing written before the last chunk
    same(await long_session, alone(runner, text))
    same(await long_stateless, alone(runner, text))
    assert (await store.get("long")).tokens == len(text)


async def test_a_sessions_steps_apply_in_order_behind_a_long_step(
    chunked: StepBatcher, runner: FakeRunner
) -> None:
    await new_session(chunked, "a", [4])
    text = long_texts(1, seed=6, low=50, high=51)[0]
    steps = [Step(text, session_id="a"), Step([5], session_id="a"), Step([], session_id="a")]
    results = await asyncio.gather(*(chunked.step(s) for s in steps))
    assert [r.tokens for r in results] == [51, 52, 52]
    same(results[0], alone(runner, [4, *text]))
    same(results[1], alone(runner, [4, *text, 5]))
    same(results[2], alone(runner, [4, *text, 5]))


async def test_many_long_steps_keep_each_batch_bounded(
    chunked: StepBatcher, runner: FakeRunner
) -> None:
    per_batch = batch_tokens(chunked, runner)
    inputs = long_texts(40, seed=7, low=20, high=40)
    shorts = texts(40, seed=8)
    results = await asyncio.gather(*(chunked.step(Step(t)) for t in inputs + shorts))
    assert max(per_batch) <= 24
    assert max(t for _, t, _ in runner.calls) <= 4
    for tokens, result in zip(inputs + shorts, results):
        same(result, alone(runner, tokens))


async def test_a_long_step_that_conflicts_is_retried_whole(
    chunked: StepBatcher, store: CountingStore, runner: FakeRunner
) -> None:
    await new_session(chunked, "a", [4])
    other = StepBatcher(runner, store, max_wait_ms=0)  # another replica, same store
    await other.start()
    interfered = False

    async def other_replica(records: list[SessionRecord]) -> None:
        nonlocal interfered
        if not interfered and any(r.session_id == "a" for r in records):
            interfered = True
            await other.step(Step([9], session_id="a"))

    store.before_put = other_replica
    text = long_texts(1, seed=9, low=30, high=31)[0]
    result = await chunked.step(Step(text, session_id="a"))
    assert interfered and result.tokens == 2 + len(text)
    same(result, alone(runner, [4, 9, *text]))  # applied whole, after 9
    await other.stop()


async def test_a_cancelled_long_step_is_never_written(
    chunked: StepBatcher, store: CountingStore, runner: FakeRunner
) -> None:
    await new_session(chunked, "a", [4])
    before = await store.get("a")
    gone = chunked.submit(Step(long_texts(1, seed=10, low=300, high=301)[0], session_id="a"))
    while not runner.calls:
        await asyncio.sleep(0.001)
    gone.cancel()
    same(await chunked.step(Step([5], session_id="a")), alone(runner, [4, 5]))
    after = await store.get("a")
    assert (after.tokens, after.version) == (2, before.version + 1)


async def test_a_failed_chunk_fails_the_long_step_and_writes_nothing(
    chunked: StepBatcher, store: CountingStore, runner: FakeRunner
) -> None:
    await new_session(chunked, "a", [4])
    runs = 0

    def third_run_fails(tokens: np.ndarray) -> bool:
        nonlocal runs
        runs += 1
        return runs == 3

    runner.fail = third_run_fails
    with pytest.raises(StepFailed):
        await chunked.step(Step(long_texts(1, seed=11, low=40, high=41)[0], session_id="a"))
    assert (await store.get("a")).tokens == 1
    runner.fail = lambda tokens: False
    same(await chunked.step(Step([5], session_id="a")), alone(runner, [4, 5]))


async def test_stop_drains_long_steps_in_progress(runner: FakeRunner, store: CountingStore) -> None:
    b = StepBatcher(runner, store, max_wait_ms=1.0, prefill_chunk=4)
    await b.start()
    await new_session(b, "a")
    text = long_texts(1, seed=12, low=100, high=101)[0]
    futures = [b.submit(Step(text, session_id="a")), b.submit(Step(text))]
    while not runner.calls:
        await asyncio.sleep(0.001)
    await b.stop(drain=True)
    for future in futures:
        same(future.result(), alone(runner, text))


def test_token_bounds_always_leave_room_for_one_chunk(
    runner: FakeRunner, store: CountingStore
) -> None:
    b = StepBatcher(
        runner, store, max_batch=8, prefill_chunk=16, max_batch_tokens=4, max_prefill_tokens=4
    )
    assert (b.prefill_chunk, b.max_prefill_tokens, b.max_batch_tokens) == (16, 16, 16)
    d = StepBatcher(runner, store, max_batch=256)
    assert (d.prefill_chunk, d.max_batch_tokens, d.max_prefill_tokens) == (16, 256, 64)


async def test_chunked_equals_whole_with_the_bundled_lstm() -> None:
    from pathlib import Path  # noqa: PLC0415

    from service.config import BUNDLED_MODELS  # noqa: PLC0415
    from service.contract.artifact import ModelArtifact  # noqa: PLC0415
    from service.engine.runtime import CPU, OrtModel  # noqa: PLC0415

    model = OrtModel(ModelArtifact.load(Path(BUNDLED_MODELS) / "lstm"), [CPU])
    rng = np.random.default_rng(13)
    text = rng.integers(3, len(model.vocab), size=700).tolist()
    answers = []
    for chunk in (0, 16, 64):
        b = StepBatcher(model, MemorySessionStore(3600.0, 10), max_wait_ms=0, prefill_chunk=chunk)
        await b.start()
        await b.step(Step([], session_id="a", create=True))
        fed = None
        for part in (text[:5], text[5:300], text[300:301], text[301:]):
            fed = await b.step(Step(part, session_id="a", k=10))
        assert fed is not None and fed.tokens == len(text)
        prefix = await b.step(Step([], session_id="a", k=5, prefix_ids=np.arange(100, 400)))
        answers += [fed, await b.step(Step(text, k=10)), prefix]
        await b.stop()
    for i, result in enumerate(answers[3:]):
        want = answers[i % 3]
        assert result.ids.tolist() == want.ids.tolist()
        np.testing.assert_allclose(result.probs, want.probs, atol=1e-4)
    assert answers[0].ids.tolist() == answers[1].ids.tolist()  # session == stateless
    np.testing.assert_allclose(answers[0].probs, answers[1].probs, atol=1e-4)


async def test_a_client_over_its_queue_share_is_refused_and_others_still_queue(
    runner: FakeRunner, store: CountingStore
) -> None:
    b = StepBatcher(runner, store, max_batch=1, max_wait_ms=0, max_queue=8, queue_share=0.25)
    await b.start()
    runner.gate = threading.Event()
    first = asyncio.ensure_future(b.step(Step([4], client="alice")))
    assert await asyncio.to_thread(runner.entered.wait, 10)
    alice = [asyncio.ensure_future(b.step(Step([5], client="alice")))]  # 2 of her 2
    await asyncio.sleep(0)
    with pytest.raises(Overloaded) as refused:
        b.submit(Step([6], client="alice"))
    assert "share" in refused.value.message and refused.value.retry_after_s is not None
    bob = [asyncio.ensure_future(b.step(Step([7], client="bob"))) for _ in range(2)]
    anyone = asyncio.ensure_future(b.step(Step([8])))  # no client: takes no share
    await asyncio.sleep(0)
    assert b.queue_depth == 4
    runner.gate.set()
    await asyncio.gather(first, *alice, *bob, anyone)
    assert b.shares.held == {}  # every answered step gave its place back
    again = await b.step(Step([6], client="alice"))
    assert again.ids.size
    await b.stop()


async def test_a_cancelled_step_gives_its_share_back(
    runner: FakeRunner, store: CountingStore
) -> None:
    b = StepBatcher(runner, store, max_batch=1, max_wait_ms=0, max_queue=4, queue_share=0.25)
    await b.start()
    runner.gate = threading.Event()
    first = asyncio.ensure_future(b.step(Step([4], client="bob")))
    assert await asyncio.to_thread(runner.entered.wait, 10)
    waiting = b.submit(Step([5], client="alice"))
    with pytest.raises(Overloaded):
        b.submit(Step([5], client="alice"))
    waiting.cancel()  # her client left
    await asyncio.sleep(0)
    later = b.submit(Step([5], client="alice"))
    runner.gate.set()
    await asyncio.gather(first, later)
    await b.stop()


async def test_a_step_with_its_sessions_last_step_id_is_answered_not_applied_again(
    batcher: StepBatcher, store: CountingStore
) -> None:
    await batcher.step(Step([4, 5], session_id="s", create=True))
    first = await batcher.step(Step([6, 7], session_id="s", step_id="m1"))
    record = await store.get("s")
    assert (record.tokens, record.last_step) == (4, "m1")
    again = await batcher.step(Step([6, 7], session_id="s", step_id="m1"))  # a retry
    assert again.tokens == first.tokens == 4
    assert np.array_equal(again.ids, first.ids) and np.allclose(again.probs, first.probs)
    assert (await store.get("s")).tokens == 4
    other = await batcher.step(Step([6, 7], session_id="s", step_id="m2"))  # a new step
    assert other.tokens == 6
    plain = await batcher.step(Step([8], session_id="s"))  # no id: always applied
    assert plain.tokens == 7 and (await store.get("s")).last_step == ""
    older = await batcher.step(Step([6, 7], session_id="s", step_id="m2"))  # not the last
    assert older.tokens == 9


async def test_a_step_queued_during_a_run_does_not_wait_again_for_its_batch(
    runner: FakeRunner, store: CountingStore
) -> None:
    # max_wait_ms bounds a step's wait from its arrival: C queues while A and B run, for
    # longer than the window, so once they are answered C is taken without a new wait.
    b = StepBatcher(runner, store, max_batch=2, max_wait_ms=200.0)
    waits: list[tuple[int, float | None]] = []
    wait = b._wait

    async def recorded(at_least: int, timeout: float | None) -> None:
        waits.append((at_least, timeout))
        await wait(at_least, timeout)

    b._wait = recorded  # type: ignore[method-assign]
    await b.start()
    try:
        runner.gate = threading.Event()
        first = asyncio.gather(b.step(Step([3])), b.step(Step([4])))
        await asyncio.to_thread(runner.entered.wait, 10)  # A and B are in their run
        third = asyncio.ensure_future(b.step(Step([5])))
        await asyncio.sleep(0.3)  # C has waited past the 200 ms window during the run
        waits.clear()
        runner.gate.set()
        await first
        same(await third, alone(runner, [5]))
        assert all(at_least != b.max_batch for at_least, _ in waits), waits
        assert runner.calls[-1][0] == 1  # C ran alone
    finally:
        runner.gate = None
        await b.stop()
