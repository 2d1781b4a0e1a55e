"""Shared fixtures: tiny real ONNX artifacts exported from small random-weight models."""

from __future__ import annotations

from pathlib import Path

import pytest

# Tests import these two from here: `from tests.conftest import make_models_dir, tiny_vocab_tokens`.
from model_export.tiny import export_tiny_models as make_models_dir
from model_export.tiny import tiny_vocab_tokens

__all__ = ["make_models_dir", "tiny_vocab_tokens"]


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models directory with tiny `lstm` and `gru` artifacts (float32)."""
    return make_models_dir(tmp_path_factory.mktemp("models"))
