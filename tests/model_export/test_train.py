"""Training: a tiny corpus trains in seconds, its loss falls, an interrupted run resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import model_export.train as train_module
from model_export.train import build_vocab, train
from model_export.train_config import TrainConfig

SENTENCES = [
    "the cat sat on the mat.",
    "the dog sat on the log.",
    "i am coming home now.",
    "we are going home today.",
    "the cat and the dog are friends.",
    "you are very good.",
    "she is coming home soon.",
    "they went home early!",
    "is the dog at home?",
]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.txt"
    lines = [SENTENCES[(i * 7) % len(SENTENCES)] for i in range(600)]
    path.write_text("\n".join(lines))
    return path


def _config(corpus: Path, out: Path, **kw) -> TrainConfig:
    base = dict(
        corpora=[str(corpus)],
        out=str(out),
        vocab_size=100,
        min_count=1,
        embedding_size=16,
        hidden_size=24,
        layers=1,
        dropout=0.0,
        batch_size=8,
        bptt=10,
        epochs=1,
        lr=1e-2,
        warmup_steps=5,
        checkpoint_interval=10,
        eval_interval=20,
        threads=1,
    )
    base.update(kw)
    return TrainConfig(**base)


def test_loss_falls_and_artifacts_are_written(corpus: Path, tmp_path: Path) -> None:
    result = train(_config(corpus, tmp_path / "run", cell="gru", epochs=2))
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    train_losses = [h["loss"] for h in history if h["kind"] == "train"]
    valid = [h for h in history if h["kind"] == "valid"]
    assert len(valid) >= 2 and valid[-1]["loss"] < valid[0]["loss"]
    assert train_losses[-1] < train_losses[0] - 0.5
    assert result["valid_ppl"] < 20
    for name in ("best.pt", "last.pt", "config.json", "vocab.txt", "curve.png"):
        assert (tmp_path / "run" / name).is_file(), name
    # best.pt is a plain state_dict: loadable with weights_only=True (no pickled module)
    state = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert "embedding.weight" in state


def test_interrupted_run_resumes_where_it_stopped(
    corpus: Path, tmp_path: Path, monkeypatch
) -> None:
    cfg = _config(corpus, tmp_path / "ref", max_steps=40)
    train(cfg)
    reference = torch.load(tmp_path / "ref" / "last.pt", weights_only=False)["model"]

    real_lr_at = train_module.lr_at

    def interrupt_at_25(step, total, config):
        if step == 25:
            raise KeyboardInterrupt
        return real_lr_at(step, total, config)

    monkeypatch.setattr(train_module, "lr_at", interrupt_at_25)
    with pytest.raises(KeyboardInterrupt):
        train(_config(corpus, tmp_path / "cut", max_steps=40))
    assert torch.load(tmp_path / "cut" / "last.pt", weights_only=False)["step"] == 20
    monkeypatch.setattr(train_module, "lr_at", real_lr_at)
    train(_config(corpus, tmp_path / "cut", max_steps=40))
    resumed = torch.load(tmp_path / "cut" / "last.pt", weights_only=False)
    assert resumed["step"] == 40
    for name, tensor in reference.items():
        torch.testing.assert_close(resumed["model"][name], tensor, rtol=1e-5, atol=1e-6)


def test_vocabulary_cap_and_min_count() -> None:
    tokens = ["a"] * 5 + ["b"] * 3 + ["c"] * 1 + ["</s>"] * 4
    vocab = build_vocab(tokens, max_size=5, min_count=2)
    assert vocab.tokens == ["<pad>", "<unk>", "</s>", "a", "b"]
    assert build_vocab(tokens, max_size=4, min_count=1).tokens == ["<pad>", "<unk>", "</s>", "a"]


def test_held_out_text_is_measured_at_each_validation(corpus: Path, tmp_path: Path) -> None:
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("the cat sat on the mat.\nthe dog sat on the log.\n" * 20)
    train(_config(corpus, tmp_path / "run", epochs=2, eval_text=str(held_out)))
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    valid = [h for h in history if h["kind"] == "valid"]
    assert len(valid) >= 2
    for entry in valid:
        assert set(entry["text"]) >= {"top1", "top3", "perplexity", "oov_rate"}
    # the tiny corpus holds these sentences: a model that learned them predicts them
    assert valid[-1]["text"]["top3"] > valid[0]["text"]["top3"]
    assert valid[-1]["text"]["top3"] > 0.3  # guessing among its ~25 words: ~0.12


def test_fresh_rows_start_at_a_sentence_from_a_zero_state() -> None:
    from model_export.model import RNNLM, ModelConfig
    from model_export.train import with_fresh_rows

    cfg = TrainConfig(batch_size=2, bptt=4, fresh_rows=3)
    eos = 2
    ids = torch.tensor([2, 5, 6, 2, 7, 8, 9, 2, 5, 5, 6, 7, 8, 9, 9, 9])
    starts = (ids[: -cfg.bptt - 1] == eos).nonzero().flatten()
    model = RNNLM(ModelConfig(10, "lstm", 4, 6, 1, 0.0))
    x, y = torch.ones(2, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.long)
    carried = (torch.ones(1, 2, 6), torch.ones(1, 2, 6))
    bx, by, state = with_fresh_rows(model, ids, starts, cfg, x, y, carried)
    assert bx.shape == by.shape == (5, 4)
    assert torch.equal(bx[:2], x) and torch.equal(by[:2], y)
    for row_x, row_y in zip(bx[2:], by[2:]):
        assert row_x[0] == eos  # each fresh row opens at a sentence start
        start = int(next(p for p in starts if torch.equal(ids[p : p + 4], row_x)))
        assert torch.equal(row_y, ids[start + 1 : start + 5])  # its targets: the next tokens
    for s in state:
        assert s.shape == (1, 5, 6)
        assert torch.equal(s[:, :2], torch.ones(1, 2, 6)) and not s[:, 2:].any()


def test_a_run_with_fresh_rows_learns_and_resumes_where_it_stopped(
    corpus: Path, tmp_path: Path, monkeypatch
) -> None:
    result = train(_config(corpus, tmp_path / "run", cell="gru", epochs=2, fresh_rows=4))
    assert result["valid_ppl"] < 20
    cfg = _config(corpus, tmp_path / "ref", max_steps=30, fresh_rows=4)
    train(cfg)
    reference = torch.load(tmp_path / "ref" / "last.pt", weights_only=False)["model"]
    real_lr_at = train_module.lr_at

    def interrupt_at_15(step, total, config):
        if step == 15:
            raise KeyboardInterrupt
        return real_lr_at(step, total, config)

    monkeypatch.setattr(train_module, "lr_at", interrupt_at_15)
    with pytest.raises(KeyboardInterrupt):
        train(_config(corpus, tmp_path / "cut", max_steps=30, fresh_rows=4))
    monkeypatch.setattr(train_module, "lr_at", real_lr_at)
    train(_config(corpus, tmp_path / "cut", max_steps=30, fresh_rows=4))
    resumed = torch.load(tmp_path / "cut" / "last.pt", weights_only=False)
    assert resumed["step"] == 30
    for name, tensor in reference.items():
        torch.testing.assert_close(resumed["model"][name], tensor, rtol=1e-5, atol=1e-6)
