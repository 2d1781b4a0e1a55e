"""The models a benchmark serves: the bundled ones, or random-weight stand-ins.

Where the bundled models are absent (a clone before `make train-bundled`), random-weight
artifacts are exported into a temporary directory instead, and the note says so: "tiny"
(model_export.tiny: a 2x32 LSTM and a 1x32 GRU over ~200 words, the model costs almost
nothing) or "full" (random weights at the bundled models' sizes, int8 like them: the same
cost per step as the real models).
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from service.config import BUNDLED_MODELS

FALLBACKS = ("tiny", "full")
# The sizes the bundled models are trained at (runs/*/config.json of `make train-bundled`).
FULL_SIZES = {
    "lstm": {"vocab_size": 12_000, "embedding_size": 256, "hidden_size": 512, "layers": 2},
    "gru": {"vocab_size": 12_000, "embedding_size": 256, "hidden_size": 512, "layers": 1},
}


def has_models(models_dir: Path) -> bool:
    """Whether a directory holds at least one artifact (a subdirectory with a manifest)."""
    return models_dir.is_dir() and any(models_dir.glob("*/manifest.json"))


def export_full_models(root: Path) -> Path:
    """Random-weight artifacts at the bundled models' sizes (int8, as bundled) in root/."""
    import torch

    from model_export.export import export_artifact
    from model_export.model import RNNLM, ModelConfig
    from service.contract.tokenizer import SPECIALS
    from service.contract.vocab import Vocabulary

    for seed, (cell, sizes) in enumerate(FULL_SIZES.items()):
        n_words = sizes["vocab_size"] - len(SPECIALS)
        vocab = Vocabulary([*SPECIALS, *(f"w{i}" for i in range(n_words))])
        torch.manual_seed(seed)
        model = RNNLM(ModelConfig(cell=cell, dropout=0.0, **sizes))
        export_artifact(
            model,
            vocab,
            root / cell,
            int8=True,
            extra={"training": {"corpora": [], "note": "random weights (benchmark)"}},
        )
    return root


@contextmanager
def tiny_models(hidden: int = 32) -> Iterator[Path]:
    """A temporary directory of tiny random-weight `lstm` and `gru` artifacts."""
    from model_export.tiny import export_tiny_models

    with tempfile.TemporaryDirectory(prefix="nextword-bench-tiny-") as tmp:
        yield export_tiny_models(Path(tmp), hidden=hidden)


@contextmanager
def models_dir(requested: Path | None, fallback: str) -> Iterator[tuple[Path, str]]:
    """(directory of the models to serve, a line saying what they are)."""
    if requested is not None:
        if not has_models(requested):
            sys.exit(f"{requested}: no model artifacts (subdirectories with manifest.json)")
        yield requested, f"models: {requested}"
        return
    if has_models(BUNDLED_MODELS):
        yield BUNDLED_MODELS, f"models: bundled ({BUNDLED_MODELS})"
        return
    print(
        f"no bundled models in {BUNDLED_MODELS}: exporting {fallback} random-weight artifacts",
        file=sys.stderr,
        flush=True,
    )
    if fallback == "tiny":
        with tiny_models() as root:
            yield (
                root,
                "models: NO BUNDLED MODELS - tiny random-weight artifacts (model_export.tiny: "
                "LSTM 2x32, GRU 1x32, ~200 words): the model costs almost nothing",
            )
        return
    with tempfile.TemporaryDirectory(prefix="nextword-bench-models-") as tmp:
        yield (
            export_full_models(Path(tmp)),
            "models: NO BUNDLED MODELS - random weights at the bundled sizes, int8 "
            "(LSTM 2x512, GRU 1x512, embedding 256, vocab 12,000): same cost per step",
        )
