"""Engine benchmark: one recurrent step (seq=1) in ONNX Runtime vs torch eager, same weights.

For each training run directory the best checkpoint is exported with
`export_artifact` into a temporary artifact, so torch and ONNX Runtime step the very
same weights (a run without `best.pt` yet falls back to random weights of the run's
configuration, and the table says so: the speed of a step does not depend on the
weights). Three paths are timed at batch 1, 64 and 256, each step feeding the state
of the previous one back in:

- torch eager: the serving graph (model + softmax + top-k over words) under
  `torch.inference_mode()`, torch threads = cores;
- ORT session.run: the artifact's graph, hot-path outputs only (state + top-k),
  SessionOptions as the engine sets them (all graph optimisations, intra-op threads =
  cores, the manifest's session config);
- engine: `service.engine.runtime.OrtModel.run` (IOBinding, checks, output copies).

The compute limit is the float32 GEMM peak measured with numpy on this machine (in a
subprocess without OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE, so OpenBLAS picks its own
kernel; threadpoolctl reports which) divided by the FLOPs of one step (2 x the
multiply-adds of the recurrent layers, projection and decoder for one token).

    .venv/bin/python -m benchmarks.bench_engine --json benchmarks/results/engine.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.lib.machine import command_line
from benchmarks.lib.results import write_report

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RUNS = [ROOT / "runs" / "lstm", ROOT / "runs" / "gru"]
BATCHES = (1, 64, 256)
BLAS_OVERRIDES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
TARGET_SPEEDUP = 5.0
TARGET_SHARE_OF_LIMIT = 0.70

GEMM_SCRIPT = r"""
import json, sys, time
import numpy as np
seconds = float(sys.argv[1])
try:
    from threadpoolctl import threadpool_info
    pools = [{k: p.get(k) for k in ("internal_api", "version", "architecture", "num_threads",
                                     "threading_layer")} for p in threadpool_info()]
except ImportError:
    pools = "threadpoolctl not installed"
rng = np.random.default_rng(0)
sizes = {}
for n in (1024, 2048, 4096):
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b
    best, spent = float("inf"), 0.0
    while spent < seconds or best == float("inf"):
        t = time.perf_counter(); a @ b; dt = time.perf_counter() - t
        best, spent = min(best, dt), spent + dt
    sizes[n] = 2 * n ** 3 / best / 1e9
print(json.dumps({"gflops_by_size": sizes, "peak_gflops": max(sizes.values()),
                  "numpy": np.__version__, "threadpools": pools}))
"""


def gemm_peak(seconds: float) -> dict:
    """Peak float32 GEMM GFLOP/s of numpy, measured in a subprocess free of BLAS overrides."""
    env = {k: v for k, v in os.environ.items() if k not in BLAS_OVERRIDES}
    out = subprocess.run(
        [sys.executable, "-c", GEMM_SCRIPT, str(seconds)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["removed_from_env"] = {k: os.environ[k] for k in BLAS_OVERRIDES if k in os.environ}
    return result


def step_flops(config) -> dict[str, int]:
    """FLOPs of one token's step: 2 x multiply-adds of every weight matrix it touches."""
    gates = 4 if config.cell == "lstm" else 3
    e, h, v = config.embedding_size, config.hidden_size, config.vocab_size
    recurrent = sum(gates * h * ((e if layer == 0 else h) + h) for layer in range(config.layers))
    projection = h * e if h != e else 0
    decoder = e * v
    macs = {"recurrent": recurrent, "projection": projection, "decoder": decoder}
    return {**{k: 2 * m for k, m in macs.items()}, "total": 2 * sum(macs.values())}


def load_model(run_dir: Path):
    """(model, vocab, where the weights come from) for a run directory."""
    import torch  # noqa: PLC0415

    from model_export.checkpoint import load_checkpoint  # noqa: PLC0415
    from model_export.model import RNNLM, ModelConfig  # noqa: PLC0415
    from service.contract.tokenizer import SPECIALS  # noqa: PLC0415
    from service.contract.vocab import Vocabulary  # noqa: PLC0415

    if (run_dir / "best.pt").is_file():
        model, vocab, _ = load_checkpoint(run_dir)
        return model, vocab, f"{run_dir.name}: trained weights ({run_dir / 'best.pt'})"
    config_path = run_dir / "config.json"
    config = (
        ModelConfig(**json.loads(config_path.read_text())["model"])
        if config_path.is_file()
        else ModelConfig(vocab_size=12_000, cell=run_dir.name if run_dir.name == "gru" else "lstm")
    )
    vocab_path = run_dir / "vocab.txt"
    vocab = (
        Vocabulary.load(vocab_path)
        if vocab_path.is_file()
        else Vocabulary([*SPECIALS, *(f"w{i}" for i in range(config.vocab_size - len(SPECIALS)))])
    )
    torch.manual_seed(0)
    model = RNNLM(config).eval()
    return (
        model,
        vocab,
        f"{run_dir.name}: RANDOM weights (no {run_dir / 'best.pt'} yet; same config)",
    )


def measure(step: Callable[[], None], seconds: float, min_runs: int = 20) -> np.ndarray:
    """Per-call wall times (s) of `step`, after a warm-up."""
    for _ in range(5):
        step()
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < min_runs:
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return np.array(times)


def torch_step(model, vocab, batch: int, threads: int) -> Callable[[], None]:
    """One eager step of the serving graph, state fed back."""
    import torch  # noqa: PLC0415

    from model_export.export import ServingGraph  # noqa: PLC0415

    torch.set_num_threads(threads)
    graph = ServingGraph(model, vocab.suggestible).eval()
    n_state = 2 if model.config.cell == "lstm" else 1
    rng = np.random.default_rng(batch)
    state = list(model.init_state(batch))

    def step() -> None:
        tokens = torch.from_numpy(rng.integers(3, len(vocab), (batch, 1)))
        with torch.inference_mode():
            out = graph(tokens, *state)
        state[:] = out[:n_state]
        out[-2].numpy()  # the top-k ids reach numpy, as in the service

    return step


def ort_session(artifact, threads: int):
    """An InferenceSession with the engine's options."""
    import onnxruntime as ort  # noqa: PLC0415

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    for key, value in (artifact.manifest.get("session_config") or {}).items():
        options.add_session_config_entry(str(key), str(value))
    return ort.InferenceSession(
        str(artifact.onnx_path), options, providers=["CPUExecutionProvider"]
    )


def ort_step(session, artifact, batch: int) -> Callable[[], None]:
    """One session.run of the hot path (state + top-k, never the full distribution)."""
    from service.contract.artifact import TOPK_IDS, TOPK_PROBS, state_inputs, state_outputs  # noqa: PLC0415

    ins, outs = state_inputs(artifact.cell), state_outputs(artifact.cell)
    rng = np.random.default_rng(batch)
    shape = (artifact.layers, batch, artifact.hidden_size)
    state = [np.zeros(shape, np.float32) for _ in ins]
    vocab_size = len(artifact.vocab)

    def step() -> None:
        feeds = {"tokens": rng.integers(3, vocab_size, (batch, 1)), **dict(zip(ins, state))}
        result = session.run([*outs, TOPK_PROBS, TOPK_IDS], feeds)
        state[:] = result[: len(outs)]

    return step


def engine_step(model, batch: int) -> Callable[[], None]:
    """One `OrtModel.run` of the service's engine."""
    rng = np.random.default_rng(batch)
    holder = [model.zero_state(batch)]
    vocab_size = len(model.vocab)

    def step() -> None:
        holder[0] = model.run(rng.integers(3, vocab_size, (batch, 1)), holder[0]).state

    return step


def bench_run(run_dir: Path, seconds: float, threads: int, int8: bool) -> dict:
    """Every path at every batch size for one run directory."""
    import onnxruntime as ort  # noqa: PLC0415

    from model_export.export import export_artifact  # noqa: PLC0415
    from service.contract.artifact import ModelArtifact  # noqa: PLC0415

    model, vocab, source = load_model(run_dir)
    print(f"weights: {source}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        artifact_dir = Path(tmp) / run_dir.name
        export_artifact(
            model,
            vocab,
            artifact_dir,
            int8=int8,
            extra={"training": {"note": "temporary artifact for bench_engine"}},
        )
        artifact = ModelArtifact.load(artifact_dir)
        session = ort_session(artifact, threads)
        paths: dict[str, Callable[[int], Callable[[], None]]] = {
            "torch eager": lambda b: torch_step(model, vocab, b, threads),
            "ORT session.run": lambda b: ort_step(session, artifact, b),
        }
        engine_note = None
        try:
            from service.engine.runtime import OrtModel  # noqa: PLC0415

            engine = OrtModel(artifact, ["CPUExecutionProvider"], intra_op_threads=threads)
            paths["engine OrtModel.run"] = lambda b: engine_step(engine, b)
        except (ImportError, TypeError) as exc:  # the engine is optional here
            engine_note = f"engine path skipped: {exc}"
            print(engine_note, flush=True)
        timings: dict[str, dict[str, dict[str, float]]] = {}
        for name, make in paths.items():
            timings[name] = {}
            for batch in BATCHES:
                t = measure(make(batch), seconds)
                timings[name][str(batch)] = {
                    "p50_ms": float(np.median(t) * 1e3),
                    "p99_ms": float(np.quantile(t, 0.99) * 1e3),
                    "mean_ms": float(t.mean() * 1e3),
                    "runs": len(t),
                    "steps_per_s": float(batch / np.median(t)),
                }
                print(
                    f"  {name:20s} batch {batch:3d}: p50 {timings[name][str(batch)]['p50_ms']:.3f} ms",
                    flush=True,
                )
    cfg = model.config
    return {
        "weights": source,
        "engine_note": engine_note,
        "int8": int8,
        "config": cfg.to_dict(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "flops_per_step": step_flops(cfg),
        "ort_providers": session.get_providers(),
        "ort_version": ort.__version__,
        "timings": timings,
    }


def machine(threads: int) -> dict:
    """What produced the figures, and how loaded the machine was."""
    import onnxruntime as ort  # noqa: PLC0415
    import torch  # noqa: PLC0415

    cpu = platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": threads,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "platform": platform.platform(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def table(report: dict) -> str:
    """The figures as markdown, headed by the machine, with the two targets checked."""
    m, peak = report["machine"], report["gemm"]["peak_gflops"]
    arch = report["gemm"]["threadpools"]
    arch_text = (
        ", ".join(
            f"{p['internal_api']} {p['version']} {p['architecture']} x{p['num_threads']}"
            for p in arch
        )
        if isinstance(arch, list)
        else arch
    )
    lines = [
        f"machine: {m['cpu']}, {m['cores']} cores (threads used: {m['threads']}); load average "
        f"{m['load_average_1m']:.2f} at start; Python {m['python']}, numpy {m['numpy']}, "
        f"torch {m['torch']}, onnxruntime {m['onnxruntime']}",
        f"float32 GEMM peak: {peak:.0f} GFLOP/s (numpy, {arch_text}; "
        f"by size: {', '.join(f'{n}: {g:.0f}' for n, g in report['gemm']['gflops_by_size'].items())})",
    ]
    for name, r in report["models"].items():
        flops = r["flops_per_step"]["total"]
        limit = peak * 1e9 / flops
        t = r["timings"]
        c = r["config"]
        lines += [
            "",
            f"### {name}: {c['cell']} {c['layers']}x{c['hidden_size']}, embedding "
            f"{c['embedding_size']}, vocab {c['vocab_size']:,} ({r['parameters']:,} parameters"
            f"{', int8 artifact' if r['int8'] else ''})",
            f"{r['weights']}",
            f"one step = {flops / 1e6:.2f} MFLOP -> compute limit {limit:,.0f} steps/s",
            "",
            "| path | batch 1 p50 (p99) | batch 64 per run | batch 64 steps/s | batch 256 per run "
            "| batch 256 steps/s | batch 256 % of limit |",
            "|---|---|---|---|---|---|---|",
        ]
        for path, by_batch in t.items():
            b1, b64, b256 = by_batch["1"], by_batch["64"], by_batch["256"]
            lines.append(
                f"| {path} | {b1['p50_ms']:.3f} ms ({b1['p99_ms']:.3f}) | {b64['p50_ms']:.2f} ms | "
                f"{b64['steps_per_s']:,.0f} | {b256['p50_ms']:.2f} ms | {b256['steps_per_s']:,.0f} | "
                f"{b256['steps_per_s'] / limit:.0%} |"
            )
        ort_path = "engine OrtModel.run" if "engine OrtModel.run" in t else "ORT session.run"
        speedup = t["torch eager"]["1"]["p50_ms"] / t[ort_path]["1"]["p50_ms"]
        best = max(t[ort_path][b]["steps_per_s"] for b in ("64", "256"))
        lines += [
            "",
            f"- {ort_path} vs torch eager at batch 1: {speedup:.1f}x "
            f"(target >= {TARGET_SPEEDUP:.0f}x: {'met' if speedup >= TARGET_SPEEDUP else 'NOT met'})",
            f"- {ort_path} best batched throughput: {best:,.0f} steps/s = {best / limit:.0%} of the "
            f"compute limit (target >= {TARGET_SHARE_OF_LIMIT:.0%}: "
            f"{'met' if best / limit >= TARGET_SHARE_OF_LIMIT else 'NOT met'})",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--checkpoint",
        nargs="+",
        type=Path,
        default=DEFAULT_RUNS,
        help="training run directories (best.pt + config.json + vocab.txt)",
    )
    p.add_argument(
        "--seconds",
        type=float,
        default=2.0,
        help="time spent measuring each path at each batch size",
    )
    p.add_argument(
        "--gemm-seconds",
        type=float,
        default=1.0,
        help="time spent measuring GEMM at each matrix size",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="intra-op threads for ONNX Runtime and torch",
    )
    p.add_argument(
        "--int8",
        action="store_true",
        help="export int8-weight artifacts (as bundled) instead of float32",
    )
    p.add_argument("--json", type=Path, help="also write the figures as JSON to this path")
    args = p.parse_args(argv)
    report: dict[str, Any] = {
        "machine": machine(args.threads),
        "gemm": gemm_peak(args.gemm_seconds),
        "models": {},
    }
    print(f"GEMM peak {report['gemm']['peak_gflops']:.0f} GFLOP/s", flush=True)
    for run_dir in args.checkpoint:
        report["models"][run_dir.name] = bench_run(run_dir, args.seconds, args.threads, args.int8)
    report["command"] = command_line("benchmarks.bench_engine", argv)
    text = table(report)
    print()
    print(text)
    if args.json:
        write_report(args.json, report, text)


if __name__ == "__main__":
    main()
