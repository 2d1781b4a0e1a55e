"""Tune an artifact's adaptation parameters on held-out documents that no evaluation uses.

    python -m model_export.tune_adapt --artifact service/models/gru \
        --corpora brown movie_reviews abc state_union webtext inaugural \
        --nltk-data NLTK_DATA_DIR --split valid --record

Two grids, each scored in one pass over the documents (one session per document, as
`nextword evaluate --adapt` types them; the model's outputs are shared by every point):

1. the mixture weight `lam` by the decay (a generous capacity and window, so that they
   do not limit it);
2. at the best of 1: the capacity, the window (as the weight it drops below) and the
   number of typed words kept, which bound the cost and the memory of a session.

The objective is top-3 accuracy over every word target (the issue's measure). Grid 2 keeps
the cheapest point (smallest capacity, then window, then max_oov) within `--tolerance` of
the best top-3: beyond that point more memory buys nothing measurable. With `--record`
the chosen parameters, what they were tuned on and both grids' figures go into the
manifest ("adaptation": "params", "tuned_on", "tuning"), every grid point's figures into
`adaptation_tuning.json` beside it; figures recorded for other parameters before are
dropped (`nextword evaluate --adapt --record` writes new ones).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from model_export.corpora import NLTK_CORPORA
from model_export.evaluate_adapt import (
    evaluate_documents,
    first_tokens,
    held_out_documents,
    record_adaptation,
)
from service.engine.adapt import AdaptParams

LAMS = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3)
DECAYS = (0.98, 0.99, 0.995, 0.998, 0.999)
CAPACITIES = (64, 128, 256, 512)
FLOORS = (0.1, 0.01, 0.001)  # the window as the weight an entry is dropped below
MAX_OOVS = (16, 64)
# Grid 1: a capacity, window and table that do not limit the cache.
WIDE_CAPACITY, WIDE_FLOOR, WIDE_MAX_OOV = 1024, 0.001, 128
TUNING_FILE = "adaptation_tuning.json"  # beside manifest.json: every grid point's figures


def window_for(decay: float, floor: float) -> int:
    """Tokens after which one occurrence weighs less than `floor`."""
    return max(1, math.ceil(math.log(floor) / math.log(decay)))


def score(model: Any, documents: Any, grid: Sequence[AdaptParams], rows: int, desc: str):
    """(params, metrics) of every grid point, and the model's own metrics."""
    base, tallies = evaluate_documents(model, documents, grid, rows, desc=desc)
    return base.metrics(), [(p, t.metrics()) for p, t in zip(grid, tallies)]


def tune(
    artifact: str,
    texts: Sequence[str],
    corpora: Sequence[str],
    split: str,
    nltk_data: str | None,
    rows: int = 64,
    max_tokens: int = 0,
    tolerance: float = 0.0002,
) -> dict[str, Any]:
    """The chosen parameters and both grids' figures."""
    from service.contract.artifact import ModelArtifact  # noqa: PLC0415
    from service.engine.runtime import OrtModel  # noqa: PLC0415

    model = OrtModel(ModelArtifact.load(artifact), ["CPUExecutionProvider"])
    sets = held_out_documents(texts, corpora, split, nltk_data)
    documents = [d for docs in sets.values() for d in first_tokens(docs, max_tokens)]
    tuned_on = " + ".join(
        f"{name} ({len(docs)} documents, one session each)" for name, docs in sets.items()
    )
    first = [
        AdaptParams(lam, decay, window_for(decay, WIDE_FLOOR), WIDE_CAPACITY, WIDE_MAX_OOV)
        for lam, decay in itertools.product(LAMS, DECAYS)
    ]
    base, points = score(model, documents, first, rows, "tune 1/2: lam x decay")
    best = max(points, key=lambda pm: pm[1]["top3"])[0]
    second = [
        AdaptParams(best.lam, best.decay, window_for(best.decay, floor), capacity, max_oov)
        for capacity, floor, max_oov in itertools.product(CAPACITIES, FLOORS, MAX_OOVS)
    ]
    _, points2 = score(model, documents, second, rows, "tune 2/2: capacity x window x max_oov")
    top = max(m["top3"] for _, m in points2)
    cheap = [pm for pm in points2 if pm[1]["top3"] >= top - tolerance]
    chosen, chosen_metrics = min(
        cheap, key=lambda pm: (pm[0].capacity, pm[0].window, pm[0].max_oov)
    )

    def rows_of(points: list[tuple[AdaptParams, dict[str, float]]]) -> list[dict[str, Any]]:
        keep = ("top1", "top3", "top5", "top3_iv", "top3_oov", "perplexity", "perplexity_iv")
        return [{**p.to_dict(), **{k: m[k] for k in keep}} for p, m in points]

    return {
        "params": chosen,
        "tuned_on": tuned_on,
        "tuning": {
            "objective": f"top3 over word targets; grid 2: the cheapest within {tolerance} of the best",
            "searched": {
                "lam": LAMS,
                "decay": DECAYS,
                "grid_1_at": {
                    "capacity": WIDE_CAPACITY,
                    "window_floor": WIDE_FLOOR,
                    "max_oov": WIDE_MAX_OOV,
                },
                "capacity": CAPACITIES,
                "window_floor": FLOORS,
                "max_oov": MAX_OOVS,
            },
            "without": {k: base[k] for k in ("top1", "top3", "top5", "perplexity")},
            "chosen": {k: chosen_metrics[k] for k in ("top1", "top3", "top5", "perplexity")},
        },
        "grid_lam_decay": rows_of(points),
        "grid_capacity_window_max_oov": rows_of(points2),
    }


def record_tuning(artifact_dir: Path, result: dict[str, Any]) -> None:
    """The chosen parameters, where and how they were tuned into the manifest; every grid
    point's figures beside it, in TUNING_FILE (not read by the service)."""
    params = result["params"]
    if isinstance(params, AdaptParams):
        result = {**result, "params": params.to_dict()}
    (artifact_dir / TUNING_FILE).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    record_adaptation(
        artifact_dir,
        AdaptParams.from_dict(result["params"]),
        tuned_on=result["tuned_on"],
        tuning={**result["tuning"], "points": TUNING_FILE},
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: see the module docstring."""
    p = argparse.ArgumentParser(
        prog="python -m model_export.tune_adapt",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--artifact", required=True, help="exported model directory")
    p.add_argument("--text", action="append", default=[], help="held-out text file (repeatable)")
    p.add_argument(
        "--corpora",
        nargs="*",
        default=[],
        help=f"NLTK corpora ({', '.join(NLTK_CORPORA)}) or paths",
    )
    p.add_argument("--split", choices=["train", "valid", "test"], default="valid")
    p.add_argument("--nltk-data", default=None, help="folder holding nltk_data")
    p.add_argument("--rows", type=int, default=64, help="documents run in parallel")
    p.add_argument("--max-tokens", type=int, default=0, help="first N targets of each set (0: all)")
    p.add_argument("--tolerance", type=float, default=0.0002, help="top-3 given up for economy")
    p.add_argument("--record", action="store_true", help="store the result in the manifest")
    p.add_argument("--json", dest="json_out", default=None, help="also write the result here")
    args = p.parse_args(argv)
    if not args.text and not args.corpora:
        print("nothing to tune on: give --text and/or --corpora", file=sys.stderr)
        return 2
    result = tune(
        args.artifact,
        args.text,
        args.corpora,
        args.split,
        args.nltk_data,
        args.rows,
        args.max_tokens,
        args.tolerance,
    )
    params: AdaptParams = result["params"]
    summary = {**result, "params": params.to_dict()}
    print(json.dumps({k: summary[k] for k in ("params", "tuned_on")}, indent=2))
    print(json.dumps({k: summary["tuning"][k] for k in ("without", "chosen")}, indent=2))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(summary, indent=2))
    if args.record:
        record_tuning(Path(args.artifact), summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
