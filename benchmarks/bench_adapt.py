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

Reported: microseconds per step and the ratio to "no memory", and the memory's bytes per
session (its slots and typed words; `GET /v1/sessions/{id}` reports the same).

    python -m benchmarks.bench_adapt --json benchmarks/results/adapt.json
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from benchmarks.lib.machine import command_line, machine, machine_lines
from benchmarks.lib.models import models_dir
from benchmarks.lib.results import write_report
from service.config import Settings
from service.contract.protocol import EngineOutput, InfoRequest, StepRequest
from service.contract.vocab import Vocabulary
from service.engine.core import EngineCore

MODULES = ("onnxruntime", "numpy")
MODES = ("no memory", "remembered", "adapted")
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


class Engine:
    """One mode's `EngineCore` and its sessions, stepped one round at a time."""

    def __init__(self, core: EngineCore, model: str, mode: str, sessions: int) -> None:
        self.core = core
        self.model = model
        self.adapt = mode == "adapted"
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

    async def step(self, word: int) -> float:
        """One round of one-word steps; its wall time in seconds."""
        requests = [
            StepRequest(i, self.model, [word], 5, sid, adapt=self.adapt)
            for i, sid in enumerate(self.names)
        ]
        start = time.perf_counter()
        await self.round(requests)
        return time.perf_counter() - start

    async def memory(self) -> tuple[float, float]:
        """Mean bytes of the sessions' memories, and mean distinct words remembered."""
        infos = await self.round([InfoRequest(i, sid) for i, sid in enumerate(self.names)])
        return (
            statistics.fmean(o.memory_bytes for o in infos),
            statistics.fmean(o.remembered for o in infos),
        )


async def measure(
    models: Path, model: str, sessions: int, rounds: int, warm_tokens: int
) -> dict[str, dict[str, float]]:
    """The three modes side by side in this process, their rounds interleaved (A B C A B C
    ...), so that a machine whose speed drifts slows each mode alike."""
    engines = {}
    try:
        for mode in MODES:
            core = await EngineCore.start(settings(models, model, mode != "no memory"))
            engines[mode] = Engine(core, model, mode, sessions)
        vocab: Vocabulary = engines[MODES[0]].core.models[model].vocab
        ids, typed = vocab.encode_typed(TEXT * (1 + warm_tokens // 80))
        ids = ids[:warm_tokens]
        typed = typed[: sum(1 for i in ids if i == vocab.unk_id)]
        for engine in engines.values():
            await engine.warm(ids, typed)
        words = [i for i in ids if i != vocab.unk_id]
        times: dict[str, list[float]] = {mode: [] for mode in MODES}
        for n in tqdm(range(rounds), desc=f"{model}: rounds", unit="round", leave=False):
            for mode, engine in engines.items():
                times[mode].append(await engine.step(words[n % len(words)]))
        out = {}
        for mode, engine in engines.items():
            memory_bytes, remembered = await engine.memory()
            out[mode] = {
                "us_per_step": 1e6 * statistics.median(times[mode]) / sessions,
                "memory_bytes": memory_bytes,
                "remembered": remembered,
            }
        return out
    finally:
        for engine in engines.values():
            await engine.core.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=Path, default=None, help="models folder (bundled)")
    parser.add_argument("--model", nargs="+", default=["gru", "lstm"])
    parser.add_argument("--sessions", type=int, default=256, help="the batch: one step each")
    parser.add_argument("--rounds", type=int, default=200, help="rounds per mode")
    parser.add_argument("--warm-tokens", type=int, default=300, help="text fed to each first")
    parser.add_argument("--json", type=Path, help="write the results here (and .txt beside)")
    args = parser.parse_args(argv)

    info = machine(MODULES)
    lines = machine_lines(info, MODULES)
    rows = []
    with models_dir(args.models, "full") as (models, label):
        lines.append(label)
        for model in args.model:
            result = asyncio.run(
                measure(models, model, args.sessions, args.rounds, args.warm_tokens)
            )
            base = result[MODES[0]]["us_per_step"]
            for mode in MODES:
                r = result[mode]
                rows.append({"model": model, "mode": mode, **r, "ratio": r["us_per_step"] / base})
    table = [
        f"{args.sessions} sessions, one word each per round (a batch of {args.sessions}); "
        f"each session first fed {args.warm_tokens} tokens; the three modes' rounds "
        f"interleaved, median of {args.rounds} rounds each",
        "",
        "| model | mode | us/step | vs no memory | memory bytes/session | words remembered |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        table.append(
            f"| {r['model']} | {r['mode']} | {r['us_per_step']:.1f} | {r['ratio']:.3f} | "
            f"{r['memory_bytes']:,.0f} | {r['remembered']:.0f} |"
        )
    text = "\n".join([*lines, command_line("benchmarks.bench_adapt", argv), "", *table])
    print(text)
    if args.json:
        write_report(args.json, {"machine": info, "rows": rows}, text)


if __name__ == "__main__":
    main()
