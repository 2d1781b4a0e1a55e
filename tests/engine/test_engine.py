"""OrtModel on tiny real artifacts: shapes, prefill == stepping, rows independent, prefixes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.contract.artifact import ModelArtifact
from service.engine.runtime import CPU, OrtModel, StepOutput, choose_providers, top_words


@pytest.fixture(scope="module", params=["lstm", "gru"])
def model(request: pytest.FixtureRequest, tiny_artifacts: Path) -> OrtModel:
    return OrtModel(ModelArtifact.load(tiny_artifacts / request.param), choose_providers("auto"))


def ids(model: OrtModel, text: str) -> list[int]:
    return [model.eos_id, *model.vocab.encode(text)]


def test_choose_providers() -> None:
    assert choose_providers("auto")[-1] == CPU
    assert choose_providers("cpu") == [CPU]
    assert choose_providers(" CPUExecutionProvider ") == [CPU]
    with pytest.raises(ValueError):
        choose_providers("NoSuchExecutionProvider")
    with pytest.raises(ValueError):
        choose_providers(" , ")


def test_providers_in_use_are_reported(model: OrtModel) -> None:
    # onnxruntime-gpu without a usable GPU falls back to CPU: the session says which.
    assert model.providers == model.session.get_providers()
    assert model.providers[-1] == CPU
    assert model.on_cuda == (model.providers[0] == "CUDAExecutionProvider")


def test_run_shapes(model: OrtModel) -> None:
    batch, seq = 3, 4
    tokens = np.full((batch, seq), model.vocab.index["the"], dtype=np.int64)
    out = model.run(tokens, model.zero_state(batch))
    assert len(out) == batch
    assert out.topk_ids.shape == out.topk_probs.shape == (batch, model.max_k)
    assert out.topk_ids.dtype == np.int64 and out.topk_probs.dtype == np.float32
    assert out.probs is None  # only fetched when asked for
    assert len(out.state) == (2 if model.cell == "lstm" else 1)
    for array in out.state:
        assert array.shape == (model.layers, batch, model.hidden_size)
    with_probs = model.run(tokens, model.zero_state(batch), want_probs=True)
    assert with_probs.probs is not None
    assert with_probs.probs.shape == (batch, len(model.vocab))
    np.testing.assert_allclose(with_probs.probs.sum(axis=1), 1.0, atol=1e-5)


def test_top_k_are_suggestible_words_best_first(model: OrtModel) -> None:
    out = model.run(np.array([ids(model, "i am coming")]), model.zero_state(1), want_probs=True)
    assert out.probs is not None
    assert model.vocab.suggestible[out.topk_ids[0]].all()
    assert (np.diff(out.topk_probs[0]) <= 0).all()
    np.testing.assert_allclose(out.topk_probs[0], out.probs[0, out.topk_ids[0]], atol=1e-6)
    best = np.sort(out.probs[0, model.vocab.suggestible])[::-1][: model.max_k]
    np.testing.assert_allclose(out.topk_probs[0], best, atol=1e-6)


def test_start_is_the_end_of_sentence_step(model: OrtModel) -> None:
    again = model.run(np.array([[model.eos_id]]), model.zero_state(1), want_probs=True)
    np.testing.assert_array_equal(model.start.topk_ids, again.topk_ids)
    assert model.start.probs is not None


def test_prefill_equals_stepping(model: OrtModel) -> None:
    tokens = ids(model, "i am coming home to see you , and the world")
    whole = model.run(np.array([tokens]), model.zero_state(1), want_probs=True)
    state = model.zero_state(1)
    step: StepOutput | None = None
    for token in tokens:
        step = model.run(np.array([[token]]), state, want_probs=True)
        state = step.state
    assert step is not None and step.probs is not None and whole.probs is not None
    np.testing.assert_allclose(step.probs, whole.probs, atol=1e-5)
    for a, b in zip(step.state, whole.state):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_rows_of_a_batch_equal_each_alone(model: OrtModel) -> None:
    rng = np.random.default_rng(0)
    batch = 16
    tokens = rng.integers(3, len(model.vocab), size=(batch, 3))
    state = tuple(
        rng.standard_normal((model.layers, batch, model.hidden_size)).astype(np.float32) * 0.5
        for _ in model.state_inputs
    )
    together = model.run(tokens, state, want_probs=True)
    assert together.probs is not None
    for i in range(batch):
        alone = model.run(tokens[i : i + 1], tuple(a[:, i : i + 1] for a in state), True)
        assert alone.probs is not None
        np.testing.assert_allclose(alone.probs[0], together.probs[i], atol=1e-5)
        for a, b in zip(alone.state, together.state):
            np.testing.assert_allclose(a[:, 0], b[:, i], atol=1e-5)


def test_prefix_completion_uses_the_full_distribution(model: OrtModel) -> None:
    out = model.run(np.array([ids(model, "i am")]), model.zero_state(1), want_probs=True)
    assert out.probs is not None
    candidates = model.vocab.ids_with_prefix("Th")  # case-insensitive
    words = [model.vocab.tokens[i] for i in candidates]
    assert words and all(w.startswith("th") for w in words)
    got_ids, got_probs = top_words(out, 0, 3, candidates)
    order = candidates[np.argsort(-out.probs[0, candidates], kind="stable")][:3]
    assert got_ids.tolist() == order.tolist()
    np.testing.assert_allclose(got_probs, out.probs[0, order])
    # k larger than the matches: all of them, best first; no match: nothing.
    all_ids, all_probs = top_words(out, 0, 50, candidates)
    assert sorted(all_ids.tolist()) == sorted(candidates.tolist())
    assert (np.diff(all_probs) <= 0).all()
    assert top_words(out, 0, 5, model.vocab.ids_with_prefix("zzzq"))[0].size == 0


def test_prefix_needs_the_distribution(model: OrtModel) -> None:
    out = model.run(np.array([[model.eos_id]]), model.zero_state(1))
    with pytest.raises(ValueError):
        top_words(out, 0, 3, model.vocab.ids_with_prefix("th"))


def test_bad_shapes_are_refused_before_ort(model: OrtModel) -> None:
    with pytest.raises(ValueError):
        model.run(np.zeros((0, 1), dtype=np.int64), model.zero_state(0))  # ORT aborts on B=0
    with pytest.raises(ValueError):
        model.run(np.zeros((1, 0), dtype=np.int64), model.zero_state(1))
    with pytest.raises(ValueError):
        model.run(np.zeros((2, 1), dtype=np.int64), model.zero_state(1))


@pytest.fixture(scope="module")
def int8_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.conftest import make_models_dir

    return make_models_dir(tmp_path_factory.mktemp("int8"), int8=True)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_int8_artifacts_are_served(int8_models: Path, cell: str) -> None:
    # The bundled models are int8: the engine applies the manifest's session config.
    artifact = ModelArtifact.load(int8_models / cell)
    assert artifact.manifest["quantization"]["type"] == "int8-weights"
    model = OrtModel(artifact, [CPU])
    tokens = ids(model, "i am coming home")
    whole = model.run(np.array([tokens]), model.zero_state(1), want_probs=True)
    state = model.zero_state(1)
    for token in tokens:
        step = model.run(np.array([[token]]), state, want_probs=True)
        state = step.state
    assert step.probs is not None and whole.probs is not None
    np.testing.assert_allclose(step.probs, whole.probs, atol=1e-5)
