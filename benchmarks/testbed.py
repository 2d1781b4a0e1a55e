"""What a benchmark ran on: the machine, the versions, and the models it served.

The end-to-end and memory benchmarks serve the bundled models (service/models) by
default. Where they are absent (a clone before `make train-bundled`), random-weight
artifacts are exported into a temporary directory instead, and the table says so:
"tiny" (the test fixture's 2x32 LSTM and 1x32 GRU over ~200 words: the model costs
almost nothing) or "full" (random weights at the bundled models' sizes, int8 like
them: the same cost per step as the real models).
"""

from __future__ import annotations

import importlib
import os
import platform
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUNDLED_MODELS = ROOT / "service" / "models"
FALLBACKS = ("tiny", "full")
# The sizes the bundled models are trained at (runs/*/config.json of `make train-bundled`).
FULL_SIZES = {
    "lstm": {"vocab_size": 12_000, "embedding_size": 256, "hidden_size": 512, "layers": 2},
    "gru": {"vocab_size": 12_000, "embedding_size": 256, "hidden_size": 512, "layers": 1},
}


def cpu_model() -> str:
    """The CPU's name from /proc/cpuinfo (the machine type where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def version(module: str) -> str:
    """A module's version, or "not installed"."""
    try:
        return str(getattr(importlib.import_module(module), "__version__", "?"))
    except ImportError:
        return "not installed"


def machine(modules: tuple[str, ...]) -> dict[str, object]:
    """CPU, cores, load and the versions of `modules`."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu_model(),
        "nproc": usable,
        "cpu_count": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "platform": platform.platform(),
        "python": platform.python_version(),
        **{name: version(name) for name in modules},
    }


def machine_lines(info: dict[str, object], modules: tuple[str, ...]) -> list[str]:
    """The header every table starts with."""
    return [
        f"machine: {info['cpu']}, nproc {info['nproc']} (cpu_count {info['cpu_count']}), "
        f"load average {info['load_average_1m']} at start, {info['platform']}",
        "versions: Python "
        + str(info["python"])
        + ", "
        + ", ".join(f"{name} {info[name]}" for name in modules),
    ]


def has_models(models_dir: Path) -> bool:
    """Whether a directory holds at least one artifact (a subdirectory with a manifest)."""
    return models_dir.is_dir() and any(models_dir.glob("*/manifest.json"))


def export_full_models(root: Path) -> Path:
    """Random-weight artifacts at the bundled models' sizes (int8, as bundled) in root/."""
    import torch  # noqa: PLC0415

    from model_export.export import export_artifact  # noqa: PLC0415
    from model_export.model import RNNLM, ModelConfig  # noqa: PLC0415
    from service.contract.tokenizer import SPECIALS  # noqa: PLC0415
    from service.contract.vocab import Vocabulary  # noqa: PLC0415

    for seed, (cell, sizes) in enumerate(FULL_SIZES.items()):
        n_words = sizes["vocab_size"] - len(SPECIALS)
        vocab = Vocabulary([*SPECIALS, *(f"w{i}" for i in range(n_words))])
        torch.manual_seed(seed)
        model = RNNLM(ModelConfig(cell=cell, dropout=0.0, **sizes))
        export_artifact(
            model,
            vocab,
            root / cell,
            int8=True,
            extra={"training": {"corpora": [], "note": "random weights (benchmark)"}},
        )
    return root


@contextmanager
def models_dir(requested: Path | None, fallback: str) -> Iterator[tuple[Path, str]]:
    """(directory of the models to serve, a line saying what they are)."""
    if requested is not None:
        if not has_models(requested):
            sys.exit(f"{requested}: no model artifacts (subdirectories with manifest.json)")
        yield requested, f"models: {requested}"
        return
    if has_models(BUNDLED_MODELS):
        yield BUNDLED_MODELS, f"models: bundled ({BUNDLED_MODELS})"
        return
    with tempfile.TemporaryDirectory(prefix="nextword-bench-models-") as tmp:
        root = Path(tmp)
        print(
            f"no bundled models in {BUNDLED_MODELS}: exporting {fallback} random-weight "
            f"artifacts into {root}",
            file=sys.stderr,
            flush=True,
        )
        if fallback == "tiny":
            sys.path.insert(0, str(ROOT))
            from tests.conftest import make_models_dir  # noqa: PLC0415

            make_models_dir(root)
            note = (
                "models: NO BUNDLED MODELS - tiny random-weight artifacts of the test "
                "fixture (LSTM 2x32, GRU 1x32, ~200 words): the model costs almost nothing"
            )
        else:
            export_full_models(root)
            note = (
                "models: NO BUNDLED MODELS - random weights at the bundled sizes, int8 "
                "(LSTM 2x512, GRU 1x512, embedding 256, vocab 12,000): same cost per step"
            )
        yield root, note
