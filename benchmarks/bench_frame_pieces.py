"""CPU per read of the API process's WebSocket protocol for a text frame sent in pieces.

A client may send a frame of the size limit a few bytes at a time (each piece its own TCP
segment, its own `data_received`). On a real `service.api.connections.WebSocketProtocol`
after a real upgrade handshake, one masked text frame of `--limit` bytes is given to it in
reads of 1, 64 and 1448 bytes (one TCP segment), and the CPU per read is measured three
ways: through the `websockets` parser (uvicorn's way), through the protocol's frame reader
(`read_frames`) of this tree, and through the frame reader of `--base` (another checkout,
the code before a change). Each way runs in its own process, the trees alternated round by
round; the best of `--rounds` is printed.

    python -m benchmarks.bench_frame_pieces --base /tmp/base-review
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

PIECES = (1, 64, 1448)
UPGRADE = (
    b"GET /v1/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)


class NullTransport:
    """An asyncio transport that drops what is written to it."""

    def get_extra_info(self, name: str, default: object = None) -> object:
        """Addresses as a loopback socket's."""
        return {"peername": ("127.0.0.1", 1), "sockname": ("127.0.0.1", 2)}.get(name, default)

    def write(self, data: bytes) -> None:
        """Drop the bytes."""

    def is_closing(self) -> bool:
        """Never."""
        return False

    def pause_reading(self) -> None:
        """Nothing to pause."""

    def resume_reading(self) -> None:
        """Nothing to resume."""

    def close(self) -> None:
        """Nothing to close."""


def measure(limit: int, piece: int, framing: bool) -> float:
    """CPU µs per read: one text frame of `limit` bytes given in reads of `piece` bytes."""
    import asyncio

    from uvicorn.server import ServerState

    from service.api.connections import ConnectionLimits, LimitedConfig, WebSocketProtocol

    async def run() -> float:
        loop = asyncio.get_running_loop()
        accepted = loop.create_future()
        done = loop.create_future()

        async def app(scope: object, receive: object, send: object) -> None:
            await receive()  # type: ignore[operator]
            await send({"type": "websocket.accept"})  # type: ignore[operator]
            accepted.set_result(None)
            await done

        config = LimitedConfig(
            app, ws_max_size=limit, log_level="warning", lifespan="off", limits=ConnectionLimits()
        )
        config.load()
        protocol = WebSocketProtocol(config, ServerState(), {}, loop)  # type: ignore[arg-type]
        protocol.connection_made(NullTransport())  # type: ignore[arg-type]
        protocol.data_received(UPGRADE)
        await accepted
        assert protocol.framing
        protocol.framing = framing
        key = os.urandom(4)
        payload = b"a" * limit
        masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
        head = bytes((0x81, 0x80 | 127)) + limit.to_bytes(8, "big")
        data = head + key + masked
        reads = [data[i : i + piece] for i in range(0, len(data), piece)]
        start = time.process_time()
        for read in reads:
            protocol.data_received(read)
        cpu = time.process_time() - start
        assert not protocol.queue.empty()  # the frame, read whole
        done.set_result(None)
        await asyncio.gather(*protocol.tasks)
        return cpu / len(reads) * 1e6

    return asyncio.run(run())


def run_in(tree: Path, limit: int, piece: int, framing: bool) -> float:
    """`measure` in a fresh process that imports `service` from `tree`."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    args = [sys.executable, __file__, "--measure", str(limit), str(piece), str(int(framing))]
    out = subprocess.run(args, cwd=tree, env=env, check=True, capture_output=True, text=True)
    result = json.loads(out.stdout)
    assert Path(result["from"]).is_relative_to(tree), result  # the tree asked for
    return float(result["us"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, help="a checkout of the old code (required)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--measure", nargs=3, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        limit, piece, framing = args.measure
        import service

        us = measure(limit, piece, bool(framing))
        print(json.dumps({"us": us, "from": service.__file__}))
        return
    if args.base is None:
        parser.error("--base is required")
    here = Path(__file__).resolve().parent.parent
    ways = [
        ("websockets parser", here, False),
        ("frame reader, base", args.base.resolve(), True),
        ("frame reader, this tree", here, True),
    ]
    print("command: python -m benchmarks.bench_frame_pieces --base", args.base)
    import uvicorn
    import websockets

    load = os.getloadavg()[0]
    print(
        f"machine: {platform.machine()}, nproc {os.cpu_count()}, load average {load:.2f} at start"
    )
    print(f"versions: Python {platform.python_version()}, uvicorn {uvicorn.__version__}, ", end="")
    print(f"websockets {websockets.__version__}\n")
    print("| limit | read | " + " | ".join(name for name, _, _ in ways) + " |")
    print("|---|---|" + "---|" * len(ways))
    for limit in (65536, 1 << 20):
        for piece in PIECES:
            if limit > 65536 and piece == 1:
                continue  # a million reads through the old reader: minutes
            best = [float("inf")] * len(ways)
            for _ in range(args.rounds):
                for i, (_, tree, framing) in enumerate(ways):
                    best[i] = min(best[i], run_in(tree, limit, piece, framing))
            cells = " | ".join(f"{us:.2f} µs" for us in best)
            print(f"| {limit} | {piece} B | {cells} |")
    print("\nCPU per read (time.process_time), best of", args.rounds, "rounds.")


if __name__ == "__main__":
    main()
