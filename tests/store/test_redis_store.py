"""The Redis stores against real servers: one redis-server on a free loopback port, and a
local Redis Cluster of three primaries (each with a replica), the same tests on both."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from service.errors import StoreUnavailable, UnknownSession
from service.store import SessionRecord, SessionStore
from tests.redis_cluster import (
    SINGLE_OR_CLUSTER,
    RedisCluster,
    single_or_cluster,
)
from tests.redis_server import RedisServer, needs_redis

pytestmark = [needs_redis, pytest.mark.redis]
_seeds = itertools.count()


@pytest.fixture(scope="module", params=SINGLE_OR_CLUSTER)
def redis_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RedisServer | RedisCluster]:
    yield from single_or_cluster(request, tmp_path_factory)


def open_store(url: str, **options: Any) -> Any:
    """The store a URL names: RedisSessionStore, or RedisClusterSessionStore for a cluster."""
    from service.config import CLUSTER_SCHEMES as SCHEMES
    from service.store.redis import RedisSessionStore
    from service.store.redis_cluster import RedisClusterSessionStore

    cls = RedisClusterSessionStore if url.startswith(SCHEMES) else RedisSessionStore
    return cls.from_url(url, **options)


def single_node_only(server: RedisServer | RedisCluster) -> None:
    if isinstance(server, RedisCluster):
        pytest.skip("stops the one Redis; the cluster's failover is tested in test_redis_cluster")


@pytest.fixture
async def store(redis_server: RedisServer | RedisCluster) -> AsyncIterator[Any]:
    s = open_store(redis_server.url, ttl_s=60, timeout_s=1.0)
    await s._redis.flushdb()
    yield s
    await s.close()


def record(session_id: str, cell: str = "lstm", layers: int = 2, hidden: int = 8) -> SessionRecord:
    """A record with a fresh random state: no two calls give the same bytes."""
    rng = np.random.default_rng(next(_seeds))
    arrays = 4 if cell == "lstm" else 2  # current and previous (h, c) / h
    state = tuple(rng.standard_normal((layers, hidden)).astype(np.float32) for _ in range(arrays))
    now = time.time()
    return SessionRecord(
        session_id, cell, state, tokens=3, created_at=now, last_used_at=now, last_token=7
    )


def test_protocol(store: object) -> None:
    assert isinstance(store, SessionStore)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
async def test_round_trip_is_bit_exact(store, cell: str) -> None:
    rec = record(store.new_id(), cell)
    for s in rec.state:  # odd values survive too
        s.ravel()[-2:] = np.float32(np.nan), np.float32(-0.0)
    assert await store.put_many([rec], [None]) == [True]
    (got,) = await store.get_many([rec.session_id])
    assert got is not None
    assert (got.model, got.tokens, got.version, got.last_token) == (cell, 3, 1, 7)
    assert (got.created_at, got.last_used_at) == (rec.created_at, rec.last_used_at)
    assert len(got.state) == len(rec.state)
    for a, b in zip(got.state, rec.state, strict=True):
        assert a.dtype == np.float32 and a.shape == b.shape
        assert a.tobytes() == b.tobytes()
    single = await store.get(rec.session_id)
    assert single.version == 1 and single.state[0].tobytes() == rec.state[0].tobytes()


async def test_versions_and_batches(store) -> None:
    recs = [record(f"s{i}") for i in range(5)]
    assert await store.put_many(recs, [None] * 5) == [True] * 5
    # Wrong expected versions fail alone; the rest of the batch is written.
    steps = [record(f"s{i}") for i in range(5)]
    assert await store.put_many(steps, [1, 0, None, 1, 2]) == [True, False, False, True, False]
    got = await store.get_many([r.session_id for r in recs])
    assert [g.version for g in got] == [2, 1, 1, 2, 1]
    assert await store.count() == 5
    assert await store.get_many([]) == [] and await store.put_many([], []) == []


async def test_get_many_of_missing_ids(store) -> None:
    rec = record("present")
    await store.put_many([rec], [None])
    got = await store.get_many(["absent", "present", store.new_id()])
    assert got[0] is None and got[2] is None
    assert got[1] is not None and got[1].session_id == "present"
    with pytest.raises(UnknownSession):
        await store.get("absent")
    with pytest.raises(UnknownSession):
        await store.delete("absent")
    await store.delete("present")
    assert await store.get_many(["present"]) == [None]


async def test_cas_conflict_exactly_one_wins(store, redis_server: RedisServer) -> None:
    """Two stores (two replicas) write with the same expected version: exactly one wins."""
    await store.put_many([record("contended")], [None])
    other = open_store(redis_server.url, ttl_s=60)
    try:
        for round_ in range(20):
            current = (await store.get_many(["contended"]))[0]
            a, b = record("contended"), record("contended")
            a.tokens, b.tokens = 100 + round_, 200 + round_
            results = await asyncio.gather(
                store.put_many([a], [current.version]), other.put_many([b], [current.version])
            )
            assert sorted(r[0] for r in results) == [False, True]
            after = (await store.get_many(["contended"]))[0]
            assert after.version == current.version + 1
            assert after.tokens == (a.tokens if results[0][0] else b.tokens)
        # Creating an existing session conflicts too.
        assert await other.put_many([record("contended")], [None]) == [False]
    finally:
        await other.close()


async def test_replayed_write_counts_as_written(store) -> None:
    """A write retried after a lost reply finds its own record and reports success."""
    rec = record("replayed")
    assert await store.put_many([rec], [None]) == [True]
    assert await store.put_many([rec], [None]) == [True]  # the identical record: a replay
    assert await store.put_many([record("replayed")], [None]) == [False]
    assert (await store.get("replayed")).version == 1


async def test_ttl_expiry_refreshed_on_write(redis_server: RedisServer) -> None:
    store = open_store(redis_server.url, ttl_s=0.4)
    try:
        rec = record("short")
        await store.put_many([rec], [None])
        ttl_ms = await store._redis.pttl(store._key("short"))
        assert 0 < ttl_ms <= 400
        await asyncio.sleep(0.25)
        assert await store.put_many([rec], [1]) == [True]  # a step refreshes the TTL
        await asyncio.sleep(0.25)
        assert (await store.get_many(["short"]))[0] is not None
        await asyncio.sleep(0.3)
        assert await store.get_many(["short"]) == [None]
        with pytest.raises(UnknownSession):
            await store.get("short")
    finally:
        await store.close()


async def test_unreadable_record_is_absent(store) -> None:
    await store._redis.set(store._key("junk"), b"not a record")
    assert await store.get_many(["junk"]) == [None]


async def test_redis_down_then_back(redis_server: RedisServer) -> None:
    """Stopped: every call raises StoreUnavailable. Restarted: the same store works again."""
    from service.store.redis import RedisSessionStore

    single_node_only(redis_server)
    store = RedisSessionStore.from_url(redis_server.url, ttl_s=60, timeout_s=1.0)
    try:
        await store.put_many([record("before")], [None])
        await store.ping()
        redis_server.stop()
        calls = [
            store.ping(),
            store.get_many(["before"]),
            store.put_many([record("x")], [None]),
            store.get("before"),
            store.delete("before"),
            store.count(),
        ]
        for call in calls:
            with pytest.raises(StoreUnavailable, match="unreachable"):
                await call
        redis_server.start()  # same port, empty (no persistence)
        await store.ping()
        assert await store.get_many(["before"]) == [None]
        rec = record("after")
        assert await store.put_many([rec], [None]) == [True]  # the script is loaded again
        assert (await store.get("after")).state[1].tobytes() == rec.state[1].tobytes()
    finally:
        if redis_server.proc is None:
            redis_server.start()
        await store.close()


async def test_an_owner_past_its_cap_evicts_its_own_oldest_session(redis_server) -> None:
    store = open_store(redis_server.url, ttl_s=60, timeout_s=1.0, owner_cap=2)
    await store._redis.flushdb()
    try:

        def owned(session_id: str, owner: str) -> SessionRecord:
            rec = record(session_id)
            rec.owner = owner
            return rec

        assert await store.put_many([owned("b1", "bob")], [None]) == [True]
        for name in ("a1", "a2"):
            assert await store.put_many([owned(name, "alice")], [None]) == [True]
            await asyncio.sleep(0.005)  # distinct millisecond scores
        assert await store.put_many([owned("a1", "alice")], [1]) == [True]  # a1 used again
        await asyncio.sleep(0.005)
        assert await store.put_many([owned("a3", "alice")], [None]) == [True]
        alive = [r is not None for r in await store.get_many(["b1", "a1", "a2", "a3"])]
        assert alive == [True, True, False, True]
        assert store.evictions == 1
        assert (await store.get("a3")).owner == "alice"
        # A delete leaves the owner's count: the next session evicts nothing.
        await store.delete("a3")
        assert await store.put_many([owned("a4", "alice")], [None]) == [True]
        alive = [r is not None for r in await store.get_many(["a1", "a4"])]
        assert alive == [True, True] and store.evictions == 1
    finally:
        await store.close()


async def test_format_1_records_are_still_read(store) -> None:
    from service.store.redis import encode_record

    rec = record("old")
    data = bytearray(encode_record(rec, 4))
    name_end = 47 + len(rec.model)
    # Format 1: no owner, no memory header, no last step, no revision (all empty here:
    # 2 + 5 + 1 + 1 bytes).
    old = bytes(b"NWS\x01" + data[4:name_end] + data[name_end + 9 :])
    await store._redis.set(store._key("old"), old)
    got = await store.get("old")
    assert (got.version, got.owner, got.tokens) == (4, "", rec.tokens)
    assert all(np.array_equal(a, b) for a, b in zip(got.state, rec.state))
    assert await store.put_many([rec], [4]) == [True]  # the CAS reads the version only


async def test_format_2_records_are_still_read_and_the_last_step_round_trips(store) -> None:
    from service.store.redis import encode_record

    rec = record("two")
    data = bytearray(encode_record(rec, 3))
    name_end = 47 + len(rec.model)
    # Format 2: no last step (its length byte follows the owner and the memory header) and
    # no revision (the next length byte).
    old = bytes(b"NWS\x02" + data[4 : name_end + 7] + data[name_end + 9 :])
    await store._redis.set(store._key("two"), old)
    got = await store.get("two")
    assert (got.version, got.last_step, got.tokens) == (3, "", rec.tokens)
    stepped = replace(got, last_step="0123456789abcdef01234567")
    assert await store.put_many([stepped], [3]) == [True]
    again = await store.get("two")
    assert again.last_step == "0123456789abcdef01234567" and again.version == 4


async def test_format_3_records_are_still_read_and_the_revision_round_trips(store) -> None:
    from service.store.redis import encode_record

    rec = replace(record("three"), last_step="0123456789abcdef01234567")
    data = bytearray(encode_record(rec, 5))
    step_end = 47 + len(rec.model) + 7 + 1 + len(rec.last_step)
    # Format 3: no revision (its length byte follows the last step).
    old = bytes(b"NWS\x03" + data[4:step_end] + data[step_end + 1 :])
    await store._redis.set(store._key("three"), old)
    got = await store.get("three")
    assert (got.version, got.last_step, got.revision) == (5, rec.last_step, "")
    assert all(np.array_equal(a, b) for a, b in zip(got.state, rec.state))
    assert await store.put_many([replace(got, revision="3cd041135982f3aa")], [5]) == [True]
    again = await store.get("three")
    assert (again.revision, again.last_step, again.version) == (
        "3cd041135982f3aa",
        rec.last_step,
        6,
    )


async def test_the_writers_words_round_trip(store) -> None:
    from service.store.base import WordMemory

    rec = record(store.new_id(), "gru", layers=1)
    keys = np.array([5, -1, 12_001, 7], np.int32)
    weights = np.array([1.5, 0.0, 1.0, 0.25], np.float32)
    rec.memory = WordMemory(keys, weights, ("Zorblax", "naïve-ish"))
    rec.adapt, rec.owner = False, "alice"
    assert await store.put_many([rec], [None]) == [True]
    got = await store.get(rec.session_id)
    assert got.memory is not None and got.memory.words == ("Zorblax", "naïve-ish")
    assert np.array_equal(got.memory.keys, keys) and np.array_equal(got.memory.weights, weights)
    assert (got.adapt, got.owner) == (False, "alice")
    assert all(np.array_equal(a, b) for a, b in zip(got.state, rec.state))


async def test_an_owners_batch_never_evicts_a_session_it_writes(redis_server) -> None:
    """A create and a feed of one owner at its cap in one batch: the idle session goes,
    not the one being fed."""
    store = open_store(redis_server.url, ttl_s=60, timeout_s=1.0, owner_cap=2)
    await store._redis.flushdb()
    try:

        def owned(session_id: str) -> SessionRecord:
            rec = record(session_id)
            rec.owner = "alice"
            return rec

        for name in ("fed", "idle"):
            assert await store.put_many([owned(name)], [None]) == [True]
            await asyncio.sleep(0.005)
        # "fed" is the oldest: a batch that feeds it and creates a third keeps it.
        assert await store.put_many([owned("new"), owned("fed")], [None, 1]) == [True, True]
        alive = [r is not None for r in await store.get_many(["fed", "idle", "new"])]
        assert alive == [True, False, True]
    finally:
        await store.close()


async def test_typed_words_of_any_length_round_trip(store) -> None:
    from service.store.base import WordMemory

    rec = record(store.new_id())
    long_word = "\U00020000" * 64  # 256 bytes of UTF-8: the longest typed word
    rec.memory = WordMemory(
        np.array([12_000], np.int32), np.array([1.0], np.float32), (long_word, "é")
    )
    assert await store.put_many([rec], [None]) == [True]
    got = await store.get(rec.session_id)
    assert got.memory is not None and got.memory.words == (long_word, "é")


async def test_a_hung_redis_fails_reads_and_writes_then_recovers(
    redis_server: RedisServer,
) -> None:
    import os
    import signal

    from service.errors import OutcomeUnknown, StoreUnavailable
    from service.store.redis import RedisSessionStore

    # A cluster's primary frozen this long may be failed over, which tests something else
    # (test_redis_cluster); the cluster store's writes take the same `writing` path.
    single_node_only(redis_server)
    store = RedisSessionStore.from_url(redis_server.url, ttl_s=60, timeout_s=0.3)
    first = record("hung")
    assert await store.put_many([first], [None]) == [True]
    assert redis_server.proc is not None
    os.kill(redis_server.proc.pid, signal.SIGSTOP)  # up, but answering nothing
    try:
        # On the connection already open: the write is sent, and never answered.
        with pytest.raises(OutcomeUnknown):
            await asyncio.wait_for(store.put_many([record("hung")], [1]), 60)
        with pytest.raises(StoreUnavailable) as read:
            await asyncio.wait_for(store.get_many(["hung"]), 60)
        assert not isinstance(read.value, OutcomeUnknown)  # a read changes nothing
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
    (got,) = await asyncio.wait_for(store.get_many(["hung"]), 60)  # back by itself
    # Applied after all, when Redis resumed: why the error could not say "not applied".
    assert got is not None and got.version == 2
    await store.close()


async def test_a_write_to_no_redis_at_all_is_not_applied() -> None:
    from service.errors import StoreUnavailable
    from service.store.redis import RedisSessionStore
    from tests.redis_server import free_port

    store = RedisSessionStore.from_url(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.3)
    with pytest.raises(StoreUnavailable) as refused:
        await store.put_many([record("nowhere")], [None])
    from service.errors import OutcomeUnknown

    assert not isinstance(refused.value, OutcomeUnknown)  # never sent: not applied
    await store.close()


async def test_a_session_written_by_another_model_revision_is_unknown(store) -> None:
    """A retrained model served under the same name (Redis outlives the swap) must not step
    the states the old weights wrote: the session is unknown to it, the client starts afresh.
    Records of stores without revisions (written before, revision "") are still accepted."""
    from service.engine.scheduler import StepBatcher
    from service.engine.steps import Step
    from tests.engine.test_batcher import FakeRunner, alone, same

    old, new = FakeRunner(), FakeRunner()
    old.revision, new.revision = "aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb"
    batchers = {}
    for runner in (old, new):
        batchers[runner.revision] = StepBatcher(runner, store, max_batch=8, max_wait_ms=1.0)
        await batchers[runner.revision].start()
    try:
        before, after = batchers[old.revision], batchers[new.revision]
        await before.step(Step([4, 5], session_id="s", create=True))
        assert (await store.get("s")).revision == old.revision
        with pytest.raises(UnknownSession, match="another revision of model 'fake'"):
            await after.step(Step([6], session_id="s"))
        # The old revision still owns it: nothing was written by the refused step.
        same(await before.step(Step([6], session_id="s")), alone(old, [4, 5, 6]))
        # A new session under the new revision, and a record that names no revision.
        await after.step(Step([4], session_id="t", create=True))
        legacy = replace(await store.get("s"), revision="")
        assert await store.put_many([legacy], [legacy.version]) == [True]
        same(await after.step(Step([7], session_id="s")), alone(new, [4, 5, 6, 7]))
        assert (await store.get("s")).revision == new.revision
    finally:
        for b in batchers.values():
            await b.stop()
