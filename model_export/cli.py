"""`nextword train`, `nextword evaluate`, `nextword export` (need the `train` extra: torch)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from model_export.corpora import NLTK_CORPORA

TRAIN_HELP = {
    "corpora": f"corpora to train on: NLTK names ({', '.join(NLTK_CORPORA)}) or text files/folders "
    "(one paragraph per line)",
    "out": "run directory: best.pt, last.pt, config.json, vocab.txt, history.json, curve.png",
    "nltk_data": "folder holding nltk_data (default: $NLTK_DATA, then NLTK's own search path)",
    "cell": "recurrent cell: lstm or gru",
    "vocab_size": "vocabulary cap, specials included",
    "min_count": "least training count of a word kept in the vocabulary",
    "embedding_size": "embedding size (input and tied output embeddings)",
    "hidden_size": "hidden size of each recurrent layer (projected to the embedding size)",
    "layers": "number of recurrent layers",
    "dropout": "dropout on embeddings, between layers and before the output layer",
    "batch_size": "parallel rows of the training stream",
    "bptt": "truncated backpropagation length (tokens); state is carried across batches",
    "fresh_rows": "rows added to each batch that start at a random sentence from a zero state, "
    "as the service starts every text (0: none; the stream's rows carry their state)",
    "epochs": "passes over the training stream",
    "lr": "peak learning rate of AdamW",
    "min_lr_ratio": "final learning rate as a fraction of the peak (cosine decay)",
    "warmup_steps": "linear warm-up steps",
    "weight_decay": "AdamW weight decay (not applied to embeddings and biases)",
    "clip": "gradient norm clipping",
    "eval_interval": "steps between validations (0: once per epoch)",
    "eval_text": "held-out text file (WikiText recognised by name) whose next-word top-1/3/5 is "
    "measured at each validation and kept in history.json (as `nextword evaluate` measures it)",
    "eval_text_tokens": "with --eval-text: only its first N tokens (0: all)",
    "checkpoint_interval": "steps between resumable checkpoints (last.pt)",
    "max_steps": "stop after this many steps (0: no limit)",
    "seed": "random seed (runs are reproducible on the same machine)",
    "threads": "torch intra-op threads (0: torch's default)",
}


def _add_train(sub) -> None:
    from model_export.train_config import TrainConfig  # noqa: PLC0415

    p = sub.add_parser(
        "train",
        help="train an LSTM/GRU language model (resumes if the run exists)",
        description="Train a word-level LSTM/GRU language model with truncated BPTT. "
        "Re-running with the same --out resumes from last.pt.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        flag = "--" + f.name.replace("_", "-")
        if f.name == "corpora":
            p.add_argument(flag, nargs="+", default=default, help=TRAIN_HELP[f.name])
        elif f.name == "cell":
            p.add_argument(flag, choices=["lstm", "gru"], default=default, help=TRAIN_HELP[f.name])
        else:
            kind = type(default) if default is not None else str
            p.add_argument(flag, type=kind, default=default, help=TRAIN_HELP[f.name])
    p.set_defaults(handler=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from model_export.train import train  # noqa: PLC0415
    from model_export.train_config import TrainConfig  # noqa: PLC0415

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    t0 = time.time()
    train(TrainConfig(**{k: v for k, v in vars(args).items() if k in names}))
    print(f"training took {time.time() - t0:.0f} s")
    return 0


def _add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="perplexity and top-1/3/5 accuracy of a checkpoint or artifact",
        description="Step a checkpoint (torch) or an exported artifact (ONNX Runtime) "
        "through held-out text and report perplexity and top-k next-word accuracy. "
        "Out-of-vocabulary targets always count as misses.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--checkpoint", help="training run directory (best.pt, config.json, vocab.txt)"
    )
    which.add_argument(
        "--artifact", help="exported model directory (model.onnx, manifest.json, vocab.txt)"
    )
    p.add_argument(
        "--text",
        action="append",
        default=[],
        help="held-out text file (repeatable); WikiText files are recognised by name",
    )
    p.add_argument(
        "--corpora", nargs="*", default=[], help="NLTK corpora or paths whose --split to use"
    )
    p.add_argument(
        "--split",
        choices=["train", "valid", "test"],
        default="test",
        help="which deterministic split of --corpora",
    )
    p.add_argument("--nltk-data", default=None, help="folder holding nltk_data")
    p.add_argument("--rows", type=int, default=64, help="parallel rows the stream is cut into")
    p.add_argument(
        "--max-tokens", type=int, default=0, help="evaluate only the first N tokens (0: all)"
    )
    p.add_argument(
        "--record",
        action="store_true",
        help="store the metrics in the artifact's manifest.json (under --record-key)",
    )
    p.add_argument(
        "--record-in",
        default=None,
        help="store the metrics in this artifact's manifest instead (e.g. the figures of a "
        "float32 export or checkpoint beside its int8 artifact's)",
    )
    p.add_argument(
        "--record-key",
        default="metrics",
        help="manifest key for recorded metrics (e.g. metrics_float32)",
    )
    p.add_argument(
        "--json", dest="json_out", default=None, help="also write the metrics to this file"
    )
    p.add_argument(
        "--adapt",
        action="store_true",
        help="type each document as a writer would (one session per document: WikiText by "
        "article, corpora by file) and report the figures with and without adaptation, "
        "in- and out-of-vocabulary targets apart (--artifact only; --record stores them "
        "under the manifest's 'adaptation')",
    )
    p.add_argument(
        "--adapt-param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="with --adapt: override one of the artifact's adaptation parameters (lam, decay, "
        "window, capacity, max_oov)",
    )
    p.add_argument(
        "--keyboard",
        action="store_true",
        help="type the documents through the service as a keyboard user would (k = 3, case "
        "exact): next-word and completion top-1/3, with a simulated slip, the share of lists "
        "echoing the last word, keystroke savings (--artifact only; --record stores them "
        "under the manifest's 'keyboard')",
    )
    p.add_argument(
        "--max-words", type=int, default=2000, help="with --keyboard: words typed per set"
    )
    p.set_defaults(handler=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from model_export.evaluate import evaluate  # noqa: PLC0415

    if not args.text and not args.corpora:
        print("nothing to evaluate: give --text and/or --corpora", file=sys.stderr)
        return 2
    if args.keyboard:
        return _run_evaluate_keyboard(args)
    if args.adapt or args.adapt_param:
        return _run_evaluate_adapt(args)
    results = evaluate(
        args.checkpoint,
        args.artifact,
        args.text,
        args.corpora,
        args.split,
        args.nltk_data,
        args.rows,
        args.max_tokens,
        args.record,
        args.record_in,
        args.record_key,
    )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))
    return 0


def _run_evaluate_keyboard(args: argparse.Namespace) -> int:
    from model_export.keyboard import evaluate_keyboard  # noqa: PLC0415

    if not args.artifact or args.adapt or args.record_in:
        print(
            "--keyboard evaluates an --artifact (not with --adapt or --record-in)", file=sys.stderr
        )
        return 2
    results = evaluate_keyboard(
        args.artifact,
        args.text,
        args.corpora,
        args.split,
        args.nltk_data,
        args.max_words,
        args.record,
    )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))
    return 0


def _run_evaluate_adapt(args: argparse.Namespace) -> int:
    from model_export.evaluate_adapt import evaluate_adaptation  # noqa: PLC0415

    if not args.adapt or not args.artifact or args.record_in:
        print(
            "--adapt evaluates an --artifact (--adapt-param needs --adapt; no --record-in)",
            file=sys.stderr,
        )
        return 2
    overrides = {}
    for item in args.adapt_param:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"--adapt-param {item!r}: expected KEY=VALUE", file=sys.stderr)
            return 2
        overrides[key.strip()] = value.strip()
    try:
        results = evaluate_adaptation(
            args.artifact,
            args.text,
            args.corpora,
            args.split,
            args.nltk_data,
            args.rows,
            args.max_tokens,
            overrides,
            args.record,
        )
    except (TypeError, ValueError) as exc:
        print(f"nextword evaluate --adapt: {exc}", file=sys.stderr)
        return 2
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="export a checkpoint to a servable ONNX artifact",
        description="Export the best checkpoint of a run to ONNX (named inputs/outputs, "
        "dynamic batch and seq, top-k inside the graph), check parity with torch at "
        "several shapes (max abs diff <= 1e-4) and write model.onnx, manifest.json "
        "and vocab.txt. Nothing is written if a check fails.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="training run directory")
    p.add_argument(
        "--out", required=True, help="artifact directory to write (its name is the model name)"
    )
    p.add_argument(
        "--int8",
        action="store_true",
        help="store weights as int8 (per-channel); ~4x smaller, served at float32 speed",
    )
    p.add_argument("--max-k", type=int, default=50, help="top-k computed inside the graph")
    p.add_argument(
        "--no-display-forms",
        action="store_true",
        help="do not derive display forms ('i' -> 'I', 'united' then 'kingdom' -> 'Kingdom') "
        "from the cased training corpora",
    )
    p.set_defaults(handler=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from model_export.checkpoint import load_checkpoint  # noqa: PLC0415
    from model_export.corpora import NLTK_CORPORA  # noqa: PLC0415
    from model_export.export import export_artifact  # noqa: PLC0415

    model, vocab, config = load_checkpoint(args.checkpoint)
    run = Path(args.checkpoint)
    history = (
        json.loads((run / "history.json").read_text()) if (run / "history.json").exists() else []
    )
    valid = [h for h in history if h["kind"] == "valid"]
    train_cfg = config.get("train", {})
    extra = {
        "training": {
            "corpora": [
                {"name": c, "licence": NLTK_CORPORA.get(c, "see source")}
                for c in train_cfg.get("corpora", [])
            ],
            "config": train_cfg,
            "best_valid_ppl": min((h["ppl"] for h in valid), default=None),
            "steps": max((h["step"] for h in history), default=0),
        }
    }
    forms, pairs = None, None
    if not args.no_display_forms:
        from model_export.casing import casing_tables  # noqa: PLC0415

        try:
            forms, pairs = casing_tables(
                train_cfg.get("corpora", []), vocab, train_cfg.get("nltk_data")
            )
        except (FileNotFoundError, LookupError) as exc:
            print(f"display forms skipped: training corpora not readable ({exc})", file=sys.stderr)
    manifest = export_artifact(
        model,
        vocab,
        Path(args.out),
        int8=args.int8,
        extra=extra,
        max_k=args.max_k,
        display_forms=forms,
        pair_forms=pairs,
    )
    print(
        json.dumps(
            {
                "out": args.out,
                "parity_max_abs_diff": manifest["parity_max_abs_diff"],
                "bytes": manifest["files"]["model.onnx"]["bytes"],
                "quantization": manifest["quantization"],
            },
            indent=2,
        )
    )
    return 0


def _add_casing(sub) -> None:
    p = sub.add_parser(
        "casing",
        help="(re)write an artifact's display forms from cased corpora",
        description="Count how the artifact's words are written in cased corpora (by default "
        "the training corpora its manifest names) and (re)write display.tsv (a word's own "
        "form: 'I', 'Paris', 'NASA') and display_pairs.tsv (its form after a given word: "
        "'united' then 'kingdom' -> 'Kingdom'), updating the manifest's hashes. "
        "`nextword export` writes both for a new model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--artifact", required=True, help="exported model directory to update")
    p.add_argument(
        "--corpora", nargs="*", default=None, help="cased corpora (default: the manifest's)"
    )
    p.add_argument("--nltk-data", default=None, help="folder holding nltk_data")
    p.add_argument(
        "--measure",
        action="store_true",
        help="write nothing: report how often the artifact's tables write the words of "
        "--text files and of the --split of --corpora as their writers did, with and "
        "without the forms after a previous word",
    )
    p.add_argument("--text", action="append", default=[], help="with --measure: cased text")
    p.add_argument(
        "--split",
        choices=["train", "valid", "test"],
        default="test",
        help="with --measure: which split of --corpora",
    )
    p.add_argument(
        "--all-splits",
        action="store_true",
        help="count every document, not only the training split (the held-out documents "
        "then no longer measure the casing)",
    )
    p.set_defaults(handler=_run_casing)


def _run_casing(args: argparse.Namespace) -> int:
    from model_export.casing import write_casing  # noqa: PLC0415
    from service.contract.artifact import ArtifactError  # noqa: PLC0415

    if args.measure:
        return _measure_casing(args)
    try:
        counts = write_casing(
            args.artifact, args.corpora, args.nltk_data, None if args.all_splits else "train"
        )
    except (ArtifactError, FileNotFoundError, LookupError, ValueError) as exc:
        print(f"nextword casing: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"artifact": args.artifact, "forms": counts}, indent=2))
    return 0


def _measure_casing(args: argparse.Namespace) -> int:
    from model_export.casing import agreement  # noqa: PLC0415
    from model_export.keyboard import cased_documents  # noqa: PLC0415
    from service.contract.artifact import ModelArtifact  # noqa: PLC0415

    if not args.text and not args.corpora:
        print("nextword casing --measure: give --text and/or --corpora", file=sys.stderr)
        return 2
    vocab = ModelArtifact.load(args.artifact).vocab
    sets = cased_documents(args.text, args.corpora or [], args.split, args.nltk_data)
    results = {name: agreement(docs, vocab) for name, docs in sets.items()}
    for name, r in results.items():
        print(
            f"{name}: {r['words']:.0f} words outside sentence starts; written as shown: "
            f"{100 * r['own']:.2f}% by each word's own form, {100 * r['with_pairs']:.2f}% "
            "with the forms after a previous word"
        )
    return 0


def add_subcommands(sub) -> None:
    """Add train/evaluate/export/casing to the `nextword` argument parser's subparsers."""
    _add_train(sub)
    _add_evaluate(sub)
    _add_export(sub)
    _add_casing(sub)
