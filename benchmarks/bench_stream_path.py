"""CPU per WebSocket message of the API process's own work, in process (no server, no engine).

What `/v1/stream` does for one client message besides uvicorn's framing and the engine's
step: each piece timed alone (best of --repeat, µs per call), then the whole of
`StreamConnection.answer_one` (decode, checks, `Predictor.feed`, the answer's words, encode,
send) over a real `Predictor` with the bundled model's vocabulary, a websocket that only
counts what it is sent, and an engine stand-in that answers at once (the wire's msgpack
encode and decode included). The messages are those of `benchmarks.bench_e2e`: one word
each, the model's 2,000 most frequent words in turn. The WebSocket protocol's own part
(frames read and written) is `benchmarks.bench_ws_protocol`.

    python -m benchmarks.bench_stream_path
    python -m benchmarks.bench_stream_path --baseline /tmp/base   # old vs new, alternated

With --baseline the whole-message row is also run on another checkout's `service` (a
subprocess with that checkout first on the import path), alternated with this one's.
Figures are CPU time (`time.process_time`), so another job on the machine slows them less
than it slows wall-clock rates; still, compare rows of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
import timeit
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "service" / "models" / "lstm"


def setup() -> SimpleNamespace:
    """The vocabulary, the messages and the engine's answers the timings use."""
    from service.contract.artifact import VOCAB_FILE, ModelArtifact
    from service.contract.tokenizer import is_word

    vocab = ModelArtifact.load(MODEL, hashed=(VOCAB_FILE,)).vocab
    words = [t for t in vocab.tokens if is_word(t)][:2000]
    return SimpleNamespace(
        vocab=vocab,
        words=words,
        messages=[json.dumps({"text": w}) for w in words],
        answer_ids=[vocab.index[w] for w in words[:50]],
    )


class AnsweringEngine:
    """An `EngineClient` that answers each step at once with five of the frequent words."""

    models = [{"name": "lstm"}]

    def __init__(self, answer_ids: list[int]) -> None:
        from service.contract import protocol

        self.protocol = protocol
        self.answer_ids = answer_ids
        self.rng = random.Random(0)
        self.ids = 0
        self.tokens = 0

    def next_id(self) -> int:
        """A request id."""
        self.ids += 1
        return self.ids

    async def call(self, request: Any) -> Any:
        """The request over the wire and its answer back, as `ZmqClient` pays for them."""
        p = self.protocol
        p.request_decoder.decode(p.request_encoder.encode([request]))
        self.tokens += len(request.tokens)
        output = p.EngineOutput(
            request.request_id,
            ids=self.rng.sample(self.answer_ids, 5),
            probs=[0.12, 0.06, 0.04, 0.03, 0.02],
            tokens=self.tokens,
            last_token=request.tokens[-1] if request.tokens else -1,
        )
        return p.output_decoder.decode(p.output_encoder.encode([output]))[0]


class CountingWebSocket:
    """What `StreamConnection` needs of a starlette `WebSocket`: sends are only counted,
    whether they come as ASGI messages (`send`) or as bytes (`send_text`, offered in the
    scope as our uvicorn protocol offers itself; code that does not know it ignores it)."""

    def __init__(self) -> None:
        self.app = SimpleNamespace(state=SimpleNamespace())
        self.scope: dict[str, Any] = {
            "client": ("127.0.0.1", 1),
            "extensions": {"nextword.sender": self},
        }
        self.sent = 0
        self.errors = 0

    async def send(self, message: Any) -> None:
        """Count one ASGI message (and the error answers among them)."""
        self.sent += 1
        self.errors += '"type":"error"' in message["text"]

    async def send_text(self, data: bytes) -> None:
        """Count one answer sent as bytes."""
        self.sent += 1
        self.errors += b'"type":"error"' in data


def whole_message_us(data: SimpleNamespace, messages: int, repeat: int) -> float:
    """CPU µs per `StreamConnection.answer_one` (best of `repeat` passes)."""
    from service.api import stream
    from service.api.predictor import Predictor
    from service.config import Settings

    async def one_pass() -> float:
        settings = Settings(default_model="lstm")
        predictor = Predictor(settings, AnsweringEngine(data.answer_ids), {"lstm": data.vocab})  # type: ignore[arg-type]
        websocket = CountingWebSocket()
        connection = stream.StreamConnection(
            websocket,  # type: ignore[arg-type]
            predictor,
            stream.message_decoder(settings.max_text_chars),
            settings.max_ws_message_bytes,
        )
        connection.session_id = "kq3Zb8M2rXb1yWc0n4LQ5w"
        frames = [{"type": "websocket.receive", "text": m} for m in data.messages]
        for frame in frames[:200]:  # warm
            await connection.answer_one(frame)
        start = time.process_time()
        for i in range(messages):
            await connection.answer_one(frames[i % len(frames)])
        spent = time.process_time() - start
        if websocket.errors or websocket.sent != messages + 200:
            raise RuntimeError(f"{websocket.errors} of {websocket.sent} answers were errors")
        return spent / messages * 1e6

    return min(asyncio.run(one_pass()) for _ in range(repeat))


def pieces_us(data: SimpleNamespace, repeat: int) -> list[tuple[str, float]]:
    """CPU µs of each piece of the per-message work, alone."""
    import msgspec

    from service.api import stream
    from service.api.predictor import Predictor
    from service.config import Settings
    from service.contract.protocol import (
        EngineOutput,
        StepRequest,
        output_decoder,
        output_encoder,
        request_encoder,
    )

    vocab = data.vocab
    message = data.messages[100]
    word = data.words[100]
    decoder = stream.message_decoder(10_000)
    request = decoder.decode(message)
    output = EngineOutput(
        1, ids=data.answer_ids[:5], probs=[0.12, 0.06, 0.04, 0.03, 0.02], tokens=7, last_token=5
    )
    frame_of_32 = output_encoder.encode([output] * 32)
    predictor = Predictor(Settings(default_model="lstm"), None, {"lstm": vocab})  # type: ignore[arg-type]
    answer = {
        "type": "predictions",
        "session_id": "kq3Zb8M2rXb1yWc0n4LQ5w",
        "tokens": 7,
        "predictions": predictor._predictions(vocab, output),
        "id": None,
    }
    encode = msgspec.json.Encoder().encode
    cases: list[tuple[str, Any, int]] = [
        ("client message: JSON decode into the Struct", lambda: decoder.decode(message), 1),
        (
            "size and field checks (over_size, problem)",
            lambda: (stream.over_size(message, 65_536), stream.StreamConnection.problem(request)),
            1,
        ),
        ("tokenize one word (Vocabulary.encode_typed)", lambda: vocab.encode_typed(word), 1),
        (
            "Predictor._tokens of one word (checks, cache hit)",
            lambda: predictor._tokens(vocab, word),
            1,
        ),
        (
            "StepRequest built and msgpack-encoded",
            lambda: request_encoder.encode([StepRequest(1, "lstm", [5], 5, session_id="s")]),
            1,
        ),
        (
            "engine answer decoded (one of a frame of 32)",
            lambda: output_decoder.decode(frame_of_32),
            32,
        ),
        (
            "five words displayed and cased (_predictions)",
            lambda: predictor._predictions(vocab, output),
            1,
        ),
        ("answer JSON-encoded, as str for ASGI", lambda: encode(answer).decode(), 1),
        (
            "the same, and the str encoded again by uvicorn",
            lambda: encode(answer).decode().encode(),
            1,
        ),
    ]
    rows = []
    for name, fn, per_call in cases:
        number = 20_000
        best = min(timeit.repeat(fn, number=number, repeat=repeat, timer=time.process_time))
        rows.append((name, best / number / per_call * 1e6))
    return rows


def child(messages: int, repeat: int) -> None:
    """Print this checkout's whole-message figure as JSON (the --baseline subprocess)."""
    print(json.dumps({"us": whole_message_us(setup(), messages, repeat)}))


def run_on(code: Path, messages: int, repeat: int) -> float:
    """The whole-message figure with `code`'s `service` first on the import path."""
    from benchmarks.lib.checkout import last_line  # noqa: PLC0415 (parent only: children may run older code)

    args = [__file__, "--child", "--messages", str(messages), "--repeat", str(repeat)]
    return float(json.loads(last_line(code, args, path=[ROOT]))["us"])


def main(argv: list[str] | None = None) -> None:
    """Print the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=20_000, help="messages per pass")
    p.add_argument("--repeat", type=int, default=5, help="passes (the best counts)")
    p.add_argument("--rounds", type=int, default=3, help="alternations with --baseline")
    p.add_argument("--baseline", type=Path, help="another checkout's root (old against new)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.messages, args.repeat)
        return
    from benchmarks.lib.machine import machine, machine_lines

    modules = ("msgspec", "uvicorn", "starlette")
    for line in machine_lines(machine(modules), modules):
        print(line)
    data = setup()
    print("\n| piece of the per-message work | CPU µs |\n|---|---|")
    for name, us in pieces_us(data, args.repeat):
        print(f"| {name} | {us:.2f} |")
    print("\n| StreamConnection.answer_one, whole (engine stand-in) | CPU µs per message |")
    print("|---|---|")
    if args.baseline is None:
        print(f"| this checkout | {whole_message_us(data, args.messages, args.repeat):.1f} |")
        return
    new: list[float] = []
    old: list[float] = []
    for _ in range(args.rounds):
        new.append(run_on(ROOT, args.messages, args.repeat))
        old.append(run_on(args.baseline.resolve(), args.messages, args.repeat))
    print(f"| this checkout (rounds) | {min(new):.1f} ({', '.join(f'{x:.1f}' for x in new)}) |")
    print(f"| {args.baseline} (rounds) | {min(old):.1f} ({', '.join(f'{x:.1f}' for x in old)}) |")
    print(f"\nnew / old: {min(new) / min(old):.2f}")


if __name__ == "__main__":
    main()
