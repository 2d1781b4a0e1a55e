"""Review of the common batch as columns: what reaches a store that keeps every field of
a record (a shared store, through `TieredSessionStore`) is what the records path writes,
also when a step of the batch is cancelled during its run."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.contract.artifact import ModelArtifact
from service.engine.adapt_hooks import Adaptation
from service.engine.pool import StatePool
from service.engine.runtime import OrtModel
from service.engine.scheduler import Step, StepBatcher
from service.errors import UnknownSession
from service.store import SessionRecord, TieredSessionStore
from service.store.memory import MemorySessionStore


class Shared(MemorySessionStore):
    """Stands for Redis: remembers every record it is given (the memory store itself
    keeps no revision)."""

    def __init__(self) -> None:
        super().__init__(ttl_s=3600.0, cap=1000)
        self.given: list[SessionRecord] = []

    async def put_many(
        self, records: list[SessionRecord], expected: list[int | None]
    ) -> list[bool]:
        self.given.extend(records)
        return await super().put_many(records, expected)


@pytest.fixture(scope="module")
def lstm(tiny_artifacts: Path) -> OrtModel:
    return OrtModel(ModelArtifact.load(tiny_artifacts / "lstm"), ["CPUExecutionProvider"])


@pytest.mark.parametrize("cancelled", [False, True], ids=["all answered", "one cancelled"])
async def test_a_common_batch_writes_its_revision_to_a_shared_store(
    lstm: OrtModel, monkeypatch: pytest.MonkeyPatch, cancelled: bool
) -> None:
    assert lstm.revision  # a real artifact's
    shared = Shared()
    pool = StatePool(lstm, 64)
    engine = StepBatcher(
        lstm, TieredSessionStore(shared), pool=pool, cache_states=True, max_wait_ms=0
    )
    futures: list[asyncio.Future[Any]] = []
    loop = asyncio.get_running_loop()
    real_run = pool.run

    def run(*args: Any, **kwargs: Any) -> Any:
        if cancelled:
            loop.call_soon_threadsafe(futures[0].cancel)
        return real_run(*args, **kwargs)

    monkeypatch.setattr(pool, "run", run)
    commons: list[int] = []
    real_write = engine._write_common

    async def write_common(batch: Any) -> None:
        commons.append(len(batch.steps))
        await real_write(batch)

    monkeypatch.setattr(engine, "_write_common", write_common)
    await engine.start()
    try:
        futures.append(engine.submit(Step([5, 6], session_id="a", create=True)))
        futures.append(engine.submit(Step([7], session_id="b", create=True)))
        await asyncio.wait(futures)
        assert commons == [2]  # one common batch of both steps
        assert futures[0].cancelled() == cancelled
        written = {r.session_id: r.revision for r in shared.given}
        assert written == (
            {"b": lstm.revision} if cancelled else dict.fromkeys("ab", lstm.revision)
        )
        assert futures[1].result().record.revision == lstm.revision
    finally:
        await engine.stop()


def _twin(s: Step) -> Step:
    return Step(
        list(s.tokens), session_id=s.session_id, create=s.create, fresh=s.fresh, k=s.k,
        owner=s.owner, step_id=s.step_id, adapt=s.adapt,
    )  # fmt: skip


def _outcome(o: Any) -> Any:
    """What a client sees of a step's outcome, and the record it wrote."""
    if isinstance(o, BaseException):
        return type(o).__name__
    r = o.record
    memory = None if r.memory is None else (r.memory.keys.tolist(), r.memory.weights.tolist())
    return (
        memory,
        o.words,
        o.ids.tolist(),
        o.probs.tolist(),
        o.tokens,
        o.last_token,
        (r.session_id, r.tokens, r.version, r.last_token, r.owner, r.adapt, r.last_step),
        (r.revision, r.state_on_device),
    )


@pytest.mark.parametrize("adapt", [False, True], ids=["adaptation off", "adaptation on"])
@pytest.mark.parametrize("seed", range(3))
async def test_random_batches_end_alike_by_columns_and_by_records(
    lstm: OrtModel, seed: int, adapt: bool
) -> None:
    """Random rounds of concurrent steps (a session twice in a round, retries by step id,
    fresh contexts, k from 1 to max_k side by side, owners past their cap and sessions
    past the store's cap): an engine taking the common batch as columns and one taking
    every batch row by row give the same outcomes, records and stored sessions."""
    rng = np.random.default_rng(seed)
    made = []
    for common in (True, False):
        store = MemorySessionStore(3600.0, cap=5, owner_cap=2)
        b = StepBatcher(
            lstm, store, pool=StatePool(lstm, 64), keep_states=True, max_wait_ms=50,
            prefill_chunk=16, max_batch=8, adaptation=Adaptation.of(lstm) if adapt else None,
        )  # fmt: skip
        b.execution.takes_common = common
        await b.start()
        made.append((b, store))
    ran: list[int] = []
    real = made[0][0].execution.compute_common

    def counted(*a: Any) -> None:
        ran.append(len(a[0].steps))
        real(*a)

    made[0][0].execution.compute_common = counted  # type: ignore[method-assign]
    seen: list[Any] = []
    names = "abcdefg"
    words = np.flatnonzero(lstm.vocab.suggestible)[:10]  # words a memory keeps
    last_ids: dict[str, str] = {}
    created: set[str] = set()
    try:
        for n in range(16):
            steps = []
            for i in range(int(rng.integers(1, 7))):
                sid = names[int(rng.integers(0, len(names)))]
                retry = sid in last_ids and rng.random() < 0.2
                step_id = last_ids[sid] if retry else f"{n}-{i}"
                last_ids[sid] = step_id
                steps.append(
                    Step(
                        rng.choice(words, size=int(rng.integers(1, 5))).tolist(),
                        session_id=sid,
                        create=sid not in created,
                        fresh=bool(rng.random() < 0.15),
                        k=int(rng.choice([1, 3, 5, lstm.max_k])),
                        owner=["", "alice", "bob"][int(rng.integers(0, 3))],
                        step_id=step_id,
                        adapt=[None, True, False][int(rng.integers(0, 3))],
                    )
                )
                created.add(sid)
            outcomes = []
            for b, _ in made:
                twins = [_twin(s) for s in steps]
                got = await asyncio.gather(*(b.submit(s) for s in twins), return_exceptions=True)
                outcomes.append([_outcome(o) for o in got])
            assert outcomes[0] == outcomes[1], n
            seen.extend(outcomes[0])
            for step, o in zip(steps, outcomes[0]):
                if o == "UnknownSession":  # evicted: created again later
                    created.discard(step.session_id)  # type: ignore[arg-type]
            reads = [await store.get_many(list(names)) for _, store in made]
            assert [
                None if r is None else (r.tokens, r.version, r.last_step, r.owner) for r in reads[0]
            ] == [
                None if r is None else (r.tokens, r.version, r.last_step, r.owner) for r in reads[1]
            ]
            assert made[0][1].evictions == made[1][1].evictions
        assert sum(ran) > 10  # the columns path ran most steps
        assert any(isinstance(o, str) for o in seen)  # some steps failed (evicted sessions)
        assert made[0][1].evictions > 0
        # With adaptation, the sessions' memories (the outcome's first field) were written.
        assert any(not isinstance(o, str) and o[0] is not None for o in seen) == adapt
    finally:
        for b, _ in made:
            await b.stop()


class Keeping(Shared):
    """A shared store that keeps each record's revision (as Redis does)."""

    def __init__(self) -> None:
        super().__init__()
        self.revisions: dict[str, str] = {}

    async def put_many(
        self, records: list[SessionRecord], expected: list[int | None]
    ) -> list[bool]:
        written = await super().put_many(records, expected)
        for record, ok in zip(records, written):
            if ok:
                self.revisions[record.session_id] = record.revision
        return written

    async def get_many(self, ids: list[str]) -> list[SessionRecord | None]:  # type: ignore[override]
        return [
            None if r is None else dataclasses.replace(r, revision=self.revisions[r.session_id])
            for r in await super().get_many(ids)
        ]

    def set_revision(self, session_id: str, revision: str) -> None:
        self.revisions[session_id] = revision


@pytest.mark.parametrize("pooled", [True, False], ids=["pool", "no pool"])
async def test_a_session_of_another_revision_is_unknown_among_others_in_its_batch(
    lstm: OrtModel, pooled: bool
) -> None:
    """In one batch: a session another revision wrote fails as unknown; one of this
    revision and one of no known revision ("", an older format) are answered."""
    shared = Keeping()
    writer = StepBatcher(lstm, TieredSessionStore(shared), max_wait_ms=0)
    await writer.start()
    try:
        for sid in "xyz":
            await writer.step(Step([5, 6], session_id=sid, create=True))
    finally:
        await writer.stop()
    shared.set_revision("x", "another")
    shared.set_revision("z", "")
    engine = StepBatcher(
        lstm,
        TieredSessionStore(shared),
        pool=StatePool(lstm, 64) if pooled else None,
        cache_states=pooled,
        max_wait_ms=50,
    )
    await engine.start()
    try:
        got = await asyncio.gather(
            *(engine.submit(Step([7], session_id=sid)) for sid in "xyz"),
            return_exceptions=True,
        )
    finally:
        await engine.stop()
    assert isinstance(got[0], UnknownSession) and "another revision" in str(got[0])
    assert [r.record.revision for r in got[1:]] == [lstm.revision] * 2
    assert shared.revisions == {"x": "another", "y": lstm.revision, "z": lstm.revision}
