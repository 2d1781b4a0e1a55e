"""Per-step cost of the session stores: Redis against the in-process store, same run.

One step of the batcher costs the store a `get_many` and a `put_many` (compare-and-set)
over the batch's sessions. This times that pair for batches of several sizes, with
states of a given model shape, and prints the cost per step and the Redis/memory ratio,
the time redis-server itself spent (it runs commands on one thread, so this bounds
the steps/s one Redis can serve for all replicas together), and what one session
takes in Redis (`MEMORY USAGE`). The last two columns are what the engine really uses with
Redis, its own copy in front (`TieredSessionStore`): written through (each batch written
to Redis before it is answered; reads of the engine's own sessions need no round trip) and
written behind (answered at once; every session written since the last flush goes to
Redis in one transaction every 50 ms, its cost spread over the steps it covered).

With `--cluster`, the engine's copy over one Redis node against a local Redis Cluster of
three primaries (each with a replica; `benchmarks.lib.redis_cluster`), written through,
behind, and through with each write waiting for one replica (WAIT 1): microseconds per
step this process spends, and the busiest primary's redis-server time per step (Redis runs
commands on one thread, so that bounds the steps/s the store sustains: one node carries all
of it, a cluster's primaries a share each).

    python -m benchmarks.bench_store                      # starts a redis-server on loopback
    python -m benchmarks.bench_store --url redis://host:6379/15   # an existing Redis (db is flushed!)
    python -m benchmarks.bench_store --cluster --batches 256     # one node against a 3-primary cluster
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from redis.utils import HIREDIS_AVAILABLE

from benchmarks.lib.machine import machine, machine_lines
from benchmarks.lib.redis_cluster import RedisCluster
from benchmarks.lib.server import redis_server, redis_version
from service.config import CLUSTER_SCHEMES as SCHEMES
from service.store import MemorySessionStore, SessionRecord, SessionStore, TieredSessionStore
from service.store.redis import RedisSessionStore
from service.store.redis_cluster import RedisClusterSessionStore

MODULES = ("numpy", "redis")


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
        got = [r for r in await store.get_many(ids) if r is not None]
        updated = [replace(r, tokens=r.tokens + 1, last_used_at=time.time()) for r in got]
        ok = await store.put_many(updated, [r.version for r in got])
        times.append(time.perf_counter() - start)
        assert all(ok)
    return times


def shared_store(url: str) -> RedisSessionStore:
    """The Redis store a URL names: one node, or a cluster (redis+cluster://)."""
    if url.startswith(SCHEMES):
        return RedisClusterSessionStore.from_url(url, ttl_s=600)
    return RedisSessionStore.from_url(url, ttl_s=600)


async def time_tiered(
    url: str, write: str, records: list[SessionRecord], min_seconds: float
) -> float:
    """Seconds per batch of the engine's copy over Redis, flushes (behind) included."""
    shared = shared_store(url)
    await shared._redis.flushdb()
    store = TieredSessionStore(shared, write=write, ttl_s=600)  # type: ignore[arg-type]
    assert all(await store.put_many(records, [None] * len(records)))
    await store.flush()
    ids = [r.session_id for r in records]
    steps, started, last_flush = 0, time.perf_counter(), time.perf_counter()
    while time.perf_counter() - started < min_seconds or steps < 20:
        got = [r for r in await store.get_many(ids) if r is not None]
        updated = [replace(r, tokens=r.tokens + 1, last_used_at=time.time()) for r in got]
        assert all(await store.put_many(updated, [r.version for r in got]))
        steps += 1
        if write == "behind" and time.perf_counter() - last_flush >= store.flush_interval_s:
            await store.flush()
            last_flush = time.perf_counter()
    await store.flush()
    elapsed = time.perf_counter() - started
    await store.close()
    return elapsed / steps


async def server_seconds(store: RedisSessionStore, steps: int) -> float:
    """Seconds redis-server spent per step (INFO commandstats since the last reset).

    Redis runs commands on one thread: this bounds the steps/s one Redis serves.
    """
    stats = await store._redis.info("commandstats")
    return sum(v["usec"] for v in stats.values()) / 1e6 / steps


async def run(url: str, args: argparse.Namespace) -> None:
    redis_store = RedisSessionStore.from_url(url, ttl_s=600)
    await redis_store._redis.flushdb()
    info = await redis_store._redis.info("server")
    print("\n".join(machine_lines(machine(MODULES), MODULES)))
    print(
        f"redis-py hiredis parser: {'yes' if HIREDIS_AVAILABLE else 'no'}; "
        f"redis-server {info['redis_version']} on {url.split('@')[-1]}"
    )
    print(
        f"state: {args.cell} {args.layers}x{args.hidden} float32; one step = get_many + put_many "
        f"(CAS) of a batch; median over >= {args.seconds:.1f} s per row\n"
    )
    header = (
        f"| {'batch':>5} | {'memory ms/batch':>15} | {'redis ms/batch':>14} "
        f"| {'memory us/step':>14} | {'redis us/step':>13} | {'redis/memory':>12} "
        f"| {'redis-server us/step':>18} | {'through us/step':>15} | {'behind us/step':>14} |"
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
        through = await time_tiered(url, "through", records, args.seconds)
        behind = await time_tiered(url, "behind", records, args.seconds)
        print(
            f"| {batch:>5} | {mem * 1e3:>15.3f} | {red * 1e3:>14.3f} "
            f"| {mem / batch * 1e6:>14.2f} | {red / batch * 1e6:>13.2f} | {red / mem:>12.1f} "
            f"| {server / batch * 1e6:>18.2f} | {through / batch * 1e6:>15.2f} "
            f"| {behind / batch * 1e6:>14.2f} |"
        )
    key = redis_store._key("bench-0")
    value = await redis_store._redis.strlen(key)
    usage = await redis_store._redis.memory_usage(key)
    print(f"\none session in Redis: {value} bytes of value, MEMORY USAGE {usage} bytes per key")
    await redis_store._redis.flushdb()
    await redis_store.close()


async def busiest_server_seconds(ports: list[int], steps: int) -> float:
    """The most seconds any one of the servers on `ports` spent per step (commandstats)."""
    import redis.asyncio as aioredis  # noqa: PLC0415

    spent = []
    for port in ports:
        client = aioredis.Redis(host="127.0.0.1", port=port)
        stats = await client.info("commandstats")
        spent.append(sum(v["usec"] for v in stats.values()) / 1e6 / steps)
        await client.aclose()
    return max(spent)


async def reset_stats(ports: list[int]) -> None:
    import redis.asyncio as aioredis  # noqa: PLC0415

    for port in ports:
        client = aioredis.Redis(host="127.0.0.1", port=port)
        await client.config_resetstat()
        await client.aclose()


async def time_tiered_counted(
    url: str, write: str, records: list[SessionRecord], seconds: float, ports: list[int]
) -> tuple[float, float]:
    """`time_tiered`, and the busiest server's seconds per batch meanwhile."""
    await reset_stats(ports)
    started = time.perf_counter()
    per_batch = await time_tiered(url, write, records, seconds)
    batches = max(1, round((time.perf_counter() - started) / per_batch))
    return per_batch, await busiest_server_seconds(ports, batches)


async def run_cluster(
    single: str, single_port: int, cluster: RedisCluster, args: argparse.Namespace
) -> None:
    """One node against a three-primary cluster: the engine's copy written through, behind,
    and through with WAIT 1 (cluster only)."""
    print("\n".join(machine_lines(machine(MODULES), MODULES)))
    print(
        f"redis-server {redis_version()}: one node, and a cluster of 3 primaries + 3 replicas, "
        f"all on this machine; state: {args.cell} {args.layers}x{args.hidden} float32; "
        f">= {args.seconds:.1f} s per cell; us/step: this process's time per step; "
        "server us/step: the busiest primary's redis-server time per step (the ceiling: "
        "1e6 / it steps/s)\n"
    )
    primaries = [n.port for n in cluster.primaries()]
    rows = [
        ("one node", single, [single_port], ("through", "behind")),
        ("cluster", cluster.url, primaries, ("through", "behind")),
        ("cluster, WAIT 1", cluster.url + "?wait_replicas=1", primaries, ("through",)),
    ]
    header = (
        f"| {'store':<15} | {'write':<7} | {'batch':>5} | {'us/step':>8} | {'steps/s':>9} "
        f"| {'server us/step':>14} | {'server ceiling steps/s':>22} |"
    )
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for batch in args.batches:
        records = make_records(batch, args.cell, args.layers, args.hidden)
        for name, url, ports, writes in rows:
            for write in writes:
                per_batch, server = await time_tiered_counted(
                    url, write, records, args.seconds, ports
                )
                print(
                    f"| {name:<15} | {write:<7} | {batch:>5} | {per_batch / batch * 1e6:>8.2f} "
                    f"| {batch / per_batch:>9,.0f} | {server / batch * 1e6:>14.2f} "
                    f"| {batch / server:>22,.0f} |"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="an existing Redis (its db is flushed); default: start one")
    parser.add_argument("--cell", choices=["lstm", "gru"], default="lstm")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--seconds", type=float, default=1.0, help="time per row and store")
    parser.add_argument(
        "--cluster", action="store_true", help="one node against a local 3-primary cluster"
    )
    args = parser.parse_args()
    if args.cluster:
        if redis_version() is None:
            sys.exit("no redis-server binary: install redis-server")
        with (
            tempfile.TemporaryDirectory() as folder,
            redis_server() as (url, _),
            RedisCluster(Path(folder)) as cluster,
        ):
            port = int(url.rsplit(":", 1)[1].split("/")[0])
            asyncio.run(run_cluster(url, port, cluster, args))
    elif args.url:
        asyncio.run(run(args.url, args))
    elif redis_version() is None:
        sys.exit("no redis-server binary: install redis-server or pass --url")
    else:
        with redis_server() as (url, _):
            asyncio.run(run(url, args))


if __name__ == "__main__":
    main()
