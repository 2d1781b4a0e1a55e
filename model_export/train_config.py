"""Settings of a training run (no torch here: the CLI builds its options from them)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrainConfig:
    """Every setting of a training run (saved in config.json)."""

    corpora: list[str] = field(default_factory=lambda: ["brown"])
    out: str = "runs/lstm"
    nltk_data: str | None = None
    cell: str = "lstm"
    vocab_size: int = 12000
    min_count: int = 2
    embedding_size: int = 256
    hidden_size: int = 512
    layers: int = 2
    dropout: float = 0.1
    batch_size: int = 32
    bptt: int = 35
    fresh_rows: int = 0  # rows a batch adds that start at a sentence from a zero state
    epochs: int = 3
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 200
    weight_decay: float = 0.01
    clip: float = 0.5
    eval_interval: int = 0  # steps between validations; 0 = once per epoch
    eval_text: str | None = None  # held-out text whose top-k is measured at each validation
    eval_text_tokens: int = 0  # evaluate only its first N tokens (0 = all)
    checkpoint_interval: int = 200  # steps between resumable checkpoints
    max_steps: int = 0  # stop after this many steps (0 = no limit)
    seed: int = 1234
    threads: int = 0  # torch threads (0 = torch's default)
