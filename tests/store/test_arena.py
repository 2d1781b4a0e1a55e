"""A row arena alone: rows that never move, the free list, gathers and scatters across
chunks, and packing records into rows."""

from __future__ import annotations

import numpy as np
import pytest

from service.store.arena import META, RowArena, Rows, pack, shape_of
from service.store.base import SessionRecord, WordMemory, columns_of

SHAPE = (2, 1, 3, 4)  # (S, L, H, C)


def rows_for(values: list[float], shape: tuple[int, int, int, int] = SHAPE) -> Rows:
    """Rows whose state, keys, weights and version all say `values[i]`."""
    n = len(values)
    column = np.array(values, dtype=np.float32)
    states = np.broadcast_to(column[:, None, None, None], (n, *shape[:3])).copy()
    metas = np.zeros(n, dtype=META)
    metas["version"] = values
    keys = np.broadcast_to(column.astype(np.int32)[:, None], (n, shape[3])).copy()
    weights = np.broadcast_to(column[:, None], (n, shape[3])).copy()
    return Rows(states, metas, keys, weights)


def test_an_arena_grows_by_doubling_and_never_moves_a_row() -> None:
    arena = RowArena(SHAPE, first=2)
    rows = [arena.alloc() for _ in range(2)]
    view = arena.row(rows[0])
    view[...] = 7.0
    rows += [arena.alloc() for _ in range(5)]  # chunks of 2, 2, 4: capacity 8
    assert rows == list(range(7))
    assert arena.capacity == 8 and arena.used == 7 and len(arena.states) == 3
    assert [arena.locate(r) for r in (0, 1, 2, 3, 4, 7)] == [
        (0, 0),
        (0, 1),
        (1, 0),
        (1, 1),
        (2, 0),
        (2, 3),
    ]
    assert np.shares_memory(arena.row(rows[0]), view) and (arena.row(0) == 7.0).all()


def test_freed_rows_are_reused_most_recent_first() -> None:
    arena = RowArena(SHAPE, first=4)
    for _ in range(4):
        arena.alloc()
    arena.release(1)
    arena.release(3)
    assert arena.used == 2
    assert [arena.alloc(), arena.alloc()] == [3, 1]
    assert arena.capacity == 4  # no growth while rows were free


def test_write_many_and_read_many_round_trip_across_chunks() -> None:
    arena = RowArena(SHAPE, first=2)
    for _ in range(8):
        arena.alloc()
    rows = np.array([6, 0, 3, 5, 1], dtype=np.int64)  # chunks 2, 0, 1, 2, 0
    arena.write_many(rows, rows_for([1.0, 2.0, 3.0, 4.0, 5.0]))
    back = arena.read_many(rows[::-1].copy())
    assert back.metas["version"].tolist() == [5, 4, 3, 2, 1]
    assert back.states[:, 0, 0, 0].tolist() == [5.0, 4.0, 3.0, 2.0, 1.0]
    assert back.keys[:, 0].tolist() == [5, 4, 3, 2, 1]
    assert back.weights[:, -1].tolist() == [5.0, 4.0, 3.0, 2.0, 1.0]
    assert arena.column(np.array([3, 6]), "version").tolist() == [3, 1]
    assert arena.version(5) == 4
    for array in back:
        assert not array.flags.writeable
    # a copy: writing the row afterwards leaves the read alone
    arena.write_many(np.array([6]), rows_for([9.0]))
    assert (
        back.states[-1, 0, 0, 0] == 1.0 and arena.read_many(np.array([6])).states[0, 0, 0, 0] == 9
    )


def test_a_state_less_arena_keeps_metadata_and_memory_only() -> None:
    arena = RowArena((0, 0, 0, 4), first=2)
    row = arena.alloc()
    arena.write_many(np.array([row]), rows_for([3.0], (0, 0, 0, 4)))
    back = arena.read_many(np.array([row]))
    assert back.states.shape == (1, 0, 0, 0) and back.keys[0].tolist() == [3, 3, 3, 3]
    assert arena.nbytes == 2 * (META.itemsize + 4 * 4 + 4 * 4)


def test_shape_of_names_the_arena_and_refuses_ragged_records() -> None:
    state = tuple(np.zeros((1, 3), np.float32) for _ in range(2))
    memory = WordMemory.empty(4)
    assert shape_of(SessionRecord("a", "m", state, 0, 0.0, 0.0, memory=memory)) == SHAPE
    device = SessionRecord("a", "m", (), 0, 0.0, 0.0, memory=memory, state_on_device=True)
    assert shape_of(device) == (0, 0, 0, 4)
    with pytest.raises(ValueError):
        shape_of(SessionRecord("a", "m", (np.zeros((1, 3)), np.zeros((1, 2))), 0, 0.0, 0.0))
    with pytest.raises(ValueError):
        shape_of(SessionRecord("a", "m", (), 0, 0.0, 0.0))
    with pytest.raises(ValueError):
        shape_of(SessionRecord("a", "m", state, 0, 0.0, 0.0, state_on_device=True))


def test_pack_lays_records_out_column_by_column() -> None:
    state = (np.full((1, 3), 1.5), np.full((1, 3), 2.5))  # float64: cast on the copy
    memory = WordMemory(np.arange(4, dtype=np.int32), np.ones(4, np.float32))
    records = [
        SessionRecord("a", "m", state, 3, 1.0, 2.0, 7, last_token=4, memory=memory),
        SessionRecord("b", "m", state, 5, 1.0, 2.0, 8, memory=memory, adapt=False),
    ]
    rows = pack(records, [1, 0], SHAPE)
    assert rows.metas["model"].tolist() == [1, 0]
    assert rows.metas["tokens"].tolist() == [3, 5]
    assert rows.metas["last_token"].tolist() == [4, -1]
    assert rows.metas["adapt"].tolist() == [1, 0]
    assert rows.metas["version"].tolist() == [0, 0]  # the caller's to set
    assert rows.states.dtype == np.float32 and rows.states[1, 1, 0, 2] == 2.5
    assert rows.keys[0].tolist() == [0, 1, 2, 3]
    with pytest.raises((ValueError, OverflowError)):
        pack([SessionRecord("c", "m", state, -1, 0.0, 0.0, memory=memory)], [70_000], SHAPE)


def test_a_batchs_memories_as_columns_are_taken_back_without_a_copy() -> None:
    keys = np.arange(12, dtype=np.int32).reshape(3, 4)
    weights = np.arange(12, dtype=np.float32).reshape(3, 4)
    memories = WordMemory.rows(keys, weights, [(), ("Okonkwo",), ()])
    assert [m.words for m in memories] == [(), ("Okonkwo",), ()]
    assert memories[2].keys.tolist() == [8, 9, 10, 11]
    assert np.shares_memory(memories[1].keys, keys)  # views, not copies
    columns = columns_of(memories)
    assert columns is not None and columns.keys is keys and columns.weights is weights
    # Anything but those rows, all of them, in order, is not the columns.
    assert columns_of(memories[::-1]) is None
    assert columns_of(memories[:2]) is None
    assert columns_of([*memories[:2], None]) is None
    assert columns_of([*memories[:2], WordMemory(keys[2].copy(), weights[2].copy())]) is None
    assert columns_of([]) is None


def test_pack_writes_a_batchs_memory_columns_as_they_are() -> None:
    state = (np.full((1, 3), 1.5), np.full((1, 3), 2.5))
    keys = np.arange(8, dtype=np.int32).reshape(2, 4)
    weights = np.ones((2, 4), np.float32)
    memories = WordMemory.rows(keys, weights, [(), ()])
    records = [SessionRecord(s, "m", state, 1, 0.0, 0.0, memory=m) for s, m in zip("ab", memories)]
    rows = pack(records, [0, 0], SHAPE)
    assert rows.keys is keys and rows.weights is weights
    # The same values as memories made one by one (stacked).
    alone = [WordMemory(m.keys.copy(), m.weights.copy()) for m in memories]
    stacked = pack(
        [SessionRecord(s, "m", state, 1, 0.0, 0.0, memory=m) for s, m in zip("ab", alone)],
        [0, 0],
        SHAPE,
    )
    assert stacked.keys is not keys
    assert np.array_equal(stacked.keys, rows.keys) and np.array_equal(stacked.weights, rows.weights)
    # Written and read back: the arena's own copy, read as columns again.
    arena = RowArena(SHAPE, first=2)
    at = np.array([arena.alloc(), arena.alloc()])
    arena.write_many(at, rows)
    keys[...] = -1  # the arena kept a copy
    back = arena.read_many(at)
    assert back.keys.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_a_memory_row_shows_only_its_own_memory() -> None:
    keys = np.array([[1, 2], [70001, 70002]], dtype=np.int32)
    weights = np.array([[0.5, 0.25], [0.75, 0.125]], dtype=np.float32)
    first, _ = WordMemory.rows(keys, weights, [(), ("Okonkwo",)])
    # Its batch's columns are how it is written back, not part of it: another session's
    # memory never shows in this one's repr (a record in a traceback or a test's output).
    assert "70001" not in repr(first) and "0.125" not in repr(first)
    assert columns_of([first]) is None  # a row alone is not its batch
