"""The scheduler with adaptation, on a tiny real model: retries after a lost compare-and-set
and long steps in chunks count every word once; a batch mixing adapted and plain rows
answers each as alone; a `k` past the model's top K answers fewer words, failing nobody."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.contract.artifact import ModelArtifact
from service.engine.runtime import CPU, OrtModel, StepOutput
from service.engine.scheduler import Adaptation, Step, StepBatcher
from service.store import MemorySessionStore, SessionRecord

TEXT = " ".join(["the dog went home and Zorblax said hello ."] * 4)


@pytest.fixture(scope="module")
def model(tiny_artifacts: Path) -> OrtModel:
    return OrtModel(ModelArtifact.load(tiny_artifacts / "gru"), [CPU], 1)


class Interfering(MemorySessionStore):
    """A store where another writer steps session "a" just before each of `bumps` writes."""

    bumps = 0

    async def put_many(self, records: list[SessionRecord], expected: list[int | None]) -> Any:
        if self.bumps and any(r.session_id == "a" for r in records):
            self.bumps -= 1
            other = await MemorySessionStore.get(self, "a")
            await MemorySessionStore.put_many(self, [other], [other.version])
        return await super().put_many(records, expected)


async def typed_run(model: OrtModel, bumps: int, chunk: int) -> tuple[Any, SessionRecord]:
    ids, typed = model.vocab.encode_typed(TEXT)
    store = Interfering(3600.0, 100)
    batcher = StepBatcher(
        model, store, max_wait_ms=0, prefill_chunk=chunk, adaptation=Adaptation.of(model)
    )
    await batcher.start()
    try:
        await batcher.step(Step([], session_id="a", create=True))
        store.bumps = bumps
        result = await batcher.step(Step(ids, session_id="a", typed=typed, k=10))
        return result, await store.get("a")
    finally:
        await batcher.stop()


@pytest.mark.parametrize(("bumps", "chunk"), [(1, 0), (3, 4), (1, 4), (0, 4)])
async def test_retries_and_chunks_count_every_word_once(
    model: OrtModel, bumps: int, chunk: int
) -> None:
    want, want_record = await typed_run(model, 0, 0)
    got, record = await typed_run(model, bumps, chunk)
    assert record.memory is not None and want_record.memory is not None
    assert np.array_equal(record.memory.keys, want_record.memory.keys)
    np.testing.assert_allclose(record.memory.weights, want_record.memory.weights, rtol=1e-6)
    assert record.memory.words == want_record.memory.words == ("Zorblax",)
    assert got.ids.tolist() == want.ids.tolist()
    np.testing.assert_allclose(got.probs, want.probs, atol=1e-6)


class SmallTopK:
    """The model as if exported with a top K of 10 (`max_k` below the API's 50)."""

    def __init__(self, model: OrtModel) -> None:
        self.model = model
        self.name, self.eos_id, self.revision = model.name, model.eos_id, model.revision
        self.vocab, self.artifact = model.vocab, model.artifact
        self.start = self._cut(model.start)

    @staticmethod
    def _cut(output: StepOutput) -> StepOutput:
        return dataclasses.replace(
            output, topk_ids=output.topk_ids[:, :10], topk_probs=output.topk_probs[:, :10]
        )

    def run(self, tokens: np.ndarray, state: Any, want_probs: bool = False) -> StepOutput:
        return self._cut(self.model.run(tokens, state, want_probs))


async def test_a_batch_mixing_adapted_and_plain_rows_answers_each_as_alone(
    model: OrtModel,
) -> None:
    runner = SmallTopK(model)
    ids, typed = model.vocab.encode_typed(TEXT)
    word = ids[:1]

    async def alone(step: Step, setup: list[Step]) -> Any:
        batcher = StepBatcher(
            runner, MemorySessionStore(3600.0, 100), adaptation=Adaptation.of(runner)
        )
        await batcher.start()
        try:
            for first in setup:
                await batcher.step(first)
            return await batcher.step(step)
        finally:
            await batcher.stop()

    def steps() -> tuple[list[Step], list[Step]]:
        setup = [
            Step(ids, session_id="a", create=True, typed=typed),
            Step([], session_id="bob", create=True),
        ]
        batch = [
            Step(word, session_id="a", k=20),  # adapted, k past the model's top 10
            Step(word, session_id="bob", k=5),  # another user's ordinary step
            Step(word, k=5, adapt=False),  # a stateless predict from the model alone
        ]
        return setup, batch

    setup, batch = steps()
    batcher = StepBatcher(
        runner,
        MemorySessionStore(3600.0, 100),
        max_wait_ms=50,
        adaptation=Adaptation.of(runner),
    )
    await batcher.start()
    try:
        for first in setup:
            await batcher.step(first)
        futures = [batcher.submit(step) for step in batch]
        together = [await future for future in futures]
    finally:
        await batcher.stop()
    assert len(together[0].ids) == 10  # fewer words, no failure
    for i, result in enumerate(together):
        setup, batch = steps()
        single = await alone(batch[i], setup)
        assert result.ids.tolist() == single.ids.tolist()
        np.testing.assert_allclose(result.probs, single.probs, atol=1e-6)
