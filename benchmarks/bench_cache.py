"""What the cache's arithmetic costs beside the model: one step of 256 sessions.

For each bundled model (or `--models`), 256 rows each hold a cache filled by `--history`
tokens of text (a `--text` file's documents, else a Zipf stream over the vocabulary), with
the artifact's tuned parameters (or `--capacity` values). Then, per round, one new token
per row, timed apart:

- the model's step at batch 256: `OrtModel.run` without and with the full distribution
  (`want_probs`; adaptation needs it: the model's probability of every cached word);
- `adapt.update` (one token per row, the common step) and `adapt.top_k` (k = 5) on that
  distribution.

Reported: the median of `--rounds` rounds in milliseconds, the cache's share of the
model's step with the distribution, and the bytes per session (C x 8 for keys and
weights, plus the typed words kept, as UTF-8).

    python -m benchmarks.bench_cache --text WIKITEXT_FILE
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from benchmarks.lib.machine import command_line, machine, machine_lines
from benchmarks.lib.models import models_dir
from benchmarks.lib.results import RESULTS, write_report
from service.contract.artifact import ModelArtifact, model_dirs
from service.engine import adapt
from service.engine.runtime import OrtModel

MODULES = ("onnxruntime", "numpy")
BATCH = 256
CONTEXT = 32  # tokens run through the model first, so that its distributions are real ones


def streams(vocab: Any, text: Path | None, rows: int, length: int, seed: int) -> list[list[str]]:
    """`rows` token streams of `length`: a text's documents (cycled), else Zipf draws."""
    if text is not None:
        from model_export.corpora import text_documents  # noqa: PLC0415

        docs = [tokens for _, tokens in text_documents(text) if len(tokens) > length]
        if docs:
            return [docs[i % len(docs)][-length:] for i in range(rows)]
    rng = np.random.default_rng(seed)
    ids = np.minimum(rng.zipf(1.1, size=(rows, length)) + 2, len(vocab) - 1)
    return [[vocab.tokens[i] for i in row] for row in ids]


def fill(
    model: OrtModel, params: adapt.AdaptParams, tokens: list[list[str]]
) -> tuple[np.ndarray, np.ndarray, list[list[str]]]:
    """Caches of `len(tokens)` rows after typing each row's tokens, with their word tables."""
    from service.contract.tokenizer import is_word  # noqa: PLC0415

    vocab = model.vocab
    rows = len(tokens)
    keys, weights = adapt.empty_cache(rows, params.capacity)
    tables: list[list[str]] = [[] for _ in range(rows)]
    ids = np.array([vocab.encode_tokens(row) for row in tokens], dtype=np.int64)
    for t in range(len(tokens[0])):
        new = np.full((rows, 1), adapt.EMPTY, dtype=np.int32)
        for b in range(rows):
            token = tokens[b][t]
            i = vocab.index.get(token)
            if i is not None and vocab.suggestible[i]:
                new[b, 0] = i
            elif i is None and is_word(token) and token != "zzunknownzz":
                new[b, 0] = adapt.oov_keys(
                    tables[b], [token], len(vocab), keys[b], weights[b], params
                )[0]
        before = ids[:, t - 1] if t else np.full(rows, vocab.eos_id)
        adapt.update(
            keys, weights, new, np.ones(rows, dtype=np.int64), params, len(vocab),
            ids[:, t : t + 1], before,
        )  # fmt: skip
    return keys, weights, tables


def median_ms(samples: list[float]) -> float:
    return 1e3 * statistics.median(samples)


def bench_model(
    path: Path, capacities: list[int], text: Path | None, history: int, rounds: int
) -> list[dict[str, Any]]:
    """The rows of one model: one per capacity."""
    artifact = ModelArtifact.load(path)
    model = OrtModel(artifact, ["CPUExecutionProvider"])
    vocab = model.vocab
    tuned = adapt.params_of(artifact.manifest)
    tokens = streams(vocab, text, BATCH, history + rounds + 1, seed=0)
    ids = np.array([vocab.encode_tokens(row) for row in tokens], dtype=np.int64)
    context = ids[:, history - CONTEXT : history]
    state = model.run(context, model.zero_state(BATCH)).state
    out = []
    for capacity in capacities or [tuned.capacity]:
        params = adapt.AdaptParams(**{**tuned.to_dict(), "capacity": capacity})
        keys, weights, tables = fill(model, params, [row[:history] for row in tokens])
        cost: dict[str, list[float]] = {"model": [], "model_probs": [], "update": [], "top_k": []}
        step_state = state
        for r in tqdm(range(rounds), desc=f"{path.name} C={capacity}", leave=False):
            x = ids[:, history + r : history + r + 1]
            t0 = time.perf_counter()
            model.run(x, step_state, want_probs=False)
            t1 = time.perf_counter()
            step = model.run(x, step_state, want_probs=True)
            t2 = time.perf_counter()
            new = np.where(vocab.suggestible[x], x, adapt.EMPTY).astype(np.int32)
            t3 = time.perf_counter()
            before = ids[:, history + r - 1]
            adapt.update(
                keys, weights, new, np.ones(BATCH, dtype=np.int64), params, len(vocab), x, before
            )
            t4 = time.perf_counter()
            assert step.probs is not None
            adapt.top_k(
                keys, weights, step.probs, step.topk_ids, step.topk_probs, vocab.unk_id,
                vocab.suggestible, 5, params.lam, params=params, last=x[:, 0],
            )  # fmt: skip
            t5 = time.perf_counter()
            step_state = step.state
            for name, seconds in zip(cost, (t1 - t0, t2 - t1, t4 - t3, t5 - t4)):
                cost[name].append(seconds)
        ms = {name: median_ms(samples) for name, samples in cost.items()}
        typed_bytes = [sum(len(w.encode()) for w in table) for table in tables]
        out.append(
            {
                "model": path.name,
                "params": params.to_dict(),
                "filled_slots_mean": float((keys >= 0).sum(1).mean()),
                "typed_words_mean": float(np.mean([len(t) for t in tables])),
                "bytes_arrays": capacity * 8,
                "bytes_typed_mean": float(np.mean(typed_bytes)),
                **{f"{name}_ms": value for name, value in ms.items()},
                "cache_share_of_step": (ms["update"] + ms["top_k"]) / ms["model_probs"],
                "probs_share_of_step": ms["model_probs"] / ms["model"] - 1,
            }
        )
    return out


def table(report: dict[str, Any]) -> str:
    """The printed table."""
    lines = [
        "What the cache costs beside the model: one step of 256 sessions (median ms)",
        *machine_lines(report["machine"], MODULES),
        report["models_note"],
        f"command: {report['command']}",
        f"caches filled by {report['history']} tokens of {report['text']}; {report['rounds']} rounds",
        "",
        "| model | C | filled | model step | + full distribution | update | top_k | cache / step | bytes per session |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['model']} | {row['params']['capacity']} | {row['filled_slots_mean']:.0f} | "
            f"{row['model_ms']:.2f} | {row['model_probs_ms']:.2f} "
            f"(+{100 * row['probs_share_of_step']:.0f}%) | {row['update_ms']:.3f} | "
            f"{row['top_k_ms']:.3f} | {100 * row['cache_share_of_step']:.1f}% | "
            f"{row['bytes_arrays']} + {row['bytes_typed_mean']:.0f} typed "
            f"({row['typed_words_mean']:.1f} words) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--models", type=Path, default=None, help="models directory")
    parser.add_argument(
        "--text", type=Path, default=None, help="text whose documents fill the caches"
    )
    parser.add_argument("--history", type=int, default=1000, help="tokens typed before timing")
    parser.add_argument("--rounds", type=int, default=50, help="timed steps")
    parser.add_argument(
        "--capacity", type=int, nargs="*", default=[], help="capacities (default: the tuned one)"
    )
    parser.add_argument("--json", type=Path, default=RESULTS / "cache.json", help="report path")
    args = parser.parse_args(argv)
    with models_dir(args.models, "full") as (root, note):
        rows = []
        for path in model_dirs(root):
            rows += bench_model(path, args.capacity, args.text, args.history, args.rounds)
    report = {
        "machine": machine(MODULES),
        "models_note": note,
        "command": command_line("benchmarks.bench_cache", argv),
        "text": str(args.text) if args.text else "a Zipf stream over the vocabulary",
        "history": args.history,
        "rounds": args.rounds,
        "rows": rows,
    }
    text = table(report)
    print(text)
    write_report(args.json, report, text)


if __name__ == "__main__":
    main()
