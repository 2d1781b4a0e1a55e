"""Review of the columns path (`SessionColumns`, `SessionRows`): any subset of a batch's
rows taken as columns is the same records as those rows taken one by one, every field
included (the model revision too)."""

from __future__ import annotations

import dataclasses

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from service.store import MemorySessionStore, SessionRecord
from service.store.base import SessionColumns, SessionRows, WordMemory

FIELDS = [f.name for f in dataclasses.fields(SessionRecord) if f.name not in ("state", "memory")]


def fields_of(record: SessionRecord | None) -> object:
    if record is None:
        return None
    memory = record.memory
    kept = None if memory is None else (memory.keys.tolist(), memory.weights.tolist(), memory.words)
    return [getattr(record, name) for name in FIELDS], [a.tolist() for a in record.state], kept


def batch(n: int, revision: str, memory: bool) -> SessionColumns:
    memories = None
    if memory:
        keys = np.arange(n * 3, dtype=np.int32).reshape(n, 3)
        weights = np.linspace(0, 1, n * 3, dtype=np.float32).reshape(n, 3)
        memories = list(WordMemory.rows(keys, weights, [("w",) if i % 2 else () for i in range(n)]))
    return SessionColumns(
        [f"s{i}" for i in range(n)],
        "gru",
        np.arange(n, dtype=np.int64) + 1,
        np.arange(n, dtype=np.float64) + 10.0,
        20.0,
        np.arange(n, dtype=np.int64) * 2,
        np.arange(n, dtype=np.int64) % 7,
        ["alice" if i % 3 == 0 else "" for i in range(n)],
        memories,  # type: ignore[arg-type]
        np.arange(n) % 2 == 0,
        [f"step-{i}" for i in range(n)],
        True,
        revision,
    )


@given(
    st.integers(1, 6).flatmap(
        lambda n: st.tuples(st.just(n), st.lists(st.integers(0, n - 1), max_size=8), st.booleans())
    ),
    st.sampled_from(["", "rev-a"]),
)
def test_taken_columns_are_the_rows_taken(case: tuple[int, list[int], bool], revision: str) -> None:
    n, at, memory = case
    columns = batch(n, revision, memory)
    taken = columns.take(at)
    assert [fields_of(r) for r in taken] == [fields_of(columns[i]) for i in at]
    assert [fields_of(r) for r in taken.records()] == [fields_of(columns[i]) for i in at]


@given(
    st.integers(1, 6).flatmap(
        lambda n: st.tuples(
            st.just(n),
            st.lists(st.booleans(), min_size=n, max_size=n),
            st.lists(st.integers(-1, n - 1), max_size=8),
        )
    ),
    st.booleans(),
)
def test_taken_rows_are_the_rows_taken(
    case: tuple[int, list[bool], list[int]], early: bool
) -> None:
    """`SessionRows.take` (-1: a row not found), whether or not records were made first."""
    n, found, at = case
    columns = batch(n, "rev-a", True)
    records: list[SessionRecord | None] = [
        dataclasses.replace(r, revision=f"r{i}") if f else None
        for i, (r, f) in enumerate(zip(columns.records(), found))
    ]
    rows = SessionRows.of(records, [f"s{i}" for i in range(n)])
    if not early:
        rows._made = None  # records made again from the columns when read
    taken = rows.take(at)
    want = [None if i < 0 else records[i] for i in at]
    assert [fields_of(r) for r in taken] == [fields_of(r) for r in want]
    assert taken.found.tolist() == [r is not None for r in want]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# One batch: (session index, expected version or None, owner index, a memory of which
# capacity (0: none)) per record, and the seconds that pass before it.
WRITE = st.tuples(st.integers(0, 5), st.one_of(st.none(), st.integers(0, 3)), st.integers(0, 2))
BATCH = st.tuples(
    st.lists(WRITE, min_size=1, max_size=6), st.sampled_from([0, 3]), st.integers(0, 40)
)


def written(rows: list[tuple[int, int | None, int]], capacity: int, at: float) -> SessionColumns:
    n = len(rows)
    memories = None
    if capacity:
        keys = np.arange(n * capacity, dtype=np.int32).reshape(n, capacity) + int(at)
        weights = np.full((n, capacity), at / 1000, dtype=np.float32)
        words = [("w",) if s % 2 else () for s, _, _ in rows]
        memories = list(WordMemory.rows(keys, weights, words))
    return SessionColumns(
        [f"s{s}" for s, _, _ in rows],
        "gru",
        [s + int(at) for s, _, _ in rows],
        [at - s for s, _, _ in rows],
        at,
        [v or 0 for _, v, _ in rows],
        [s % 4 for s, _, _ in rows],
        [["", "alice", "bob"][o] for _, _, o in rows],
        memories,  # type: ignore[arg-type]
        [bool(s % 2) for s, _, _ in rows],
        [f"step-{int(at)}-{s}" if s % 3 else "" for s, _, _ in rows],
        True,
        "rev-a",
    )


@given(st.lists(BATCH, min_size=1, max_size=6), st.sampled_from([(3, 0), (10, 2), (4, 1)]))
async def test_columns_write_as_their_records_write(
    batches: list[tuple[list[tuple[int, int | None, int]], int, int]], caps: tuple[int, int]
) -> None:
    """Any sequence of batches (a session twice in one, stale versions, new sessions past
    the cap or an owner's cap, memories of two capacities, expiry between batches):
    written as columns and written as records, the two stores answer the same
    compare-and-sets, evict the same sessions and hold the same records."""
    cap, owner_cap = caps
    clocks = Clock(), Clock()
    by_records, by_columns = (
        MemorySessionStore(60.0, cap=cap, clock=clock, first_rows=2, owner_cap=owner_cap)
        for clock in clocks
    )
    ids = [f"s{i}" for i in range(6)]
    for rows, capacity, wait in batches:
        for clock in clocks:
            clock.now += wait
        batch = written(rows, capacity, clocks[0].now)
        expected = [v for _, v, _ in rows]
        want = await by_records.put_many(batch.records(), list(expected))
        got = await by_columns.put_many(batch, list(expected))
        assert got == want
        assert by_columns.evictions == by_records.evictions
        a, b = await by_columns.get_many(ids), await by_records.get_many(ids)
        assert [fields_of(r) for r in a] == [fields_of(r) for r in b]
