"""A hung session store (Redis not answering) holds up no stateless step, and stopping the
scheduler cuts a hung session batch short or drains it."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from service.contract.artifact import ModelArtifact
from service.engine.runtime import OrtModel
from service.engine.scheduler import Step, StepBatcher
from service.errors import Overloaded, StepFailed
from service.store import MemorySessionStore, SessionRecord

CPU = ["CPUExecutionProvider"]


class HungStore(MemorySessionStore):
    """A store whose reads or writes hang (Redis not answering) until released."""

    def __init__(self) -> None:
        super().__init__(ttl_s=3600.0, cap=1000)
        self.hang_reads = False
        self.hang_writes = False
        self.release = asyncio.Event()
        self.hanging = asyncio.Event()

    async def _hang(self) -> None:
        self.hanging.set()
        await self.release.wait()

    async def get_many(self, ids: list[str]) -> list[SessionRecord | None]:
        if self.hang_reads:
            await self._hang()
        return await super().get_many(ids)

    async def put_many(
        self, records: list[SessionRecord], expected: list[int | None]
    ) -> list[bool]:
        if self.hang_writes:
            await self._hang()
        return await super().put_many(records, expected)


@pytest.fixture
async def gru(tiny_artifacts: Path) -> OrtModel:
    return OrtModel(ModelArtifact.load(tiny_artifacts / "gru"), CPU)


async def answered_soon(futures: list[asyncio.Future[Any]], within_s: float = 2.0) -> list[Any]:
    return list(await asyncio.wait_for(asyncio.gather(*futures), within_s))


@pytest.mark.parametrize("hang", ["reads", "writes"])
async def test_a_hung_store_holds_up_no_stateless_step(gru: OrtModel, hang: str) -> None:
    store = HungStore()
    batcher = StepBatcher(gru, store, max_wait_ms=2.0, store_grace_ms=10.0)
    await batcher.start()
    try:
        await batcher.step(Step([4, 5], session_id="s", create=True))
        alone = await batcher.step(Step([7, 8]))
        setattr(store, f"hang_{hang}", True)
        # A session step and stateless steps in one batch, and more stateless steps later.
        fed = batcher.submit(Step([6], session_id="s"))
        created = batcher.submit(Step([6], session_id="t", create=True))
        same_batch = [batcher.submit(Step([7, 8])) for _ in range(3)]
        results = await answered_soon(same_batch)
        await asyncio.wait_for(store.hanging.wait(), 2)
        later = [batcher.submit(Step([7, 8])) for _ in range(3)]
        results += await answered_soon(later)
        for result in results:
            assert result.ids.tolist() == alone.ids.tolist()
        # The sessions' steps wait for the store, in order, and no other session step
        # runs meanwhile (one session batch in flight).
        queued = batcher.submit(Step([9], session_id="s"))
        await asyncio.sleep(0.05)
        assert not fed.done() and not created.done() and not queued.done()
        store.release.set()
        first, second = await answered_soon([fed, queued])
        assert (first.tokens, second.tokens) == (3, 4)
        assert (await created).tokens == 1
    finally:
        store.release.set()
        await batcher.stop()


async def test_stop_cuts_a_hung_session_batch_short(gru: OrtModel) -> None:
    store = HungStore()
    batcher = StepBatcher(gru, store, max_wait_ms=0)
    await batcher.start()
    await batcher.step(Step([4], session_id="s", create=True))
    store.hang_writes = True
    fed = batcher.submit(Step([5], session_id="s"))
    await asyncio.wait_for(store.hanging.wait(), 2)
    queued = batcher.submit(Step([6], session_id="s"))
    await asyncio.wait_for(batcher.stop(drain=False), 2)
    assert isinstance(fed.exception(), StepFailed)
    assert isinstance(queued.exception(), Overloaded)


async def test_stop_with_drain_finishes_the_session_batch(gru: OrtModel) -> None:
    store = HungStore()
    batcher = StepBatcher(gru, store, max_wait_ms=0)
    await batcher.start()
    await batcher.step(Step([4], session_id="s", create=True))
    store.hang_reads = True
    fed = batcher.submit(Step([5], session_id="s"))
    queued = batcher.submit(Step([6], session_id="s"))
    await asyncio.wait_for(store.hanging.wait(), 2)
    stopping = asyncio.ensure_future(batcher.stop(drain=True))
    await asyncio.sleep(0.05)
    assert not stopping.done()
    store.release.set()
    await asyncio.wait_for(stopping, 5)
    assert (fed.result().tokens, queued.result().tokens) == (2, 3)
