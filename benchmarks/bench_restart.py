"""An engine crash under load: SIGKILL the engine process while WebSocket streams type.

One `nextword serve` (--workers API processes, default 2) with its sessions in Redis written
through (a redis-server started on a free port, or --redis-url; --store memory for the
memory store), --streams WebSocket streams (default 50) each typing one word at a time
(closed loop), then SIGKILL of the engine process. Measured:

    ready again      seconds from the SIGKILL until /readyz answers 200 again (the supervisor
                     restarts the engine; loading the models dominates)
    kept             streams whose connection stayed open through the restart
    answering        kept streams that got predictions again after /readyz came back
    exact            sessions whose token count (GET /v1/sessions/{id}) equals the words the
                     stream saw acknowledged: none lost, none applied twice
    longest pause    per kept stream, the longest time between two answers (the restart)
    errors           `engine_restarting` answers (maybe applied / not applied), and others

Each stream follows the documented protocol: on `engine_restarting` it waits
`retry_after_ms`; when `maybe_applied` is true it first sends an empty text, whose `tokens`
tells whether the word was applied (then it is not sent again). With the memory store the
sessions are gone after the restart (`unknown_session`, close 4404): such streams count as
lost, not kept.

    python -m benchmarks.bench_restart                       # -> results/restart.json, .txt
    python -m benchmarks.bench_restart --store memory --streams 20
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import statistics
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from benchmarks.lib.machine import command_line, machine, machine_lines
from benchmarks.lib.models import models_dir
from benchmarks.lib.results import RESULTS, write_report
from benchmarks.lib.server import ServerProcess, free_port, http_status, redis_server
from service.contract.tokenizer import is_word

MODULES = ("onnxruntime", "zmq", "redis", "websockets", "uvicorn")
ANSWER_TIMEOUT_S = 60.0  # no answer within this long: the stream counts as hung


def single_token_words(models: Path, model: str = "lstm", count: int = 200) -> list[str]:
    """Plain words of a model's vocabulary: each is exactly one token."""
    lines = (models / model / "vocab.txt").read_text(encoding="utf-8").splitlines()
    words = [w for w in lines if is_word(w) and w.isalpha() and w.isascii()]
    return words[10 : 10 + count] or words[:count]


@dataclass
class Typist:
    """One WebSocket stream typing a word at a time, through an engine restart.

    `acked` is the session's token count as the server last acknowledged it; after the run
    it must equal the session's `tokens` exactly.
    """

    uri: str
    words: list[str]
    session_id: str = ""
    acked: int = 0
    answers: int = 0
    answers_at: list[float] = field(default_factory=list)  # monotonic time of each answer
    errors: Counter[str] = field(default_factory=Counter)
    close_code: int | None = None  # set when the server closed the connection
    hung: bool = False
    problem: str = ""
    _ids: int = 0

    async def _ask(self, ws: ClientConnection, message: dict[str, Any]) -> dict[str, Any]:
        self._ids += 1
        message_id = self._ids
        await ws.send(json.dumps({**message, "id": message_id}))
        while True:
            answer: dict[str, Any] = json.loads(await ws.recv())
            if answer.get("id") == message_id:
                return answer

    async def run(self, stop: asyncio.Event) -> None:
        try:
            async with connect(self.uri, compression=None, open_timeout=60) as ws:
                ready = json.loads(await ws.recv())
                self.session_id, self.acked = ready["session_id"], ready["tokens"]
                while not stop.is_set():
                    word = random.choice(self.words)
                    try:
                        await asyncio.wait_for(self._type(ws, word), ANSWER_TIMEOUT_S)
                    except TimeoutError:
                        self.hung = True
                        return
                    if self.problem:
                        await self._await_close(ws)
                        return
        except ConnectionClosed as closed:
            self.close_code = closed.rcvd.code if closed.rcvd is not None else 1006

    async def _await_close(self, ws: ClientConnection) -> None:
        """After an error that ends the stream (unknown_session: 4404), note the close."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                try:
                    while True:
                        await ws.recv()
                except ConnectionClosed as closed:
                    self.close_code = closed.rcvd.code if closed.rcvd is not None else 1006

    async def _type(self, ws: ClientConnection, word: str) -> None:
        """Send one word until it is acknowledged (or known applied)."""
        message: dict[str, Any] = {"text": word}
        while True:
            answer = await self._ask(ws, message)
            if answer["type"] == "predictions":
                expected = self.acked + (1 if message["text"] else 0)
                if answer["tokens"] != expected:
                    self.problem = f"tokens {answer['tokens']}, expected {expected}"
                self.acked = answer["tokens"]
                self.answers += 1
                self.answers_at.append(time.monotonic())
                return
            error = answer["error"]
            self.errors[f"{error['code']}{'/maybe' if error.get('maybe_applied') else ''}"] += 1
            if error["code"] != "engine_restarting":
                self.problem = f"{error['code']}: {error['message']}"
                return
            await asyncio.sleep(error["retry_after_ms"] / 1000 * random.uniform(0.5, 1.0))
            if not error["maybe_applied"]:
                message = {"text": word}
                continue
            # It may have been applied: an empty text tells (its tokens), changing nothing.
            probe = await self._ask(ws, {"text": ""})
            if probe["type"] != "predictions":
                self.errors[f"probe:{probe['error']['code']}"] += 1
                continue  # the engine is still away: ask again after the next wait
            if probe["tokens"] == self.acked + 1:
                self.acked += 1  # applied before the engine died: done, its answer is this
                self.answers += 1
                self.answers_at.append(time.monotonic())
                return
            if probe["tokens"] != self.acked:
                self.problem = f"probe tokens {probe['tokens']}, expected {self.acked} or +1"
                return
            message = {"text": word}


def engine_process(supervisor_pid: int, port: int) -> psutil.Process:
    """The supervisor's child that does not listen on the service's port."""
    for child in psutil.Process(supervisor_pid).children():
        with contextlib.suppress(psutil.Error):
            if "--multiprocessing-fork" not in " ".join(child.cmdline()):
                continue
            if not any(c.laddr and c.laddr.port == port for c in child.net_connections()):
                return child
    raise RuntimeError("no engine process found")


def session_tokens(url: str, session_id: str) -> int | None:
    """A session's token count, or None when it is unknown."""
    try:
        with urllib.request.urlopen(f"{url}/v1/sessions/{session_id}", timeout=10) as reply:
            return int(json.loads(reply.read())["tokens"])
    except OSError:
        return None


async def crash_under_load(
    url: str,
    supervisor_pid: int,
    streams: int,
    words: list[str],
    warmup_s: float = 3.0,
    after_s: float = 3.0,
) -> dict[str, Any]:
    """Streams type; SIGKILL the engine; measure readiness, connections and token counts.

    `url`: the service's http://127.0.0.1:PORT; `supervisor_pid`: its `nextword serve`."""
    stop = asyncio.Event()
    port = int(url.rsplit(":", 1)[1])
    uri = f"ws://127.0.0.1:{port}/v1/stream"
    typists = [Typist(uri, words) for _ in range(streams)]
    tasks = [asyncio.create_task(t.run(stop)) for t in typists]
    await asyncio.sleep(warmup_s)
    engine = engine_process(supervisor_pid, port)
    answers_before = sum(t.answers for t in typists)
    engine.kill()
    killed_at = time.monotonic()
    statuses: Counter[str] = Counter()
    ready_after = None
    while time.monotonic() - killed_at < 120:
        ready, live = await asyncio.gather(
            asyncio.to_thread(http_status, url + "/readyz"),
            asyncio.to_thread(http_status, url + "/healthz"),
        )
        statuses[f"readyz {ready}"] += 1
        statuses[f"healthz {live}"] += 1
        if ready == 200:
            ready_after = time.monotonic() - killed_at
            break
        await asyncio.sleep(0.02)
    back_at = time.monotonic()
    await asyncio.sleep(after_s)
    stop.set()
    await asyncio.wait(tasks, timeout=ANSWER_TIMEOUT_S + 10)
    exact = 0
    for typist in typists:
        if typist.session_id and not typist.problem:
            tokens = await asyncio.to_thread(session_tokens, url, typist.session_id)
            exact += tokens == typist.acked
    kept = [t for t in typists if t.close_code is None and not t.hung]
    answering = [t for t in kept if any(at > back_at for at in t.answers_at)]
    gaps = [
        max(b - a for a, b in zip(t.answers_at, t.answers_at[1:]))
        for t in kept
        if len(t.answers_at) > 1
    ]
    errors: Counter[str] = Counter()
    for typist in typists:
        errors.update(typist.errors)
    return {
        "streams": streams,
        "ready_again_s": ready_after,
        "kept": len(kept),
        "answering": len(answering),
        "exact": exact,
        "hung": sum(t.hung for t in typists),
        "closed": dict(Counter(str(t.close_code) for t in typists if t.close_code is not None)),
        "problems": [t.problem for t in typists if t.problem][:5],
        "errors": dict(errors),
        "probe_statuses": dict(statuses),
        "answers_before_kill": answers_before,
        "answers_total": sum(t.answers for t in typists),
        "longest_gap_s_median": statistics.median(gaps) if gaps else None,
        "longest_gap_s_max": max(gaps) if gaps else None,
    }


@contextmanager
def session_store(args: argparse.Namespace) -> Iterator[tuple[str, str]]:
    """(NEXTWORD_SESSION_STORE, a line naming it)."""
    if args.store == "memory":
        yield "memory", "memory store"
    elif args.redis_url:
        yield args.redis_url, f"Redis at {args.redis_url}, written {args.write}"
    else:
        with redis_server() as (url, _pid):
            yield url, f"Redis (redis-server on a free port), written {args.write}"


def percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "-"


def table(report: dict[str, Any]) -> str:
    lines = [
        "An engine crash under load (SIGKILL of the engine process while streams type)",
        *machine_lines(report["machine"], MODULES),
        f"command: {report['command']}",
        f"{report['models']}; {report['store']}; {report['workers']} API processes",
        "",
        "| run | streams | /readyz 200 again | kept | answering again | exact tokens | "
        "longest pause of a stream (median / max) | engine_restarting (maybe / not applied) "
        "| other |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for index, run in enumerate(report["runs"], 1):
        errors = dict(run["errors"])
        maybe = errors.pop("engine_restarting/maybe", 0)
        not_applied = errors.pop("engine_restarting", 0)
        other = ", ".join(f"{k} {v}" for k, v in sorted(errors.items())) or "none"
        if run["closed"]:
            other += "; closed " + ", ".join(f"{k}: {v}" for k, v in run["closed"].items())
        ready = run["ready_again_s"]
        gaps = run["longest_gap_s_median"], run["longest_gap_s_max"]
        pause = "-" if gaps[0] is None else f"{gaps[0]:.2f} / {gaps[1]:.2f} s"
        lines.append(
            f"| {index} | {run['streams']} | "
            + (f"{ready:.2f} s" if ready is not None else "never")
            + f" | {run['kept']} ({percent(run['kept'], run['streams'])}) | "
            f"{run['answering']} ({percent(run['answering'], run['streams'])}) | "
            f"{run['exact']} ({percent(run['exact'], run['streams'])}) | {pause} | "
            f"{maybe} / {not_applied} | {other} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2, help="API processes")
    parser.add_argument("--store", choices=("redis", "memory"), default="redis")
    parser.add_argument("--write", choices=("through", "behind"), default="through")
    parser.add_argument("--redis-url", default="", help="an existing Redis (else one is started)")
    parser.add_argument("--models", type=Path, default=None, help="default: the bundled models")
    parser.add_argument("--runs", type=int, default=3, help="crashes, one after another")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of typing before")
    parser.add_argument("--after", type=float, default=3.0, help="seconds of typing after")
    parser.add_argument(
        "--window", type=float, default=5.0, help="NEXTWORD_ENGINE_RESTART_WINDOW_S"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "restart.json")
    args = parser.parse_args(argv)

    with ExitStack() as stack:
        models, models_line = stack.enter_context(models_dir(args.models, "tiny"))
        store_url, store_line = stack.enter_context(session_store(args))
        log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="restart-")))
        port = free_port()
        env = {
            "NEXTWORD_HOST": "127.0.0.1",
            "NEXTWORD_LOG_LEVEL": "warning",
            "NEXTWORD_PROVIDERS": "cpu",
            "NEXTWORD_SESSION_STORE": store_url,
            "NEXTWORD_SESSION_STORE_WRITE": args.write,
            # Runs are seconds apart: each crash alone in its window restarts at once (the
            # back-off applies to repeated deaths).
            "NEXTWORD_ENGINE_RESTART_WINDOW_S": str(args.window),
        }
        command = [sys.executable, "-m", "service", "--port", str(port)]
        command += ["--workers", str(args.workers), "--models", str(models)]
        server = stack.enter_context(
            ServerProcess("restart", command, env, port=port, log_dir=log_dir)
        )
        words = single_token_words(models)
        runs = []
        for run in range(args.runs):
            result = asyncio.run(
                crash_under_load(
                    server.url, server.pid, args.streams, words, args.warmup, args.after
                )
            )
            print(f"run {run + 1}: {json.dumps(result)}", file=sys.stderr, flush=True)
            runs.append(result)
            if result["ready_again_s"] is None:
                print(server.log_tail(), file=sys.stderr)
                break
    report = {
        "machine": machine(MODULES),
        "command": command_line("benchmarks.bench_restart", argv),
        "models": models_line,
        "store": store_line,
        "workers": args.workers,
        "runs": runs,
    }
    text = table(report)
    write_report(args.out, report, text)
    print(text)


if __name__ == "__main__":
    main()
