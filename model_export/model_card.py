"""Render MODEL_CARD.md for an artifact from its manifest (and optional baseline figures).

    python -m model_export.model_card service/models/lstm --train-seconds 4200 \
        --baseline benchmarks/results/trigram.json --fp32-metrics runs/lstm/fp32_metrics.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _metrics_rows(metrics: dict[str, dict[str, float]], label: str) -> list[str]:
    rows = []
    for dataset, m in metrics.items():
        rows.append(
            f"| {label} | {dataset} | {m['perplexity']:.1f} | {100 * m['top1']:.2f}% | "
            f"{100 * m['top3']:.2f}% | {100 * m['top5']:.2f}% | {100 * m['oov_rate']:.1f}% | {m['tokens']:,} |"
        )
    return rows


def _adaptation_lines(section: dict[str, Any]) -> list[str]:
    """The card's section on suggestions that learn the writer (manifest "adaptation")."""
    if not section.get("params"):
        return []
    params = section["params"]
    lines = [
        "",
        "## Adaptation (suggestions that learn the writer)",
        "",
        "A session remembers the words it typed (decayed counts, typed out-of-vocabulary "
        'words included) and the pairs it typed ("last word -> next word"), and mixes '
        "them into the model's suggestions once it holds enough text; it never raises the "
        "last few words typed (`service/engine/adapt.py`). Parameters: "
        + ", ".join(f"{k} {v}" for k, v in params.items())
        + f"; tuned on {section.get('tuned_on', '?')}"
        + (
            " (the points tried: the manifest's `adaptation.tuning`)."
            if "tuning" in section
            else "."
        ),
    ]
    metrics = section.get("metrics") or {}
    if metrics:
        lines += [
            "",
            "Each document typed as one session (WikiText by article, the corpora by file; "
            "`nextword evaluate --adapt`). Top-k over every word target; IV/OOV: in- and "
            "out-of-vocabulary targets; perplexity over in-vocabulary targets.",
            "",
            "| text | | top-1 | top-3 | top-5 | top-3 IV | top-3 OOV | perplexity IV |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for dataset, result in metrics.items():
            for label in ("without", "with"):
                r = result[label]
                lines.append(
                    f"| {dataset} | {label} | {100 * r['top1']:.2f}% | {100 * r['top3']:.2f}% | "
                    f"{100 * r['top5']:.2f}% | {100 * r['top3_iv']:.2f}% | "
                    f"{100 * r['top3_oov']:.2f}% | {r['perplexity_iv']:.1f} |"
                )
    return lines


def _keyboard_lines(section: dict[str, Any]) -> list[str]:
    """The card's section on suggestions as a keyboard user takes them (manifest "keyboard")."""
    if not section:
        return []
    lines = [
        "",
        "## As a keyboard user sees it",
        "",
        "Documents typed through the service itself, one session each, k = 3, a suggestion "
        "counting only when it is the word exactly as written (case included); the figures "
        "and the slip model are defined in `model_export/keyboard.py` "
        "(`nextword evaluate --keyboard --record`). With adaptation on (the service's "
        'default) unless marked "plain".',
        "",
        "| text | words | next top-1 | next top-3 | next top-3 plain | completion top-1 | "
        "completion top-3 | with a slip top-1 | with a slip top-3 | echo | echo plain | "
        "keystrokes saved |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    keys = (
        "next_top1", "next_top3", "next_top3_plain", "completion_top1", "completion_top3",
        "slip_completion_top1", "slip_completion_top3", "echo_top3", "echo_top3_plain",
        "keystroke_savings",
    )  # fmt: skip
    for dataset, m in section.items():
        cells = " | ".join(f"{100 * m[k]:.1f}%" for k in keys)
        lines.append(f"| {dataset} | {int(m['words']):,} | {cells} |")
    return lines


def render(
    artifact: Path,
    train_seconds: float | None = None,
    baseline: dict[str, Any] | None = None,
    fp32_metrics: dict[str, Any] | None = None,
    command: str | None = None,
) -> str:
    """The model card text."""
    m = json.loads((artifact / "manifest.json").read_text())
    training = m.get("training", {})
    train_seconds = train_seconds or training.get("wall_seconds")
    command = command or training.get("command")
    cfg = training.get("config", {})
    size = m["files"]["model.onnx"]["bytes"]
    quant = m.get("quantization") or {}
    lines = [
        f"# Model card: `{m['name']}`",
        "",
        f"A word-level {m['cell'].upper()} language model for next-word suggestions, "
        "served by nextword (ONNX Runtime).",
        "",
        "## Architecture",
        "",
        "| | |",
        "|---|---|",
        f"| cell | {m['cell']} ({m['layers']} layer(s), hidden {m['hidden_size']}) |",
        f"| embedding | {m['embedding_size']}, tied input/output embeddings"
        + (" via a linear projection" if m["hidden_size"] != m["embedding_size"] else "")
        + " |",
        f"| vocabulary | {m['vocab_size']:,} tokens (lower-cased words, `,` `;` `:`, `</s>`, `<unk>`, `<pad>`) |",
        f"| parameters | {m.get('parameters', 0):,} |",
        f"| model.onnx | {size / 1e6:.2f} MB"
        + (
            f" (int8 weights, per-channel; float32 export was {quant['fp32_bytes'] / 1e6:.2f} MB)"
            if quant
            else ""
        )
        + " |",
        f"| graph | opset {m['versions']['opset']}, inputs {', '.join(m['inputs'])}; outputs "
        f"{', '.join(m['outputs'])}; dynamic batch and seq |",
        f"| versions | torch {m['versions']['torch']}, onnx {m['versions']['onnx']}, "
        f"onnxruntime {m['versions']['onnxruntime']} |",
        "",
        "Export parity with torch (max abs difference of state and probabilities, float32 graph): "
        + ", ".join(f"{k}: {v:.1e}" for k, v in m.get("parity_max_abs_diff", {}).items())
        + ".",
    ]
    if quant:
        lines += [
            "int8 graph against torch: "
            + ", ".join(f"{k}: {v:.1e}" for k, v in quant.get("max_abs_diff", {}).items())
            + ".",
        ]
    lines += ["", "## Training data", "", "| corpus | licence (NLTK package index) |", "|---|---|"]
    for c in training.get("corpora", []):
        lines.append(f"| {c['name']} | {c['licence']} |")
    lines += [
        "",
        "Documents (files, or blocks of 200 lines of long files) are split 90/5/5 into "
        "train/validation/test by a hash of their name (`model_export/corpora.py`).",
        "The Brown corpus is distributed for non-commercial use: check its terms before "
        "using this model commercially, or retrain without it (`--corpora`).",
        "",
        "## Training",
        "",
    ]
    if command:
        lines += ["```sh", command, "```", ""]
    if cfg:
        lines.append(
            f"AdamW (peak lr {cfg.get('lr')}, weight decay {cfg.get('weight_decay')}), linear warm-up then "
            f"cosine decay, batch {cfg.get('batch_size')} x BPTT {cfg.get('bptt')}, dropout {cfg.get('dropout')}, "
            f"gradient clipping {cfg.get('clip')}, {cfg.get('epochs')} epochs ({training.get('steps', '?')} steps), "
            f"seed {cfg.get('seed')}."
        )
    if train_seconds:
        lines.append(
            f"Wall time {train_seconds / 60:.0f} minutes on 2 CPU cores (AMD EPYC), sharing them with "
            "a second training job."
        )
    if training.get("best_valid_ppl"):
        lines.append(f"Best validation perplexity: {training['best_valid_ppl']:.1f}.")
    lines += [
        "",
        "## Held-out results",
        "",
        "Perplexity over every token (out-of-vocabulary as `<unk>`); top-k accuracy over "
        "word targets only, predictions restricted to words as the service returns them, an "
        "out-of-vocabulary target always a miss (`nextword evaluate`). WikiText-2 validation "
        "is out of domain (Wikipedia), typed through the same tokenizer.",
        "",
        "The trigram rows are the count-based baseline (`benchmarks/trigram_baseline.py`), "
        "trained on the same split with the same tokenizer and vocabulary and scored by the "
        "same code. The float32 rows step an ONNX export of the same weights without int8: "
        "the difference to the int8 rows is what int8 costs.",
        "",
        "| model | text | perplexity | top-1 | top-3 | top-5 | OOV words | tokens |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += _metrics_rows(m.get("metrics", {}), f"{m['name']} ({'int8' if quant else 'float32'})")
    fp32_metrics = fp32_metrics or m.get("metrics_float32")
    if fp32_metrics:
        lines += _metrics_rows(fp32_metrics, f"{m['name']} (float32, same weights)")
    if baseline:
        for dataset, rankers in baseline.get("results", {}).items():
            for ranker, b in rankers.items():
                ppl = f"{b['perplexity']:.1f}" if b.get("perplexity") else "-"
                lines.append(
                    f"| trigram ({ranker.replace('_', ' ')}) | {dataset} | {ppl} | "
                    f"{100 * b['top1']:.2f}% | {100 * b['top3']:.2f}% | {100 * b['top5']:.2f}% | "
                    f"{100 * b.get('oov_rate', 0):.1f}% | {b.get('tokens', 0):,} |"
                )
    lines += _adaptation_lines(m.get("adaptation") or {})
    lines += _keyboard_lines(m.get("keyboard") or {})
    lines += [
        "",
        "## Intended use and limits",
        "",
        "Next-word suggestions for English typing. The model sees lower-cased text and "
        "suggests words only (no punctuation); the service writes them as typed there: "
        "names and acronyms from a table (`display.tsv`: `I`, `America`, `NASA`), "
        "the form a word takes after a given word (`display_pairs.tsv`: `Kingdom` after "
        "`united`), capitals at sentence starts and as typed in the prefix. Trained on ~4M words of mostly 20th-century American and "
        "Australian English (news, fiction, speeches, film reviews, web forums); it knows "
        "no recent vocabulary, reflects the biases of those texts, and is small by design "
        "(a few MB). It is not a source of facts.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("artifact", type=Path, help="artifact directory (its MODEL_CARD.md is written)")
    p.add_argument("--train-seconds", type=float, default=None, help="training wall time")
    p.add_argument("--baseline", type=Path, default=None, help="trigram baseline JSON")
    p.add_argument(
        "--fp32-metrics", type=Path, default=None, help="metrics JSON of the float32 model"
    )
    p.add_argument("--command", default=None, help="the exact training command")
    # (The bundled cards: `--baseline benchmarks/results/trigram.json`.)
    args = p.parse_args()
    text = render(
        args.artifact,
        args.train_seconds,
        json.loads(args.baseline.read_text()) if args.baseline else None,
        json.loads(args.fp32_metrics.read_text()) if args.fp32_metrics else None,
        args.command,
    )
    (args.artifact / "MODEL_CARD.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
