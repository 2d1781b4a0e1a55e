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
