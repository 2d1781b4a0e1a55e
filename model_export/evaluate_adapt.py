"""Evaluation of suggestions that learn the writer (`nextword evaluate --adapt`).

Each held-out document is typed as a writer would type it: one session (one cache) per
document, never reset inside it, documents run in parallel rows (a row takes the next
document when its own ends). Every step runs the artifact through the service's engine
(`OrtModel`) and the cache through the service's own functions (`service.engine.adapt`:
`oov_keys`, `update`, `top_k`, `probability`), so the figures are those of what the
service serves. One pass scores the model without adaptation and any number of
parameter sets with it (the model's outputs are shared; `tune_adapt` relies on this).

Targets are every token after a document's first; word targets (what a keyboard
suggests) split into in-vocabulary (IV) and out-of-vocabulary (OOV) ones:

- top-k: an IV target is a hit when its id is among the k suggestions; an OOV target
  when a suggested typed word normalizes to it (only the cache can suggest one: without
  adaptation OOV targets are always misses). A WikiText `<unk>` is no typed word: never
  remembered, always a miss (counted in `oov_untyped`).
- echo_top3: the share of suggestion lists, after a word, whose top 3 holds that word
  again (the word just typed suggested as the next one).
- perplexity: over every target with OOV ones as the `<unk>` class (the mixture's mass
  on it: the model's share of `<unk>` plus the cache's on typed words), as
  `evaluate_stream` counts it; `perplexity_iv` over IV targets only, comparable with
  and without adaptation.
- `perplexity_oov_cached`: over the OOV targets the cache holds when they come (typed
  before in the document and not dropped since; `oov_cached` of them), the mixture's
  probability of the exact typed word; `perplexity_oov_cached_unk` is the model's
  probability of the whole `<unk>` class for the same targets, an upper bound on what
  the model alone gives the word. OOV targets the cache does not hold (first
  occurrences, dropped ones, `<unk>`) are in neither: they are top-k misses both ways.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from model_export.corpora import WIKITEXT_UNK
from service.contract.tokenizer import is_word
from service.contract.vocab import Vocabulary
from service.engine import adapt
from service.engine.adapt import AdaptParams

KS = (1, 3, 5)
TYPED_OOV = -2  # a document key: a typed out-of-vocabulary word (its key depends on the table)


@dataclass
class Tally:
    """Sums over the targets of one configuration (the model alone, or one param set)."""

    nll: float = 0.0  # every target; OOV ones as the <unk> class
    targets: int = 0
    nll_iv: float = 0.0
    iv_targets: int = 0
    nll_oov_cached: float = 0.0  # the exact typed word, for OOV targets the cache holds
    nll_oov_cached_unk: float = 0.0  # the model's <unk> class for the same targets
    oov_cached: int = 0
    words: int = 0
    iv_words: int = 0
    oov_words: int = 0
    oov_untyped: int = 0
    hits: dict[int, int] = field(default_factory=lambda: dict.fromkeys(KS, 0))
    hits_iv: dict[int, int] = field(default_factory=lambda: dict.fromkeys(KS, 0))
    hits_oov: dict[int, int] = field(default_factory=lambda: dict.fromkeys(KS, 0))
    after_word: int = 0  # suggestion lists given right after a word
    echoes: int = 0  # ... whose top 3 holds that word again

    def metrics(self) -> dict[str, float]:
        """The figures (see the module docstring)."""

        def ppl(nll: float, n: int) -> float:
            return math.exp(nll / n) if n else float("nan")

        out: dict[str, float] = {
            "perplexity": ppl(self.nll, self.targets),
            "perplexity_iv": ppl(self.nll_iv, self.iv_targets),
        }
        for k in KS:
            out[f"top{k}"] = self.hits[k] / max(self.words, 1)
            out[f"top{k}_iv"] = self.hits_iv[k] / max(self.iv_words, 1)
            out[f"top{k}_oov"] = self.hits_oov[k] / max(self.oov_words, 1)
        out["echo_top3"] = self.echoes / max(self.after_word, 1)
        if self.oov_cached:
            out["oov_cached"] = self.oov_cached
            out["perplexity_oov_cached"] = ppl(self.nll_oov_cached, self.oov_cached)
            out["perplexity_oov_cached_unk"] = ppl(self.nll_oov_cached_unk, self.oov_cached)
        return out

    def counts(self) -> dict[str, int]:
        """How many targets of each kind."""
        return {
            "targets": self.targets,
            "word_targets": self.words,
            "iv_word_targets": self.iv_words,
            "oov_word_targets": self.oov_words,
            "oov_untyped": self.oov_untyped,
        }


@dataclass(frozen=True)
class EncodedDocument:
    """A document's tokens as the evaluation needs them."""

    name: str
    tokens: list[str]
    ids: np.ndarray  # (N,) int64 vocabulary ids (<unk> when unknown): the model's input
    keys: np.ndarray  # (N,) int32 cache keys: a suggestible id, -1 (not remembered), TYPED_OOV
    words: np.ndarray  # (N,) bool: a word target


def encode_document(name: str, tokens: list[str], vocab: Vocabulary) -> EncodedDocument:
    """Ids, cache keys and word flags of a token stream."""
    ids = np.array(vocab.encode_tokens(tokens), dtype=np.int64)
    keys = np.where(vocab.suggestible[ids], ids, adapt.EMPTY).astype(np.int32)
    typed = [t != WIKITEXT_UNK and is_word(t) for t in tokens]
    keys[(ids == vocab.unk_id) & np.array(typed, dtype=bool)] = TYPED_OOV
    words = np.array([is_word(t) for t in tokens], dtype=bool)
    return EncodedDocument(name, tokens, ids, keys, words)


class _Sessions:
    """The caches of every row for one parameter set, with their typed-word tables."""

    def __init__(self, params: AdaptParams, rows: int) -> None:
        self.params = params
        self.keys, self.weights = adapt.empty_cache(rows, params.capacity)
        self.tables: list[list[str]] = [[] for _ in range(rows)]
        self.tally = Tally()

    def reset(self, row: int) -> None:
        self.keys[row] = adapt.EMPTY
        self.weights[row] = 0.0
        self.tables[row] = []

    def slot_key(self, row: int, token: str, vocab_size: int) -> int:
        """The key of a typed word in a row's table (-1 when absent)."""
        table = self.tables[row]
        return vocab_size + table.index(token) if token in table else adapt.EMPTY


def evaluate_documents(
    model: Any,
    documents: Sequence[tuple[str, list[str]]],
    params_list: Sequence[AdaptParams],
    rows: int = 64,
    desc: str = "evaluate --adapt",
) -> tuple[Tally, list[Tally]]:
    """Tallies of the model alone and of each parameter set, one session per document.

    `model` is a `service.engine.runtime.OrtModel` (`run`, `zero_state`, `vocab`).
    """
    vocab: Vocabulary = model.vocab
    docs = [encode_document(n, t, vocab) for n, t in documents if len(t) > 1]
    docs.sort(key=lambda d: -len(d.ids))  # longest first: rows stay busy to the end
    rows = max(1, min(rows, len(docs)))
    base = Tally()
    sessions = [_Sessions(p, rows) for p in params_list]
    state = model.zero_state(rows)
    doc_of: list[EncodedDocument | None] = [None] * rows
    position = np.zeros(rows, dtype=np.int64)
    queue = iter(docs)
    total = sum(len(d.ids) - 1 for d in docs)

    def start(row: int) -> None:
        doc_of[row] = next(queue, None)
        position[row] = 0
        for array in state:
            array[:, row] = 0.0
        for s in sessions:
            s.reset(row)

    for row in range(rows):
        start(row)
    with tqdm(total=total, desc=desc, unit="tok", leave=False) as progress:
        while True:
            act = np.array([r for r in range(rows) if doc_of[r] is not None], dtype=np.int64)
            if not len(act):
                break
            active: list[EncodedDocument] = [doc_of[r] for r in act]  # type: ignore[misc]
            t = position[act]
            x = np.array([d.ids[i] for d, i in zip(active, t)], dtype=np.int64)
            y = np.array([d.ids[i + 1] for d, i in zip(active, t)], dtype=np.int64)
            word = np.array([d.words[i + 1] for d, i in zip(active, t)], dtype=bool)
            full = len(act) == rows
            sub = state if full else tuple(np.ascontiguousarray(a[:, act]) for a in state)
            out = model.run(x[:, None], sub, want_probs=True)
            if full:
                state = tuple(out.state)
            else:
                for array, new in zip(state, out.state):
                    array[:, act] = new
            probs = out.probs
            rng = np.arange(len(act))
            p_y = probs[rng, y]
            known = y != vocab.unk_id
            oov_word = word & ~known
            _score_base(base, p_y, known, word, oov_word, y, out.topk_ids, active, t)
            for s in sessions:
                _step_session(s, vocab, act, full, active, t, y, known, word, oov_word, p_y, out)
            progress.update(len(act))
            position[act] += 1
            for r in act:
                doc = doc_of[r]
                assert doc is not None
                if position[r] + 1 >= len(doc.ids):
                    start(int(r))
    return base, [s.tally for s in sessions]


def _score_base(
    tally: Tally,
    p_y: np.ndarray,
    known: np.ndarray,
    word: np.ndarray,
    oov_word: np.ndarray,
    y: np.ndarray,
    topk_ids: np.ndarray,
    active: list[EncodedDocument],
    t: np.ndarray,
) -> None:
    """The model alone: its top k, its probability of each target."""
    nll = -np.log(np.maximum(p_y.astype(np.float64), 1e-30))
    tally.nll += float(nll.sum())
    tally.targets += len(y)
    tally.nll_iv += float(nll[known].sum())
    tally.iv_targets += int(known.sum())
    iv_word = word & known
    tally.words += int(word.sum())
    tally.iv_words += int(iv_word.sum())
    tally.oov_words += int(oov_word.sum())
    tally.oov_untyped += sum(
        1 for i in np.flatnonzero(oov_word) if active[i].keys[t[i] + 1] != TYPED_OOV
    )
    for k in KS:
        hit = int(((topk_ids[:, :k] == y[:, None]).any(1) & iv_word).sum())
        tally.hits[k] += hit
        tally.hits_iv[k] += hit
    typed = np.array([d.words[i] for d, i in zip(active, t)], dtype=bool)
    x = np.array([d.ids[i] for d, i in zip(active, t)], dtype=np.int64)
    tally.after_word += int(typed.sum())
    tally.echoes += int(((topk_ids[:, :3] == x[:, None]).any(1) & typed).sum())


def _step_session(
    s: _Sessions,
    vocab: Vocabulary,
    act: np.ndarray,
    full: bool,
    active: list[EncodedDocument],
    t: np.ndarray,
    y: np.ndarray,
    known: np.ndarray,
    word: np.ndarray,
    oov_word: np.ndarray,
    p_y: np.ndarray,
    out: Any,
) -> None:
    """One token typed in every active row of one parameter set, then its suggestions."""
    params, tally = s.params, s.tally
    vocab_size, unk, suggestible = len(vocab), vocab.unk_id, vocab.suggestible
    new = np.array([d.keys[i] for d, i in zip(active, t)], dtype=np.int32)
    for i in np.flatnonzero(new == TYPED_OOV):
        row = int(act[i])
        token = active[i].tokens[t[i]]
        new[i] = adapt.oov_keys(
            s.tables[row], [token], vocab_size, s.keys[row], s.weights[row], params
        )[0]
    ones = np.ones(len(act), dtype=np.int64)
    x = np.array([d.ids[i] for d, i in zip(active, t)], dtype=np.int64)
    # The token before: a document starts after a sentence end, as a service session does.
    before = np.array([d.ids[i - 1] if i else vocab.eos_id for d, i in zip(active, t)])
    if full:
        keys, weights = s.keys, s.weights
        adapt.update(keys, weights, new[:, None], ones, params, vocab_size, x[:, None], before)
    else:
        keys, weights = s.keys[act], s.weights[act]
        adapt.update(keys, weights, new[:, None], ones, params, vocab_size, x[:, None], before)
        s.keys[act], s.weights[act] = keys, weights
    suggested, _ = adapt.top_k(
        keys, weights, out.probs, out.topk_ids, out.topk_probs, unk, suggestible, max(KS),
        params.lam, params=params, last=x,
    )  # fmt: skip
    typed = np.array([d.words[i] for d, i in zip(active, t)], dtype=bool)
    tally.after_word += int(typed.sum())
    # The word just typed: its id, or its typed-word key.
    top3 = suggested[:, :3]
    echo = (top3 == x[:, None]).any(1) | ((top3 == new[:, None]).any(1) & (new >= 0))
    tally.echoes += int((echo & typed).sum())
    # The target's key: its id, or its slot in the row's table (typed OOV words).
    target = y.copy()
    cached_oov = np.zeros(len(act), dtype=bool)
    for i in np.flatnonzero(oov_word):
        doc = active[i]
        if doc.keys[t[i] + 1] != TYPED_OOV:
            continue
        key = s.slot_key(int(act[i]), doc.tokens[t[i] + 1], vocab_size)
        if key >= 0:
            target[i] = key
            cached_oov[i] = bool((keys[i] == key).any())
    # OOV targets as the <unk> class (y is <unk> there): comparable with the model alone.
    p_class = adapt.probability(
        keys, weights, out.probs, y, unk, suggestible, params.lam, params, x
    )
    nll = -np.log(np.maximum(p_class.astype(np.float64), 1e-30))
    tally.nll += float(nll.sum())
    tally.targets += len(y)
    tally.nll_iv += float(nll[known].sum())
    tally.iv_targets += int(known.sum())
    if cached_oov.any():
        rows = np.flatnonzero(cached_oov)
        p_word = adapt.probability(
            keys[rows],
            weights[rows],
            out.probs[rows],
            target[rows],
            unk,
            suggestible,
            params.lam,
            params,
            x[rows],
        )
        tally.nll_oov_cached += float(-np.log(np.maximum(p_word.astype(np.float64), 1e-30)).sum())
        tally.nll_oov_cached_unk += float(-np.log(np.maximum(p_y[rows], 1e-30)).sum())
        tally.oov_cached += len(rows)
    iv_word = word & known
    tally.words += int(word.sum())
    tally.iv_words += int(iv_word.sum())
    tally.oov_words += int(oov_word.sum())
    for k in KS:
        hit = (suggested[:, :k] == target[:, None]).any(1)
        hit_iv = int((hit & iv_word).sum())
        hit_oov = int((hit & oov_word & (target >= vocab_size)).sum())
        tally.hits[k] += hit_iv + hit_oov
        tally.hits_iv[k] += hit_iv
        tally.hits_oov[k] += hit_oov


Documents = list[tuple[str, list[str]]]


def held_out_documents(
    texts: Sequence[str], corpora: Sequence[str], split: str, nltk_data: str | None
) -> dict[str, Documents]:
    """Named sets of documents: each text file (a WikiText file by article), and the
    `split` of the named corpora (one document per corpus file)."""
    from pathlib import Path  # noqa: PLC0415

    from model_export.corpora import split_documents, text_documents  # noqa: PLC0415

    sets = {Path(t).name: text_documents(Path(t)) for t in texts}
    if corpora:
        sets[f"{'+'.join(corpora)}:{split}"] = split_documents(list(corpora), split, nltk_data)
    return sets


def first_tokens(documents: Documents, max_tokens: int) -> Documents:
    """The documents, in order, up to `max_tokens` targets in all (0: all of them)."""
    if not max_tokens:
        return list(documents)
    out, left = [], max_tokens
    for name, tokens in documents:
        if left <= 0:
            break
        out.append((name, tokens[: left + 1]))
        left -= len(tokens) - 1
    return out


def summary(documents: int, base: Tally, tally: Tally) -> dict[str, Any]:
    """The figures of one set of documents: counts, then without and with adaptation."""
    return {
        "documents": documents,
        **base.counts(),
        "without": base.metrics(),
        "with": tally.metrics(),
    }


def format_table(name: str, result: dict[str, Any]) -> str:
    """A text table of `summary`'s figures."""
    without, with_ = result["without"], result["with"]
    lines = [
        f"{name}: {result['documents']} documents, {result['targets']:,} targets, "
        f"{result['word_targets']:,} words ({result['oov_word_targets']:,} out of vocabulary, "
        f"{result['oov_untyped']:,} of them <unk>)",
        f"  {'':22} {'without':>9} {'with':>9} {'change':>9}",
    ]
    for key in ("top1", "top3", "top5", "top1_iv", "top3_iv", "top5_iv", "top3_oov", "echo_top3"):
        a, b = 100 * without[key], 100 * with_[key]
        lines.append(f"  {key + ' %':22} {a:9.2f} {b:9.2f} {b - a:+9.2f}")
    for key in ("perplexity", "perplexity_iv"):
        a, b = without[key], with_[key]
        lines.append(f"  {key:22} {a:9.1f} {b:9.1f} {100 * (b / a - 1):+8.1f}%")
    if "oov_cached" in with_:
        lines.append(
            f"  OOV targets in the cache: {with_['oov_cached']:,}; perplexity of the typed word "
            f"{with_['perplexity_oov_cached']:.1f} (the model's whole <unk> class: "
            f"{with_['perplexity_oov_cached_unk']:.1f})"
        )
    return "\n".join(lines)


def evaluate_adaptation(
    artifact: str,
    texts: Sequence[str],
    corpora: Sequence[str],
    split: str = "test",
    nltk_data: str | None = None,
    rows: int = 64,
    max_tokens: int = 0,
    overrides: dict[str, Any] | None = None,
    record: bool = False,
) -> dict[str, dict[str, Any]]:
    """Evaluate an artifact with and without adaptation on each set of documents.

    The parameters are the artifact's (manifest "adaptation" "params", else the service's
    default), with `overrides` applied. With `record`, the figures go into the manifest's
    "adaptation" "metrics" (only for the manifest's own parameters).
    """
    from pathlib import Path  # noqa: PLC0415

    from service.contract.artifact import ModelArtifact  # noqa: PLC0415
    from service.engine.runtime import OrtModel  # noqa: PLC0415

    loaded = ModelArtifact.load(artifact)
    own = adapt.params_of(loaded.manifest)
    params = AdaptParams.from_dict({**own.to_dict(), **(overrides or {})})
    if record and params != own:
        raise ValueError(
            "--record stores the figures of the artifact's own parameters: drop the overrides "
            "(or record new parameters with model_export.tune_adapt)"
        )
    model = OrtModel(loaded, ["CPUExecutionProvider"])
    print(f"adaptation parameters: {json.dumps(params.to_dict())}")
    results = {}
    for name, documents in held_out_documents(texts, corpora, split, nltk_data).items():
        documents = first_tokens(documents, max_tokens)
        base, (tally,) = evaluate_documents(model, documents, [params], rows, desc=name)
        results[name] = summary(len(documents), base, tally)
        print(format_table(name, results[name]))
    if record:
        record_adaptation(Path(artifact), metrics=results)
    return results


def record_adaptation(
    artifact_dir: Any,
    params: AdaptParams | None = None,
    tuned_on: str | None = None,
    metrics: dict[str, Any] | None = None,
    tuning: dict[str, Any] | None = None,
) -> None:
    """Merge into an artifact's manifest.json "adaptation": new params (which clear the
    figures of the old ones), where they were tuned, figures by set of documents."""
    from pathlib import Path  # noqa: PLC0415

    path = Path(artifact_dir) / "manifest.json"
    manifest = json.loads(path.read_text(encoding="utf-8"))
    section = manifest.setdefault("adaptation", {})
    if params is not None:
        if section.get("params") != params.to_dict():
            section.pop("metrics", None)
        section["params"] = params.to_dict()
    if tuned_on is not None:
        section["tuned_on"] = tuned_on
    if tuning is not None:
        section["tuning"] = tuning
    if metrics:
        section.setdefault("metrics", {}).update(metrics)
    path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
