"""Reading a training run directory (best.pt + config.json + vocab.txt)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from model_export.model import RNNLM, ModelConfig
from service.contract.vocab import Vocabulary


def load_checkpoint(run_dir: Path | str) -> tuple[RNNLM, Vocabulary, dict]:
    """The best model of a run (eval mode), its vocabulary and its config JSON."""
    run_dir = Path(run_dir)
    for name in ("best.pt", "config.json", "vocab.txt"):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"{run_dir / name}: missing (is {run_dir} a training run?)")
    config = json.loads((run_dir / "config.json").read_text())
    model = RNNLM(ModelConfig(**config["model"]))
    model.load_state_dict(torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True))
    model.eval()
    return model, Vocabulary.load(run_dir / "vocab.txt"), config
