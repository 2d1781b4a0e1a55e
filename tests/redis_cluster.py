"""A real local Redis Cluster for tests (`benchmarks.lib.redis_cluster`), skipped with a
reason where redis-server or redis-cli is missing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.lib.redis_cluster import REDIS_CLI, REDIS_SERVER, ClusterNode, RedisCluster
from tests.redis_server import RedisServer, running_redis

__all__ = [
    "REDIS_CLI",
    "SINGLE_OR_CLUSTER",
    "ClusterNode",
    "RedisCluster",
    "needs_redis_cluster",
    "running_cluster",
    "single_or_cluster",
]

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


# The params of a module fixture that runs its tests on one redis-server, then on a cluster.
SINGLE_OR_CLUSTER = ["single", pytest.param("cluster", marks=needs_redis_cluster)]


def single_or_cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RedisServer | RedisCluster]:
    """Generator body for a fixture with `params=SINGLE_OR_CLUSTER`: one redis-server, or a
    three-primary cluster (its `url` is a redis+cluster:// URL)."""
    if request.param == "single":
        yield from running_redis()
    else:
        yield from running_cluster(tmp_path_factory.mktemp("cluster"))
