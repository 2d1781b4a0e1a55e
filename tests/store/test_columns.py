"""The memory store's write of a batch as columns (`SessionColumns`): the same sessions,
versions, eviction and refusals as the same records written one by one."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from service.store import MemorySessionStore, SessionRecord
from service.store.base import SessionColumns, SessionRows, WordMemory

CAPACITY = 6


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def columns(ids: list[str], version: list[int], memory: bool, tokens: int = 3) -> SessionColumns:
    """A batch's records of `ids`, as an engine writes them (states on its device)."""
    n = len(ids)
    memories = None
    if memory:
        keys = np.arange(n * CAPACITY, dtype=np.int32).reshape(n, CAPACITY)
        weights = np.linspace(0, 1, n * CAPACITY, dtype=np.float32).reshape(n, CAPACITY)
        typed = [("Quokka",) if i % 2 else () for i in range(n)]
        memories = list(WordMemory.rows(keys, weights, typed))
    return SessionColumns(
        ids,
        "gru",
        [tokens + i for i in range(n)],
        [10.0 + i for i in range(n)],
        20.0,
        version,
        [i % 5 for i in range(n)],
        ["alice" if i % 3 == 0 else "" for i in range(n)],
        memories,  # type: ignore[arg-type]
        [i % 2 == 0 for i in range(n)],
        [f"step-{i}" if i % 2 else "" for i in range(n)],
    )


def same(a: SessionRecord | None, b: SessionRecord | None) -> None:
    assert (a is None) == (b is None)
    if a is None or b is None:
        return
    fields = ("session_id", "model", "tokens", "created_at", "last_used_at", "version")
    fields += ("last_token", "owner", "adapt", "last_step", "state_on_device")
    assert [getattr(a, f) for f in fields] == [getattr(b, f) for f in fields]
    assert a.state == b.state == ()
    assert (a.memory is None) == (b.memory is None)
    if a.memory is not None and b.memory is not None:
        np.testing.assert_array_equal(a.memory.keys, b.memory.keys)
        np.testing.assert_array_equal(a.memory.weights, b.memory.weights)
        assert a.memory.words == b.memory.words


def test_columns_are_a_sequence_of_their_records() -> None:
    batch = columns(["a", "b", "c"], [0, 0, 0], memory=True)
    assert len(batch) == 3 and [r.session_id for r in batch] == ["a", "b", "c"]
    assert batch[-1].session_id == "c" and [r.tokens for r in batch[1:]] == [4, 5]
    with pytest.raises(IndexError):
        batch[3]
    taken = batch.take([2, 0])
    same(taken[0], batch[2])
    same(taken[1], batch[0])


@pytest.mark.parametrize("memory", [False, True], ids=["no memory", "a memory"])
async def test_columns_write_what_their_records_write(memory: bool) -> None:
    """New sessions, then a step of each with one conflict, then past the cap and an
    owner's cap: both stores hold the same records, evict the same sessions and answer
    the same compare-and-sets."""
    clocks = Clock(), Clock()
    by_records, by_columns = (
        MemorySessionStore(3600.0, cap=7, clock=clock, first_rows=2, owner_cap=3)
        for clock in clocks
    )
    ids = [f"s{i}" for i in range(6)]
    rounds = [
        (ids, [0] * 6, [None] * 6),
        (ids, [1] * 6, [1, 1, 7, 1, 1, 1]),  # s2's write loses: it is at version 1
        ([*ids[:3], "t0", "t1", "t2"], [2, 2, 1, 0, 0, 0], [2, 2, 1, None, None, None]),
    ]
    for names, version, expected in rounds:
        for clock in clocks:
            clock.now += 1.0
        batch = columns(names, version, memory)
        want = await by_records.put_many(batch.records(), list(expected))
        got = await by_columns.put_many(batch, list(expected))
        assert got == want
        every = sorted({*ids, "t0", "t1", "t2"})
        for a, b in zip(await by_columns.get_many(every), await by_records.get_many(every)):
            same(a, b)
        assert by_columns.evictions == by_records.evictions
    assert by_columns.evictions > 0  # the cap and the owner's cap took sessions


async def test_columns_of_no_one_batch_take_the_records_path() -> None:
    """Memories that are not one batch's rows in order (a subset) are still written."""
    store = MemorySessionStore(3600.0, cap=10, owner_cap=5)  # owners kept
    batch = columns(["a", "b", "c"], [0, 0, 0], memory=True).take([2, 0])
    assert await store.put_many(batch, [None, None]) == [True, True]
    same(await store.get("c"), replace(batch[0], version=1))
    same(await store.get("a"), replace(batch[1], version=1))


async def test_columns_with_host_states_are_refused() -> None:
    store = MemorySessionStore(3600.0, cap=10)
    batch = columns(["a"], [0], memory=False)
    batch.state_on_device = False
    with pytest.raises(ValueError):
        await store.put_many(batch, [None])


async def test_a_read_is_columns_whose_items_are_the_records() -> None:
    """`get_many` answers columns (`SessionRows`): as a sequence, the records (None where
    not found), each made once; `take` picks rows (-1: one not read); records read one by
    one give the same columns (`SessionRows.of`)."""
    store = MemorySessionStore(3600.0, cap=10, owner_cap=5)
    batch = columns(["a", "b", "c"], [0, 0, 0], memory=True)
    assert await store.put_many(batch, [None] * 3) == [True] * 3
    read = await store.get_many(["b", "nobody", "a"])
    assert isinstance(read, SessionRows)
    assert read.found.tolist() == [True, False, True] and read[1] is None
    assert read == [read[0], None, read[2]] and read[0] is read[0]
    same(read[0], replace(batch[1], version=1))
    same(read[2], replace(batch[0], version=1))
    assert read.tokens[[0, 2]].tolist() == [4, 3] and read.version[[0, 2]].tolist() == [1, 1]
    assert read.on_device[[0, 2]].all() and read.last_step == ["step-1", "", ""]
    picked = read.take([2, -1, 0])
    assert picked.found.tolist() == [True, False, True] and picked[1] is None
    assert picked[0] is read[2] and picked.ids[0] == "a"
    again = SessionRows.of(list(read), ["b", "nobody", "a"])
    assert again.found.tolist() == read.found.tolist()
    for name in ("tokens", "version", "last_token", "created_at", "adapt", "on_device"):
        got, want = getattr(again, name), getattr(read, name)
        assert got[read.found].tolist() == want[read.found].tolist(), name
    assert again.owner == read.owner and again.last_step == read.last_step
    assert SessionRows.of([], []).take([-1, -1]).found.tolist() == [False, False]
