"""The memory session store against a plain-dict reference, in random orders (hypothesis).

The store packs sessions into arrays (a row arena per state shape, packed metadata, an
ordered index, owners' ordered sets, a typed-words table); the reference below keeps each
session as a plain dict entry in write order and applies the rules the store documents:

- a write is a compare-and-set on the session's version (None: a new session), made in the
  batch's order, so one batch may write a session twice;
- sessions idle `ttl_s` or longer are gone (expiry);
- past `cap`, the least recently written sessions go, those the batch does not write first;
- past `owner_cap`, a new session of an owner evicts that owner's least recently written
  session, never another owner's;
- a delete forgets a live session; an unknown or expired one raises `UnknownSession`.

After every operation both must agree on every session's presence and on its record, state
bytes included. Spilling and bringing back device rows needs a model's pool: its machine
is tests/engine/test_residency_model.py; this one covers the host side the engine reads and
writes every batch.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from service.errors import UnknownSession
from service.store import MemorySessionStore, SessionRecord
from service.store.base import WordMemory

TTL_S = 10.0
CAP = 6
OWNER_CAP = 3
IDS = [f"s{i}" for i in range(10)]
OWNERS = ["", "alice", "bob"]
# Two models of different state shapes (an LSTM's four arrays, a GRU's two); the GRU's
# sessions remember their writer's words (a memory of 4 slots).
SHAPES = {"lstm": (4, 2, 3), "gru": (2, 1, 5)}
MEMORY_SLOTS = {"lstm": 0, "gru": 4}


@dataclass
class Entry:
    """A session as the reference keeps it."""

    record: SessionRecord
    version: int
    touched: float
    owner: str


class Reference:
    """The store's documented rules over an ordered dict (write order = LRU = TTL order)."""

    def __init__(self) -> None:
        self.sessions: OrderedDict[str, Entry] = OrderedDict()

    def expire(self, now: float) -> None:
        for session_id in [s for s, e in self.sessions.items() if e.touched <= now - TTL_S]:
            del self.sessions[session_id]

    def live(self, session_id: str, now: float) -> Entry | None:
        entry = self.sessions.get(session_id)
        if entry is not None and entry.touched <= now - TTL_S:
            self.expire(now)
            return None
        return entry

    def evict(self, n: int, keep: set[str]) -> None:
        victims = [s for s in self.sessions if s not in keep][: max(0, n)]
        for session_id in victims:
            del self.sessions[session_id]

    def evict_owned(self, new: dict[str, int], keep: set[str]) -> None:
        for owner, count in new.items():
            owned = [s for s, e in self.sessions.items() if e.owner == owner]
            excess = len(owned) + count - OWNER_CAP
            for session_id in owned:
                if excess <= 0:
                    break
                if session_id not in keep:
                    del self.sessions[session_id]
                    excess -= 1

    def put_many(
        self, records: list[SessionRecord], expected: list[int | None], now: float
    ) -> list[bool]:
        self.expire(now)
        versions: dict[str, int] = {}
        written = []
        for record, version in zip(records, expected):
            stored = self.sessions.get(record.session_id)
            have = versions.get(record.session_id, None if stored is None else stored.version)
            fits = have == version
            if fits:
                versions[record.session_id] = (version or 0) + 1
            written.append(fits)
        new = sum(s not in self.sessions for s in versions)
        owned: dict[str, int] = {}
        for record, ok in zip(records, written):
            if ok and record.owner and record.session_id not in self.sessions:
                owned[record.owner] = owned.get(record.owner, 0) + 1
        self.evict_owned(owned, keep=set(versions))
        self.evict(len(self.sessions) + new - CAP, keep=set(versions))
        for record, version, ok in zip(records, expected, written):
            if not ok:
                continue
            old = self.sessions.pop(record.session_id, None)
            owner = old.owner if old is not None and old.owner else record.owner
            self.sessions[record.session_id] = Entry(record, (version or 0) + 1, now, owner)
        self.evict(len(self.sessions) - CAP, keep=set())
        self.evict_owned(dict.fromkeys(owned, 0), keep=set())
        return written


def make_record(
    session_id: str,
    model: str,
    owner: str,
    fill: int,
    with_words: bool,
    last_step: str,
    on_device: bool = False,
) -> SessionRecord:
    arrays, layers, hidden = SHAPES[model]
    rng = np.random.default_rng(fill)
    state = tuple(rng.standard_normal((layers, hidden)).astype(np.float32) for _ in range(arrays))
    if on_device:  # the engine keeps this version's state: the store gets none
        state = ()
    memory = None
    if MEMORY_SLOTS[model]:
        slots = MEMORY_SLOTS[model]
        words = ("Zyx", "qwerty") if with_words else ()
        memory = WordMemory(
            rng.integers(0, 100, slots).astype(np.int32),
            rng.random(slots).astype(np.float32),
            words,
        )
    return SessionRecord(
        session_id,
        model,
        state,
        tokens=fill % 1000,
        created_at=1.5 * fill,
        last_used_at=2.5 * fill,
        last_token=fill % 50,
        owner=owner,
        memory=memory,
        adapt=bool(fill % 2),
        last_step=last_step,
        state_on_device=on_device,
    )


def same(got: SessionRecord, want: SessionRecord, version: int, owner: str) -> None:
    """Every field the engine reads back, state and memory bytes included."""
    assert (got.model, got.tokens, got.last_token, got.adapt, got.last_step) == (
        want.model,
        want.tokens,
        want.last_token,
        want.adapt,
        want.last_step,
    )
    assert (got.created_at, got.last_used_at) == (want.created_at, want.last_used_at)
    assert got.version == version and got.owner == owner
    assert got.state_on_device == want.state_on_device
    assert len(got.state) == len(want.state)
    for a, b in zip(got.state, want.state):
        assert a.dtype == np.float32 and a.tobytes() == b.tobytes()
    if want.memory is None:
        assert got.memory is None
    else:
        assert got.memory is not None
        assert got.memory.keys.tobytes() == want.memory.keys.tobytes()
        assert got.memory.weights.tobytes() == want.memory.weights.tobytes()
        assert got.memory.words == want.memory.words


writes = st.lists(
    st.tuples(
        st.sampled_from(IDS),
        st.sampled_from(sorted(SHAPES)),
        st.sampled_from(OWNERS),
        st.integers(0, 10_000),
        st.booleans(),  # typed words in the memory (the GRU's)
        st.sampled_from(["", "step-a", "step-b"]),
        st.sampled_from(["right", "right", "right", "new", "stale"]),  # the expected version
        st.sampled_from([False, False, True]),  # the state kept on an engine's device
    ),
    min_size=1,
    max_size=8,
)


class StoreMachine(RuleBasedStateMachine):
    """Random batches of writes, reads, deletes and clock moves on both."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0
        self.store = MemorySessionStore(
            ttl_s=TTL_S, cap=CAP, clock=lambda: self.now, first_rows=2, owner_cap=OWNER_CAP
        )
        self.ref = Reference()
        self.loop = asyncio.new_event_loop()

    def run(self, coroutine: Any) -> Any:
        return self.loop.run_until_complete(coroutine)

    def teardown(self) -> None:
        self.loop.close()

    @rule(batch=writes)
    def write(self, batch: list[tuple[Any, ...]]) -> None:
        records, expected = [], []
        planned: dict[str, int | None] = {}  # versions as this batch's earlier writes leave them
        for session_id, model, owner, fill, words, last_step, which, on_device in batch:
            stored = self.ref.live(session_id, self.now)
            current = planned.get(session_id, None if stored is None else stored.version)
            version = {
                "right": current,
                "new": None,
                "stale": (current or 0) + 7,
            }[which]
            if which == "right" and current is not None:
                planned[session_id] = current + 1
            elif which == "new" and current is None:
                planned[session_id] = 1
            # A session keeps its model and owner, as the engine writes it (only a new
            # session takes the request's owner).
            if stored is not None:
                model, owner = stored.record.model, stored.owner
            records.append(make_record(session_id, model, owner, fill, words, last_step, on_device))
            expected.append(version)
        want = self.ref.put_many(records, expected, self.now)
        got = self.run(self.store.put_many(records, expected))
        assert got == want

    @rule(seconds=st.sampled_from([0.0, 0.5, 3.0, 6.0, TTL_S]))
    def tick(self, seconds: float) -> None:
        self.now += seconds

    @rule(ids=st.lists(st.sampled_from(IDS), min_size=1, max_size=6))
    def read(self, ids: list[str]) -> None:
        got = self.run(self.store.get_many(ids))
        for session_id, record in zip(ids, got):
            entry = self.ref.live(session_id, self.now)
            if entry is None:
                assert record is None, session_id
            else:
                assert record is not None, session_id
                same(record, entry.record, entry.version, entry.owner)

    @rule(session_id=st.sampled_from(IDS))
    def delete(self, session_id: str) -> None:
        entry = self.ref.live(session_id, self.now)
        if entry is None:
            with pytest.raises(UnknownSession):
                self.run(self.store.delete(session_id))
        else:
            self.run(self.store.delete(session_id))
            del self.ref.sessions[session_id]

    @precondition(lambda self: bool(self.ref.sessions))
    @rule()
    def step_everyone(self) -> None:
        """One batch stepping every live session once, as the engine writes a full batch."""
        live = [s for s in list(self.ref.sessions) if self.ref.live(s, self.now)]
        records, expected = [], []
        for n, session_id in enumerate(live):
            entry = self.ref.sessions[session_id]
            fill = entry.record.tokens + 1 + n
            records.append(replace(entry.record, tokens=fill, last_token=fill % 50))
            expected.append(entry.version)
        want = self.ref.put_many(records, expected, self.now)
        assert self.run(self.store.put_many(records, expected)) == want == [True] * len(live)

    @invariant()
    def agree(self) -> None:
        live = [s for s in IDS if self.ref.live(s, self.now) is not None]
        got = self.run(self.store.get_many(IDS))
        assert [s for s, r in zip(IDS, got) if r is not None] == live
        assert len(live) <= CAP
        for owner in OWNERS[1:]:
            assert sum(self.ref.sessions[s].owner == owner for s in live) <= OWNER_CAP
        assert self.run(self.store.count()) == len(self.ref.sessions)


StoreMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_the_memory_store_follows_its_rules = StoreMachine.TestCase
