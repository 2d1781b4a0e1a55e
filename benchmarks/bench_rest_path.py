"""CPU per REST request of the API process's own work, in process (no server, no engine).

`POST /v1/predict` (stateless, a short text) and `POST /v1/sessions/{id}/feed` (one word)
sent straight into the service's ASGI app (every middleware, the router, the lean route)
over a real `Predictor` with the bundled model's vocabulary and the engine stand-in of
`benchmarks.bench_stream_path` (it answers at once, the wire's msgpack included); the
same requests into a bare FastAPI JSON endpoint (`benchmarks/bare_ws_app.py`'s
`/v1/predict`) as the yardstick. uvicorn's HTTP parsing and socket writes are left out:
this is what the service adds per request above them.

    python -m benchmarks.bench_rest_path
    python -m benchmarks.bench_rest_path --baseline /tmp/base   # old vs new, alternated

With --baseline each row of the service is also run on another checkout's `service` (a
subprocess with that checkout first on the import path), alternated with this one's.
Figures are CPU time (`time.process_time`); compare rows of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SESSION = "kq3Zb8M2rXb1yWc0n4LQ5w"


def http_scope(path: str, body: bytes) -> dict[str, Any]:
    """An ASGI HTTP scope of a JSON POST as uvicorn builds it."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"127.0.0.1:8000"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }


async def drive(app: Any, path: str, bodies: list[bytes], requests: int) -> float:
    """CPU µs per request of `app` answering POSTs to `path` (after a warm-up)."""
    statuses: list[int] = []

    async def one(body: bytes) -> None:
        done = asyncio.get_running_loop().create_future()
        sent_body = False

        async def receive() -> dict[str, Any]:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": body, "more_body": False}
            await done  # as a server does: nothing more until the answer is complete
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])
            elif not message.get("more_body", False) and not done.done():
                done.set_result(None)

        await app(http_scope(path, body), receive, send)

    for i in range(300):
        await one(bodies[i % len(bodies)])
    start = time.process_time()
    for i in range(requests):
        await one(bodies[i % len(bodies)])
    spent = time.process_time() - start
    if set(statuses) != {200}:
        raise RuntimeError(f"statuses {sorted(set(statuses))}")
    return spent / requests * 1e6


async def service_rows(requests: int) -> dict[str, float]:
    """µs per predict and per feed request through the service's app."""
    from benchmarks.bench_stream_path import AnsweringEngine, setup
    from service.api.app import create_app
    from service.api.predictor import Predictor
    from service.config import Settings

    data = setup()
    settings = Settings(default_model="lstm")

    class Engine(AnsweringEngine):
        async def close(self) -> None:
            """Nothing to close."""

    async def factory(settings: Settings) -> Predictor:
        return Predictor(settings, Engine(data.answer_ids), {"lstm": data.vocab})  # type: ignore[arg-type]

    app = create_app(settings, predictor_factory=factory)
    rows = {}
    async with app.router.lifespan_context(app):
        words = data.words[:500]
        predict = [json.dumps({"text": f"the {w}"}).encode() for w in words]
        feed = [json.dumps({"text": w}).encode() for w in words]
        rows["predict"] = await drive(app, "/v1/predict", predict, requests)
        created = await app.state.predictor.create_session("")
        path = f"/v1/sessions/{created['session_id']}/feed"
        rows["feed"] = await drive(app, path, feed, requests)
    return rows


async def bare_row(requests: int) -> float:
    """µs per request of the bare FastAPI JSON endpoint."""
    from benchmarks.bare_ws_app import app

    body = json.dumps({"text": "the cat"}).encode()
    return await drive(app, "/v1/predict", [body], requests)


def best(fn: Any, requests: int, repeat: int) -> Any:
    """The lowest of `repeat` runs (a dict: per key)."""
    runs = [asyncio.run(fn(requests)) for _ in range(repeat)]
    if isinstance(runs[0], dict):
        return {k: min(r[k] for r in runs) for k in runs[0]}
    return min(runs)


def run_on(code: Path, requests: int, repeat: int) -> dict[str, float]:
    """The service rows with `code`'s `service` first on the import path."""
    from benchmarks.lib.checkout import last_line  # noqa: PLC0415 (parent only: children may run older code)

    args = ["-m", "benchmarks.bench_rest_path", "--child"]
    args += ["--requests", str(requests), "--repeat", str(repeat)]
    return dict(json.loads(last_line(code, args, path=[ROOT])))


def main(argv: list[str] | None = None) -> None:
    """Print the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=5000, help="requests per pass")
    p.add_argument("--repeat", type=int, default=3, help="passes (the best counts)")
    p.add_argument("--rounds", type=int, default=3, help="alternations with --baseline")
    p.add_argument("--baseline", type=Path, help="another checkout's root (old against new)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(best(service_rows, args.requests, args.repeat)))
        return
    logging_off()
    bare = best(bare_row, args.requests, args.repeat)
    print("| app, in process | CPU µs per request | / bare |\n|---|---|---|")
    print(f"| bare FastAPI JSON endpoint | {bare:.1f} | 1.00 |")
    if args.baseline is None:
        rows = best(service_rows, args.requests, args.repeat)
        for name, us in rows.items():
            print(f"| service {name} | {us:.1f} | {us / bare:.2f} |")
        return
    new: list[dict[str, float]] = []
    old: list[dict[str, float]] = []
    for _ in range(args.rounds):
        new.append(run_on(ROOT, args.requests, args.repeat))
        old.append(run_on(args.baseline.resolve(), args.requests, args.repeat))
    for name in new[0]:
        n = min(r[name] for r in new)
        o = min(r[name] for r in old)
        print(f"| service {name}, this checkout | {n:.1f} | {n / bare:.2f} |")
        print(f"| service {name}, {args.baseline} | {o:.1f} | {o / bare:.2f} |")
        print(
            f"\n{name} new / old: {n / o:.2f} ({', '.join(f'{r[name]:.1f}' for r in new)} "
            f"against {', '.join(f'{r[name]:.1f}' for r in old)})\n"
        )


def logging_off() -> None:
    """No per-request log lines in the timings."""
    import logging

    logging.disable(logging.WARNING)


if __name__ == "__main__":
    main()
