"""Word-level recurrent language model (LSTM or GRU) with tied embeddings. No I/O."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

State = tuple[torch.Tensor, ...]  # (h,) for a GRU, (h, c) for an LSTM; each (L, B, H)


@dataclass
class ModelConfig:
    """Sizes of an `RNNLM`."""

    vocab_size: int
    cell: str = "lstm"  # "lstm" or "gru"
    embedding_size: int = 256
    hidden_size: int = 512
    layers: int = 2
    dropout: float = 0.1

    def to_dict(self) -> dict:
        return asdict(self)


class RNNLM(nn.Module):
    """Embedding -> LSTM/GRU -> (projection to embedding size) -> tied output layer.

    The projection is a separate `nn.Linear` rather than `nn.LSTM(proj_size=...)`
    so that the recurrent layers export to native ONNX `LSTM`/`GRU` nodes.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.cell not in ("lstm", "gru"):
            raise ValueError(f"cell must be 'lstm' or 'gru', not {config.cell!r}")
        self.config = config
        c = config
        self.embedding = nn.Embedding(c.vocab_size, c.embedding_size)
        rnn_cls = nn.LSTM if c.cell == "lstm" else nn.GRU
        self.rnn = rnn_cls(
            c.embedding_size,
            c.hidden_size,
            c.layers,
            dropout=c.dropout if c.layers > 1 else 0.0,
            batch_first=True,
        )
        self.projection = (
            nn.Linear(c.hidden_size, c.embedding_size, bias=False)
            if c.hidden_size != c.embedding_size
            else nn.Identity()
        )
        self.decoder = nn.Linear(c.embedding_size, c.vocab_size)
        self.decoder.weight = self.embedding.weight  # tied input/output embeddings
        self.drop = nn.Dropout(c.dropout)
        nn.init.uniform_(self.embedding.weight, -0.05, 0.05)
        nn.init.zeros_(self.decoder.bias)

    def init_state(self, batch: int, device: torch.device | str = "cpu") -> State:
        """Zero state for `batch` rows."""
        c = self.config
        zeros = torch.zeros(c.layers, batch, c.hidden_size, device=device)
        return (zeros, zeros.clone()) if c.cell == "lstm" else (zeros,)

    def features(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """tokens (B, T) int64 -> output features (B, T, E) before the tied decoder, new state."""
        x = self.drop(self.embedding(tokens))  # (B, T, E)
        rnn_state = state if self.config.cell == "lstm" else state[0]
        y, new_state = self.rnn(x, rnn_state)  # (B, T, H)
        y = self.projection(self.drop(y))  # (B, T, E)
        return y, (tuple(new_state) if self.config.cell == "lstm" else (new_state,))

    def forward(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """tokens (B, T) int64 -> logits (B, T, V), new state."""
        y, new_state = self.features(tokens, state)
        return self.decoder(y), new_state  # (B, T, V)
