"""Per-step cost of the session stores: Redis against the in-process store, same run.

One step of the batcher costs the store a `get_many` and a `put_many` (compare-and-set)
over the batch's sessions. This times that pair for batches of several sizes, with
states of a given model shape, and prints the cost per step and the Redis/memory ratio,
the time redis-server itself spent (it runs commands on one thread, so this bounds
the steps/s one Redis can serve for all replicas together), and what one session
takes in Redis (`MEMORY USAGE`).

    python benchmarks/bench_store.py                      # starts a redis-server on loopback
    python benchmarks/bench_store.py --url redis://host:6379/15   # an existing Redis (db is flushed!)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import redis
from redis.utils import HIREDIS_AVAILABLE

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.store import MemorySessionStore, SessionRecord, SessionStore  # noqa: E402
from service.store.redis import RedisSessionStore  # noqa: E402


@contextmanager
def local_redis() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A throwaway redis-server on a free loopback port (no persistence)."""
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("no redis-server binary: install redis-server or pass --url")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        url = f"redis://127.0.0.1:{port}/0"
        client = redis.Redis.from_url(url)
        for _ in range(500):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.01)
        client.close()
        yield url, proc
    finally:
        proc.terminate()
        proc.wait()


def make_records(n: int, cell: str, layers: int, hidden: int) -> list[SessionRecord]:
    rng = np.random.default_rng(0)
    arrays = 4 if cell == "lstm" else 2  # current and previous (h, c) / h
    now = time.time()
    return [
        SessionRecord(
            session_id=f"bench-{i}",
            model=cell,
            state=tuple(
                rng.standard_normal((layers, hidden)).astype(np.float32) for _ in range(arrays)
            ),
            tokens=0,
            created_at=now,
            last_used_at=now,
        )
        for i in range(n)
    ]


async def time_steps(
    store: SessionStore, records: list[SessionRecord], min_seconds: float
) -> list[float]:
    """Seconds per get_many + put_many of the whole batch, repeated for min_seconds."""
    assert all(await store.put_many(records, [None] * len(records)))
    ids = [r.session_id for r in records]
    times: list[float] = []
    deadline = time.perf_counter() + min_seconds
    while time.perf_counter() < deadline or len(times) < 20:
        start = time.perf_counter()
        got = await store.get_many(ids)
        updated = [replace(r, tokens=r.tokens + 1, last_used_at=time.time()) for r in got]  # type: ignore[type-var]
        ok = await store.put_many(updated, [r.version for r in got])  # type: ignore[union-attr]
        times.append(time.perf_counter() - start)
        assert all(ok)
    return times


async def server_seconds(store: RedisSessionStore, steps: int) -> float:
    """Seconds redis-server spent per step (INFO commandstats since the last reset).

    Redis runs commands on one thread: this bounds the steps/s one Redis serves.
    """
    stats = await store._redis.info("commandstats")
    return sum(v["usec"] for v in stats.values()) / 1e6 / steps


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


async def run(url: str, args: argparse.Namespace) -> None:
    redis_store = RedisSessionStore.from_url(url, ttl_s=600)
    await redis_store._redis.flushdb()
    info = await redis_store._redis.info("server")
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"machine: {machine()}; load average {load} at start")
    print(
        f"python {platform.python_version()}, numpy {np.__version__}, redis-py {redis.__version__} "
        f"(hiredis parser: {'yes' if HIREDIS_AVAILABLE else 'no'}), "
        f"redis-server {info['redis_version']} on {url.split('@')[-1]}"
    )
    print(
        f"state: {args.cell} {args.layers}x{args.hidden} float32; one step = get_many + put_many "
        f"(CAS) of a batch; median over >= {args.seconds:.1f} s per row\n"
    )
    header = (
        f"| {'batch':>5} | {'memory ms/batch':>15} | {'redis ms/batch':>14} "
        f"| {'memory us/step':>14} | {'redis us/step':>13} | {'redis/memory':>12} "
        f"| {'redis-server us/step':>18} |"
    )
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for batch in args.batches:
        records = make_records(batch, args.cell, args.layers, args.hidden)
        memory = MemorySessionStore(ttl_s=600, cap=10 * batch)
        mem = statistics.median(await time_steps(memory, records, args.seconds))
        await redis_store._redis.flushdb()
        await redis_store._redis.config_resetstat()
        times = await time_steps(redis_store, records, args.seconds)
        red = statistics.median(times)
        server = await server_seconds(redis_store, len(times))
        print(
            f"| {batch:>5} | {mem * 1e3:>15.3f} | {red * 1e3:>14.3f} "
            f"| {mem / batch * 1e6:>14.2f} | {red / batch * 1e6:>13.2f} | {red / mem:>12.1f} "
            f"| {server / batch * 1e6:>18.2f} |"
        )
    key = redis_store._key("bench-0")
    value = await redis_store._redis.strlen(key)
    usage = await redis_store._redis.memory_usage(key)
    print(f"\none session in Redis: {value} bytes of value, MEMORY USAGE {usage} bytes per key")
    await redis_store._redis.flushdb()
    await redis_store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="an existing Redis (its db is flushed); default: start one")
    parser.add_argument("--cell", choices=["lstm", "gru"], default="lstm")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--seconds", type=float, default=1.0, help="time per row and store")
    args = parser.parse_args()
    if args.url:
        asyncio.run(run(args.url, args))
    else:
        with local_redis() as (url, _):
            asyncio.run(run(url, args))


if __name__ == "__main__":
    main()
