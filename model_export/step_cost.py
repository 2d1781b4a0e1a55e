"""What one step of a model costs at a serving batch: artifacts and candidate shapes compared.

    python -m model_export.step_cost --artifact service/models/lstm --shape lstm:24000:128:512:2

Each model runs one step (`tokens` (B, 1) and a state; the state and top-k fetched, as the
engine's step fetches them) on ONNX Runtime's CPU provider. A `--shape`
(cell:vocab:embedding:hidden:layers) is an untrained model of that shape exported as
`nextword export --int8` would (the cost does not depend on the weights). The models are
timed in turn, round after round, so that a machine's changing load falls on all of them;
each is compared with the first model of its cell by the ratio of their fastest steps and
by the median of the per-round ratios. The table names the machine and versions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Timed:
    """A model under test: its session, one step's feed and what the step fetches."""

    name: str
    cell: str
    shape: str
    megabytes: float
    session: Any
    feed: dict[str, np.ndarray]
    fetch: list[str]


def export_shape(spec: str, root: Path) -> Path:
    """Export an untrained int8 model of `cell:vocab:embedding:hidden:layers` under root."""
    import torch  # noqa: PLC0415

    from model_export.export import export_artifact  # noqa: PLC0415
    from model_export.model import RNNLM, ModelConfig  # noqa: PLC0415
    from service.contract.tokenizer import SPECIALS  # noqa: PLC0415
    from service.contract.vocab import Vocabulary  # noqa: PLC0415

    cell, vocab_size, embedding, hidden, layers = spec.split(":")
    size = int(vocab_size)
    vocab = Vocabulary([*SPECIALS, *(f"w{i}" for i in range(size - len(SPECIALS)))])
    torch.manual_seed(0)
    model = RNNLM(ModelConfig(size, cell, int(embedding), int(hidden), int(layers), 0.0))
    out = root / spec.replace(":", "-")
    export_artifact(model, vocab, out, int8=True)
    return out


def load(path: Path, name: str, batch: int, threads: int) -> Timed:
    """An artifact's session (its manifest's session settings) and a random step's feed."""
    import onnxruntime as ort  # noqa: PLC0415

    manifest = json.loads((path / "manifest.json").read_text())
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    for key, value in manifest.get("session_config", {}).items():
        options.add_session_config_entry(key, value)
    session = ort.InferenceSession(
        str(path / "model.onnx"), options, providers=["CPUExecutionProvider"]
    )
    rng = np.random.default_rng(0)
    layers, hidden = manifest["layers"], manifest["hidden_size"]
    feed = {"tokens": rng.integers(3, manifest["vocab_size"], (batch, 1)).astype(np.int64)}
    for state in manifest["inputs"][1:]:
        feed[state] = (rng.standard_normal((layers, batch, hidden)) * 0.3).astype(np.float32)
    shape = f"{manifest['vocab_size']}/{manifest['embedding_size']}/{hidden}/{layers}"  # V/E/H/L
    return Timed(
        name,
        manifest["cell"],
        shape,
        (path / "model.onnx").stat().st_size / 1e6,
        session,
        feed,
        [o for o in manifest["outputs"] if o != "probs"],  # the engine's step skips probs
    )


def measure(models: list[Timed], rounds: int, runs: int) -> dict[str, list[float]]:
    """Seconds per step of each model in each round (models in turn within a round)."""
    times: dict[str, list[float]] = {m.name: [] for m in models}
    for m in models:
        m.session.run(m.fetch, m.feed)  # warm-up
    for _ in range(rounds):
        for m in models:
            start = time.perf_counter()
            for _ in range(runs):
                m.session.run(m.fetch, m.feed)
            times[m.name].append((time.perf_counter() - start) / runs)
    return times


def table(models: list[Timed], times: dict[str, list[float]]) -> str:
    """One line a model: size, fastest and median step, ratios to the first of its cell."""
    import onnxruntime as ort  # noqa: PLC0415

    base: dict[str, str] = {}
    lines = [
        f"# {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; onnxruntime {ort.__version__}",
        "| model | V/E/H/L | int8 MB | fastest ms | median ms | fastest ratio | median ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in models:
        ref = base.setdefault(m.cell, m.name)
        ratios = [a / b for a, b in zip(times[m.name], times[ref])]
        lines.append(
            f"| {m.name} | {m.shape} | {m.megabytes:.2f} | {min(times[m.name]) * 1e3:.2f} | "
            f"{statistics.median(times[m.name]) * 1e3:.2f} | "
            f"{min(times[m.name]) / min(times[ref]):.3f} | {statistics.median(ratios):.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Compare step costs; the first model of each cell is the reference of that cell."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", action="append", default=[], help="artifact directory")
    p.add_argument(
        "--shape",
        action="append",
        default=[],
        help="cell:vocab:embedding:hidden:layers of an untrained int8 model",
    )
    p.add_argument("--batch", type=int, default=256, help="rows in one step")
    p.add_argument("--rounds", type=int, default=80, help="rounds (each model once a round)")
    p.add_argument("--runs", type=int, default=1, help="steps timed together in a round")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    args = p.parse_args(argv)
    if not args.artifact and not args.shape:
        p.error("give at least one --artifact or --shape")
    with tempfile.TemporaryDirectory() as tmp:
        paths = [(Path(a), a) for a in args.artifact]
        paths += [(export_shape(s, Path(tmp)), s) for s in args.shape]
        models = [load(path, name, args.batch, args.threads) for path, name in paths]
    print(f"one step at batch {args.batch}, {args.threads} thread(s), {args.rounds} rounds")
    print(table(models, measure(models, args.rounds, args.runs)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
