"""Rate limits held in Redis: one bucket per key for every process, on one node and a cluster.

The rates here are so low (one request per 1,000 s) that nothing refills while a test runs:
what is admitted is the burst, exactly, whatever the machine's speed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from service.api.auth import RateLimiter
from service.api.rate_limit import SharedRateLimiter
from service.store import redis_client
from tests.redis_cluster import (
    SINGLE_OR_CLUSTER,
    RedisCluster,
    single_or_cluster,
)
from tests.redis_server import RedisServer, needs_redis

pytestmark = [needs_redis, pytest.mark.redis]
SLOW = 0.001  # requests per second: no refill within a test


@pytest.fixture(scope="module", params=SINGLE_OR_CLUSTER)
def redis_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RedisServer | RedisCluster]:
    yield from single_or_cluster(request, tmp_path_factory)


@pytest.fixture
async def limiters(redis_server: RedisServer | RedisCluster) -> AsyncIterator[list[Any]]:
    """Three limiters as three API processes would hold them: burst 5, a third of the rate
    each as the fallback."""
    made = [
        SharedRateLimiter(
            # Generous: these tests are about the shared bucket, and on a loaded machine a
            # cluster client's first connection can take longer than a production timeout
            # (the limiter would then answer from its own share, by design).
            redis_client(redis_server.url, timeout_s=5.0),
            SLOW,
            5,
            fallback=RateLimiter(rate=SLOW / 3, burst=5),
        )
        for _ in range(3)
    ]
    await made[0].redis.flushdb()
    yield made
    for limiter in made:
        await limiter.close()


async def test_one_bucket_per_key_across_processes(limiters: list[Any]) -> None:
    waits = [await limiters[i % 3].admit("alice") for i in range(15)]
    assert waits[:5] == [0.0] * 5  # the burst, wherever the requests go
    assert all(w > 0 for w in waits[5:])
    # The next request may go when one request's worth has refilled: 1/rate.
    assert waits[5] == pytest.approx(1 / SLOW, rel=0.01)
    assert await limiters[1].admit("bob") == 0.0  # keys are apart
    assert all(limiter.global_scope for limiter in limiters)


async def test_concurrent_requests_never_pass_the_burst(limiters: list[Any]) -> None:
    waits = await asyncio.gather(*(limiters[i % 3].admit("carol") for i in range(60)))
    assert sum(1 for w in waits if w == 0.0) == 5


async def test_the_process_bucket_answers_while_redis_is_down(
    redis_server: RedisServer | RedisCluster, caplog: pytest.LogCaptureFixture
) -> None:
    if isinstance(redis_server, RedisCluster):
        pytest.skip("stops the one Redis")
    limiter = SharedRateLimiter(
        redis_client(redis_server.url, timeout_s=0.5),
        SLOW,
        2,
        fallback=RateLimiter(rate=SLOW, burst=3),
        retry_s=0.0,  # try Redis again at every request
    )
    try:
        assert [await limiter.admit("dave") for _ in range(3)][-1] > 0  # Redis: burst 2
        redis_server.stop()
        with caplog.at_level(logging.INFO, logger="service.api.rate_limit"):
            waits = [await limiter.admit("dave") for _ in range(4)]
            assert waits == [0.0, 0.0, 0.0, pytest.approx(1 / SLOW, rel=0.01)]  # the local burst, 3
            assert not limiter.global_scope
            redis_server.start()  # empty: a fresh bucket
            assert await limiter.admit("dave") == 0.0
            assert limiter.global_scope
        messages = [r.getMessage() for r in caplog.records]
        assert any("Redis unreachable" in m for m in messages)
        assert any("rates are global" in m for m in messages)
        assert sum("Redis unreachable" in m for m in messages) == 1  # once per outage
    finally:
        if redis_server.proc is None:
            redis_server.start()
        await limiter.close()
