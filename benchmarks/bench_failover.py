"""A Redis Cluster primary's failover under streaming load: errors, time to recover, steps lost.

A local cluster (3 primaries, each with a replica, `cluster-node-timeout` --node-timeout-ms;
`benchmarks.lib.redis_cluster`) holds --sessions LSTM sessions (2 x 512). The engine's store
(`TieredSessionStore` written through over `RedisClusterSessionStore`, as `nextword serve`
runs it) steps all of them, one batch after another, as fast as it can. After --before
seconds one primary goes: SIGKILL (no warning, its replica is promoted after the node
timeout) or CLUSTER FAILOVER on its replica (a planned switch, no write lost). A batch that
fails (`StoreUnavailable`, a 503 to clients) is retried after 20 ms, as a client would.

Printed per run: batches failed, the time from the event to the first whole batch written
again (recovery), steps answered with a 503 that were written all the same (the other
shards' part of a failed batch: a client that re-sends them gets them applied twice),
and what the cluster kept against what was acknowledged: steps lost
(acknowledged writes the promoted replica never received: asynchronous replication) and
steps applied twice (a stored record whose step count differs from its version; must be 0).
With --wait, the same with every write waiting for one replica (WAIT 1).

    python -m benchmarks.bench_failover
    python -m benchmarks.bench_failover --wait --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from benchmarks.bench_store import make_records
from benchmarks.lib.machine import machine, machine_lines
from benchmarks.lib.redis_cluster import RedisCluster
from benchmarks.lib.server import redis_version
from service.errors import StoreUnavailable
from service.store import TieredSessionStore
from service.store.redis_cluster import RedisClusterSessionStore

MODULES = ("numpy", "redis")


async def stream(
    store: TieredSessionStore,
    ids: list[str],
    stop: asyncio.Event,
    log: list[tuple[float, float, bool]],
    refused_but_written: list[int],
) -> dict[str, int]:
    """Step every session once per batch until `stop`: the last acknowledged version of each;
    `log` gets (start, end, whole batch written) per attempt.

    One writer only: the first batch after a failed one loses the compare-and-set exactly
    for the sessions the failed batch wrote all the same (their engine copies are a step
    behind Redis). Those are counted in `refused_but_written`: steps answered with a 503
    that a client re-sending them would have applied twice."""
    acked = dict.fromkeys(ids, 1)
    after_failure = False
    while not stop.is_set():
        start = time.monotonic()
        try:
            got = await store.get_many(ids)
            records = [r for r in got if r is not None]
            assert len(records) == len(ids), "a session vanished"
            steps = [replace(r, tokens=r.tokens + 1, last_used_at=time.time()) for r in records]
            written = await store.put_many(steps, [r.version for r in records])
        except StoreUnavailable:
            log.append((start, time.monotonic(), False))
            after_failure = True
            await asyncio.sleep(0.02)
            continue
        if after_failure:
            refused_but_written.append(written.count(False))
            after_failure = False
        for record, ok in zip(records, written, strict=True):
            if ok:
                acked[record.session_id] = record.version + 1
        log.append((start, time.monotonic(), all(written)))
        await asyncio.sleep(0)
    return acked


async def one_run(cluster: RedisCluster, how: str, wait: bool, args: argparse.Namespace) -> str:
    logging.getLogger("service").setLevel(logging.ERROR)  # the store's outage warnings
    url = cluster.url + ("?wait_replicas=1" if wait else "")  # WAIT for 100 ms at most
    shared = RedisClusterSessionStore.from_url(url, ttl_s=600, timeout_s=1.0)
    await shared.flush()
    store = TieredSessionStore(shared, write="through", ttl_s=600)
    records = make_records(args.sessions, "lstm", 2, 512)
    records = [replace(r, session_id=f"{r.session_id}-{time.time_ns()}", tokens=1) for r in records]
    assert all(await store.put_many(records, [None] * len(records)))
    ids = [r.session_id for r in records]
    stop = asyncio.Event()
    log: list[tuple[float, float, bool]] = []
    refused_but_written: list[int] = []
    task = asyncio.create_task(stream(store, ids, stop, log, refused_but_written))
    await asyncio.sleep(args.before)
    primary = cluster.primaries()[0]
    replica = cluster.replica_of(primary)
    event = time.monotonic()
    if how == "SIGKILL":
        primary.kill()
    else:
        await asyncio.to_thread(cluster.command, replica.port, "CLUSTER", "FAILOVER")
    await asyncio.to_thread(cluster.wait_promoted, replica)
    await asyncio.sleep(args.after)
    stop.set()
    acked = await task
    if how == "SIGKILL":
        primary.start()  # back as its old replica's replica
        await asyncio.to_thread(cluster.wait_healthy)
    stored = await shared.get_many(ids)
    # A write whose reply never came (the batch failed) may still have been applied: the
    # stored version is then past the acknowledged one, which is not a loss.
    lost = sum(
        max(0, acked[i] - r.version) for i, r in zip(ids, stored, strict=True) if r is not None
    )
    twice = sum(1 for r in stored if r is None or r.tokens != r.version)
    before = [end for _, end, _ in log if end < event]
    rate_before = len(before) * len(ids) / (before[-1] - before[0]) if len(before) > 1 else 0.0
    failures = [end for _, end, ok in log if end >= event and not ok]
    # Recovered: the end of the first whole batch started after the last failure (or after
    # the event, when none failed).
    since = max(failures, default=event)
    recovered = next((end - event for start, end, ok in log if start >= since and ok), math.nan)
    await store.close()
    return (
        f"| {how:<16} | {'WAIT 1' if wait else 'async':<6} | {rate_before:>14,.0f} "
        f"| {len(failures):>14} | {recovered:>13.2f} | {sum(refused_but_written):>15} "
        f"| {lost:>10} | {twice:>13} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=256, help="sessions, one batch")
    parser.add_argument("--before", type=float, default=3.0, help="seconds before the event")
    parser.add_argument("--after", type=float, default=3.0, help="seconds after the promotion")
    parser.add_argument("--node-timeout-ms", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=1, help="runs of each kind")
    parser.add_argument("--wait", action="store_true", help="also with WAIT 1 on every write")
    args = parser.parse_args()
    print("\n".join(machine_lines(machine(MODULES), MODULES)))
    print(
        f"redis-server {redis_version()}: 3 primaries + 3 replicas on this machine, "
        f"cluster-node-timeout {args.node_timeout_ms} ms; {args.sessions} LSTM 2x512 sessions "
        "stepped in one batch, written through\n"
    )
    header = (
        f"| {'event':<16} | {'writes':<6} | {'steps/s before':>14} | {'failed batches':>14} "
        f"| {'recovered, s':>13} | {'503 but written':>15} | {'steps lost':>10} "
        f"| {'applied twice':>13} |"
    )
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    kinds = [("CLUSTER FAILOVER", False), ("SIGKILL", False)]
    if args.wait:
        kinds.append(("SIGKILL", True))
    with tempfile.TemporaryDirectory() as folder:
        cluster = RedisCluster(Path(folder), node_timeout_ms=args.node_timeout_ms)
        with cluster:
            for _ in range(args.runs):
                for how, wait in kinds:
                    print(asyncio.run(one_run(cluster, how, wait, args)), flush=True)


if __name__ == "__main__":
    main()
