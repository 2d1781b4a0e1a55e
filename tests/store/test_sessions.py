"""The in-process session store: CAS writes, TTL, LRU cap, compact state, counters."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import REGISTRY

from service.errors import UnknownSession
from service.store import MemorySessionStore, SessionRecord, SessionStore, open_store

LAYERS, HIDDEN = 2, 8


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def record(session_id: str, fill: float = 0.0, tokens: int = 0, version: int = 0) -> SessionRecord:
    state = tuple(np.full((LAYERS, HIDDEN), fill + i, dtype=np.float32) for i in range(4))
    return SessionRecord(session_id, "lstm", state, tokens, 1.0, 2.0, version, last_token=2)


def sample(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(clock: Clock) -> MemorySessionStore:
    return MemorySessionStore(ttl_s=60.0, cap=3, clock=clock)


async def create(store: MemorySessionStore, *ids: str) -> None:
    assert await store.put_many([record(i) for i in ids], [None] * len(ids)) == [True] * len(ids)


def test_ids_are_unguessable_and_url_safe(store: MemorySessionStore) -> None:
    ids = {store.new_id() for _ in range(1000)}
    assert len(ids) == 1000
    for session_id in ids:
        assert len(session_id) >= 22  # 128 bits
        assert set(session_id) <= set(
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        )


def test_memory_store_is_a_session_store(store: MemorySessionStore) -> None:
    assert isinstance(store, SessionStore)
    assert isinstance(open_store("memory", 10.0, 5), MemorySessionStore)


async def test_round_trip(store: MemorySessionStore) -> None:
    await create(store, "a")
    got = await store.get("a")
    want = record("a")
    assert (got.session_id, got.model, got.tokens, got.last_token) == ("a", "lstm", 0, 2)
    assert (got.created_at, got.last_used_at, got.version) == (1.0, 2.0, 1)
    assert len(got.state) == 4
    for have, expected in zip(got.state, want.state):
        np.testing.assert_array_equal(have, expected)
        assert have.dtype == np.float32 and have.shape == (LAYERS, HIDDEN)


async def test_state_is_one_compact_copy(store: MemorySessionStore) -> None:
    batch = np.random.default_rng(0).standard_normal((LAYERS, 64, HIDDEN)).astype(np.float32)
    views = tuple(batch[:, i, :] for i in range(4))  # rows of a batch output
    expected = [v.copy() for v in views]
    rec = SessionRecord("a", "gru", views, 3, 1.0, 1.0)
    assert await store.put_many([rec], [None]) == [True]
    stored = store._stored_state("a")  # the session's row in its pool
    # One contiguous row of exactly the raw state size, not a view of the batch.
    assert not np.shares_memory(stored, batch) and stored.flags.c_contiguous
    assert stored.nbytes == 4 * LAYERS * HIDDEN * 4
    batch[:] = 0  # the batch buffer is reused: the stored state must not change
    got = await store.get("a")
    for have, want in zip(got.state, expected):
        np.testing.assert_array_equal(have, want)
    with pytest.raises(ValueError):
        got.state[0][0, 0] = 1.0  # read-only: callers cannot change a stored state


async def test_compare_and_set(store: MemorySessionStore) -> None:
    await create(store, "a")
    assert await store.put_many([record("a")], [None]) == [False]  # exists already
    assert await store.put_many([record("a", tokens=5)], [7]) == [False]  # stale version
    assert await store.put_many([record("b")], [1]) == [False]  # does not exist
    assert await store.put_many([record("a", tokens=5)], [1]) == [True]
    got = await store.get("a")
    assert (got.tokens, got.version) == (5, 2)
    with pytest.raises(UnknownSession):
        await store.get("b")


async def test_put_many_is_per_record(store: MemorySessionStore) -> None:
    await create(store, "a", "b")
    written = await store.put_many(
        [record("a", tokens=1), record("b", tokens=1), record("c")], [1, 9, None]
    )
    assert written == [True, False, True]
    assert [r.tokens if r else None for r in await store.get_many(["a", "b", "c", "x"])] == [
        1,
        0,
        0,
        None,
    ]


async def test_idle_sessions_expire(store: MemorySessionStore, clock: Clock) -> None:
    before = sample("nextword_session_expirations_total")
    await create(store, "a")
    clock.now += 30
    await create(store, "b")
    clock.now += 31  # a idle 61 s, b idle 31 s
    a, b = await store.get_many(["a", "b"])
    assert a is None and b is not None and b.session_id == "b"
    with pytest.raises(UnknownSession):
        await store.get("a")
    assert await store.count() == 1
    assert store.expirations == 1
    assert sample("nextword_session_expirations_total") == before + 1
    # A write keeps a session alive: b is written at 61 s and lives on past 91 s.
    assert await store.put_many([record("b", tokens=1)], [1]) == [True]
    clock.now += 59
    assert (await store.get("b")).tokens == 1
    clock.now += 2
    assert await store.count() == 0
    assert store.expirations == 2


async def test_expired_session_cannot_be_written_or_deleted(
    store: MemorySessionStore, clock: Clock
) -> None:
    await create(store, "a")
    clock.now += 61
    assert await store.put_many([record("a", tokens=1)], [1]) == [False]
    with pytest.raises(UnknownSession):
        await store.delete("a")


async def test_least_recently_written_is_evicted_past_the_cap(
    store: MemorySessionStore, clock: Clock
) -> None:
    before = sample("nextword_session_evictions_total")
    await create(store, "a", "b", "c")
    clock.now += 1
    assert await store.put_many([record("a", tokens=1)], [1]) == [True]  # a used again
    await store.get("b")  # reading is not using: b stays the least recently used
    await create(store, "d")
    assert [r is not None for r in await store.get_many(["a", "b", "c", "d"])] == [
        True,
        False,
        True,
        True,
    ]
    assert store.evictions == 1
    assert sample("nextword_session_evictions_total") == before + 1
    assert await store.count() == 3
    assert sample("nextword_active_sessions") == 3


async def test_delete(store: MemorySessionStore) -> None:
    await create(store, "a")
    await store.delete("a")
    with pytest.raises(UnknownSession):
        await store.get("a")
    with pytest.raises(UnknownSession):
        await store.delete("a")
    assert await store.put_many([record("a", tokens=1)], [1]) == [False]  # no resurrection


async def test_ping_count_close(store: MemorySessionStore) -> None:
    await store.ping()
    await create(store, "a", "b")
    assert await store.count() == 2
    await store.close()
    assert await store.count() == 0


async def test_put_many_needs_one_version_per_record(store: MemorySessionStore) -> None:
    with pytest.raises(ValueError):
        await store.put_many([record("a")], [])


# --- the slot pool ----------------------------------------------------------------------

SHAPES = {"lstm": (4, 2, 8, 0), "gru": (2, 1, 8, 0)}  # (S, L, H, memory slots) of two models


def random_record(
    rng: np.random.Generator, session_id: str, model: str, version: int = 0
) -> SessionRecord:
    """A record whose state is random bits (NaNs, infinities, subnormals included)."""
    s, layers, hidden, _ = SHAPES[model]
    bits = rng.integers(0, 2**32, size=(s, layers, hidden), dtype=np.uint32)
    state = tuple(bits.view(np.float32))
    return SessionRecord(
        session_id,
        model,
        state,
        tokens=int(rng.integers(0, 10**6)),
        created_at=float(rng.uniform(0, 2e9)),
        last_used_at=float(rng.uniform(0, 2e9)),
        version=version,
        last_token=int(rng.integers(-1, 50_000)),
    )


def assert_same(got: SessionRecord | None, want: SessionRecord, version: int) -> None:
    assert got is not None
    assert (got.session_id, got.model, got.tokens, got.last_token, got.version) == (
        want.session_id,
        want.model,
        want.tokens,
        want.last_token,
        version,
    )
    assert (got.created_at, got.last_used_at) == (want.created_at, want.last_used_at)
    assert len(got.state) == len(want.state)
    for have, expected in zip(got.state, want.state):
        assert have.dtype == np.float32 and have.shape == expected.shape
        np.testing.assert_array_equal(have.view(np.uint32), expected.view(np.uint32))


async def test_rows_are_reused_after_delete_expiry_and_eviction(clock: Clock) -> None:
    store = MemorySessionStore(ttl_s=60.0, cap=3, clock=clock, first_rows=3)
    await create(store, "a", "b", "c")
    [pool] = store.pool_usage()
    assert (pool.shape, pool.used, pool.capacity) == ((4, LAYERS, HIDDEN, 0), 3, 3)
    row_a = store._stored_state("a")
    await store.delete("a")
    assert store.pool_usage()[0].used == 2
    await create(store, "d")
    assert np.shares_memory(store._stored_state("d"), row_a)  # a's row, freed, reused
    await create(store, "e", "f")  # past the cap: b and c evicted, their rows reused
    assert store.evictions == 2
    clock.now += 61  # d, e, f expire
    await create(store, "g", "h", "i")
    assert store.expirations == 3
    await create(store, "j")  # evicts g
    assert store.evictions == 3
    assert [(p.used, p.capacity) for p in store.pool_usage()] == [(3, 3)]  # never grew
    for session_id in "hij":
        got = await store.get(session_id)
        for have, want in zip(got.state, record(session_id).state):
            np.testing.assert_array_equal(have, want)


async def test_many_sessions_of_two_shapes_round_trip_bit_exactly(clock: Clock) -> None:
    rng = np.random.default_rng(1)
    store = MemorySessionStore(ttl_s=600.0, cap=100_000, clock=clock, first_rows=16)
    models = ["lstm", "gru"] * 1500
    want = {f"s{i}": random_record(rng, f"s{i}", m) for i, m in enumerate(models)}
    ids = list(want)
    for start in range(0, len(ids), 256):  # batches, the two shapes interleaved
        batch = [want[i] for i in ids[start : start + 256]]
        assert await store.put_many(batch, [None] * len(batch)) == [True] * len(batch)
    gone = ids[::7]
    for session_id in gone:
        await store.delete(session_id)
    # Rewrite a third (version 1 -> 2) and create new ones in the freed rows.
    again = {i: random_record(rng, i, want[i].model, version=1) for i in ids[1::3] if i not in gone}
    assert all(await store.put_many(list(again.values()), [1] * len(again)))
    fresh = {f"n{i}": random_record(rng, f"n{i}", models[i]) for i in range(len(gone))}
    assert all(await store.put_many(list(fresh.values()), [None] * len(fresh)))
    want.update(again)
    want.update(fresh)
    for session_id in gone:
        del want[session_id]
    got = await store.get_many(list(want))
    for have, expected in zip(got, want.values()):
        assert_same(have, expected, version=2 if expected.session_id in again else 1)
    assert await store.get_many(gone) == [None] * len(gone)
    usage = {p.shape: p for p in store.pool_usage()}
    assert {shape: usage[shape].used for shape in usage} == {
        SHAPES[m]: sum(r.model == m for r in want.values()) for m in SHAPES
    }
    assert all(p.capacity < 2 * 1500 for p in usage.values())  # the freed rows were reused


async def test_a_state_read_is_not_aliased_to_the_pool(clock: Clock) -> None:
    rng = np.random.default_rng(2)
    store = MemorySessionStore(ttl_s=60.0, cap=1, clock=clock, first_rows=1)
    first = random_record(rng, "a", "lstm")
    assert await store.put_many([first], [None]) == [True]
    read = await store.get("a")
    [batch_read] = await store.get_many(["a"])
    second = random_record(rng, "a", "lstm")
    assert await store.put_many([second], [1]) == [True]  # the same row, written in place
    other = random_record(rng, "b", "lstm")
    assert await store.put_many([other], [None]) == [True]  # a evicted, b in its row
    assert_same(read, first, version=1)
    assert batch_read is not None
    assert_same(batch_read, first, version=1)
    for array in (*read.state, *batch_read.state):
        assert not array.flags.writeable
        assert not np.shares_memory(array, store._stored_state("b"))
    assert_same(await store.get("b"), other, version=1)


async def test_the_pool_grows_past_its_first_chunk(clock: Clock) -> None:
    rng = np.random.default_rng(3)
    store = MemorySessionStore(ttl_s=600.0, cap=1000, clock=clock, first_rows=4)
    empty = store.memory_bytes()
    records = [random_record(rng, f"s{i}", "gru") for i in range(100)]
    for r in records:  # one at a time: the pool grows between writes
        assert await store.put_many([r], [None]) == [True]
    [pool] = store.pool_usage()
    assert (pool.used, pool.capacity) == (100, 128)  # chunks of 4, 4, 8, 16, 32, 64 rows
    row_bytes = 2 * 1 * 8 * 4
    assert pool.nbytes >= 128 * row_bytes
    assert store.memory_bytes() >= empty + pool.nbytes + 100 * len("s00")
    for have, want in zip(await store.get_many([r.session_id for r in records]), records):
        assert_same(have, want, version=1)
    await store.close()
    assert store.pool_usage() == [] and store.memory_bytes() <= empty


async def test_a_session_may_change_shape(store: MemorySessionStore) -> None:
    rng = np.random.default_rng(4)
    await store.put_many([random_record(rng, "a", "lstm")], [None])
    gru = random_record(rng, "a", "gru")
    assert await store.put_many([gru], [1]) == [True]
    assert_same(await store.get("a"), gru, version=2)
    assert {p.shape: p.used for p in store.pool_usage()} == {SHAPES["lstm"]: 0, SHAPES["gru"]: 1}


async def test_a_malformed_state_writes_nothing(store: MemorySessionStore) -> None:
    bad = SessionRecord("b", "lstm", (np.zeros((2, 8)), np.zeros((2, 4))), 0, 1.0, 1.0)
    with pytest.raises(ValueError):
        await store.put_many([record("a"), bad], [None, None])
    with pytest.raises(ValueError):
        await store.put_many([SessionRecord("c", "lstm", (), 0, 1.0, 1.0)], [None])
    assert await store.count() == 0


async def test_eviction_takes_sessions_the_batch_does_not_write(clock: Clock) -> None:
    store = MemorySessionStore(ttl_s=60.0, cap=3, clock=clock, first_rows=3)
    await create(store, "a", "b", "c")
    # a is written in the same batch as the new d: b, not a, is the least recently written.
    assert await store.put_many([record("d"), record("a", tokens=1)], [None, 1]) == [True, True]
    assert [r is not None for r in await store.get_many(["a", "b", "c", "d"])] == [
        True,
        False,
        True,
        True,
    ]
    # A batch of more new sessions than the cap keeps its last ones.
    await create(store, "x", "y", "z", "w")
    assert [r is not None for r in await store.get_many(["a", "c", "d", "x", "y", "z", "w"])] == [
        False,
        False,
        False,
        False,
        True,
        True,
        True,
    ]
    assert store.evictions == 5
    assert (await store.get("w")).version == 1
    assert [(p.used, p.capacity) for p in store.pool_usage()] == [(3, 6)]  # one batch over


def owned(session_id: str, owner: str) -> SessionRecord:
    rec = record(session_id)
    rec.owner = owner
    return rec


async def test_an_owner_past_its_cap_evicts_its_own_oldest_session(clock: Clock) -> None:
    store = MemorySessionStore(ttl_s=60.0, cap=100, clock=clock, owner_cap=2)
    assert await store.put_many([owned("b1", "bob")], [None]) == [True]
    for name in ("a1", "a2"):
        clock.now += 1
        assert await store.put_many([owned(name, "alice")], [None]) == [True]
    clock.now += 1
    assert await store.put_many([owned("a1", "alice")], [1]) == [True]  # a1 used again
    clock.now += 1
    assert await store.put_many([owned("a3", "alice")], [None]) == [True]
    alive = [r is not None for r in await store.get_many(["b1", "a1", "a2", "a3"])]
    assert alive == [True, True, False, True]  # alice's least recently used went, not bob's
    assert store.evictions == 1
    assert (await store.get("a3")).owner == "alice"
    # One batch creating more sessions than the cap keeps the owner's newest two.
    batch = [owned(f"x{i}", "carol") for i in range(4)]
    assert await store.put_many(batch, [None] * 4) == [True] * 4
    alive = [r is not None for r in await store.get_many([f"x{i}" for i in range(4)])]
    assert sum(alive) == 2
    # Deleted and expired sessions leave their owner's count.
    await store.delete("a3")
    clock.now += 1
    assert await store.put_many([owned("a4", "alice")], [None]) == [True]
    assert await store.get("a1") is not None  # room was left by the delete
    clock.now += 61
    assert await store.count() == 0
    assert store._quotas.owned == {} and store._quotas.owner_of == {}


async def test_sessions_without_an_owner_are_not_capped_per_owner(clock: Clock) -> None:
    store = MemorySessionStore(ttl_s=60.0, cap=100, clock=clock, owner_cap=1)
    await create(store, "a", "b", "c")
    assert await store.count() == 3


async def test_the_writers_words_live_beside_the_state(store: MemorySessionStore) -> None:
    from service.store.base import WordMemory

    rec = record("m")
    keys = np.array([3, 9, -1], np.int32)
    rec.memory = WordMemory(keys, np.array([1.0, 0.5, 0.0], np.float32), ("Zorblax",))
    rec.adapt = False
    await store.put_many([rec, record("plain")], [None, None])
    got = await store.get("m")
    assert got.memory is not None and got.memory.words == ("Zorblax",)
    assert np.array_equal(got.memory.keys, keys) and got.adapt is False
    assert (await store.get("plain")).memory is None
    assert {u.shape for u in store.pool_usage()} == {(4, LAYERS, HIDDEN, 3), (4, LAYERS, HIDDEN, 0)}
    got.memory = WordMemory.empty(3)  # forgotten: the typed words go too
    assert await store.put_many([got], [1]) == [True]
    again = await store.get("m")
    assert again.memory is not None and again.memory.words == () and store._words == {}


async def test_one_batch_may_write_a_session_twice(store: MemorySessionStore) -> None:
    rng = np.random.default_rng(5)
    first, second = random_record(rng, "a", "lstm"), random_record(rng, "a", "lstm")
    # The second write expects the version the first one leaves: both apply, in order.
    assert await store.put_many([first, second], [None, 1]) == [True, True]
    assert_same(await store.get("a"), second, version=2)
    assert [p.used for p in store.pool_usage()] == [1]


async def test_a_row_freed_in_a_batch_holds_the_record_written_last(clock: Clock) -> None:
    rng = np.random.default_rng(6)
    store = MemorySessionStore(ttl_s=60.0, cap=10, clock=clock, first_rows=1)
    await store.put_many([random_record(rng, "a", "lstm")], [None])
    # "a" leaves its LSTM row for a GRU one; "b", new, takes that freed row in the same batch.
    a, b = random_record(rng, "a", "gru"), random_record(rng, "b", "lstm")
    assert await store.put_many([a, b], [1, None]) == [True, True]
    assert_same(await store.get("a"), a, version=2)
    assert_same(await store.get("b"), b, version=1)
    assert {p.shape: p.used for p in store.pool_usage()} == {SHAPES["lstm"]: 1, SHAPES["gru"]: 1}


async def test_memories_round_trip_across_chunks(clock: Clock) -> None:
    from service.store.base import WordMemory

    rng = np.random.default_rng(7)
    store = MemorySessionStore(ttl_s=600.0, cap=1000, clock=clock, first_rows=2)
    records = []
    for i in range(40):  # rows in chunks of 2, 2, 4, 8, 16, 32
        r = random_record(rng, f"s{i}", "gru")
        keys = rng.integers(-1, 1000, size=6).astype(np.int32)
        r.memory = WordMemory(keys, rng.random(6).astype(np.float32), (f"w{i}",) * (i % 2))
        records.append(r)
    assert all(await store.put_many(records, [None] * len(records)))
    shuffled = [records[i] for i in rng.permutation(len(records))]
    got = await store.get_many([r.session_id for r in shuffled] + ["nobody"])
    assert got[-1] is None
    for have, want in zip(got, shuffled):
        assert_same(have, want, version=1)
        assert have is not None and have.memory is not None and want.memory is not None
        np.testing.assert_array_equal(have.memory.keys, want.memory.keys)
        np.testing.assert_array_equal(have.memory.weights, want.memory.weights)
        assert have.memory.words == want.memory.words
        assert not have.memory.keys.flags.writeable


async def test_an_expired_session_in_a_batch_read_is_none(
    store: MemorySessionStore, clock: Clock
) -> None:
    await create(store, "old")
    clock.now += 61.0
    await create(store, "new")
    assert [r and r.session_id for r in await store.get_many(["old", "new"])] == [None, "new"]
    assert await store.count() == 1


async def test_a_record_that_cannot_be_stored_refuses_the_batch_before_any_change(
    clock: Clock,
) -> None:
    rng = np.random.default_rng(8)
    store = MemorySessionStore(ttl_s=60.0, cap=1, clock=clock, first_rows=4)
    kept = random_record(rng, "kept", "lstm")
    await store.put_many([kept], [None])
    new, bad = random_record(rng, "new", "lstm"), random_record(rng, "bad", "lstm")
    bad.tokens = 2**70  # no int64 field holds it: found only when the batch is packed
    with pytest.raises(OverflowError):
        await store.put_many([new, bad], [None, None])
    # Nothing evicted, nothing placed: "new" did not take "kept"'s row.
    assert await store.get_many(["new", "bad"]) == [None, None]
    assert_same(await store.get("kept"), kept, version=1)


async def test_a_state_read_is_a_copy_of_its_own(clock: Clock) -> None:
    rng = np.random.default_rng(9)
    store = MemorySessionStore(ttl_s=60.0, cap=100, clock=clock)
    records = [random_record(rng, f"s{i}", "lstm") for i in range(64)]
    await store.put_many(records, [None] * len(records))
    got = await store.get_many([r.session_id for r in records])
    assert got[0] is not None
    # A long step holds its record across batches: it must not keep the batch's read alive.
    base = got[0].state[0].base
    assert base is not None and base.nbytes == sum(a.nbytes for a in got[0].state)


async def test_the_last_step_id_is_kept_with_the_session_and_forgotten_with_it() -> None:
    from dataclasses import replace

    store = MemorySessionStore(ttl_s=60.0, cap=10)
    assert await store.put_many([replace(record("a"), last_step="abc")], [None]) == [True]
    (got,) = await store.get_many(["a"])
    assert got is not None and got.last_step == "abc"
    assert await store.put_many([replace(got, last_step="")], [got.version]) == [True]
    assert (await store.get("a")).last_step == ""  # a step without an id clears it
    await store.put_many([replace(record("b"), last_step="x")], [None])
    await store.delete("b")
    await store.put_many([record("b")], [None])
    assert (await store.get("b")).last_step == ""
    await store.close()


async def test_an_owner_evicts_its_least_recently_written_session_whatever_a_write_names(
    clock: Clock,
) -> None:
    """A session keeps the owner it was created with, and each write moves it to the end of
    that owner's order even when the record names no owner (found by tests/test_store_model)."""
    store = MemorySessionStore(ttl_s=60.0, cap=10, clock=clock, owner_cap=2)
    a, b = record("a"), record("b")
    a.owner = b.owner = "alice"
    assert await store.put_many([a, b], [None, None]) == [True, True]
    again = record("a", fill=1.0)  # a step of a: the record names no owner
    assert await store.put_many([again], [1]) == [True]
    c = record("c")
    c.owner = "alice"
    assert await store.put_many([c], [None]) == [True]
    got = await store.get_many(["a", "b", "c"])
    assert [r is not None for r in got] == [True, False, True]  # b was alice's oldest write
    assert got[0] is not None and got[0].owner == "alice"


async def test_a_state_kept_on_a_device_is_a_flag_here_and_comes_back_as_host_arrays(
    store: MemorySessionStore, clock: Clock
) -> None:
    """A record `state_on_device` keeps only its metadata here; `restore_states` gives it
    host arrays at exactly its version, its version, TTL and LRU place unchanged."""
    kept = SessionRecord("a", "lstm", (), 3, 1.0, 1.0, state_on_device=True)
    both = SessionRecord("y", "lstm", record("y").state, 0, 1.0, 1.0, state_on_device=True)
    with pytest.raises(ValueError):  # arrays and the flag: malformed
        await store.put_many([both], [None])
    assert await store.put_many([kept, record("b")], [None, None]) == [True, True]
    got = await store.get("a")
    assert got.state == () and got.state_on_device and got.tokens == 3 and got.version == 1
    assert not (await store.get("b")).state_on_device
    clock.now += 30.0
    state = record("a", fill=2.0).state
    assert store.restore_states(["a", "b", "gone"], [2, 1, 1], [state] * 3) == [False] * 3
    assert store.restore_states(["a"], [1], [state]) == [True]
    got = await store.get("a")
    assert not got.state_on_device and got.version == 1
    for a, b in zip(got.state, state):
        np.testing.assert_array_equal(a, b)
    assert store.restore_states(["a"], [1], [state]) == [False]  # holds a state now
    clock.now += 35.0  # 65 s after its write: the TTL (60 s) still runs from the write
    assert await store.get_many(["a", "b"]) == [None, None]


async def test_a_batch_losing_a_compare_leaves_that_session_where_it_was(clock: Clock) -> None:
    store = MemorySessionStore(ttl_s=60.0, cap=4, clock=clock)
    await create(store, "a", "b", "c", "d")  # write order a, b, c, d
    clock.now += 1.0
    # Every session written again, "a" at a stale version: the others move behind it.
    batch = [record(i, version=1) for i in "abcd"]
    assert await store.put_many(batch, [7, 1, 1, 1]) == [False, True, True, True]
    assert [r.version for r in await store.get_many(list("abcd")) if r] == [1, 2, 2, 2]
    await create(store, "e")  # past the cap: the least recently written goes
    assert [r is not None for r in await store.get_many(list("abcde"))] == [
        False,
        True,
        True,
        True,
        True,
    ]
    clock.now += 59.5  # "b".."d" were written 1 s after "a": "a" would have expired first
    assert await store.count() == 4


async def test_expected_versions_no_int64_holds_are_refused_one_by_one(
    store: MemorySessionStore,
) -> None:
    await create(store, "a", "b")
    batch = [record("a"), record("b")]
    assert await store.put_many(batch, [2**70, 1]) == [False, True]
    assert await store.put_many(batch, [-(2**63), 2]) == [False, True]  # int64's least
    assert [r.version for r in await store.get_many(["a", "b"]) if r] == [1, 3]
