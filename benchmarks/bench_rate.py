"""A key's rate limit across replicas, and what the shared bucket costs a request.

burst   Three replicas (`python -m service`, one API process each, the bundled models) share
        a store: "memory" (none: each process keeps its own buckets) or a Redis started here
        (one node, or with --cluster a local 3-primary cluster). One API key sends GET
        /v1/models (a route that does not reach the engine) round-robin through the three
        as fast as --connections keep-alive connections per replica allow, for --seconds.
        Printed: requests admitted (200) and refused (429), and the admitted rate,
        (admitted - burst) / seconds, against NEXTWORD_RATE_LIMIT.
cost    The limiter's own time per request, sequential, --calls calls: the process's bucket
        (`RateLimiter`) against the Redis bucket (`SharedRateLimiter`, one EVALSHA) on one
        node and on the cluster; and GET /v1/models through one replica without a limit
        against with the Redis limit (a rate it never reaches), alternated --rounds times.

    python -m benchmarks.bench_rate                  # one Redis node
    python -m benchmarks.bench_rate --cluster        # a local 3-primary Redis Cluster too
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from benchmarks.bench_limits import exchange
from benchmarks.lib.machine import machine, machine_lines
from benchmarks.lib.redis_cluster import RedisCluster
from benchmarks.lib.server import ServerProcess, free_port, redis_server, redis_version
from service.api.auth import RateLimiter
from service.api.rate_limit import SharedRateLimiter
from service.store import redis_client

MODULES = ("redis", "uvicorn", "fastapi")
KEY = "bench-rate-key-0123456789"


def get_request(path: str) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n\r\n"
    ).encode()


@contextmanager
def replicas(store: str, count: int, env: dict[str, str]) -> Iterator[list[ServerProcess]]:
    """`count` replicas of the service on one store, each with one API process."""
    with ExitStack() as stack:
        started = []
        for i in range(count):
            port = free_port()
            server = ServerProcess(
                f"replica-{i}",
                [sys.executable, "-m", "service"],
                {
                    "NEXTWORD_HOST": "127.0.0.1",
                    "NEXTWORD_PORT": str(port),
                    "NEXTWORD_WORKERS": "1",
                    "NEXTWORD_SESSION_STORE": store,
                    "NEXTWORD_API_KEYS": f"bench:{KEY}",
                    "NEXTWORD_INTRA_OP_THREADS": "1",
                    "NEXTWORD_LOG_LEVEL": "warning",
                    **env,
                },
                port=port,
            )
            server.start()
            stack.callback(server.stop)
            started.append(server)
        for server in started:
            server.wait_ready()
        yield started


async def burst(servers: list[ServerProcess], connections: int, seconds: float) -> Counter[int]:
    """GET /v1/models as fast as the connections allow, for `seconds`: statuses."""
    statuses: Counter[int] = Counter()
    request = get_request("/v1/models")
    deadline = time.monotonic() + seconds

    async def worker(port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while time.monotonic() < deadline:
            if reader.at_eof():
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            status, _, _ = await exchange(reader, writer, request)
            statuses[status] += 1
        writer.close()

    await asyncio.gather(*(worker(s.port) for s in servers for _ in range(connections)))
    return statuses


def run_burst(stores: list[tuple[str, str]], args: argparse.Namespace) -> None:
    print(
        f"\n## burst: one key through 3 replicas, NEXTWORD_RATE_LIMIT={args.rate:g}/s, "
        f"NEXTWORD_RATE_BURST={args.burst}, {args.connections} connections per replica, "
        f"{args.seconds:g} s\n"
    )
    header = (
        f"| {'store':<22} | {'admitted':>8} | {'refused':>8} | {'other':>5} "
        f"| {'admitted/s':>10} | {'of the rate':>11} |"
    )
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    env = {"NEXTWORD_RATE_LIMIT": str(args.rate), "NEXTWORD_RATE_BURST": str(args.burst)}
    for name, store in stores:
        with replicas(store, 3, env) as servers:
            statuses = asyncio.run(burst(servers, args.connections, args.seconds))
        ok, limited = statuses[200], statuses[429]
        other = sum(statuses.values()) - ok - limited
        rate = (ok - args.burst) / args.seconds
        print(
            f"| {name:<22} | {ok:>8} | {limited:>8} | {other:>5} | {rate:>10.1f} "
            f"| {rate / args.rate:>10.1%} |"
        )


async def limiter_cost(url: str | None, calls: int) -> float:
    """Median seconds per `admit` of one key, sequential."""
    local = RateLimiter(rate=1e9, burst=1e9)
    limiter = local if url is None else SharedRateLimiter(redis_client(url, 0.5), 1e9, 1e9, local)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        await limiter.admit("alice")
        times.append(time.perf_counter() - start)
    if isinstance(limiter, SharedRateLimiter):
        assert limiter.global_scope, "Redis did not answer"
        await limiter.close()
    return statistics.median(times)


async def request_cost(port: int, requests: int) -> float:
    """Median seconds per GET /v1/models on one keep-alive connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = get_request("/v1/models")
    times = []
    for _ in range(requests):
        start = time.perf_counter()
        status, _, _ = await exchange(reader, writer, request)
        times.append(time.perf_counter() - start)
        assert status == 200, status
    writer.close()
    return statistics.median(times)


def run_cost(stores: list[tuple[str, str]], args: argparse.Namespace) -> None:
    print(f"\n## cost: the limiter's time per request (median of {args.calls} sequential calls)\n")
    print("| limiter | us/request |\n|---|---|")
    print(f"| this process's bucket | {asyncio.run(limiter_cost(None, args.calls)) * 1e6:.1f} |")
    for name, url in stores:
        if url != "memory":
            cost = asyncio.run(limiter_cost(url, args.calls))
            print(f"| Redis bucket, {name} | {cost * 1e6:.1f} |")
    redis_url = next(url for _, url in stores if url != "memory")
    print(
        f"\nGET /v1/models through one replica, median of {args.calls} sequential requests, "
        f"{args.rounds} alternated rounds (us):\n"
    )
    print("| round | no limit | Redis limit (never reached) | difference |\n|---|---|---|---|")
    with (
        replicas(redis_url, 1, {}) as (plain,),
        replicas(redis_url, 1, {"NEXTWORD_RATE_LIMIT": "1000000"}) as (limited,),
    ):
        for round_ in range(args.rounds):
            a = asyncio.run(request_cost(plain.port, args.calls))
            b = asyncio.run(request_cost(limited.port, args.calls))
            print(f"| {round_ + 1} | {a * 1e6:.0f} | {b * 1e6:.0f} | {(b - a) * 1e6:+.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=50.0, help="NEXTWORD_RATE_LIMIT")
    parser.add_argument("--burst", type=int, default=10, help="NEXTWORD_RATE_BURST")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=2, help="per replica")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cluster", action="store_true", help="a local Redis Cluster too")
    parser.add_argument("--skip", choices=["burst", "cost"], action="append", default=[])
    args = parser.parse_args()
    if redis_version() is None:
        sys.exit("no redis-server binary: install redis-server")
    print("\n".join(machine_lines(machine(MODULES), MODULES)))
    print(f"redis-server {redis_version()}, on this machine with the replicas and the client")
    with ExitStack() as stack:
        url, _ = stack.enter_context(redis_server())
        stores = [("memory (per process)", "memory"), ("Redis, one node", url)]
        if args.cluster:
            folder = stack.enter_context(tempfile.TemporaryDirectory())
            cluster = stack.enter_context(RedisCluster(Path(folder)))
            stores.append(("Redis Cluster, 3 primaries", cluster.url))
        if "burst" not in args.skip:
            run_burst(stores, args)
        if "cost" not in args.skip:
            run_cost(stores, args)


if __name__ == "__main__":
    main()
