"""OrtModel invariants on each execution provider: CPU always, CUDA where a GPU is usable.

The serving invariants (a prefill equals stepping, batch rows are independent) hold to
1e-4 on CUDA too, and CUDA agrees with CPU to 1e-4: ORT's CUDA provider would use TF32
by default (about 1e-3 off), so OrtModel turns it off unless `allow_tf32` is given.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.contract.artifact import ModelArtifact
from service.engine import runtime
from service.engine.runtime import CPU, CUDA, OrtModel, StepOutput
from tests.gpu_support import provider_params, providers_for

ATOL = 1e-4


@pytest.fixture(scope="module", params=["lstm", "gru"])
def cell(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module", params=provider_params())
def provider(request: pytest.FixtureRequest) -> str:
    return request.param


def load(tiny_artifacts: Path, cell: str, provider: str, **kwargs: bool) -> OrtModel:
    model = OrtModel(ModelArtifact.load(tiny_artifacts / cell), providers_for(provider), **kwargs)
    assert model.on_cuda == (provider == "cuda"), model.providers
    return model


@pytest.fixture(scope="module")
def model(tiny_artifacts: Path, cell: str, provider: str) -> OrtModel:
    return load(tiny_artifacts, cell, provider)


@pytest.fixture(scope="module", params=provider_params(cpu=False))
def cuda_model(request: pytest.FixtureRequest, tiny_artifacts: Path, cell: str) -> OrtModel:
    return load(tiny_artifacts, cell, request.param)


def text_ids(model: OrtModel) -> list[int]:
    return [model.eos_id, *model.vocab.encode("i am coming home to see you , and the world")]


def random_batch(model: OrtModel, batch: int) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, len(model.vocab), size=(batch, 3))
    state = tuple(
        rng.standard_normal((model.layers, batch, model.hidden_size)).astype(np.float32) * 0.5
        for _ in model.state_inputs
    )
    return tokens, state


def assert_same(a: StepOutput, b: StepOutput) -> None:
    assert a.probs is not None and b.probs is not None
    np.testing.assert_allclose(a.probs, b.probs, atol=ATOL)
    np.testing.assert_allclose(a.topk_probs, b.topk_probs, atol=ATOL)
    for x, y in zip(a.state, b.state):
        np.testing.assert_allclose(x, y, atol=ATOL)


def test_prefill_equals_stepping(model: OrtModel) -> None:
    tokens = text_ids(model)
    whole = model.run(np.array([tokens]), model.zero_state(1), want_probs=True)
    state = model.zero_state(1)
    step: StepOutput | None = None
    for token in tokens:
        step = model.run(np.array([[token]]), state, want_probs=True)
        state = step.state
    assert step is not None
    assert_same(step, whole)


def test_rows_of_a_batch_equal_each_alone(model: OrtModel) -> None:
    batch = 16
    tokens, state = random_batch(model, batch)
    together = model.run(tokens, state, want_probs=True)
    assert together.probs is not None
    for i in range(batch):
        alone = model.run(tokens[i : i + 1], tuple(a[:, i : i + 1] for a in state), True)
        assert alone.probs is not None
        np.testing.assert_allclose(alone.probs[0], together.probs[i], atol=ATOL)
        for a, b in zip(alone.state, together.state):
            np.testing.assert_allclose(a[:, 0], b[:, i], atol=ATOL)


def test_cuda_equals_cpu(cuda_model: OrtModel, tiny_artifacts: Path, cell: str) -> None:
    cpu_model = load(tiny_artifacts, cell, "cpu")
    # A prefill, stepping, and a batch with random states.
    tokens = np.array([text_ids(cpu_model)])
    assert_same(
        cuda_model.run(tokens, cuda_model.zero_state(1), want_probs=True),
        cpu_model.run(tokens, cpu_model.zero_state(1), want_probs=True),
    )
    cuda_state, cpu_state = cuda_model.zero_state(1), cpu_model.zero_state(1)
    for token in tokens[0]:
        on_cuda = cuda_model.run(np.array([[token]]), cuda_state, want_probs=True)
        on_cpu = cpu_model.run(np.array([[token]]), cpu_state, want_probs=True)
        assert_same(on_cuda, on_cpu)
        cuda_state, cpu_state = on_cuda.state, on_cpu.state
    batch_tokens, state = random_batch(cpu_model, 64)
    assert_same(
        cuda_model.run(batch_tokens, state, want_probs=True),
        cpu_model.run(batch_tokens, state, want_probs=True),
    )


def test_tf32_is_off_unless_allowed(cuda_model: OrtModel, tiny_artifacts: Path) -> None:
    assert cuda_model.session.get_provider_options()[CUDA]["use_tf32"] == "0"
    allowed = load(tiny_artifacts, cuda_model.cell, "cuda", allow_tf32=True)
    assert allowed.session.get_provider_options()[CUDA]["use_tf32"] == "1"


@pytest.mark.parametrize("allow", [False, True])
def test_tf32_option_is_requested(
    monkeypatch: pytest.MonkeyPatch, tiny_artifacts: Path, allow: bool
) -> None:
    # Runs without a GPU: what OrtModel asks ORT for (the session itself is made on CPU).
    requested: list[object] = []
    real = runtime.ort.InferenceSession

    def recording(path: str, options: object, providers: list[object]) -> object:
        requested.extend(providers)
        return real(path, options, providers=[CPU])

    monkeypatch.setattr(runtime.ort, "InferenceSession", recording)
    OrtModel(ModelArtifact.load(tiny_artifacts / "gru"), [CUDA, CPU], allow_tf32=allow)
    assert requested == [(CUDA, {"use_tf32": "1" if allow else "0"}), CPU]
