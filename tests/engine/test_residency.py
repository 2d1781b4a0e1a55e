"""Residency (service/engine/residency.py): every route a step can end by gives its pool
rows back, and a session's state is never read from a row that is not its own.

Each test runs a real scheduler with a state pool over the memory store (`keep_states`,
as the engine runs by default) and ends with the pool's reference counts equal to its
holders (two per residency entry and the two pinned rows: nothing in flight), and, where
nothing was applied, the pool's free rows where they were before the step.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import REGISTRY

from service.contract.artifact import ModelArtifact
from service.engine.adapt_hooks import Adaptation
from service.engine.pool import StatePool
from service.engine.runtime import OrtModel
from service.engine.scheduler import Step, StepBatcher
from service.errors import StepFailed, StoreUnavailable, UnknownSession
from service.store import SessionRecord, TieredSessionStore
from service.store.memory import MemorySessionStore

ATOL = 1e-5


class Store(MemorySessionStore):
    """The memory store, able to fail a write or let another writer in first."""

    def __init__(self) -> None:
        super().__init__(ttl_s=3600.0, cap=1000)
        self.fail_writes = 0
        self.before_write: list[Any] = []  # coroutines run before the next write

    async def put_many(
        self, records: list[SessionRecord], expected: list[int | None]
    ) -> list[bool]:
        while self.before_write:
            await self.before_write.pop(0)
        if self.fail_writes:
            self.fail_writes -= 1
            raise StoreUnavailable("the store is away")
        return await super().put_many(records, expected)


@pytest.fixture(scope="module")
def lstm(tiny_artifacts: Path) -> OrtModel:
    return OrtModel(ModelArtifact.load(tiny_artifacts / "lstm"), ["CPUExecutionProvider"])


@pytest.fixture
async def engine(lstm: OrtModel) -> AsyncIterator[StepBatcher]:
    batcher = StepBatcher(
        lstm,
        Store(),
        pool=StatePool(lstm, 64),
        keep_states=True,
        max_wait_ms=0,
        prefill_chunk=2,
        max_retries=3,
    )
    await batcher.start()
    yield batcher
    await batcher.stop()
    assert batcher.pool is not None and batcher.pool.used == 2  # only the pinned rows


@pytest.fixture
async def copied(lstm: OrtModel) -> AsyncIterator[StepBatcher]:
    batcher = StepBatcher(lstm, MemorySessionStore(3600.0, 1000), max_wait_ms=0, prefill_chunk=2)
    await batcher.start()
    yield batcher
    await batcher.stop()


def settled(b: StepBatcher) -> None:
    """The pool's counts are its holders': the entries' rows and the pinned ones."""
    assert b.pool is not None and b.residency is not None
    pinned = np.array([b._start_current, b._zeros], dtype=np.int64)
    b.pool.check_counts(np.concatenate([b.residency.holders(), pinned]))


async def same(b: StepBatcher, copied: StepBatcher, step: Step) -> None:
    """`step` on both schedulers answers alike."""
    twin = Step(list(step.tokens), session_id=step.session_id, create=step.create)
    got, want = await b.step(step), await copied.step(twin)
    assert got.tokens == want.tokens
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_allclose(got.probs, want.probs, atol=ATOL)


async def test_answered_steps_leave_two_rows_per_session(
    engine: StepBatcher, copied: StepBatcher
) -> None:
    assert engine.pool is not None
    await same(engine, copied, Step([5, 6, 7], session_id="a", create=True))
    await same(engine, copied, Step([], session_id="b", create=True))  # the pinned rows
    await same(engine, copied, Step([8], session_id="a"))
    await same(engine, copied, Step([], session_id="a"))  # no new words: the same rows
    settled(engine)
    assert engine.pool.used == 2 + 2 and len(engine.residency or ()) == 2


async def test_a_step_cancelled_before_its_run_takes_no_row(engine: StepBatcher) -> None:
    assert engine.pool is not None
    await engine.step(Step([5, 6], session_id="a", create=True))
    free = engine.pool.free
    step = engine.submit(Step([7, 8, 9, 10, 11], session_id="a"))
    step.cancel()  # before the loop ran again: it drops the step when it takes it
    await engine.step(Step([], session_id="a"))  # the loop ran past the cancelled step
    assert engine.pool.free == free
    settled(engine)


@pytest.mark.parametrize("when", ["during the run", "after the run"])
@pytest.mark.parametrize("tokens", [[7, 8, 9], [7]], ids=["a long step", "a common batch"])
async def test_a_step_cancelled_during_or_after_its_run_gives_its_rows_back(
    engine: StepBatcher,
    copied: StepBatcher,
    monkeypatch: pytest.MonkeyPatch,
    when: str,
    tokens: list[int],
) -> None:
    pool = engine.pool
    assert pool is not None
    await same(engine, copied, Step([5, 6], session_id="a", create=True))
    free = pool.free
    futures: list[asyncio.Future[Any]] = []
    real_run, real_compute = pool.run, engine._compute

    loop = asyncio.get_running_loop()

    def run(*args: Any, **kwargs: Any) -> Any:
        loop.call_soon_threadsafe(futures[0].cancel)
        return real_run(*args, **kwargs)

    def compute(rows: Any, holding: Any) -> None:
        real_compute(rows, holding)
        loop.call_soon_threadsafe(futures[0].cancel)

    if when == "during the run":
        monkeypatch.setattr(pool, "run", run)
    else:
        monkeypatch.setattr(engine, "_compute", compute)
    futures.append(engine.submit(Step(tokens, session_id="a")))
    await asyncio.wait([futures[0]])
    assert futures[0].cancelled()
    monkeypatch.undo()
    for _ in range(3):  # the cancellation lands; the batch ends
        await asyncio.sleep(0.01)
    assert pool.free == free  # nothing written: the session keeps its rows
    settled(engine)
    await same(engine, copied, Step([7], session_id="a"))  # the session as it was


async def test_a_long_step_cancelled_between_its_chunks_gives_its_carried_row_back(
    engine: StepBatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = engine.pool
    assert pool is not None
    await engine.step(Step([5, 6], session_id="a", create=True))
    free = pool.free
    real = engine._carry_on
    carried = []

    def carry_on(rows: Any) -> Any:
        done = real(rows)
        for row in rows:
            if row.carried != -1:  # between two chunks: cancelled now
                carried.append(row.carried)
                row.step.future.cancel()
        return done

    monkeypatch.setattr(engine, "_carry_on", carry_on)
    step = engine.submit(Step(list(range(3, 15)), session_id="a"))
    await asyncio.wait([step])
    monkeypatch.undo()
    await engine.step(Step([], session_id="a"))  # the loop dropped the cancelled step
    assert carried and pool.free == free
    settled(engine)


async def test_a_lost_compare_and_set_retries_from_the_other_writers_state(
    engine: StepBatcher, copied: StepBatcher
) -> None:
    """Another writer (host states, as a replica through a shared store would write)
    steps the session between this step's read and its write: the step retries from the
    record written, uploaded, and answers what the copied path answers."""
    store = engine.store
    assert isinstance(store, Store)
    await same(engine, copied, Step([5, 6], session_id="a", create=True))
    await copied.step(Step([9], session_id="a"))  # what the other writer applied
    other = await copied.store.get("a")

    async def interfere() -> None:
        (record,) = await store.get_many(["a"])
        assert record is not None
        assert await store.put_many([_with(other, record)], [record.version]) == [True]

    store.before_write.append(interfere())
    await same(engine, copied, Step([7, 8], session_id="a"))
    settled(engine)
    assert engine.pool is not None and engine.pool.used == 2 + 2


def _with(other: SessionRecord, record: SessionRecord) -> SessionRecord:
    """`other`'s state and tokens on `record`'s identity (created_at, version)."""
    return SessionRecord(
        record.session_id,
        record.model,
        tuple(np.array(a) for a in other.state),
        other.tokens,
        record.created_at,
        record.last_used_at,
        record.version,
        other.last_token,
        memory=other.memory,
        adapt=other.adapt,
    )


async def test_a_failed_write_and_a_failed_run_leave_the_session_and_its_rows(
    engine: StepBatcher, copied: StepBatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool, store = engine.pool, engine.store
    assert pool is not None and isinstance(store, Store)
    await same(engine, copied, Step([5, 6], session_id="a", create=True))
    free = pool.free
    for tokens in ([7, 8, 9, 10, 11], [7, 8]):  # a long step, a common batch
        store.fail_writes = 1
        with pytest.raises(StoreUnavailable):
            await engine.step(Step(tokens, session_id="a"))
        assert pool.free == free
        settled(engine)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the device fell over")

    monkeypatch.setattr(pool, "_run", broken)
    for tokens in ([7, 8, 9], [7]):
        with pytest.raises(StepFailed):
            await engine.step(Step(tokens, session_id="a"))
    monkeypatch.undo()
    assert pool.free == free
    settled(engine)
    await same(engine, copied, Step([7], session_id="a"))  # the session as it was


@pytest.mark.parametrize("drain", [True, False])
async def test_shutdown_gives_every_row_back(
    engine: StepBatcher, monkeypatch: pytest.MonkeyPatch, drain: bool
) -> None:
    pool = engine.pool
    assert pool is not None
    for i in range(4):
        await engine.step(Step([5, 6, i + 3], session_id=f"s{i}", create=True))
    long = [engine.submit(Step(list(range(3, 20)), session_id=f"s{i}")) for i in range(4)]
    await asyncio.sleep(0)
    await engine.stop(drain=drain)
    await asyncio.wait(long)
    assert pool.used == 2  # the pinned rows only: no entry, nothing carried or in flight
    engine._closing = False
    await engine.start()  # the fixture stops it again


async def test_a_record_whose_state_is_nowhere_is_an_unknown_session_logged_once(
    engine: StepBatcher, caplog: pytest.LogCaptureFixture
) -> None:
    """A record written without state (kept on a device) by no entry of this engine: it
    must not happen; it is answered as unknown, and logged the first time."""
    store = engine.store
    await engine.step(Step([5, 6], session_id="a", create=True))
    record = await store.get("a")
    for session_id in ("x", "y"):
        orphan = SessionRecord(
            session_id, "lstm", (), 2, 1.0, 1.0, last_token=6, state_on_device=True
        )
        assert await store.put_many([orphan], [None]) == [True]
    lost = {"model": "lstm"}
    before = REGISTRY.get_sample_value("nextword_lost_sessions_total", lost) or 0.0
    with caplog.at_level(logging.ERROR, logger="service.engine.residency"):
        for session_id in ("x", "y"):
            with pytest.raises(UnknownSession):
                await engine.step(Step([7], session_id=session_id))
    assert engine.residency is not None and engine.residency.lost == 2
    assert REGISTRY.get_sample_value("nextword_lost_sessions_total", lost) == before + 2
    assert caplog.text.count("has its state nowhere") == 1
    assert (await store.get("a")).version == record.version  # the others untouched
    settled(engine)


@pytest.mark.parametrize("gone", ["deleted", "expired"])
async def test_a_session_re_created_under_its_id_never_reads_the_stale_entry(
    lstm: OrtModel, copied: StepBatcher, gone: str
) -> None:
    """With a frozen clock, a session deleted (or expired) and created again under the same
    id has the same created_at and version as before: its first write replaces the stale
    entry, and its steps run from its own states."""
    now = [1000.0]
    store = MemorySessionStore(ttl_s=100.0, cap=100, clock=lambda: now[0])
    engine = StepBatcher(
        lstm,
        store,
        pool=StatePool(lstm, 64),
        keep_states=True,
        max_wait_ms=0,
        clock=lambda: now[0],
    )
    await engine.start()
    try:
        await engine.step(Step([5, 6, 7], session_id="s", create=True))
        old = await store.get("s")
        if gone == "deleted":
            await store.delete("s")
        else:
            now[0] += 101.0
            assert await store.count() == 0
        assert engine.residency is not None and len(engine.residency) == 1  # stale, kept
        await same(engine, copied, Step([9, 10], session_id="s", create=True))
        new = await store.get("s")
        assert (new.version, new.created_at) == (old.version, old.created_at) or gone == "expired"
        await same(engine, copied, Step([11], session_id="s"))
        settled(engine)
    finally:
        await engine.stop()


async def test_through_a_shared_store_the_rows_written_are_kept_and_another_writer_is_seen(
    lstm: OrtModel, copied: StepBatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`cache_states` (a shared store written through): records carry host states, the
    engine keeps the rows of what it wrote, so a session's next step uploads nothing; a
    version another engine wrote is uploaded (after the stale local copy loses its
    compare-and-set), and every answer is the copied path's."""
    shared = MemorySessionStore(3600.0, 1000)  # stands for Redis
    pool = StatePool(lstm, 64)
    engine = StepBatcher(
        lstm, TieredSessionStore(shared), pool=pool, cache_states=True, max_wait_ms=0
    )
    other = StepBatcher(lstm, TieredSessionStore(shared), max_wait_ms=0)  # another replica
    uploads: list[int] = []
    real = pool.upload

    def upload(states: Any) -> Any:
        uploads.append(len(states))
        return real(states)

    monkeypatch.setattr(pool, "upload", upload)
    await engine.start()
    await other.start()
    try:
        await same(engine, copied, Step([5, 6, 7], session_id="s", create=True))
        assert not (await shared.get("s")).state_on_device  # host states in the store
        await same(engine, copied, Step([8], session_id="s"))
        await same(engine, copied, Step([9, 10], session_id="s"))
        assert uploads == []  # each step ran from the rows the last one wrote
        settled(engine)
        twin = Step([11], session_id="s")
        await other.step(Step([11], session_id="s"))
        await copied.step(twin)
        await same(engine, copied, Step([12], session_id="s"))
        assert uploads == [2]  # the other writer's version, brought in once
        settled(engine)
    finally:
        await engine.stop()
        await other.stop()
    assert pool.used == 2


@pytest.mark.parametrize("adapt", [False, True], ids=["adaptation off", "adaptation on"])
async def test_a_common_batch_answers_and_leaves_states_as_the_general_path_bit_for_bit(
    lstm: OrtModel, monkeypatch: pytest.MonkeyPatch, adapt: bool
) -> None:
    """Batches of sessions' steps of one to `prefill_chunk` words (new sessions, resident
    ones, mixed lengths and k, with or without the writer's words) run as arrays
    (`execute.Common`): the same runs as the general path, so the same answers, records,
    memories and state bytes."""
    mixed: list[int] = []  # runs whose answers mixed the writer's words in
    real_answer = Adaptation.answer_columns

    def answer(self: Adaptation, *a: Any) -> Any:
        mixed.append(1)
        return real_answer(self, *a)

    monkeypatch.setattr(Adaptation, "answer_columns", answer)
    made = []
    for common in (True, False):
        b = StepBatcher(
            lstm, Store(), pool=StatePool(lstm, 64), keep_states=True, max_wait_ms=50,
            prefill_chunk=16, max_batch=8, adaptation=Adaptation.of(lstm) if adapt else None,
        )  # fmt: skip
        b.execution.takes_common = common
        ran: list[int] = []

        def counted(*a: Any, _real: Any = b.execution.compute_common, _ran: Any = ran) -> None:
            _ran.append(1)
            _real(*a)

        monkeypatch.setattr(b.execution, "compute_common", counted)
        await b.start()
        made.append((b, ran))
    w = np.flatnonzero(lstm.vocab.suggestible)[:8].tolist()  # words a memory keeps
    unk = lstm.vocab.unk_id
    rounds = [
        # Twelve words: past the tiny model's warm-up (the memory mixes from the next step).
        [Step(w + w[:4], session_id="a", create=True), Step([], session_id="b", create=True),
         Step(w[::-1] + w[:4], session_id="c", create=True, k=3)],
        [Step([w[0]], session_id="a"), Step([w[3], w[4], w[3]], session_id="b", k=2),
         Step([w[2], w[5]], session_id="c"), Step([w[6]], session_id="d", create=True)],
        [Step([w[1], w[0]], session_id="a", fresh=True), Step([w[4]], session_id="b"),
         Step([w[5], w[2], w[7]], session_id="c"), Step([w[6], w[6]], session_id="d")],
        [Step([w[0]], session_id="a", adapt=False), Step([w[3]], session_id="b"),
         Step([w[2]], session_id="c", k=7), Step([w[7]], session_id="d")],
        # Typed words outside the vocabulary (`<unk>` tokens), then steps they may answer.
        [Step([unk, w[1], unk], session_id="a", typed=["Zyzzyva", "Quokka"]),
         Step([unk], session_id="c", typed=["Zyzzyva"], k=9)],
        [Step([unk] * 12, session_id="a", typed=["Zyzzyva"] * 12, k=9),
         Step([w[1]], session_id="c", k=9)],
        [Step([w[1]], session_id="a", k=9), Step([unk], session_id="c", typed=["Zyzzyva"])],
    ]  # fmt: skip
    named_typed = 0  # answers that name a typed word
    try:
        for steps in rounds:
            answers = []
            for b, _ in made:
                twins = [
                    Step(list(s.tokens), session_id=s.session_id, create=s.create,
                         fresh=s.fresh, k=s.k, adapt=s.adapt, typed=list(s.typed))
                    for s in steps
                ]  # fmt: skip
                answers.append(await asyncio.gather(*(b.submit(s) for s in twins)))
            for got, want in zip(*answers):
                assert got.tokens == want.tokens and got.last_token == want.last_token
                assert got.words == want.words
                named_typed += bool(got.words)
                np.testing.assert_array_equal(got.ids, want.ids)
                np.testing.assert_array_equal(got.probs, want.probs)
                g, w = got.record, want.record
                assert g is not None and w is not None
                assert (g.tokens, g.version, g.last_token, g.adapt, g.state_on_device) == (
                    w.tokens, w.version, w.last_token, w.adapt, w.state_on_device
                )  # fmt: skip
                assert (g.memory is None) == (w.memory is None) == (not adapt)
                if g.memory is not None and w.memory is not None:
                    np.testing.assert_array_equal(g.memory.keys, w.memory.keys)
                    np.testing.assert_array_equal(g.memory.weights, w.memory.weights)
                    assert g.memory.words == w.memory.words
        for sid in "abcd":
            states = []
            for b, _ in made:
                assert b.residency is not None and b.pool is not None
                entry = b.residency.entry(sid)
                assert entry is not None
                rows = b.residency._rows[b.residency._entries[sid]]
                states.append(b.pool.download(rows))
            for g_state, w_state in zip(*states):
                for g, w in zip(g_state, w_state):
                    np.testing.assert_array_equal(g, w)
        # The first engine took the array path (the first round's empty step aside), the
        # other never did.
        assert made[0][1] and not made[1][1]
        assert bool(mixed) == adapt
        assert bool(named_typed) == adapt  # a typed word was remembered, then answered
    finally:
        for b, _ in made:
            await b.stop()
            settled(b)


async def test_the_residency_entries_count_in_the_memory_stores_bytes(engine: StepBatcher) -> None:
    """`MemorySessionStore.memory_bytes` counts the engine's residency entries (their ids
    and columns) beside its own rows, and stops counting an entry once it is dropped."""
    store, residency = engine.store, engine.residency
    assert isinstance(store, MemorySessionStore) and residency is not None
    empty, entries = store.memory_bytes(), residency.nbytes
    ids = [f"session-{i:04d}" for i in range(20)]
    await asyncio.gather(*(engine.step(Step([5], session_id=s, create=True)) for s in ids))
    assert len(residency) == 20
    grown = residency.nbytes - entries
    assert grown >= 20 * len(ids[0])  # at least the ids
    assert store.memory_bytes() - empty >= grown
    residency.drop(ids)
    assert residency.nbytes < entries + grown
    settled(engine)
