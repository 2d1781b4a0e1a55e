"""CPU per WebSocket message of the API process's protocol: frames read and written.

On a real `service.api.connections.WebSocketProtocol` (uvicorn's websockets-sansio protocol
with the service's changes) over a transport that only counts what is written, after a real
upgrade handshake and an app that accepts:

    receive   a client's text frame (`{"text": "because"}`, masked) given to `data_received`,
              queued and taken by `receive()`: through the `websockets` parser, as uvicorn
              does it, and through the protocol's own frame reader (`read_frames`)
    send      one answer (five predictions, ~250 bytes): as an ASGI `websocket.send` of text
              through Starlette's `WebSocket.send`, the two exception-handler wrappers of the
              app's stack and uvicorn's `send` (what the stream did before), and as bytes
              through the protocol's `send_text` (what it does now)

Best of --repeat passes of --number calls, CPU time (`time.process_time`): compare rows of
one run.

    python -m benchmarks.bench_ws_protocol
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

MESSAGE = b'{"text": "because"}'


class CountingTransport:
    """An asyncio transport that counts what is written to it."""

    def __init__(self) -> None:
        self.written = 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """Addresses as a loopback socket's."""
        return {"peername": ("127.0.0.1", 1), "sockname": ("127.0.0.1", 2)}.get(name, default)

    def write(self, data: bytes) -> None:
        """Count the bytes."""
        self.written += len(data)

    def is_closing(self) -> bool:
        """Never."""
        return False

    def pause_reading(self) -> None:
        """Nothing to pause."""

    def resume_reading(self) -> None:
        """Nothing to resume."""

    def close(self) -> None:
        """Nothing to close."""


def protocol_us(repeat: int, number: int) -> list[tuple[str, float]]:
    """CPU µs per message of the WebSocket protocol's own receive and send, each way."""
    from starlette._exception_handler import wrap_app_handling_exceptions
    from starlette.websockets import WebSocket, WebSocketState
    from uvicorn.server import ServerState
    from websockets.frames import Frame, Opcode

    from service.api.connections import ConnectionLimits, LimitedConfig, WebSocketProtocol

    answer = (
        b'{"type":"predictions","session_id":"kq3Zb8M2rXb1yWc0n4LQ5w","tokens":7,'
        b'"predictions":[{"word":"the","probability":0.12},{"word":"to","probability":0.06},'
        b'{"word":"a","probability":0.04},{"word":"and","probability":0.03},'
        b'{"word":"of","probability":0.02}],"id":null}'
    )
    client_frame = Frame(Opcode.TEXT, MESSAGE).serialize(mask=True, extensions=[])

    async def measure() -> list[tuple[str, float]]:
        loop = asyncio.get_running_loop()
        app_send: list[Any] = []
        opened = loop.create_future()
        done = loop.create_future()

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await receive()
            await send({"type": "websocket.accept"})
            websocket = WebSocket(scope, receive, send)

            async def endpoint(scope: Any, receive: Any, send: Any) -> None:
                app_send.append(send)
                opened.set_result(None)
                await done  # open until the benchmark ends

            # The app's stack wraps `send` twice (ExceptionMiddleware and the route).
            wrapped = wrap_app_handling_exceptions(endpoint, websocket)
            await wrap_app_handling_exceptions(wrapped, websocket)(scope, receive, send)

        config = LimitedConfig(
            app, ws_max_size=65_536, log_level="warning", lifespan="off", limits=ConnectionLimits()
        )
        config.load()
        protocol = WebSocketProtocol(config, ServerState(), {}, loop)  # type: ignore[arg-type]
        protocol.connection_made(CountingTransport())  # type: ignore[arg-type]
        protocol.data_received(
            b"GET /v1/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        await opened
        starlette_ws = WebSocket(protocol.scope, protocol.receive, app_send[0])  # type: ignore[arg-type]
        starlette_ws.client_state = starlette_ws.application_state = WebSocketState.CONNECTED
        framing = protocol.framing
        text = answer.decode()

        async def receive_one() -> None:
            protocol.data_received(client_frame)
            await protocol.receive()

        async def via_websockets() -> None:
            protocol.framing = False
            await receive_one()

        async def framed_here() -> None:
            protocol.framing = framing
            await receive_one()

        async def via_starlette() -> None:
            await starlette_ws.send({"type": "websocket.send", "text": text})

        async def direct() -> None:
            await protocol.send_text(answer)

        cases = [
            (
                "receive: a frame parsed by websockets, queued, taken (uvicorn's way)",
                via_websockets,
            ),
            ("receive: the same frame split by the protocol's frame reader", framed_here),
            ("send: an answer through WebSocket.send, 2 wrappers, uvicorn's send", via_starlette),
            ("send: the same answer's bytes through the protocol's send_text", direct),
        ]
        rows = []
        for name, fn in cases:
            best = float("inf")
            for _ in range(repeat):
                start = time.process_time()
                for _ in range(number):
                    await fn()
                best = min(best, time.process_time() - start)
            rows.append((name, best / number * 1e6))
        protocol.framing = framing
        done.set_result(None)
        await asyncio.gather(*protocol.tasks)
        if not framing:
            rows = [(f"{name} (frame reader OFF: not started)", us) for name, us in rows]
        return rows

    return asyncio.run(measure())


def main(argv: list[str] | None = None) -> None:
    """Print the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--number", type=int, default=20_000, help="calls per pass")
    p.add_argument("--repeat", type=int, default=5, help="passes (the best counts)")
    args = p.parse_args(argv)
    from benchmarks.lib.machine import machine, machine_lines

    modules = ("uvicorn", "websockets", "starlette")
    for line in machine_lines(machine(modules), modules):
        print(line)
    rows = protocol_us(args.repeat, args.number)
    print("\n| per message | CPU µs |\n|---|---|")
    for name, us in rows:
        print(f"| {name} | {us:.2f} |")
    print(f"\nreceive, frame reader / websockets: {rows[1][1] / rows[0][1]:.2f}")
    print(f"send, send_text / WebSocket.send: {rows[3][1] / rows[2][1]:.2f}")


if __name__ == "__main__":
    main()
