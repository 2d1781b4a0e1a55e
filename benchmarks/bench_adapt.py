"""What adaptation costs the engine: time per one-word step at a batch of 256, and memory.

`EngineCore` in this process (scheduler, session store, protocol; no sockets), the bundled
models, `--sessions` sessions each fed a real text first (so that every memory holds a few
hundred words, as a writer's would), then stepping one word each per round, as fast as
answers come back, in three modes measured in turn, each `--rounds` rounds, repeated
`--repeat` times (the median of the repeats is reported):

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


async def run(
    models: Path, model: str, mode: str, sessions: int, rounds: int, warm_tokens: int
) -> dict[str, float]:
    """Microseconds per step of one mode, and the memory's mean bytes per session."""
    core = await EngineCore.start(settings(models, model, mode != "no memory"))
    vocab: Vocabulary = core.models[model].vocab
    ids, typed = vocab.encode_typed(TEXT * (1 + warm_tokens // 80))
    unk = vocab.unk_id
    ids = ids[:warm_tokens]
    typed = typed[: sum(1 for i in ids if i == unk)]
    adapt = mode == "adapted"
    names = [f"s{i}" for i in range(sessions)]
    try:
        done = asyncio.Event()
        answered: list[EngineOutput] = []

        def reply(output: EngineOutput) -> None:
            answered.append(output)
            if len(answered) == len(names):
                done.set()

        async def round_(requests: list[Any]) -> list[EngineOutput]:
            answered.clear()
            done.clear()
            core.handle(requests, reply, "bench")
            await done.wait()
            assert all(o.error is None for o in answered), answered[0]
            return list(answered)

        await round_(
            [
                StepRequest(i, model, ids, 5, sid, create=True, adapt=adapt, typed=typed)
                for i, sid in enumerate(names)
            ]
        )
        words = [i for i in ids if i != unk]
        start = time.perf_counter()
        for n in range(rounds):
            word = words[n % len(words)]
            await round_(
                [StepRequest(i, model, [word], 5, sid, adapt=adapt) for i, sid in enumerate(names)]
            )
        elapsed = time.perf_counter() - start
        infos = await round_([InfoRequest(i, sid) for i, sid in enumerate(names)])
        return {
            "us_per_step": 1e6 * elapsed / (rounds * sessions),
            "memory_bytes": statistics.fmean(o.memory_bytes for o in infos),
            "remembered": statistics.fmean(o.remembered for o in infos),
        }
    finally:
        await core.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=Path, default=None, help="models folder (bundled)")
    parser.add_argument("--model", nargs="+", default=["gru", "lstm"])
    parser.add_argument("--sessions", type=int, default=256, help="the batch: one step each")
    parser.add_argument("--rounds", type=int, default=40, help="rounds per mode and repeat")
    parser.add_argument("--repeat", type=int, default=3, help="each mode this many times")
    parser.add_argument("--warm-tokens", type=int, default=300, help="text fed to each first")
    parser.add_argument("--json", type=Path, help="write the results here (and .txt beside)")
    args = parser.parse_args(argv)

    info = machine(MODULES)
    lines = machine_lines(info, MODULES)
    rows = []
    with models_dir(args.models, "full") as (models, label):
        lines.append(label)
        runs = [(m, mode, r) for m in args.model for r in range(args.repeat) for mode in MODES]
        measured: dict[tuple[str, str], list[dict[str, float]]] = {}
        for model, mode, _ in tqdm(runs, desc="adaptation cost", unit="run"):
            result = asyncio.run(
                run(models, model, mode, args.sessions, args.rounds, args.warm_tokens)
            )
            measured.setdefault((model, mode), []).append(result)
        for model in args.model:
            base = statistics.median(r["us_per_step"] for r in measured[(model, MODES[0])])
            for mode in MODES:
                results = measured[(model, mode)]
                us = statistics.median(r["us_per_step"] for r in results)
                rows.append(
                    {
                        "model": model,
                        "mode": mode,
                        "us_per_step": us,
                        "ratio": us / base,
                        "memory_bytes": results[0]["memory_bytes"],
                        "remembered": results[0]["remembered"],
                    }
                )
    table = [
        f"{args.sessions} sessions, one word each per round (a batch of {args.sessions}); "
        f"each session first fed {args.warm_tokens} tokens; median of {args.repeat} runs "
        f"of {args.rounds} rounds",
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
