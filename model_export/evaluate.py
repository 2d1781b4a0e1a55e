"""Perplexity and top-k next-word accuracy of a checkpoint or an exported artifact.

Both are stepped one token at a time through the serving graph (top-k over
suggestible words, the full distribution for perplexity), exactly as the service
runs them. The held-out stream is cut into `rows` parallel rows.

- perplexity: exp of the mean negative log-likelihood over every target token
  (words, punctuation and end-of-sentence; out-of-vocabulary targets as `<unk>`);
- top-k accuracy: over word targets only (what a keyboard suggests); a target
  outside the vocabulary is always a miss, so accuracy compares across vocabularies;
- `start_top3`: top-3 over the word targets that open a sentence (0-4 words of their
  sentence before them; `start_words` of them), where a model has the least context;
- `fresh_start_top3`: the same openings typed from a fresh state (`</s>` first), as the
  service starts every text: the first `FRESH_SENTENCES` sentences, each on its own.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from service.contract.tokenizer import EOS, is_word
from service.contract.vocab import Vocabulary

# step(tokens (B, 1), state) -> (probs (B, V), topk_ids (B, K), new state)
Step = Callable[[np.ndarray, Any], tuple[np.ndarray, np.ndarray, Any]]
KS = (1, 3, 5)
START_WORDS = 5  # a target with fewer words of its sentence before it opens the sentence
FRESH_SENTENCES = 2000


def torch_stepper(model, vocab: Vocabulary) -> tuple[Step, Any]:
    """Step function and zero state for a torch model, through the serving graph."""
    import torch  # noqa: PLC0415

    from model_export.export import ServingGraph  # noqa: PLC0415

    graph = ServingGraph(model.eval(), vocab.suggestible).eval()
    n_state = 2 if model.config.cell == "lstm" else 1

    def step(tokens: np.ndarray, state):
        with torch.inference_mode():
            out = graph(torch.from_numpy(tokens), *state)
        return out[-1].numpy(), out[-2].numpy(), tuple(out[:n_state])

    def zero(batch: int):
        return model.init_state(batch)

    return step, zero


def ort_stepper(artifact_dir: Path) -> tuple[Step, Any, Vocabulary]:
    """Step function and zero state for an exported artifact, through the service's engine."""
    from service.contract.artifact import ModelArtifact  # noqa: PLC0415
    from service.engine.runtime import OrtModel  # noqa: PLC0415

    model = OrtModel(ModelArtifact.load(artifact_dir), ["CPUExecutionProvider"])

    def step(tokens: np.ndarray, state):
        out = model.run(tokens, state, want_probs=True)
        return out.probs, out.topk_ids, out.state

    return step, model.zero_state, model.vocab


def evaluate_stream(
    step: Step,
    zero,
    vocab: Vocabulary,
    tokens: list[str],
    rows: int = 64,
    max_tokens: int = 0,
    desc: str = "evaluate",
) -> dict[str, float]:
    """Metrics over a token stream (see the module docstring)."""
    if max_tokens:
        tokens = tokens[: max_tokens + 1]
    rows = max(1, min(rows, (len(tokens) - 1) // 2))
    length = (len(tokens) - 1) // rows
    ids = np.array(vocab.encode_tokens(tokens), dtype=np.int64)
    word = np.array([is_word(t) for t in tokens])
    known = ids != vocab.unk_id
    opening = sentence_openings(tokens, vocab.eos_id, ids)
    starts = np.arange(rows) * length
    state = zero(rows)
    nll, count, words, oov_words = 0.0, 0, 0, 0
    hits = dict.fromkeys(KS, 0)
    start_words, start_hits = 0, 0
    for t in tqdm(range(length), desc=desc, unit="step", leave=False):
        x = ids[starts + t][:, None]
        target = starts + t + 1
        probs, topk, state = step(x, state)
        y = ids[target]
        nll -= float(np.log(np.maximum(probs[np.arange(rows), y], 1e-30)).sum())
        count += rows
        is_target_word = word[target]
        scorable = is_target_word & known[target]
        words += int(is_target_word.sum())
        oov_words += int((is_target_word & ~known[target]).sum())
        for k in KS:
            hits[k] += int(((topk[:, :k] == y[:, None]).any(1) & scorable).sum())
        opens = is_target_word & opening[target]
        start_words += int(opens.sum())
        start_hits += int(((topk[:, :3] == y[:, None]).any(1) & scorable & opens).sum())
    result = {
        "tokens": count,
        "perplexity": math.exp(nll / max(count, 1)),
        "word_targets": words,
        "oov_rate": oov_words / max(words, 1),
    }
    result.update({f"top{k}": hits[k] / max(words, 1) for k in KS})
    result.update({"start_words": start_words, "start_top3": start_hits / max(start_words, 1)})
    return result


def fresh_start_accuracy(
    step: Step,
    zero,
    vocab: Vocabulary,
    tokens: list[str],
    max_sentences: int = FRESH_SENTENCES,
    rows: int = 256,
) -> dict[str, float]:
    """Top-3 over the openings (first `START_WORDS` words) of the stream's first
    `max_sentences` sentences, each typed from a zero state after `</s>`."""
    sentences: list[list[str]] = []
    current: list[str] = []
    for token in tokens:
        if token == EOS:
            if any(is_word(t) for t in current):
                sentences.append(current)
            current = []
            if len(sentences) == max_sentences:
                break
            continue
        current.append(token)
    openings = []
    for sentence in sentences:
        words = np.cumsum([is_word(t) for t in sentence])
        openings.append(sentence[: int(np.searchsorted(words, START_WORDS)) + 1])
    hits = targets = 0
    for first in range(0, len(openings), rows):
        chunk = openings[first : first + rows]
        length = max(len(o) for o in chunk)
        inputs = np.full((len(chunk), length), vocab.eos_id, dtype=np.int64)
        wanted = np.full((len(chunk), length), -1, dtype=np.int64)  # -1: no word target
        for r, opening in enumerate(chunk):
            ids = vocab.encode_tokens(opening)
            inputs[r, 1 : len(ids)] = ids[:-1]
            for c, (token, token_id) in enumerate(zip(opening, ids)):
                if is_word(token):
                    targets += 1
                    wanted[r, c] = token_id if token_id != vocab.unk_id else -2  # -2: a miss
        state = zero(len(chunk))
        for c in range(length):
            _, topk, state = step(inputs[:, c : c + 1], state)
            hits += int((topk[:, :3] == wanted[:, c : c + 1]).any(1).sum())
    return {"fresh_start_words": targets, "fresh_start_top3": hits / max(targets, 1)}


def sentence_openings(tokens: list[str], eos_id: int, ids: np.ndarray) -> np.ndarray:
    """Per position: whether fewer than `START_WORDS` words of its sentence come before it."""
    opening = np.zeros(len(tokens), dtype=bool)
    before = 0
    for i, token in enumerate(tokens):
        opening[i] = before < START_WORDS
        if ids[i] == eos_id:
            before = 0
        elif is_word(token):
            before += 1
    return opening


def held_out_streams(
    texts: list[str], corpora: list[str], split: str, nltk_data: str | None
) -> dict[str, list[str]]:
    """Named token streams: text files by path, and a split of named corpora."""
    from model_export.corpora import load_splits, text_tokens  # noqa: PLC0415

    streams = {Path(t).name: text_tokens(Path(t)) for t in texts}
    if corpora:
        streams[f"{'+'.join(corpora)}:{split}"] = load_splits(corpora, nltk_data)[split]
    return streams


def evaluate(
    checkpoint: str | None,
    artifact: str | None,
    texts: list[str],
    corpora: list[str],
    split: str = "test",
    nltk_data: str | None = None,
    rows: int = 64,
    max_tokens: int = 0,
    record: bool = False,
    record_in: str | None = None,
    record_key: str = "metrics",
) -> dict[str, dict[str, float]]:
    """Evaluate one checkpoint or artifact on every stream.

    With `record`, the metrics go into the manifest of the evaluated artifact, or of
    `record_in` (e.g. a float32 export's figures beside its int8 artifact's, under
    `record_key`, so the manifest records what int8 costs).
    """
    if (checkpoint is None) == (artifact is None):
        raise ValueError(
            "give exactly one of a checkpoint (run directory) or an artifact directory"
        )
    if checkpoint:
        from model_export.checkpoint import load_checkpoint  # noqa: PLC0415

        model, vocab, _ = load_checkpoint(checkpoint)
        step, zero = torch_stepper(model, vocab)
    else:
        step, zero, vocab = ort_stepper(Path(artifact))  # type: ignore[arg-type]
    results = {}
    for name, stream in held_out_streams(texts, corpora, split, nltk_data).items():
        results[name] = evaluate_stream(step, zero, vocab, stream, rows, max_tokens, desc=name)
        results[name].update(fresh_start_accuracy(step, zero, vocab, stream))
        print(f"{name}: " + ", ".join(f"{k} {v:.4g}" for k, v in results[name].items()))
    target = record_in or (artifact if record else None)
    if target:
        record_metrics(Path(target), record_key, results)
    return results


def record_metrics(artifact_dir: Path, key: str, results: dict[str, dict[str, float]]) -> None:
    """Merge metrics into an artifact's manifest.json under `key`."""
    path = artifact_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.setdefault(key, {}).update(results)
    path.write_text(json.dumps(manifest, indent=2) + "\n")
