"""GPU check: CUDA vs CPU parity and engine steps/s of the bundled models, one JSON + table.

For each bundled model (service/models: lstm, gru):

- parity: the max abs difference of the top-k probabilities between the CPU and the
  CUDA provider over 20 steps of a fixed text (one step per run, each provider feeding
  its own state back), with default settings (TF32 off) and with `allow_tf32=True`;
- engine steps/s at batch 1, 256 and 4096: `OrtModel.run` as served (one step per run,
  state fed back, states copied host <-> device once per batch), on CPU (one ORT thread
  per core) and on CUDA.

Where CUDA is not usable (no GPU, no CUDA libraries, CPU-only onnxruntime) the CUDA
columns say "not available" and the CPU ones still run. `--quick` shortens every
measurement so that a CPU rehearsal ends within about a minute on 2 cores.

    .venv/bin/python -m benchmarks.gpu_check --out /tmp/gpu_check [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from benchmarks.lib.machine import machine, machine_lines
from benchmarks.lib.results import write_report
from service.config import BUNDLED_MODELS
from service.contract.artifact import ModelArtifact
from service.engine.runtime import CPU, CUDA, OrtModel

try:
    from tqdm import tqdm
except ImportError:  # tqdm comes with the `train` extra; a bare GPU host may lack it
    tqdm = None

MODELS = ("lstm", "gru")
BATCHES = (1, 256, 4096)
PARITY_STEPS = 20
PARITY_TEXT = (
    "i am coming home tonight because the weather is bad and i want to see you before "
    "the end of the week"
)
NA = "not available"
MODULES = ("onnxruntime", "numpy")


def gpu_info() -> dict[str, Any]:
    """The GPU as nvidia-smi and onnxruntime see it (empty fields where they see none)."""
    info: dict[str, Any] = {
        "ort_device": ort.get_device(),
        "ort_cuda_version": getattr(ort, "cuda_version", None),
        "ort_available_providers": ort.get_available_providers(),
    }
    try:
        info["ort_ep_devices"] = [
            {
                "ep": d.ep_name,
                "type": str(d.device.type),
                "vendor": d.device.vendor,
                "metadata": dict(d.device.metadata),
            }
            for d in ort.get_ep_devices()
        ]
    except Exception as error:  # older onnxruntime
        info["ort_ep_devices"] = f"unknown ({type(error).__name__})"
    smi = shutil.which("nvidia-smi")
    if smi:
        query = "--query-gpu=name,driver_version,memory.total,compute_cap"
        try:
            out = subprocess.run(
                [smi, query, "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout
            info["nvidia_smi"] = [line.strip() for line in out.splitlines() if line.strip()]
        except (OSError, subprocess.SubprocessError) as error:
            info["nvidia_smi"] = f"failed: {error}"
    else:
        info["nvidia_smi"] = "not found"
    return info


def load_cuda(artifact: ModelArtifact, allow_tf32: bool) -> tuple[OrtModel | None, str]:
    """An OrtModel really on CUDA, or None and why not."""
    if CUDA not in ort.get_available_providers():
        return None, "onnxruntime has no CUDAExecutionProvider"
    model = OrtModel(artifact, [CUDA, CPU], allow_tf32=allow_tf32)
    if not model.on_cuda:
        return None, "CUDA session fell back to CPU (no GPU or CUDA libraries)"
    return model, ""


def parity_tokens(model: OrtModel) -> list[int]:
    """PARITY_STEPS tokens: end of sentence, then the fixed text (cycled if short)."""
    ids = [model.eos_id, *model.vocab.encode(PARITY_TEXT)]
    return [ids[i % len(ids)] for i in range(PARITY_STEPS)]


def parity(cpu: OrtModel, cuda: OrtModel) -> dict[str, Any]:
    """Max abs differences over PARITY_STEPS steps, each provider feeding its state back."""
    cpu_state, cuda_state = cpu.zero_state(1), cuda.zero_state(1)
    topk = state = 0.0
    top1_agree = 0
    for token in parity_tokens(cpu):
        tokens = np.array([[token]], dtype=np.int64)
        a, b = cpu.run(tokens, cpu_state), cuda.run(tokens, cuda_state)
        topk = max(topk, float(np.abs(a.topk_probs - b.topk_probs).max()))
        state = max(state, *(float(np.abs(x - y).max()) for x, y in zip(a.state, b.state)))
        top1_agree += int(a.topk_ids[0, 0] == b.topk_ids[0, 0])
        cpu_state, cuda_state = a.state, b.state
    return {
        "max_abs_diff_topk_probs": topk,
        "max_abs_diff_state": state,
        "top1_agree": f"{top1_agree}/{PARITY_STEPS}",
        "use_tf32": cuda.session.get_provider_options().get(CUDA, {}).get("use_tf32"),
    }


def steps_per_s(
    model: OrtModel, batch: int, seconds: float, min_runs: int, warmup: int
) -> dict[str, Any]:
    """Steps/s of `OrtModel.run` at `batch` rows, one step per run, state fed back."""
    rng = np.random.default_rng(batch)
    tokens = [rng.integers(3, len(model.vocab), size=(batch, 1)) for _ in range(4)]
    state = model.zero_state(batch)
    for i in range(warmup):
        state = model.run(tokens[i % 4], state).state
    runs = 0
    start = time.perf_counter()
    while runs < min_runs or time.perf_counter() - start < seconds:
        state = model.run(tokens[runs % 4], state).state
        runs += 1
    elapsed = time.perf_counter() - start
    return {"steps_per_s": batch * runs / elapsed, "runs": runs, "seconds": round(elapsed, 3)}


def check_model(artifact: ModelArtifact, args: argparse.Namespace, progress: Any) -> dict[str, Any]:
    """Parity and steps/s of one model."""
    name = artifact.name
    cpu = OrtModel(artifact, [CPU])
    cuda, why = load_cuda(artifact, allow_tf32=False)
    result: dict[str, Any] = {
        "cell": artifact.cell,
        "layers": artifact.layers,
        "hidden_size": artifact.hidden_size,
        "vocab_size": len(artifact.vocab),
        "cpu_providers": cpu.providers,
        "cuda_providers": cuda.providers if cuda else NA,
        "cuda_unavailable_reason": why or None,
        "parity": {},
        "steps_per_s": {"cpu": {}, "cuda": {} if cuda else NA},
    }
    for setting, allow in (("default", False), ("allow_tf32", True)):
        with progress(f"{name}: parity {setting}"):
            if cuda is None:
                result["parity"][setting] = NA
                continue
            model = cuda if not allow else load_cuda(artifact, allow_tf32=True)[0]
            assert model is not None
            result["parity"][setting] = parity(cpu, model)
    for provider, model in (("cpu", cpu), ("cuda", cuda)):
        for batch in BATCHES:
            with progress(f"{name}: {provider} batch {batch}"):
                if model is None:
                    continue
                result["steps_per_s"][provider][str(batch)] = steps_per_s(
                    model, batch, args.seconds, args.min_runs, args.warmup
                )
    return result


def fmt_diff(value: Any) -> str:
    return value if isinstance(value, str) else f"{value['max_abs_diff_topk_probs']:.1e}"


def fmt_rate(cell: Any) -> str:
    return cell if isinstance(cell, str) else f"{cell['steps_per_s']:,.0f}"


def table(report: dict[str, Any]) -> str:
    """The printed summary: machine, parity, steps/s."""
    info, gpu = report["machine"], report["gpu"]
    smi = gpu["nvidia_smi"]
    lines = [
        *machine_lines(info, MODULES),
        f"GPU: {'; '.join(smi) if isinstance(smi, list) else 'nvidia-smi ' + smi}; "
        f"onnxruntime device {gpu['ort_device']}, CUDA {gpu['ort_cuda_version']}",
        f"mode: {'quick' if report['settings']['quick'] else 'full'}, "
        f">= {report['settings']['seconds']} s and >= {report['settings']['min_runs']} runs "
        "per measurement",
        "",
        f"Parity, CUDA vs CPU: max abs diff of top-k probabilities over {PARITY_STEPS} steps",
        "",
        "| model | default (use_tf32=0) | allow_tf32 (use_tf32=1) |",
        "|---|---|---|",
    ]
    for name, result in report["models"].items():
        p = result["parity"]
        lines.append(f"| {name} | {fmt_diff(p['default'])} | {fmt_diff(p['allow_tf32'])} |")
    lines += [
        "",
        "Engine steps/s, one step per run, state fed back (OrtModel.run: states copied per batch)",
        "",
        f"| model | batch | CPU, {info['nproc']} threads | CUDA |",
        "|---|---|---|---|",
    ]
    for name, result in report["models"].items():
        rates = result["steps_per_s"]
        for batch in BATCHES:
            cuda = rates["cuda"] if isinstance(rates["cuda"], str) else rates["cuda"][str(batch)]
            lines.append(
                f"| {name} | {batch:,} | {fmt_rate(rates['cpu'][str(batch)])} | {fmt_rate(cuda)} |"
            )
    reasons = {r["cuda_unavailable_reason"] for r in report["models"].values()} - {None}
    if reasons:
        lines += ["", f"CUDA {NA}: {'; '.join(sorted(reasons))}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the results")
    parser.add_argument("--models-dir", type=Path, default=BUNDLED_MODELS)
    parser.add_argument("--quick", action="store_true", help="short measurements (rehearsal)")
    parser.add_argument("--seconds", type=float, help="least seconds per measurement")
    args = parser.parse_args(argv)
    if args.seconds is None:
        args.seconds = 0.2 if args.quick else 2.0
    args.min_runs, args.warmup = (2, 1) if args.quick else (5, 3)

    artifacts = [ModelArtifact.load(args.models_dir / name) for name in MODELS]
    report: dict[str, Any] = {
        "machine": machine(MODULES),
        "gpu": gpu_info(),
        "settings": {
            "quick": args.quick,
            "seconds": args.seconds,
            "min_runs": args.min_runs,
            "warmup_runs": args.warmup,
            "batches": list(BATCHES),
            "parity_steps": PARITY_STEPS,
            "parity_text": PARITY_TEXT,
            "models_dir": str(args.models_dir),
        },
        "models": {},
    }
    tasks = len(artifacts) * (2 + 2 * len(BATCHES))
    bar = tqdm(total=tasks, unit="check", file=sys.stderr) if tqdm else None

    @contextlib.contextmanager
    def progress(what: str) -> Iterator[None]:
        if bar is None:
            print(what, file=sys.stderr, flush=True)
            yield
            return
        bar.set_description(what)
        yield
        bar.update(1)

    for artifact in artifacts:
        report["models"][artifact.name] = check_model(artifact, args, progress)
    if bar is not None:
        bar.close()

    args.out.mkdir(parents=True, exist_ok=True)
    text = table(report)
    write_report(args.out / "gpu_check.json", report, text)
    print(text)
    print(f"\nwrote {args.out / 'gpu_check.json'} and {args.out / 'gpu_check.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
