"""Tiny random-weight LSTM and GRU artifacts: the test suite's models, and a near-free model
for benchmarks that measure everything around the model.

Real artifacts (exported, verified, with manifest and vocabulary) over ~200 common words;
at the default hidden size of 32 a step costs microseconds. Only the export needs torch.
"""

from __future__ import annotations

from pathlib import Path

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
CELLS = (("lstm", 2), ("gru", 1))  # (cell, layers): one artifact each, named after the cell
EMBEDDING_SIZE = 16


def tiny_vocab_tokens() -> list[str]:
    """Specials, punctuation and ~200 common words: enough for readable test texts."""
    seen: list[str] = []
    for word in WORDS:
        if word not in seen:
            seen.append(word)
    return ["<pad>", "<unk>", "</s>", ",", ";", ":", *seen]


def export_tiny_models(root: Path, *, hidden: int = 32, int8: bool = False) -> Path:
    """Export a tiny LSTM (2 layers) and GRU (1 layer) with random weights into root/lstm and
    root/gru; `hidden` is their hidden size. Returns root."""
    import torch

    from model_export.export import export_artifact
    from model_export.model import RNNLM, ModelConfig
    from service.contract.vocab import Vocabulary

    vocab = Vocabulary(tiny_vocab_tokens())
    for seed, (cell, layers) in enumerate(CELLS):
        torch.manual_seed(seed)
        model = RNNLM(ModelConfig(len(vocab), cell, EMBEDDING_SIZE, hidden, layers, 0.0))
        with torch.no_grad():  # sharper distributions than the default init
            model.embedding.weight.mul_(20)
        export_artifact(
            model,
            vocab,
            root / cell,
            int8=int8,
            extra={"training": {"corpora": [], "note": f"random weights, hidden {hidden}"}},
        )
    return root
