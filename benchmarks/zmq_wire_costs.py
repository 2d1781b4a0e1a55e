"""The per-step pieces of a step's way over ZeroMQ, each timed alone (no sockets, no engine).

What `core_zmq_cpu` cannot split: the wire's share (msgpack encoding and decoding of a
frame of 256 requests and of 256 answers, per step), an answer's making, and what waiting
for an answer costs the API process: a plain future per call, against a coroutine wrapped
in a task per call (what `ZmqClient.call` cost before it returned its future). Run on the
default asyncio loop, as the benchmarks' client process does:

    python -m benchmarks.zmq_wire_costs
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import numpy as np

from service.contract.protocol import (
    EngineOutput,
    StepRequest,
    output_decoder,
    output_encoder,
    request_decoder,
    request_encoder,
)

SESSIONS = 256


def per_step(repeat: int, run: Callable[[], object], steps: int = SESSIONS) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        run()
    return 1e6 * (time.perf_counter() - start) / repeat / steps


async def waiting(repeat: int) -> tuple[float, float]:
    loop = asyncio.get_running_loop()

    def futures() -> list[asyncio.Future[int]]:
        return [loop.create_future() for _ in range(SESSIONS)]

    async def through(future: asyncio.Future[int]) -> int:
        return await future

    start = time.perf_counter()
    for _ in range(repeat):
        batch = futures()
        gathered = asyncio.gather(*batch)
        await asyncio.sleep(0)
        for future in batch:
            future.set_result(1)
        await gathered
    plain = 1e6 * (time.perf_counter() - start) / repeat / SESSIONS
    start = time.perf_counter()
    for _ in range(repeat):
        batch = futures()
        gathered = asyncio.gather(*(through(future) for future in batch))
        await asyncio.sleep(0)
        for future in batch:
            future.set_result(1)
        await gathered
    tasks = 1e6 * (time.perf_counter() - start) / repeat / SESSIONS
    return plain, tasks


def main() -> None:
    requests = [StepRequest(i, "lstm", [10 + i % 50], 5, f"s{i}") for i in range(SESSIONS)]
    ids, probs = np.arange(5, dtype=np.int64), np.linspace(0.3, 0.1, 5, dtype=np.float32)
    outputs = [
        EngineOutput(i, ids=ids.tolist(), probs=probs.tolist(), tokens=5, model="lstm")
        for i in range(SESSIONS)
    ]
    request_frame, output_frame = request_encoder.encode(requests), output_encoder.encode(outputs)
    rows = [
        ("requests: encode (API process)", per_step(300, lambda: request_encoder.encode(requests))),
        ("requests: decode (engine)", per_step(300, lambda: request_decoder.decode(request_frame))),
        (
            "an answer made (tolist x2)",
            per_step(
                100_000,
                lambda: EngineOutput(
                    1, ids=ids.tolist(), probs=probs.tolist(), tokens=5, model="lstm"
                ),
                1,
            ),
        ),
        ("answers: encode (engine)", per_step(300, lambda: output_encoder.encode(outputs))),
        (
            "answers: decode (API process)",
            per_step(300, lambda: output_decoder.decode(output_frame)),
        ),
    ]
    plain, tasks = asyncio.run(waiting(200))
    rows += [
        ("waiting: a future per call (gathered)", plain),
        ("waiting: a task per call (gathered)", tasks),
    ]
    print(f"{SESSIONS} steps a frame; {len(request_frame)} / {len(output_frame)} bytes a frame")
    for name, us in rows:
        print(f"  {name:42s} {us:6.2f} us/step")


if __name__ == "__main__":
    main()
