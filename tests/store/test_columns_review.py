"""Review of the columns path (`SessionColumns`, `SessionRows`): any subset of a batch's
rows taken as columns is the same records as those rows taken one by one, every field
included (the model revision too)."""

from __future__ import annotations

import dataclasses

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from service.store import SessionRecord
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
