"""Count-based trigram baseline for next-word prediction, scored like the neural models.

The trigram is trained on the same train split, with the same tokenizer and the same
closed vocabulary as the LSTM/GRU runs (out-of-vocabulary tokens become `<unk>`), and
is scored by `model_export.evaluate.evaluate_stream` itself through a step function
whose "state" is the previous token: the same target tokens, the same rows, word
targets only, an out-of-vocabulary target always a miss, candidates limited to
suggestible words. Two rankers:

- interpolated modified Kneser-Ney (Chen & Goodman 1998): a normalised distribution
  over the whole vocabulary, so its perplexity compares with the neural models';
- stupid backoff (Brants et al. 2007, alpha 0.4): trigram continuations by count, then
  bigram, then unigram; a ranking only (its scores do not sum to one, no perplexity).

Needs numpy, nltk and tqdm, not torch:

    .venv/bin/python -m benchmarks.trigram_baseline --json benchmarks/results/trigram.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model_export.corpora import NLTK_CORPORA, load_splits, text_tokens
from model_export.evaluate import Step, evaluate_stream
from service.contract.tokenizer import SPECIALS
from service.contract.vocab import Vocabulary

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CORPORA = list(NLTK_CORPORA)
DEFAULT_NLTK_DATA = ROOT.parent / "shared" / "data" / "nltk_data"
DEFAULT_TEXTS = [ROOT.parent / "shared" / "data" / "wikitext-2-valid.txt"]
DEFAULT_VOCAB = ROOT / "runs" / "lstm" / "vocab.txt"
NO_TOKEN = -1  # "previous token" of a row's first step: no left context
TOP_K = 5


def frequent_vocabulary(tokens: list[str], max_size: int, min_count: int) -> Vocabulary:
    """The training vocabulary rule of `model_export.train.build_vocab` (which needs torch)."""
    counts = Counter(tokens)
    for special in SPECIALS:
        counts.pop(special, None)
    ranked = sorted((t for t, n in counts.items() if n >= min_count), key=lambda t: (-counts[t], t))
    return Vocabulary(list(SPECIALS) + ranked[: max_size - len(SPECIALS)])


@dataclass(frozen=True)
class Grouped:
    """N-gram types sorted by key, grouped by their context (all but the last token)."""

    keys: np.ndarray  # (N,) context * V + word, sorted
    counts: np.ndarray  # (N,) count of each type
    words: np.ndarray  # (N,) last token of each type
    contexts: np.ndarray  # (C,) distinct contexts, sorted
    starts: np.ndarray  # (C,) first type of each context
    lengths: np.ndarray  # (C,) types per context
    totals: np.ndarray  # (C,) summed counts per context

    @classmethod
    def of(cls, keys: np.ndarray, counts: np.ndarray, vocab_size: int) -> Grouped:
        contexts, starts, lengths = np.unique(
            keys // vocab_size, return_index=True, return_counts=True
        )
        totals = np.add.reduceat(counts, starts) if len(keys) else np.zeros(0, np.int64)
        return cls(keys, counts, keys % vocab_size, contexts, starts, lengths, totals)

    def per_context(self, values: np.ndarray) -> np.ndarray:
        """Sum `values` (one per type) within each context."""
        return np.add.reduceat(values, self.starts) if len(values) else values

    def find_contexts(self, context: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Index of each context in `contexts` and whether it was seen."""
        j = np.minimum(np.searchsorted(self.contexts, context), max(len(self.contexts) - 1, 0))
        seen = (self.contexts[j] == context) if len(self.contexts) else np.zeros(len(context), bool)
        return j, seen & (context >= 0)


def discounts(counts: np.ndarray) -> np.ndarray:
    """Modified Kneser-Ney discounts D[c] for c = 0, 1, 2, 3+ from counts of counts.

    Falls back to a single absolute discount where counts of counts are missing
    (tiny corpora).
    """
    n = np.bincount(np.minimum(counts, 4), minlength=5)[1:5].astype(np.float64)
    y = n[0] / (n[0] + 2 * n[1]) if n[0] + 2 * n[1] > 0 else 0.5
    if (n > 0).all():
        d = [1 - 2 * y * n[1] / n[0], 2 - 3 * y * n[2] / n[1], 3 - 4 * y * n[3] / n[2]]
    else:
        d = [y, y, y]
    return np.array([0.0, *np.clip(d, 0.0, [1.0, 2.0, 3.0])])


def _slices(
    group: Grouped, rows_contexts: np.ndarray, seen: np.ndarray, values: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, word, value) of every type under each row's context (unseen rows: none)."""
    lengths = np.where(seen, group.lengths[rows_contexts], 0)
    starts = np.where(seen, group.starts[rows_contexts], 0)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    index = np.repeat(starts, lengths) + offsets
    return rows, group.words[index], values[index]


class TrigramCounts:
    """Trigram and bigram counts of a token-id stream over a closed vocabulary."""

    def __init__(self, ids: np.ndarray, vocab_size: int) -> None:
        v = self.vocab_size = vocab_size
        ids = np.asarray(ids, dtype=np.int64)
        self.unigrams = np.bincount(ids, minlength=v)
        keys, counts = np.unique(ids[:-1] * v + ids[1:], return_counts=True)
        self.bigrams = Grouped.of(keys, counts, v)
        keys, counts = np.unique((ids[:-2] * v + ids[1:-1]) * v + ids[2:], return_counts=True)
        self.trigrams = Grouped.of(keys, counts, v)


class KneserNey:
    """Interpolated modified Kneser-Ney trigram: P(w | u v) over the whole vocabulary."""

    def __init__(self, counts: TrigramCounts) -> None:
        v = counts.vocab_size
        tri = counts.trigrams
        # Highest order: discounted counts of (u v w) over c(u v .).
        self.tri = tri
        d3 = discounts(tri.counts)
        numer = np.maximum(tri.counts - d3[np.minimum(tri.counts, 3)], 0.0)
        self.alpha3 = numer / np.repeat(tri.totals, tri.lengths)
        self.gamma3 = 1.0 - tri.per_context(numer) / tri.totals
        # Middle order: continuation counts N1+(. v w), how many u precede (v w).
        keys, cont = np.unique(tri.keys % (v * v), return_counts=True)
        bi = self.bi = Grouped.of(keys, cont, v)
        d2 = discounts(cont)
        numer = np.maximum(cont - d2[np.minimum(cont, 3)], 0.0)
        self.alpha2 = numer / np.repeat(bi.totals, bi.lengths)
        # Indexed by the context token itself; a context never seen backs off fully.
        self.gamma2 = np.ones(v)
        self.gamma2[bi.contexts] = 1.0 - bi.per_context(numer) / bi.totals
        self.row2 = np.zeros(v, np.int64)
        self.row2[bi.contexts] = np.arange(len(bi.contexts))
        self.seen2 = np.zeros(v, bool)
        self.seen2[bi.contexts] = True
        # Lowest order: N1+(. w), how many distinct tokens precede w, plus a uniform floor.
        cont1 = np.bincount(bi.words, minlength=v)
        d1 = discounts(cont1[cont1 > 0])
        numer = np.maximum(cont1 - d1[np.minimum(cont1, 3)], 0.0)
        total = max(cont1.sum(), 1)
        self.p1 = numer / total + (1.0 - numer.sum() / total) / v

    def distribution(self, prev: np.ndarray, cur: np.ndarray) -> np.ndarray:
        """P(. | prev cur) for each row: (B, V) float64; prev = NO_TOKEN for no left context."""
        v = len(self.p1)
        p = self.gamma2[cur][:, None] * self.p1[None, :]  # (B, V)
        rows, words, values = _slices(self.bi, self.row2[cur], self.seen2[cur], self.alpha2)
        p[rows, words] += values  # words are distinct within a row
        j, seen = self.tri.find_contexts(np.where(prev >= 0, prev * v + cur, -1))
        p *= np.where(seen, self.gamma3[j], 1.0)[:, None]
        rows, words, values = _slices(self.tri, j, seen, self.alpha3)
        p[rows, words] += values
        return p


class StupidBackoff:
    """Stupid backoff trigram scores: the highest order that saw the word, times alpha per step down."""

    def __init__(self, counts: TrigramCounts, alpha: float = 0.4) -> None:
        v = counts.vocab_size
        self.counts, self.alpha = counts, alpha
        self.unigram = alpha * alpha * counts.unigrams / max(counts.unigrams.sum(), 1)
        bi = counts.bigrams
        self.row2 = np.zeros(v, np.int64)
        self.row2[bi.contexts] = np.arange(len(bi.contexts))
        self.seen2 = np.zeros(v, bool)
        self.seen2[bi.contexts] = True
        self.score2 = alpha * bi.counts / np.repeat(bi.totals, bi.lengths)
        tri = counts.trigrams
        self.score3 = tri.counts / np.repeat(tri.totals, tri.lengths)

    def distribution(self, prev: np.ndarray, cur: np.ndarray) -> np.ndarray:
        """Scores (B, V) for each row (not normalised: a ranking only)."""
        v = self.counts.vocab_size
        p = np.repeat(self.unigram[None, :], len(cur), axis=0)
        rows, words, values = _slices(
            self.counts.bigrams, self.row2[cur], self.seen2[cur], self.score2
        )
        p[rows, words] = values  # a seen higher order replaces the lower one
        j, seen = self.counts.trigrams.find_contexts(np.where(prev >= 0, prev * v + cur, -1))
        rows, words, values = _slices(self.counts.trigrams, j, seen, self.score3)
        p[rows, words] = values
        return p


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Ids of the k largest non-negative scores per row, best first (k argmax passes beat
    a full argpartition of a 12k-wide row by ~5x)."""
    scores = scores.copy()
    rows = np.arange(len(scores))
    top = np.empty((len(scores), k), dtype=np.int64)
    for i in range(k):
        top[:, i] = best = scores.argmax(axis=1)
        scores[rows, best] = -1.0
    return top


def ngram_stepper(model: KneserNey | StupidBackoff, vocab: Vocabulary, k: int = TOP_K):
    """Step function and zero state for `evaluate_stream`; the state is the previous token."""
    suggest = vocab.suggestible.astype(np.float64)

    def step(tokens: np.ndarray, prev: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        cur = tokens[:, 0]
        probs = model.distribution(prev, cur)
        # Scores are positive; specials and punctuation get 0, so they never rank above a word.
        return probs, top_k(probs * suggest[None, :], k), cur

    def zero(batch: int) -> np.ndarray:
        return np.full(batch, NO_TOKEN, dtype=np.int64)

    step_fn: Step = step
    return step_fn, zero


def machine() -> dict[str, str]:
    """What produced the figures."""
    import nltk  # noqa: PLC0415

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "nltk": nltk.__version__,
        "platform": platform.platform(),
    }


def run(
    corpora: list[str],
    nltk_data: str,
    texts: list[Path],
    vocab_path: Path | None,
    vocab_size: int,
    min_count: int,
    rows: int,
    max_tokens: int,
) -> dict:
    """Train on the train split, evaluate on the test split and on each text."""
    started = time.perf_counter()
    splits = load_splits(corpora, nltk_data)
    streams = {f"{'+'.join(corpora)}:test": splits["test"]}
    streams.update({t.name: text_tokens(t) for t in texts})
    if vocab_path is not None and vocab_path.is_file():
        vocab = Vocabulary.load(vocab_path)
        resolved = vocab_path.resolve()
        vocab_source = str(
            resolved.relative_to(ROOT) if resolved.is_relative_to(ROOT) else resolved
        )
    else:
        vocab = frequent_vocabulary(splits["train"], vocab_size, min_count)
        vocab_source = f"{vocab_size} most frequent training tokens (count >= {min_count})"
    loaded = time.perf_counter()
    counts = TrigramCounts(np.array(vocab.encode_tokens(splits["train"])), len(vocab))
    rankers = {"kneser_ney": KneserNey(counts), "stupid_backoff": StupidBackoff(counts)}
    trained = time.perf_counter()
    results: dict[str, dict[str, dict]] = {}
    for name, stream in streams.items():
        results[name] = {}
        for ranker, model in rankers.items():
            step, zero = ngram_stepper(model, vocab)  # type: ignore[arg-type]
            metrics: dict = evaluate_stream(
                step, zero, vocab, stream, rows, max_tokens, desc=f"{ranker} {name[:24]}"
            )
            if ranker == "stupid_backoff":
                metrics["perplexity"] = None  # scores are not a distribution
            results[name][ranker] = metrics
    return {
        "machine": machine(),
        "config": {
            "corpora": corpora,
            "train_tokens": len(splits["train"]),
            "vocab": vocab_source,
            "vocab_size": len(vocab),
            "rows": rows,
            "max_tokens": max_tokens,
            "trigram_types": len(counts.trigrams.keys),
            "bigram_types": len(counts.bigrams.keys),
        },
        "seconds": {
            "load": round(loaded - started, 1),
            "count": round(trained - loaded, 1),
            "evaluate": round(time.perf_counter() - trained, 1),
        },
        "results": results,
    }


def table(report: dict) -> str:
    """Markdown table of the results, headed by the machine and versions."""
    m, c = report["machine"], report["config"]
    lines = [
        f"machine: {m['cpu']}, {m['cores']} cores; Python {m['python']}, numpy {m['numpy']}, "
        f"nltk {m['nltk']}",
        f"trained on {c['train_tokens']:,} tokens of {', '.join(c['corpora'])} (train split); "
        f"vocabulary {c['vocab_size']:,} ({c['vocab']}); {c['trigram_types']:,} trigram types",
        "",
        "| held-out text | ranker | perplexity | top-1 | top-3 | top-5 | word targets | OOV words |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, by_ranker in report["results"].items():
        for ranker, r in by_ranker.items():
            ppl = f"{r['perplexity']:.1f}" if r["perplexity"] is not None else "-"
            lines.append(
                f"| {name} | {ranker.replace('_', ' ')} | {ppl} | {r['top1']:.2%} | "
                f"{r['top3']:.2%} | {r['top5']:.2%} | {r['word_targets']:,} | "
                f"{r['oov_rate']:.2%} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--corpora",
        nargs="+",
        default=DEFAULT_CORPORA,
        help="training corpora (NLTK names or paths); their test split is evaluated",
    )
    p.add_argument(
        "--nltk-data",
        default=os.environ.get("NLTK_DATA", str(DEFAULT_NLTK_DATA)),
        help="NLTK data directory",
    )
    p.add_argument(
        "--texts",
        nargs="*",
        type=Path,
        default=DEFAULT_TEXTS,
        help="held-out text files (WikiText format recognised by name)",
    )
    p.add_argument(
        "--vocab",
        type=Path,
        default=DEFAULT_VOCAB,
        help="vocab.txt of the neural model to compare with; if missing, the "
        "vocabulary is built from the train split like `nextword train` does",
    )
    p.add_argument("--vocab-size", type=int, default=12_000, help="size of a built vocabulary")
    p.add_argument("--min-count", type=int, default=2, help="minimum count in a built vocabulary")
    p.add_argument(
        "--rows",
        type=int,
        default=64,
        help="parallel rows each stream is cut into (as `nextword evaluate`)",
    )
    p.add_argument(
        "--max-tokens", type=int, default=0, help="evaluate only the first N tokens (0: all)"
    )
    p.add_argument("--json", type=Path, help="also write the results as JSON to this path")
    args = p.parse_args(argv)
    report = run(
        args.corpora,
        args.nltk_data,
        args.texts,
        args.vocab,
        args.vocab_size,
        args.min_count,
        args.rows,
        args.max_tokens,
    )
    print(table(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
