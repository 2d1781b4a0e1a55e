"""Sessions resident in a state pool, spilled to host memory, brought back, deleted,
expired and re-created, against a plain-dict reference in random orders (hypothesis,
stateful; the host side's rules are tests/store/test_store_model.py's).

The machine drives a real scheduler (`StepBatcher`) with a small `StatePool` over the
memory store (`keep_states`: the engine keeps its sessions' states on the device, their
records written without state), as the engine runs by default. Its pool is short, so
batches spill the least recently written sessions (and the `spill` rule forces more);
a spilled session comes back on its next step. Steps of up to five tokens run in chunks
of two (a long step carries a row between its batches). The reference is a plain dict
(session -> tokens fed) and a second scheduler on the copied path (no pool) fed the
same steps: after every step both answer the same words and probabilities.

After every operation: the sessions alive are those of the reference, with the same
token counts; each one's state (read back from its rows when resident, from its record
when spilled) equals the copied path's; and the pool's reference counts are exactly its
holders: two per residency entry (stale entries of deleted or expired sessions included,
until a spill reclaims them), the pinned start and zero states, nothing in flight.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from service.contract.artifact import ModelArtifact
from service.engine.pool import StatePool
from service.engine.runtime import OrtModel
from service.engine.scheduler import Step, StepBatcher
from service.errors import UnknownSession
from service.store.memory import MemorySessionStore

IDS = [f"s{i}" for i in range(6)]
ROWS = 18  # 2 pinned, and 3 steps in flight: each its 2 rows, a carried one and 2 new
TTL = 100.0
ATOL = 1e-5  # the same kernels; only the batch's layout differs


class Clock:
    """The stores' and the schedulers' time, moved by the machine."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def pinned_rows(batcher: StepBatcher) -> np.ndarray:
    return np.array([batcher._start_current, batcher._zeros], dtype=np.int64)


class ResidencyMachine(RuleBasedStateMachine):
    """Creates, steps, spills, deletes and expiries on a resident engine and a reference."""

    model: OrtModel  # set by the test below (a module fixture: one model for every example)

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.loop = asyncio.new_event_loop()
        self.pool = StatePool(self.model, ROWS)  # its own: no example sees another's rows
        self.store = MemorySessionStore(ttl_s=TTL, cap=100, clock=self.clock, first_rows=2)
        self.copied_store = MemorySessionStore(ttl_s=TTL, cap=100, clock=self.clock)
        options: dict[str, Any] = dict(max_batch=3, max_wait_ms=0, prefill_chunk=2)
        self.batcher = StepBatcher(
            self.model,
            self.store,
            pool=self.pool,
            keep_states=True,
            clock=self.clock,
            **options,
        )
        self.copied = StepBatcher(self.model, self.copied_store, clock=self.clock, **options)
        self.run(self.batcher.start())
        self.run(self.copied.start())
        self.ref: dict[str, list[int]] = {}  # session -> its tokens
        self.written: dict[str, float] = {}  # session -> when it was last written
        self.vocab = len(self.model.vocab)

    def run(self, coroutine: Any) -> Any:
        return self.loop.run_until_complete(coroutine)

    def teardown(self) -> None:
        self.run(self.batcher.stop())
        self.run(self.copied.stop())
        assert self.pool.used == 2  # shutdown released every entry: only the pinned rows
        self.loop.close()

    async def both(self, steps: list[tuple[str, list[int], bool]]) -> list[Any]:
        """The same steps on both schedulers, concurrently (batched together)."""

        def make(session_id: str, tokens: list[int], create: bool) -> Step:
            return Step(list(tokens), session_id=session_id, create=create, k=5)

        got = await asyncio.gather(*(self.batcher.step(make(*s)) for s in steps))
        want = await asyncio.gather(*(self.copied.step(make(*s)) for s in steps))
        return list(zip(got, want))

    def check_answers(self, pairs: list[Any]) -> None:
        for got, want in pairs:
            assert got.tokens == want.tokens
            np.testing.assert_array_equal(got.ids, want.ids)
            np.testing.assert_allclose(got.probs, want.probs, atol=ATOL)

    token_lists = st.lists(st.integers(3, 40), max_size=5)

    @precondition(lambda self: len(self.ref) < len(IDS))
    @rule(data=st.data(), tokens=token_lists)
    def create(self, data: st.DataObject, tokens: list[int]) -> None:
        """A new session (perhaps under the id of a deleted or expired one)."""
        session_id = data.draw(st.sampled_from([s for s in IDS if s not in self.ref]))
        tokens = [t % self.vocab for t in tokens]
        self.check_answers(self.run(self.both([(session_id, tokens, True)])))
        self.ref[session_id] = list(tokens)
        self.written[session_id] = self.clock.now

    @precondition(lambda self: bool(self.ref))
    @rule(data=st.data())
    def step(self, data: st.DataObject) -> None:
        """Steps of up to three sessions in one batch (none: a step of no new words)."""
        ids = data.draw(
            st.lists(st.sampled_from(sorted(self.ref)), min_size=1, max_size=3, unique=True)
        )
        steps = []
        for session_id in ids:
            tokens = data.draw(self.token_lists)
            steps.append((session_id, [t % self.vocab for t in tokens], False))
        self.check_answers(self.run(self.both(steps)))
        for session_id, tokens, _ in steps:
            self.ref[session_id] += tokens
            self.written[session_id] = self.clock.now

    @rule(rows=st.sampled_from([1, 2, 4, 8, ROWS]))
    def spill(self, rows: int) -> None:
        """Free about `rows` rows, as a batch short of rows does."""
        assert self.batcher.residency is not None
        self.batcher.residency.spill(rows)

    def spilled(self) -> list[str]:
        records = self.run(self.store.get_many(sorted(self.ref)))
        return [r.session_id for r in records if r is not None and r.state]

    @precondition(lambda self: bool(self.ref))
    @rule(data=st.data())
    def bring_back(self, data: st.DataObject) -> None:
        """A step of a spilled session (if any): its host states are uploaded first."""
        spilled = self.spilled()
        if not spilled:
            return
        session_id = data.draw(st.sampled_from(spilled))
        tokens = [t % self.vocab for t in data.draw(self.token_lists)]
        self.check_answers(self.run(self.both([(session_id, tokens, False)])))
        self.ref[session_id] += tokens
        self.written[session_id] = self.clock.now
        assert session_id not in self.spilled()  # resident again

    @precondition(lambda self: bool(self.ref))
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        session_id = data.draw(st.sampled_from(sorted(self.ref)))
        self.run(self.store.delete(session_id))
        self.run(self.copied_store.delete(session_id))
        del self.ref[session_id], self.written[session_id]

    @rule(idle=st.sampled_from([0.4, 0.7, 1.1]))
    def wait(self, idle: float) -> None:
        """Time passes: the sessions not written for the TTL expire (a spill is no write)."""
        self.clock.now += idle * TTL
        for session_id in [s for s, t in self.written.items() if t <= self.clock.now - TTL]:
            self.ref.pop(session_id, None)
            del self.written[session_id]

    @rule(session_id=st.sampled_from(IDS))
    def step_an_unknown_session(self, session_id: str) -> None:
        if session_id in self.ref:
            return
        with pytest.raises(UnknownSession):
            self.run(self.batcher.step(Step([5], session_id=session_id)))

    @invariant()
    def agree(self) -> None:
        residency = self.batcher.residency
        assert residency is not None and residency.lost == 0
        got = self.run(self.store.get_many(IDS))
        want = self.run(self.copied_store.get_many(IDS))
        for session_id, record, copied in zip(IDS, got, want):
            if session_id not in self.ref:
                assert record is None and copied is None, session_id
                continue
            assert record is not None and copied is not None, session_id
            assert record.tokens == copied.tokens == len(self.ref[session_id])
            if record.state:  # spilled: its host state
                state = record.state
            else:  # resident: the rows its entry holds
                (rows,) = residency.find([record])
                assert rows[0] != -1, f"{session_id} lost"
                current, previous = self.pool.download(rows)
                state = (*current, *previous)
            for a, b in zip(state, copied.state):
                np.testing.assert_allclose(a, b, atol=ATOL)
        holders = np.concatenate([residency.holders(), pinned_rows(self.batcher)])
        self.pool.check_counts(holders)  # no row leaked, none freed while held


@pytest.fixture(scope="module")
def lstm(tiny_artifacts: Path) -> OrtModel:
    return OrtModel(ModelArtifact.load(tiny_artifacts / "lstm"), ["CPUExecutionProvider"])


def test_resident_sessions_keep_every_answer_and_state_as_the_reference_has_them(
    lstm: OrtModel,
) -> None:
    ResidencyMachine.model = lstm
    run = ResidencyMachine.TestCase
    run.settings = settings(
        max_examples=30,
        stateful_step_count=20,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    run().runTest()
