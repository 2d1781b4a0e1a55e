"""Shared fixtures: tiny real ONNX artifacts exported from small random-weight models."""

from __future__ import annotations

from pathlib import Path

import pytest

WORDS = (  # noqa: SIM905
    "i am you are he she it we they is was be have has had do does did not no yes the a an "
    "and or but if then so of to in on at for with from by about as into home coming going "
    "go went come time day night year people man woman child world good new first last long "
    "great little own other old right big high small large this that these those what which "
    "who when where why how all any some many much can will would should could may might "
    "must say said get got make made know think see look want give use find tell ask work "
    "seem feel try leave call there here now just like well very really also only even back "
    "still way thing life hand part don't it's i'm well-known hello world cat dog house car "
    "tree water food love "
).split()


def tiny_vocab_tokens() -> list[str]:
    """Specials, punctuation and ~200 common words: enough for readable test texts."""
    seen: list[str] = []
    for word in WORDS:
        if word not in seen:
            seen.append(word)
    return ["<pad>", "<unk>", "</s>", ",", ";", ":", *seen]


def make_models_dir(root: Path, *, int8: bool = False, hidden: int = 32) -> Path:
    """Export a tiny LSTM (2 layers) and GRU (1 layer) with random weights into root/."""
    import torch

    from model_export.export import export_artifact
    from model_export.model import RNNLM, ModelConfig
    from service.contract.vocab import Vocabulary

    vocab = Vocabulary(tiny_vocab_tokens())
    for seed, (cell, layers) in enumerate((("lstm", 2), ("gru", 1))):
        torch.manual_seed(seed)
        model = RNNLM(ModelConfig(len(vocab), cell, 16, hidden, layers, 0.0))
        with torch.no_grad():  # sharper distributions than the default init
            model.embedding.weight.mul_(20)
        export_artifact(
            model,
            vocab,
            root / cell,
            int8=int8,
            extra={"training": {"corpora": [], "note": "random weights for tests"}},
        )
    return root


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models directory with tiny `lstm` and `gru` artifacts (float32)."""
    return make_models_dir(tmp_path_factory.mktemp("models"))
