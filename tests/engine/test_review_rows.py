"""Review of the common batch as columns: what reaches a store that keeps every field of
a record (a shared store, through `TieredSessionStore`) is what the records path writes,
also when a step of the batch is cancelled during its run."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from service.contract.artifact import ModelArtifact
from service.engine.pool import StatePool
from service.engine.runtime import OrtModel
from service.engine.scheduler import Step, StepBatcher
from service.store import SessionRecord, TieredSessionStore
from service.store.memory import MemorySessionStore


class Shared(MemorySessionStore):
    """Stands for Redis: remembers every record it is given (the memory store itself
    keeps no revision)."""

    def __init__(self) -> None:
        super().__init__(ttl_s=3600.0, cap=1000)
        self.given: list[SessionRecord] = []

    async def put_many(
        self, records: list[SessionRecord], expected: list[int | None]
    ) -> list[bool]:
        self.given.extend(records)
        return await super().put_many(records, expected)


@pytest.fixture(scope="module")
def lstm(tiny_artifacts: Path) -> OrtModel:
    return OrtModel(ModelArtifact.load(tiny_artifacts / "lstm"), ["CPUExecutionProvider"])


@pytest.mark.parametrize("cancelled", [False, True], ids=["all answered", "one cancelled"])
async def test_a_common_batch_writes_its_revision_to_a_shared_store(
    lstm: OrtModel, monkeypatch: pytest.MonkeyPatch, cancelled: bool
) -> None:
    assert lstm.revision  # a real artifact's
    shared = Shared()
    pool = StatePool(lstm, 64)
    engine = StepBatcher(
        lstm, TieredSessionStore(shared), pool=pool, cache_states=True, max_wait_ms=0
    )
    futures: list[asyncio.Future[Any]] = []
    loop = asyncio.get_running_loop()
    real_run = pool.run

    def run(*args: Any, **kwargs: Any) -> Any:
        if cancelled:
            loop.call_soon_threadsafe(futures[0].cancel)
        return real_run(*args, **kwargs)

    monkeypatch.setattr(pool, "run", run)
    commons: list[int] = []
    real_write = engine._write_common

    async def write_common(batch: Any) -> None:
        commons.append(len(batch.steps))
        await real_write(batch)

    monkeypatch.setattr(engine, "_write_common", write_common)
    await engine.start()
    try:
        futures.append(engine.submit(Step([5, 6], session_id="a", create=True)))
        futures.append(engine.submit(Step([7], session_id="b", create=True)))
        await asyncio.wait(futures)
        assert commons == [2]  # one common batch of both steps
        assert futures[0].cancelled() == cancelled
        written = {r.session_id: r.revision for r in shared.given}
        assert written == (
            {"b": lstm.revision} if cancelled else dict.fromkeys("ab", lstm.revision)
        )
        assert futures[1].result().record.revision == lstm.revision
    finally:
        await engine.stop()
