"""A real local Redis Cluster for tests (`benchmarks.lib.redis_cluster`), skipped with a
reason where redis-server or redis-cli is missing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.lib.redis_cluster import REDIS_CLI, REDIS_SERVER, ClusterNode, RedisCluster

__all__ = ["REDIS_CLI", "ClusterNode", "RedisCluster", "needs_redis_cluster", "running_cluster"]

needs_redis_cluster = pytest.mark.skipif(
    REDIS_SERVER is None or REDIS_CLI is None,
    reason="no redis-server / redis-cli binaries to start a local Redis Cluster",
)


def running_cluster(folder: Path) -> Iterator[RedisCluster]:
    """Generator body for fixtures: a started cluster, stopped afterwards."""
    cluster = RedisCluster(folder)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
