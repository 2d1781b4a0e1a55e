"""Sessions resident in a state pool, spilled to host memory and brought back, against a
plain-dict reference in random orders (hypothesis, stateful; the host side's rules are
tests/store/test_store_model.py's).

A session written with its states in pool rows (`SessionRecord.resident`: the rows of the
state after its last token and of the one before) is resident; `MemorySessionStore.spill`
moves the least recently written resident sessions (those not kept) to host memory, as a
batch short of rows makes it do, and the scheduler brings a spilled session back on its
next step by uploading its states into fresh rows and writing it (a compare-and-set, as
every step). After every operation the store and the reference agree on every session's
presence, version and state bytes (read back from the pool for a resident one), and the
pool holds exactly the rows of the resident sessions: none leaked, none freed early.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass
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
from service.errors import UnknownSession
from service.store import SessionRecord
from service.store.memory import MemorySessionStore

IDS = [f"s{i}" for i in range(8)]
ROWS = 24  # pool rows: room for all eight sessions (two rows each) and a batch's uploads


@dataclass
class Entry:
    """A session as the reference keeps it: its states' bytes, version and residency."""

    state: tuple[bytes, ...]  # current arrays, then previous arrays
    version: int
    resident: bool


class ResidencyMachine(RuleBasedStateMachine):
    """Writes (resident), spills, bring-backs, reads and deletes on the store and the reference."""

    model: OrtModel  # set by the test below (a module fixture: one model for every example)

    def __init__(self) -> None:
        super().__init__()
        self.pool = StatePool(self.model, ROWS)  # its own: no example sees another's rows
        self.store = MemorySessionStore(ttl_s=1e9, cap=len(IDS), first_rows=2)
        self.ref: OrderedDict[str, Entry] = OrderedDict()  # write order
        self.loop = asyncio.new_event_loop()
        self.rng = np.random.default_rng(0)
        self.kinds = len(self.model.state_inputs)

    def run(self, coroutine: Any) -> Any:
        return self.loop.run_until_complete(coroutine)

    def teardown(self) -> None:
        self.run(self.store.close())
        self.loop.close()

    def states(self) -> tuple[np.ndarray, ...]:
        shape = (self.model.layers, self.model.hidden_size)
        return tuple(
            self.rng.standard_normal(shape).astype(np.float32) for _ in range(2 * self.kinds)
        )

    def resident_record(self, session_id: str, state: tuple[np.ndarray, ...]) -> SessionRecord:
        """A record whose states are uploaded into two fresh pool rows, as a step leaves it."""
        current, previous = self.pool.upload([state[: self.kinds], state[self.kinds :]])
        return SessionRecord(session_id, "lstm", (), 1, 1.0, 1.0, resident=(current, previous))

    @rule(ids=st.lists(st.sampled_from(IDS), min_size=1, max_size=4, unique=True))
    def step(self, ids: list[str]) -> None:
        """A batch of steps: each session's new states resident, written with the version read."""
        records, expected, states = [], [], []
        for session_id in ids:
            state = self.states()
            states.append(state)
            records.append(self.resident_record(session_id, state))
            entry = self.ref.get(session_id)
            expected.append(None if entry is None else entry.version)
        assert self.run(self.store.put_many(records, expected)) == [True] * len(ids)
        for session_id, state, version in zip(ids, states, expected):
            self.ref.pop(session_id, None)
            self.ref[session_id] = Entry(
                tuple(a.tobytes() for a in state), (version or 0) + 1, True
            )

    @rule(rows=st.integers(1, 2 * len(IDS)), keep=st.sets(st.sampled_from(IDS), max_size=3))
    def spill(self, rows: int, keep: set[str]) -> None:
        """Free about `rows` rows: the least recently written resident sessions not kept,
        whole sessions (two rows each), oldest first."""
        victims, freeing = [], 0
        for session_id, entry in self.ref.items():
            if freeing >= rows:
                break
            if entry.resident and session_id not in keep:
                victims.append(session_id)
                freeing += 2
        free = self.pool.free
        got = self.run(self.store.spill(self.pool, rows, keep))
        assert got == freeing == self.pool.free - free
        for session_id in victims:
            self.ref[session_id].resident = False  # version and place in the order unchanged

    @precondition(lambda self: any(not e.resident for e in self.ref.values()))
    @rule(data=st.data())
    def bring_back(self, data: st.DataObject) -> None:
        """A spilled session's next step: its host states uploaded into fresh rows, written
        on the version read (a step of no new words: the same states)."""
        session_id = data.draw(st.sampled_from([s for s, e in self.ref.items() if not e.resident]))
        (record,) = self.run(self.store.get_many([session_id]))
        assert record is not None and record.resident is None
        state = tuple(np.asarray(a) for a in record.state)
        back = self.resident_record(session_id, state)
        assert self.run(self.store.put_many([back], [record.version])) == [True]
        entry = self.ref.pop(session_id)
        self.ref[session_id] = Entry(entry.state, entry.version + 1, True)

    @rule(session_id=st.sampled_from(IDS))
    def delete(self, session_id: str) -> None:
        if session_id not in self.ref:
            with pytest.raises(UnknownSession):
                self.run(self.store.delete(session_id))
            return
        self.run(self.store.delete(session_id))
        del self.ref[session_id]

    @invariant()
    def agree(self) -> None:
        got = self.run(self.store.get_many(IDS))
        for session_id, record in zip(IDS, got):
            entry = self.ref.get(session_id)
            if entry is None:
                assert record is None, session_id
                continue
            assert record is not None, session_id
            assert record.version == entry.version
            assert (record.resident is not None) == entry.resident, session_id
            if record.resident is not None:
                current, previous = self.pool.download(list(record.resident))
                state = (*current, *previous)
            else:
                state = record.state
            assert tuple(np.asarray(a, dtype=np.float32).tobytes() for a in state) == entry.state
        del got, record  # a row goes back as soon as its last Slot is dropped
        resident = sum(e.resident for e in self.ref.values())
        assert self.store.resident_sessions() == resident
        assert self.pool.used == 2 * resident  # no row leaked, none freed while held


@pytest.fixture(scope="module")
def lstm(tiny_artifacts: Path) -> OrtModel:
    return OrtModel(ModelArtifact.load(tiny_artifacts / "lstm"), ["CPUExecutionProvider"])


def test_spilling_and_bringing_back_keep_every_session_as_the_reference_has_it(
    lstm: OrtModel,
) -> None:
    ResidencyMachine.model = lstm
    run = ResidencyMachine.TestCase
    run.settings = settings(
        max_examples=40,
        stateful_step_count=20,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    run().runTest()
