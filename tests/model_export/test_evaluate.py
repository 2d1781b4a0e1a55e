"""Evaluation: checkpoint and exported artifact agree; out-of-vocabulary targets are misses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from model_export.evaluate import evaluate_stream, ort_stepper, torch_stepper
from model_export.export import export_artifact
from model_export.model import RNNLM, ModelConfig
from service.contract.tokenizer import tokenize
from service.contract.vocab import Vocabulary
from tests.conftest import tiny_vocab_tokens

TEXT = "i am coming home. the cat and the dog are good. you are very good, and she is not." * 8


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_checkpoint_and_artifact_give_the_same_metrics(tmp_path: Path, cell: str) -> None:
    vocab = Vocabulary(tiny_vocab_tokens())
    model = RNNLM(ModelConfig(len(vocab), cell, 16, 24, 1, 0.0)).eval()
    export_artifact(model, vocab, tmp_path / cell)
    stream = ["</s>", *tokenize(TEXT)]
    a = evaluate_stream(*torch_stepper(model, vocab), vocab, stream, rows=4)
    step, zero, art_vocab = ort_stepper(tmp_path / cell)
    b = evaluate_stream(step, zero, art_vocab, stream, rows=4)
    assert a["tokens"] == b["tokens"] and a["word_targets"] == b["word_targets"]
    assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-4)
    for k in ("top1", "top3", "top5"):
        assert a[k] == pytest.approx(b[k], abs=0.01)


def test_oracle_scores_every_known_word_and_misses_unknown_ones() -> None:
    vocab = Vocabulary(tiny_vocab_tokens())
    stream = ["</s>", *tokenize("the cat zebra and the dog quux home.")]
    ids = vocab.encode_tokens(stream)
    position = {"t": 0}

    def oracle(tokens: np.ndarray, state):
        # One row: knows the next token; puts all mass (and top-1) on it.
        nxt = ids[position["t"] + 1]
        position["t"] += 1
        probs = np.full((1, len(vocab)), 1e-9, np.float32)
        probs[0, nxt] = 1.0
        return probs, np.array([[nxt, 3, 4, 5, 6]]), state

    result = evaluate_stream(oracle, lambda b: None, vocab, stream, rows=1)
    words = [t for t in stream[1:] if t not in ("</s>", ",")]
    assert result["word_targets"] == len(words)
    unknown = sum(vocab.index.get(w) is None for w in words)  # zebra, quux
    assert unknown == 2
    assert result["top1"] == pytest.approx((len(words) - unknown) / len(words))
    assert result["oov_rate"] == pytest.approx(unknown / len(words))


def test_sentence_openings_are_scored_apart() -> None:
    vocab = Vocabulary(tiny_vocab_tokens())
    # 7 words, then a sentence of 2: openings are the first 5 words of each sentence
    stream = ["</s>", *tokenize("the cat and the dog are good. you are.")]
    ids = vocab.encode_tokens(stream)
    position = {"t": 0}

    def oracle_late(tokens: np.ndarray, state):
        # Knows the next token only past the fifth word of a sentence.
        t = position["t"] = position["t"] + 1
        probs = np.full((1, len(vocab)), 1e-9, np.float32)
        best = ids[t] if t in (6, 7) else vocab.index["home"]
        probs[0, best] = 1.0
        return probs, np.array([[best, 3, 4]]), state

    result = evaluate_stream(oracle_late, lambda b: None, vocab, stream, rows=1)
    assert result["start_words"] == 5 + 2
    assert result["start_top3"] == 0.0 and result["top3"] == pytest.approx(2 / 9)


def test_fresh_start_openings_are_typed_from_a_zero_state() -> None:
    from model_export.evaluate import fresh_start_accuracy

    vocab = Vocabulary(tiny_vocab_tokens())
    # three sentences; the openings are their first 5 words ("zebra": out of vocabulary)
    stream = ["</s>", *tokenize("the cat and the dog are good. you are. the zebra, is home.")]
    follows = {"</s>": "the", "the": "cat", "and": "the", "you": "are", "is": "home"}
    zeros: list[int] = []

    def bigram(tokens: np.ndarray, state):
        # Knows the word after some words; the state counts the steps since a zero state.
        assert state.shape == (tokens.shape[0],)
        best = [vocab.index[follows.get(vocab.tokens[t], "dog")] for t in tokens[:, 0]]
        return None, np.array([[b, 3, 4] for b in best]), state + 1

    def zero(batch: int):
        zeros.append(batch)
        return np.zeros(batch)

    result = fresh_start_accuracy(bigram, zero, vocab, stream, rows=2)
    assert zeros == [2, 1]  # each chunk of sentences starts from a zero state
    # openings: the cat and the dog | you are | the zebra is home
    assert result["fresh_start_words"] == 5 + 2 + 4
    # hits: the (after </s>), cat, the (after "and") | are | the, home
    assert result["fresh_start_top3"] == pytest.approx((3 + 1 + 2) / 11)
    one = fresh_start_accuracy(bigram, zero, vocab, stream, max_sentences=1)
    assert one == {"fresh_start_words": 5, "fresh_start_top3": 3 / 5}


def test_metrics_can_be_recorded_in_another_artifacts_manifest(tmp_path: Path) -> None:
    import json

    from model_export.evaluate import evaluate

    vocab = Vocabulary(tiny_vocab_tokens())
    model = RNNLM(ModelConfig(len(vocab), "gru", 8, 8, 1, 0.0)).eval()
    export_artifact(model, vocab, tmp_path / "float32")
    export_artifact(model, vocab, tmp_path / "int8", int8=True)
    text = tmp_path / "held_out.txt"
    text.write_text(TEXT)
    evaluate(None, str(tmp_path / "int8"), [str(text)], [], record=True)
    evaluate(
        None,
        str(tmp_path / "float32"),
        [str(text)],
        [],
        record_in=str(tmp_path / "int8"),
        record_key="metrics_float32",
    )
    manifest = json.loads((tmp_path / "int8" / "manifest.json").read_text())
    assert set(manifest["metrics"]) == set(manifest["metrics_float32"]) == {"held_out.txt"}
    assert "metrics_float32" not in json.loads((tmp_path / "float32" / "manifest.json").read_text())
    from service.contract.artifact import ModelArtifact

    ModelArtifact.load(tmp_path / "int8")  # recording metrics keeps the artifact valid
