"""GPU check: CUDA vs CPU parity and engine steps/s of the bundled models, one JSON + table.

For each bundled model (service/models: lstm, gru):

- parity: the max abs difference of the top-k probabilities between the CPU and the
  CUDA provider over 20 steps of a fixed text (one step per run, each provider feeding
  its own state back), with default settings (TF32 off) and with `allow_tf32=True`;
- parity of the resident path (`StatePool.run`: states kept in pool rows on the device),
  CUDA vs CPU, default settings;
- engine steps/s at batch 1, 256 and 4096, one step per run, state fed back, on CPU (one
  ORT thread per core) and on CUDA: "copied" is `OrtModel.run` (states copied host <->
  device once per batch), "resident" is `StatePool.run` (token ids in, top-k out, the
  batch's rows gathered and scattered on the device) from rows spread over a pool of
  --pool-rows rows;
- many sessions (--sessions, the LSTM): that many sessions created through the session
  store with their states resident in the pool (each from its first word), the device
  bytes and the host bytes (resident set growth) per session, and a sample of them
  stepped again and checked against the copied path.

Where CUDA is not usable (no GPU, no CUDA libraries, CPU-only onnxruntime) the CUDA
columns say "not available" and the CPU ones still run. `--quick` shortens every
measurement so that a CPU rehearsal ends within about a minute on 2 cores.

    .venv/bin/python -m benchmarks.gpu_check --out /tmp/gpu_check [--quick] [--sessions N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
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
from service.engine.pool import StatePool, device_free_bytes
from service.engine.residency import Residency
from service.engine.runtime import CPU, CUDA, OrtModel
from service.store import SessionRecord
from service.store.memory import MemorySessionStore

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


def resident_parity(cpu: OrtModel, cuda: OrtModel) -> dict[str, Any]:
    """Max abs difference of the top-k probabilities, CUDA vs CPU, both through their
    pools (each feeding its own rows back), over PARITY_STEPS steps."""
    pools = [_pool(cpu, 64), _pool(cuda, 64)]
    slots = [p.upload([tuple(a[:, 0] for a in cpu.zero_state(1))]) for p in pools]
    topk = 0.0
    for token in parity_tokens(cpu):
        tokens = np.array([[token]], dtype=np.int64)
        a, b = (p.run(tokens, s, False) for p, s in zip(pools, slots))
        topk = max(topk, float(np.abs(a.topk_probs - b.topk_probs).max()))
        for pool, rows in zip(pools, slots):
            pool.release(rows)
        slots = [a.rows, b.rows]
    return {"max_abs_diff_topk_probs": topk}


_POOLS: dict[int, StatePool] = {}  # by id(model): one pool per model at a time


def _pool(model: OrtModel, rows: int) -> StatePool:
    """The model's pool, (re)made with at least `rows` rows."""
    pool = _POOLS.get(id(model))
    if pool is None or pool.rows < rows:
        _POOLS.pop(id(model), None)  # the old pool's memory goes first
        del pool
        _POOLS[id(model)] = StatePool(model, rows)
    return _POOLS[id(model)]


def steps_per_s(
    model: OrtModel,
    batch: int,
    seconds: float,
    min_runs: int,
    warmup: int,
    resident: bool = False,
    pool_rows: int = 0,
) -> dict[str, Any]:
    """Steps/s at `batch` rows, one step per run, state fed back: `OrtModel.run` (copied)
    or `StatePool.run` (resident, from rows spread over a pool of `pool_rows`)."""
    rng = np.random.default_rng(batch)
    tokens = [rng.integers(3, len(model.vocab), size=(batch, 1)) for _ in range(4)]
    state = model.zero_state(batch)
    if resident:
        pool = _pool(model, max(pool_rows, 2 * batch + 16))
        # Sessions spread over the pool, as after many others came and went.
        held = pool.take(pool.rows - 2 * batch)
        keep = np.sort(rng.choice(len(held), size=batch, replace=False))
        slots = held[keep]
        pool.release(np.delete(held, keep))
        pool.release(pool.upload([tuple(a[:, b] for a in state) for b in range(batch)]))  # warm

        def step(i: int) -> None:
            nonlocal slots
            out = pool.run(tokens[i % 4], slots, False).rows
            pool.release(slots)
            slots = out
    else:

        def step(i: int) -> None:
            nonlocal state
            state = model.run(tokens[i % 4], state).state

    for i in range(warmup):
        step(i)
    runs = 0
    start = time.perf_counter()
    while runs < min_runs or time.perf_counter() - start < seconds:
        step(runs)
        runs += 1
    elapsed = time.perf_counter() - start
    return {"steps_per_s": batch * runs / elapsed, "runs": runs, "seconds": round(elapsed, 3)}


def rss_bytes() -> int:
    """This process's resident set."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def many_sessions(model: OrtModel, n: int, batch: int, progress: Any) -> dict[str, Any]:
    """`n` sessions through a MemorySessionStore, each with its state resident in the pool
    (current and previous rows: two words fed), made in batches; the bytes each costs on
    the device and in host memory (the resident set's growth less, on CPU, the pool rows
    taken); a sample stepped again against the copied path."""
    pool = _pool(model, 2 * n + 8 * batch + 16)
    store = MemorySessionStore(cap=n, ttl_s=1e9)
    residency = Residency(pool, store)
    rng = np.random.default_rng(7)
    (start_current,) = pool.upload([tuple(a[:, 0] for a in model.start.state)])
    words = rng.integers(3, len(model.vocab), size=(n, 2))
    ids = [f"s{i:07d}" for i in range(n)]
    loop = asyncio.new_event_loop()
    # ONNX Runtime's arena grows to a batch's activations once: before the measurement.
    warm = pool.run(words[:batch, :1], [start_current] * min(n, batch), False)
    pool.release(np.concatenate([warm.rows, pool.run(words[:batch, 1:], warm.rows, False).rows]))
    del warm
    gc.collect()
    used_before, rss_before = pool.used, rss_bytes()
    started = time.perf_counter()
    for lo in progress(range(0, n, batch)):
        hi = min(n, lo + batch)
        first = pool.run(words[lo:hi, :1], [start_current] * (hi - lo), False)
        second = pool.run(words[lo:hi, 1:], first.rows, False)
        records = [
            SessionRecord(
                ids[i], model.name, (), 2, 0.0, 0.0, 0, int(words[i, 1]), state_on_device=True
            )
            for i in range(lo, hi)
        ]
        written = loop.run_until_complete(store.put_many(records, [None] * (hi - lo)))
        assert all(written)
        pair = np.stack([second.rows, first.rows], axis=1)
        residency.commit(ids[lo:hi], [1] * (hi - lo), [0.0] * (hi - lo), pair)
        pool.release(pair.ravel())  # the entries hold them now
        del first, second, records
    created_s = time.perf_counter() - started
    rows = pool.used - used_before
    host = rss_bytes() - rss_before - (rows * pool.row_bytes if pool.device == "cpu" else 0)
    # A sample stepped again: a third word from the resident row vs the copied path.
    sample = sorted(rng.choice(n, size=min(n, 256), replace=False).tolist())
    got = loop.run_until_complete(store.get_many([ids[i] for i in sample]))
    third = rng.integers(3, len(model.vocab), size=(len(sample), 1))
    resident = pool.run(third, residency.find(got)[:, 0], False)  # type: ignore[arg-type]
    start = tuple(np.repeat(a, len(sample), axis=1) for a in model.start.state)
    copied = model.run(np.concatenate([words[sample], third], axis=1), start)
    diff = float(np.abs(resident.topk_probs - copied.topk_probs).max())
    store_bytes = store.memory_bytes()
    loop.run_until_complete(store.close())
    loop.close()
    return {
        "sessions": n,
        "pool_rows": pool.rows,
        "rows_used": rows,
        "device": pool.device,
        "device_bytes_per_session": rows * pool.row_bytes / n,
        "host_bytes_per_session": host / n,
        "store_bytes_per_session": store_bytes / n,
        "create_seconds": round(created_s, 2),
        "sessions_per_s": n / created_s,
        "sample_max_abs_diff_topk_probs": diff,
        "free_device_bytes_after": device_free_bytes() if pool.device == "cuda" else None,
    }


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
        "resident_steps_per_s": {"cpu": {}, "cuda": {} if cuda else NA},
    }
    for setting, allow in (("default", False), ("allow_tf32", True)):
        with progress(f"{name}: parity {setting}"):
            if cuda is None:
                result["parity"][setting] = NA
                continue
            model = cuda if not allow else load_cuda(artifact, allow_tf32=True)[0]
            assert model is not None
            result["parity"][setting] = parity(cpu, model)
    with progress(f"{name}: parity resident"):
        result["parity"]["resident"] = NA if cuda is None else resident_parity(cpu, cuda)
    for provider, model in (("cpu", cpu), ("cuda", cuda)):
        for batch in BATCHES:
            with progress(f"{name}: {provider} batch {batch}"):
                if model is None:
                    continue
                result["steps_per_s"][provider][str(batch)] = steps_per_s(
                    model, batch, args.seconds, args.min_runs, args.warmup
                )
            with progress(f"{name}: {provider} batch {batch} resident"):
                if model is None:
                    continue
                result["resident_steps_per_s"][provider][str(batch)] = steps_per_s(
                    model, batch, args.seconds, args.min_runs, args.warmup, True, args.pool_rows
                )
    if cuda is not None:
        _POOLS.pop(id(cuda), None)  # its memory back before the next model
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
    lines[-2] = "| model | default (use_tf32=0) | allow_tf32 (use_tf32=1) | resident, default |"
    lines[-1] = "|---|---|---|---|"
    for name, result in report["models"].items():
        p = result["parity"]
        lines.append(
            f"| {name} | {fmt_diff(p['default'])} | {fmt_diff(p['allow_tf32'])} "
            f"| {fmt_diff(p['resident'])} |"
        )
    lines += [
        "",
        "Engine steps/s, one step per run, state fed back: copied (OrtModel.run, states "
        "copied per batch) and resident (StatePool.run, states in pool rows on the device, "
        f"{report['settings']['pool_rows']:,} rows)",
        "",
        f"| model | batch | CPU copied, {info['nproc']} threads | CPU resident | CUDA copied "
        "| CUDA resident | CUDA resident / copied |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, result in report["models"].items():
        cells = []
        for batch in BATCHES:
            row: list[Any] = []
            for table_ in ("steps_per_s", "resident_steps_per_s"):
                for provider in ("cpu", "cuda"):
                    rates = result[table_][provider]
                    row.append(rates if isinstance(rates, str) else rates[str(batch)])
            cpu_copied, cuda_copied, cpu_resident, cuda_resident = row
            ratio = (
                f"{cuda_resident['steps_per_s'] / cuda_copied['steps_per_s']:.1f}x"
                if not isinstance(cuda_copied, str)
                else NA
            )
            cells.append(
                f"| {name} | {batch:,} | {fmt_rate(cpu_copied)} | {fmt_rate(cpu_resident)} "
                f"| {fmt_rate(cuda_copied)} | {fmt_rate(cuda_resident)} | {ratio} |"
            )
        lines += cells
    many = report.get("many_sessions")
    if many:
        lines += [
            "",
            f"Many sessions ({many['model']}, states resident on {many['device']}): "
            f"{many['sessions']:,} sessions in {many['create_seconds']} s "
            f"({many['sessions_per_s']:,.0f}/s); "
            f"{many['device_bytes_per_session']:,.0f} B a session in the pool "
            f"({many['rows_used']:,} rows of {many['pool_rows']:,}), "
            f"{many['store_bytes_per_session']:,.0f} B a session in the store's host memory "
            f"(its estimate; the resident set grew by {many['host_bytes_per_session']:,.0f} B "
            "a session besides the pool); a sample of 256 stepped again: max abs diff "
            f"{many['sample_max_abs_diff_topk_probs']:.1e} to the copied path",
        ]
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
    parser.add_argument(
        "--pool-rows", type=int, default=1_000_000, help="pool rows for the resident steps/s"
    )
    parser.add_argument(
        "--sessions", type=int, help="sessions of the many-sessions check (1,000,000; quick 20,000)"
    )
    args = parser.parse_args(argv)
    if args.seconds is None:
        args.seconds = 0.2 if args.quick else 2.0
    args.min_runs, args.warmup = (2, 1) if args.quick else (5, 3)
    if args.sessions is None:
        args.sessions = 20_000 if args.quick else 1_000_000
    if args.quick:
        args.pool_rows = min(args.pool_rows, 20_000)

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
            "pool_rows": args.pool_rows,
            "sessions": args.sessions,
        },
        "models": {},
    }
    tasks = len(artifacts) * (3 + 4 * len(BATCHES)) + 1
    bar = tqdm(total=tasks, unit="check", file=sys.stderr) if tqdm else None

    def batches(items: range) -> Any:
        return tqdm(items, unit="batch", leave=False, file=sys.stderr) if tqdm else items

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
    lstm = artifacts[0]
    with progress(f"{lstm.name}: {args.sessions:,} sessions"):
        model, _ = load_cuda(lstm, allow_tf32=False)
        model = model or OrtModel(lstm, [CPU])
        report["many_sessions"] = {
            "model": lstm.name,
            **many_sessions(model, args.sessions, 4096, batches),
        }
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
