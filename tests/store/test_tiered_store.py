"""The engine's copy of its sessions in front of Redis (service/store/tiered.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from prometheus_client import REGISTRY

from service.errors import UnknownSession
from service.store import MemorySessionStore, SessionRecord, SessionStore, TieredSessionStore
from tests.redis_server import RedisServer, needs_redis, running_redis
from tests.store.test_redis_store import record

pytestmark = [needs_redis, pytest.mark.redis]


class Counting:
    """A shared store that counts its round trips."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name in ("get_many", "put_many", "get", "delete"):

            async def counted(*args: Any) -> Any:
                self.calls.append(name)
                return await attr(*args)

            return counted
        return attr


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    yield from running_redis()


@pytest.fixture
async def redis_url(redis_server: RedisServer) -> AsyncIterator[str]:
    from service.store.redis import RedisSessionStore

    store = RedisSessionStore.from_url(redis_server.url)
    await store._redis.flushdb()
    await store.close()
    yield redis_server.url


def tiered(url: str, write: str = "through") -> tuple[TieredSessionStore, Counting]:
    from service.store.redis import RedisSessionStore

    shared = Counting(RedisSessionStore.from_url(url, ttl_s=60))
    return TieredSessionStore(shared, write=write, ttl_s=60), shared  # type: ignore[arg-type]


def same(a: SessionRecord | None, b: SessionRecord) -> bool:
    assert a is not None
    return a.tokens == b.tokens and all(np.array_equal(x, y) for x, y in zip(a.state, b.state))


async def test_write_through_reads_its_own_sessions_without_a_round_trip(redis_url: str) -> None:
    store, shared = tiered(redis_url)
    assert isinstance(store, SessionStore)
    first = record("a")
    assert await store.put_many([first], [None]) == [True]
    assert shared.calls == ["put_many"]  # written before the step is answered
    (got,) = await store.get_many(["a"])
    assert shared.calls == ["put_many"] and same(got, first) and got is not None
    second = replace(first, tokens=4)
    assert await store.put_many([second], [got.version]) == [True]
    other, _ = tiered(redis_url)  # another engine sees every answered step
    (seen,) = await other.get_many(["a"])
    assert same(seen, second) and seen is not None and seen.version == 2
    await store.close()
    await other.close()


async def test_a_stale_copy_loses_the_compare_and_set_then_reads_redis(redis_url: str) -> None:
    mine, _ = tiered(redis_url)
    theirs, _ = tiered(redis_url)
    await mine.put_many([record("s")], [None])
    (read_by_them,) = await theirs.get_many(["s"])
    assert read_by_them is not None
    stepped = replace(read_by_them, tokens=9)
    assert await theirs.put_many([stepped], [read_by_them.version]) == [True]
    (stale,) = await mine.get_many(["s"])  # my copy: one step behind
    assert stale is not None and stale.tokens == 3
    assert await mine.put_many([replace(stale, tokens=4)], [stale.version]) == [False]
    (fresh,) = await mine.get_many(["s"])  # the retry reads what they wrote
    assert same(fresh, stepped)
    await mine.close()
    await theirs.close()


async def test_write_behind_answers_first_and_flushes_later(redis_url: str) -> None:
    store, shared = tiered(redis_url, "behind")
    other, _ = tiered(redis_url)
    first = record("b")
    assert await store.put_many([first], [None]) == [True]
    assert shared.calls == []  # answered before any write to Redis
    assert await other.get_many(["b"]) == [None]
    (got,) = await store.get_many(["b"])
    assert got is not None
    later = replace(got, tokens=5)
    assert await store.put_many([later], [got.version]) == [True]
    assert (await store.get("b")).tokens == 5
    await store.flush()
    assert shared.calls == ["put_many"]  # both steps, one write
    (seen,) = await other.get_many(["b"])
    assert same(seen, later)
    await store.close()
    await other.close()


async def test_write_behind_conflict_keeps_the_other_engines_state(redis_url: str) -> None:
    mine, _ = tiered(redis_url, "behind")
    theirs, _ = tiered(redis_url)
    await mine.put_many([record("c")], [None])
    await mine.flush()
    (read_by_them,) = await theirs.get_many(["c"])
    (read_by_me,) = await mine.get_many(["c"])
    assert read_by_them is not None and read_by_me is not None
    theirs_step = replace(read_by_them, tokens=10)
    await theirs.put_many([theirs_step], [read_by_them.version])
    await mine.put_many([replace(read_by_me, tokens=4)], [read_by_me.version])
    before = REGISTRY.get_sample_value("nextword_store_conflicts_total") or 0.0
    await mine.flush()
    assert REGISTRY.get_sample_value("nextword_store_conflicts_total") == before + 1
    (now,) = await mine.get_many(["c"])
    assert same(now, theirs_step)
    await mine.close()
    await theirs.close()


async def test_closing_flushes_what_was_written_behind(redis_url: str) -> None:
    store, _ = tiered(redis_url, "behind")
    first = record("d")
    await store.put_many([first], [None])
    await store.close()
    other, _ = tiered(redis_url)
    (seen,) = await other.get_many(["d"])
    assert same(seen, first)
    await other.delete("d")
    with pytest.raises(UnknownSession):
        await other.get("d")
    await other.close()


async def test_flushes_never_overlap(redis_url: str) -> None:
    store, _ = tiered(redis_url, "behind")
    first = record("e")
    await store.put_many([first], [None])
    await store.flush()
    (got,) = await store.get_many(["e"])
    assert got is not None
    await store.put_many([replace(got, tokens=6)], [got.version])
    before = REGISTRY.get_sample_value("nextword_store_conflicts_total") or 0.0
    await asyncio.gather(store.flush(), store.flush())  # the background flush and close()
    assert (REGISTRY.get_sample_value("nextword_store_conflicts_total") or 0.0) == before
    other, _ = tiered(redis_url)
    (seen,) = await other.get_many(["e"])
    assert seen is not None and seen.tokens == 6
    await store.close()
    await other.close()


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Gated(Counting):
    """A shared store whose writes wait for `open` (a hung Redis, until it is set)."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.open = asyncio.Event()
        self.open.set()

    def __getattr__(self, name: str) -> Any:
        attr = super().__getattr__(name)
        if name != "put_many":
            return attr

        async def gated(*args: Any) -> Any:
            await self.open.wait()
            return await attr(*args)

        return gated


def behind_over_memory(window_s: float = 1.0) -> tuple[TieredSessionStore, Gated, Clock]:

    clock = Clock()
    shared = Gated(MemorySessionStore(ttl_s=60, cap=100))
    store = TieredSessionStore(
        shared,  # type: ignore[arg-type]
        write="behind",
        ttl_s=60,
        behind_window_s=window_s,
        flush_interval_s=3600,  # flushed by the test
        clock=clock,
    )
    return store, shared, clock


async def test_write_behind_stops_answering_once_the_window_is_full() -> None:
    from service.errors import StoreUnavailable

    store, shared, clock = behind_over_memory(window_s=1.0)
    shared.open.clear()  # Redis hangs: nothing is flushed
    assert await store.put_many([record("w")], [None]) == [True]
    flushing = asyncio.ensure_future(store.flush())
    clock.now += 0.9
    (got,) = await store.get_many(["w"])
    assert got is not None and store.unflushed_age() == pytest.approx(0.9)
    assert await store.put_many([replace(got, tokens=4)], [got.version]) == [True]  # within
    clock.now += 0.2  # the oldest step not flushed is now 1.1 s old
    (got,) = await store.get_many(["w"])
    assert got is not None
    with pytest.raises(StoreUnavailable, match="behind"):
        await store.put_many([replace(got, tokens=5)], [got.version])
    assert (await store.get("w")).tokens == 4  # the refused step was not applied
    shared.open.set()  # Redis is back: the flush catches up
    await flushing
    await store.flush()  # the step written during the first flush
    assert store.unflushed_age() == 0.0
    (got,) = await store.get_many(["w"])
    assert got is not None
    assert await store.put_many([replace(got, tokens=5)], [got.version]) == [True]
    await store.flush()
    assert (await shared.inner.get("w")).tokens == 5  # every answered step reached it
    before = REGISTRY.get_sample_value("nextword_store_conflicts_total") or 0.0
    assert (REGISTRY.get_sample_value("nextword_store_conflicts_total") or 0.0) == before
    await store.close()


async def test_a_session_written_again_during_a_flush_is_flushed_without_a_conflict() -> None:
    store, shared, _ = behind_over_memory()
    before = REGISTRY.get_sample_value("nextword_store_conflicts_total") or 0.0
    await store.put_many([record("x")], [None])
    shared.open.clear()
    flushing = asyncio.ensure_future(store.flush())
    await asyncio.sleep(0)
    (got,) = await store.get_many(["x"])
    assert got is not None
    await store.put_many([replace(got, tokens=7)], [got.version])  # during the flush
    shared.open.set()
    await flushing
    await store.flush()
    assert (REGISTRY.get_sample_value("nextword_store_conflicts_total") or 0.0) == before
    assert (await shared.inner.get("x")).tokens == 7
    await store.close()


async def test_a_shared_store_refuses_a_state_kept_on_a_device() -> None:
    """Only the in-process store keeps a record whose state is on an engine's device."""
    store = TieredSessionStore(MemorySessionStore(ttl_s=60.0, cap=10))
    kept = SessionRecord("a", "lstm", (), 1, 1.0, 1.0, state_on_device=True)
    with pytest.raises(ValueError, match="host states only"):
        await store.put_many([kept], [None])
