"""What adaptation costs the engine: time per one-word step at a batch of 256, and memory.

`EngineCore` in this process (scheduler, session store, protocol; no sockets), the bundled
models, `--sessions` sessions each fed a real text first (so that every memory holds a few
hundred words, as a writer's would), then stepping one word each per round, as fast as
answers come back, in three modes side by side (three engines in this process, their rounds interleaved, so
that a drift in the machine's speed slows each alike; the median round is reported):

- "no memory": `NEXTWORD_ADAPT_MEMORY=false`, the engine as it was before adaptation;
- "remembered": the words are counted into each session's memory, answers from the model
  alone (`adapt: false`);
- "adapted": remembered and mixed into every answer (the default).

Reported: microseconds per step (the median round), the ratio to "no memory" (the median
of each round's ratio to the "no memory" round beside it), the same two by the process's
CPU time (steadier than the wall clock on a shared machine), and the memory's bytes per
session (its slots and typed words; `GET /v1/sessions/{id}` reports the same).

`--baseline REF` (a git ref, or the path of an `adapt.py`) adds a fourth mode, "adapted,
baseline": adapted, with the functions of that `service/engine/adapt.py` and the batch
hooks of its `adapt_hooks.py` (`Adaptation`) standing in for this tree's during its rounds, so that old and new adaptation code are timed alternated in
one run, against the same "no memory". `--tiny` also measures the tiny random-weight
models (a model that costs almost nothing: what is left is the engine's own work).

`--functions` times the adaptation functions alone instead (no engine): a batch of 256
rows whose memories each hold 1,000 tokens of WikiText-2 valid (or a Zipf stream), one
token a row per round: `update`, `live`, `gather_ids` and `top_k` from the gathered
probabilities, as the engine calls them, alternated with the baseline's when given, with
a check that both leave the same memories and give the same answers.

    python -m benchmarks.bench_adapt --json benchmarks/results/adapt.json
    python -m benchmarks.bench_adapt --baseline 6f8f324 --tiny
    python -m benchmarks.bench_adapt --functions --baseline 6f8f324
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from tqdm import tqdm

from benchmarks.lib.machine import command_line, machine, machine_lines
from benchmarks.lib.models import models_dir, tiny_models
from benchmarks.lib.results import write_report
from service.config import Settings
from service.contract.artifact import ModelArtifact
from service.contract.protocol import EngineOutput, InfoRequest, StepRequest
from service.contract.vocab import Vocabulary
from service.engine import adapt
from service.engine.adapt_hooks import Adaptation
from service.engine.core import EngineCore

MODULES = ("onnxruntime", "numpy")
MODES = ("no memory", "remembered", "adapted")
BASELINE = "adapted, baseline"
# What the engine calls: these stand in for this tree's during a baseline's rounds.
FUNCTIONS = (
    "empty_cache", "update", "count", "oov_keys", "live", "probability", "gather_ids", "top_k",
)  # fmt: skip
# The batch hooks the engine calls (`Adaptation`): the baseline's stand in for these too.
HOOK_METHODS = (
    "memory_of", "resized", "count", "count_columns", "_stack", "prepare",
    "prepare_columns", "gather_ids", "answer", "answer_columns",
)  # fmt: skip
WIKITEXT = Path("/work/shared/data/wikitext-2-valid.txt")
# A writer's text: names outside the vocabulary come back, as they do in real writing.
TEXT = (
    "Dear Marisol , thank you for the letter about the Kettleworth project . Marisol and I "
    "read it twice . The Kettleworth team wants to meet on Monday , and Dr Okonkwo will "
    "bring the numbers from the last quarter . I told Okonkwo that the numbers look good but "
    "the project needs more time . We can talk about the budget when Marisol comes back "
    "from Lisbon . The team at Kettleworth said the first part of the work is done , and the "
    "rest will take about two months . "
)


def settings(models: Path, model: str, memory: bool) -> Settings:
    return Settings(
        models_dir=models,
        default_model=model,
        providers="CPUExecutionProvider",
        adapt_memory=memory,
        session_cap=1_000_000,
    )


def _source(ref: str, name: str) -> Path:
    """The path of `service/engine/<name>` of another version: beside `ref` where `ref` is
    an `adapt.py` file's path (None there: the file missing), else of the git ref `ref`."""
    path = Path(ref)
    if path.is_file():
        return path if name == "adapt.py" else path.with_name(name)
    root = Path(__file__).resolve().parent.parent
    source = subprocess.run(
        ["git", "show", f"{ref}:service/engine/{name}"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = Path(tempfile.mkdtemp(prefix="nextword-baseline-")) / name
    path.write_text(source)
    return path


def _load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def load_baseline(ref: str) -> ModuleType:
    """Another version of `service/engine/adapt.py`: a file's path, or a git ref of this
    repository, imported under its own name (its functions call its own helpers).

    Its `adapt_hooks.py` (beside the file, or of the ref), where there is one, comes as the
    module's `HOOKS`: the engine's batch hooks of that version, which `using` puts in place
    of this tree's beside its functions (its hooks call `adapt.<function>` through this
    tree's module, which then holds the baseline's), so that a change to the hooks is timed
    against the old hooks, not against old functions called by new hooks."""
    module = _load(_source(ref, "adapt.py"), "nextword_baseline_adapt")
    try:
        hooks_path = _source(ref, "adapt_hooks.py")
    except subprocess.CalledProcessError:  # a version before the hooks
        hooks_path = Path()
    if hooks_path.is_file():
        module.HOOKS = _load(hooks_path, "nextword_baseline_adapt_hooks")  # type: ignore[attr-defined]
    return module


@contextmanager
def using(baseline: ModuleType | None) -> Iterator[None]:
    """This tree's adaptation functions replaced by the baseline's (None: unchanged) while
    the block runs. The engine calls them through the module (`adapt.top_k`), so the
    replacement reaches it; the parameters' class stays this tree's (same fields)."""
    if baseline is None:
        yield
        return
    saved = {name: getattr(adapt, name) for name in FUNCTIONS}
    hooks = getattr(baseline, "HOOKS", None)
    methods = [m for m in HOOK_METHODS if hooks is not None and hasattr(hooks.Adaptation, m)]
    saved_methods = {name: Adaptation.__dict__[name] for name in methods}
    try:
        for name in FUNCTIONS:
            setattr(adapt, name, getattr(baseline, name))
        for name in methods:
            assert hooks is not None
            setattr(Adaptation, name, hooks.Adaptation.__dict__[name])
        yield
    finally:
        for name, function in saved.items():
            setattr(adapt, name, function)
        for name, method in saved_methods.items():
            setattr(Adaptation, name, method)


class Engine:
    """One mode's `EngineCore` and its sessions, stepped one round at a time."""

    def __init__(
        self,
        core: EngineCore,
        model: str,
        mode: str,
        sessions: int,
        baseline: ModuleType | None = None,
    ) -> None:
        self.core = core
        self.model = model
        self.adapt = mode in ("adapted", BASELINE)
        self.baseline = baseline if mode == BASELINE else None
        self.names = [f"s{i}" for i in range(sessions)]
        self.done = asyncio.Event()
        self.answered: list[EngineOutput] = []

    def _reply(self, output: EngineOutput) -> None:
        self.answered.append(output)
        if len(self.answered) == len(self.names):
            self.done.set()

    async def round(self, requests: list[Any]) -> list[EngineOutput]:
        self.answered.clear()
        self.done.clear()
        with using(self.baseline):
            self.core.handle(requests, self._reply, "bench")
            await self.done.wait()
        assert all(o.error is None for o in self.answered), self.answered[0]
        return list(self.answered)

    async def warm(self, ids: list[int], typed: list[str]) -> None:
        """Each session fed the writer's text: its memory holds what a writer's would."""
        await self.round(
            [
                StepRequest(i, self.model, ids, 5, sid, create=True, adapt=self.adapt, typed=typed)
                for i, sid in enumerate(self.names)
            ]
        )

    async def step(self, word: int) -> tuple[float, float]:
        """One round of one-word steps; its wall time and the process's CPU time (every
        thread: the loop, the executor, ONNX Runtime's), in seconds."""
        requests = [
            StepRequest(i, self.model, [word], 5, sid, adapt=self.adapt)
            for i, sid in enumerate(self.names)
        ]
        start, cpu = time.perf_counter(), time.process_time()
        await self.round(requests)
        return time.perf_counter() - start, time.process_time() - cpu

    async def memory(self) -> tuple[float, float]:
        """Mean bytes of the sessions' memories, and mean distinct words remembered."""
        infos = await self.round([InfoRequest(i, sid) for i, sid in enumerate(self.names)])
        return (
            statistics.fmean(o.memory_bytes for o in infos),
            statistics.fmean(o.remembered for o in infos),
        )


async def measure(
    models: Path,
    model: str,
    sessions: int,
    rounds: int,
    warm_tokens: int,
    baseline: ModuleType | None = None,
) -> dict[str, dict[str, float]]:
    """The modes side by side in this process, their rounds interleaved (A B C A B C ...),
    so that a machine whose speed drifts slows each mode alike."""
    modes = modes_of(baseline)
    engines = {}
    try:
        for mode in modes:
            core = await EngineCore.start(settings(models, model, mode != "no memory"))
            engines[mode] = Engine(core, model, mode, sessions, baseline)
        vocab: Vocabulary = engines[modes[0]].core.models[model].vocab
        ids, typed = vocab.encode_typed(TEXT * (1 + warm_tokens // 80))
        ids = ids[:warm_tokens]
        typed = typed[: sum(1 for i in ids if i == vocab.unk_id)]
        for engine in engines.values():
            await engine.warm(ids, typed)
        words = [i for i in ids if i != vocab.unk_id]
        times: dict[str, list[float]] = {mode: [] for mode in modes}
        cpu: dict[str, list[float]] = {mode: [] for mode in modes}
        for n in tqdm(range(rounds), desc=f"{model}: rounds", unit="round", leave=False):
            for mode, engine in engines.items():
                wall, used = await engine.step(words[n % len(words)])
                times[mode].append(wall)
                cpu[mode].append(used)
        out = {}
        for mode, engine in engines.items():
            memory_bytes, remembered = await engine.memory()
            out[mode] = {
                "us_per_step": 1e6 * statistics.median(times[mode]) / sessions,
                # Each round against the same round's "no memory" (they ran back to back):
                # steadier than a ratio of medians where the machine's load swings.
                "paired_ratio": statistics.median(
                    t / base for t, base in zip(times[mode], times[MODES[0]])
                ),
                # The same by the process's CPU time: on a shared machine the other work
                # stretches the wall clock far more than it moves this process's CPU.
                "cpu_us_per_step": 1e6 * statistics.median(cpu[mode]) / sessions,
                "cpu_paired_ratio": statistics.median(
                    t / base for t, base in zip(cpu[mode], cpu[MODES[0]])
                ),
                "memory_bytes": memory_bytes,
                "remembered": remembered,
            }
        return out
    finally:
        for engine in engines.values():
            await engine.core.close()


def modes_of(baseline: ModuleType | None) -> tuple[str, ...]:
    """The modes measured: the baseline's adapted steps beside this tree's, when given."""
    return MODES if baseline is None else (*MODES[:2], BASELINE, MODES[2])


def token_rows(vocab: Vocabulary, rows: int, length: int, seed: int = 0) -> tuple[np.ndarray, str]:
    """(rows, length) token ids: stretches of WikiText-2 valid where it is here, else Zipf
    draws over the vocabulary; and what they are."""
    rng = np.random.default_rng(seed)
    if WIKITEXT.is_file():
        ids = np.array(vocab.encode(WIKITEXT.read_text(encoding="utf-8")), dtype=np.int64)
        starts = rng.integers(0, len(ids) - length, size=rows)
        return np.stack([ids[s : s + length] for s in starts]), f"WikiText-2 valid ({WIKITEXT})"
    draws = np.minimum(rng.zipf(1.1, size=(rows, length)) + 2, len(vocab) - 1)
    return draws.astype(np.int64), "a Zipf stream over the vocabulary (no WikiText-2 here)"


def measure_functions(
    path: Path, rows: int, rounds: int, history: int, baseline: ModuleType | None
) -> tuple[list[dict[str, Any]], str]:
    """The adaptation functions alone at a batch of `rows` one-token steps, each version
    on its own copy of the same memories, rounds alternated; microseconds per row."""
    from service.engine.runtime import OrtModel  # noqa: PLC0415

    artifact = ModelArtifact.load(path)
    model = OrtModel(artifact, ["CPUExecutionProvider"])
    vocab = model.vocab
    size = len(vocab)
    ids, source = token_rows(vocab, rows, history + rounds + 1)
    keys_of = np.where(vocab.suggestible[ids], ids, adapt.EMPTY).astype(np.int32)
    versions = {"baseline": baseline, "this tree": adapt} if baseline else {"this tree": adapt}
    memories = {}
    for name, module in versions.items():
        params = module.params_of(artifact.manifest)
        keys, weights = module.empty_cache(rows, params.capacity)
        module.update(
            keys, weights, keys_of[:, :history], np.full(rows, history), params, size,
            ids[:, :history], np.full(rows, vocab.eos_id),
        )  # fmt: skip
        memories[name] = (module, params, keys, weights)
    state = model.run(ids[:, max(0, history - 32) : history], model.zero_state(rows)).state
    parts = ("update", "live", "gather_ids", "top_k")
    times: dict[str, list[list[float]]] = {name: [] for name in versions}
    answers: dict[str, list[np.ndarray]] = {name: [] for name in versions}
    ones = np.ones(rows, dtype=np.int64)
    none: list[Any] = [None] * rows
    for t in tqdm(range(history, history + rounds), desc=path.name, unit="round", leave=False):
        x = ids[:, t : t + 1]
        step = model.run(x, state, want_probs=True)
        state = step.state
        assert step.probs is not None
        for name, (module, params, keys, weights) in memories.items():
            t0 = time.perf_counter()
            module.update(
                keys, weights, keys_of[:, t : t + 1], ones, params, size, x, ids[:, t - 1]
            )
            t1 = time.perf_counter()
            module.live(keys, weights, size, params)
            t2 = time.perf_counter()
            gather = module.gather_ids(keys, size, vocab.unk_id)
            t3 = time.perf_counter()
            # (the graph's GatherElements, untimed: it runs in ONNX Runtime)
            at_keys = np.take_along_axis(step.probs, gather.astype(np.int64), 1)
            t4 = time.perf_counter()
            got = module.top_k(
                keys, weights, None, step.topk_ids, step.topk_probs, vocab.unk_id,
                vocab.suggestible, 5, params.lam, none, none, at_keys, None, params, x[:, 0], none,
            )  # fmt: skip
            t5 = time.perf_counter()
            times[name].append([t1 - t0, t2 - t1, t3 - t2, t5 - t4])
            answers[name] = [*got, keys, weights]
    # The same answers: the same words and memories (bit for bit), the probabilities to
    # float32 rounding (a sum over other slots, or in another order, may round otherwise).
    first = next(iter(answers.values()))
    same = all(
        np.array_equal(first[0], other[0])
        and np.allclose(first[1], other[1], rtol=1e-6, atol=0)
        and all(np.array_equal(a, b) for a, b in zip(first[2:], other[2:]))
        for other in answers.values()
    )
    differ = max(
        float(np.max(np.abs(other[1] - first[1]) / np.maximum(first[1], 1e-30), initial=0))
        for other in answers.values()
    )
    out = []
    for name, samples in times.items():
        us = np.median(np.array(samples), axis=0) * 1e6 / rows
        out.append(
            {
                "model": path.name,
                "version": name,
                **{f"{part}_us": float(v) for part, v in zip(parts, us)},
                "total_us": float(us.sum()),
                "filled_slots_mean": float((memories[name][2] >= 0).sum(1).mean()),
                "same_as_baseline": same,
                "probs_max_rel_diff": differ,
            }
        )
    return out, source


def functions_main(args: argparse.Namespace, argv: list[str] | None) -> None:
    """`--functions`: the table of the functions alone."""
    baseline = load_baseline(args.baseline) if args.baseline else None
    info = machine(MODULES)
    rows: list[dict[str, Any]] = []
    source = ""
    with models_dir(args.models, "full") as (models, label):
        for name in args.model:
            got, source = measure_functions(
                models / name, args.sessions, args.rounds, args.history, baseline
            )
            rows += got
    table = [
        f"the adaptation functions alone, a batch of {args.sessions} one-token steps; memories "
        f"first fed {args.history} tokens of {source}; median of {args.rounds} rounds, "
        "the versions alternated round by round; microseconds per row",
        "",
        "| model | version | update | live | gather_ids | top_k | total | vs baseline | "
        "filled slots | same answers | probabilities' largest relative difference |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = next(b for b in rows if b["model"] == r["model"])["total_us"]
        table.append(
            f"| {r['model']} | {r['version']} | {r['update_us']:.2f} | {r['live_us']:.2f} | "
            f"{r['gather_ids_us']:.2f} | {r['top_k_us']:.2f} | {r['total_us']:.2f} | "
            f"{r['total_us'] / base:.3f} | {r['filled_slots_mean']:.0f} | "
            f"{'yes' if r['same_as_baseline'] else 'NO'} | {r['probs_max_rel_diff']:.1e} |"
        )
    lines = [*machine_lines(info, MODULES), label]
    text = "\n".join([*lines, command_line("benchmarks.bench_adapt", argv), "", *table])
    print(text)
    if args.json:
        write_report(args.json, {"machine": info, "rows": rows}, text)


@contextmanager
def model_sets(args: argparse.Namespace) -> Iterator[list[tuple[Path, str, str]]]:
    """(models folder, label, name prefix) of the bundled models, and the tiny ones with
    `--tiny`."""
    with (
        models_dir(args.models, "full") as (models, label),
        tiny_models() if args.tiny else nullcontext() as tiny,
    ):
        sets = [(models, label, "")]
        if tiny is not None:
            note = "tiny: random-weight LSTM 2x32 / GRU 1x32 (model_export.tiny)"
            sets.append((tiny, note, "tiny-"))
        yield sets


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=Path, default=None, help="models folder (bundled)")
    parser.add_argument("--model", nargs="+", default=["gru", "lstm"])
    parser.add_argument("--sessions", type=int, default=256, help="the batch: one step each")
    parser.add_argument("--rounds", type=int, default=200, help="rounds per mode")
    parser.add_argument("--warm-tokens", type=int, default=300, help="text fed to each first")
    parser.add_argument(
        "--baseline", help="a git ref or adapt.py path whose adaptation functions to time too"
    )
    parser.add_argument("--tiny", action="store_true", help="also the tiny random-weight models")
    parser.add_argument(
        "--functions", action="store_true", help="the adaptation functions alone (no engine)"
    )
    parser.add_argument(
        "--history", type=int, default=1000, help="--functions: tokens fed to each memory first"
    )
    parser.add_argument("--json", type=Path, help="write the results here (and .txt beside)")
    args = parser.parse_args(argv)
    if args.functions:
        functions_main(args, argv)
        return

    baseline = load_baseline(args.baseline) if args.baseline else None
    modes = modes_of(baseline)
    info = machine(MODULES)
    lines = machine_lines(info, MODULES)
    rows = []
    with model_sets(args) as sets:
        for models, label, prefix in sets:
            lines.append(label)
            for model in args.model:
                result = asyncio.run(
                    measure(models, model, args.sessions, args.rounds, args.warm_tokens, baseline)
                )
                base = result[MODES[0]]["us_per_step"]
                for mode in modes:
                    r = result[mode]
                    rows.append(
                        {
                            "model": prefix + model,
                            "mode": mode,
                            **r,
                            "ratio": r["paired_ratio"],
                            "ratio_of_medians": r["us_per_step"] / base,
                        }
                    )
    table = [
        f"{args.sessions} sessions, one word each per round (a batch of {args.sessions}); "
        f"each session first fed {args.warm_tokens} tokens; the {len(modes)} modes' rounds "
        f"interleaved, median of {args.rounds} rounds each",
        *(
            [f"baseline: the adaptation functions and batch hooks of {args.baseline}"]
            if baseline
            else []
        ),
        "",
        "| model | mode | us/step | vs no memory (paired) | ratio of medians | "
        "CPU us/step | vs no memory (paired, CPU) | memory bytes/session | words remembered |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        table.append(
            f"| {r['model']} | {r['mode']} | {r['us_per_step']:.1f} | {r['ratio']:.3f} | "
            f"{r['ratio_of_medians']:.3f} | {r['cpu_us_per_step']:.1f} | "
            f"{r['cpu_paired_ratio']:.3f} | {r['memory_bytes']:,.0f} | {r['remembered']:.0f} |"
        )
    text = "\n".join([*lines, command_line("benchmarks.bench_adapt", argv), "", *table])
    print(text)
    if args.json:
        write_report(args.json, {"machine": info, "rows": rows}, text)


if __name__ == "__main__":
    main()
