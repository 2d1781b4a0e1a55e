"""Where sessions live: the record and protocol (`base`), in this process (`memory`), Redis."""

from __future__ import annotations

from typing import Any

from service.store.base import SessionRecord, SessionStore, State, new_session_id
from service.store.memory import MemorySessionStore
from service.store.tiered import TieredSessionStore, WriteMode


def redis_client(url: str, timeout_s: float) -> Any:
    """A redis-py asyncio client for a redis:// or redis+cluster:// URL, with no retries
    (for callers that have a fallback of their own): `redis.asyncio.Redis` or `RedisCluster`."""
    from redis.asyncio import Redis  # noqa: PLC0415 (redis only when asked)
    from redis.asyncio.cluster import ClusterNode, RedisCluster  # noqa: PLC0415
    from redis.asyncio.retry import Retry  # noqa: PLC0415
    from redis.backoff import NoBackoff  # noqa: PLC0415

    from service.config import CLUSTER_SCHEMES as SCHEMES
    from service.config import parse_cluster_url

    options: dict[str, Any] = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "retry": Retry(NoBackoff(), retries=0),
    }
    if not url.startswith(SCHEMES):
        return Redis.from_url(url, **options)
    parts = parse_cluster_url(url)
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in parts["seeds"]],
        username=parts["username"],
        password=parts["password"],
        ssl=parts["ssl"],
        require_full_coverage=False,
        **options,
    )


__all__ = [
    "MemorySessionStore",
    "redis_client",
    "SessionRecord",
    "SessionStore",
    "State",
    "TieredSessionStore",
    "new_session_id",
    "open_store",
]


def open_store(
    url: str,
    ttl_s: float,
    cap: int,
    write: WriteMode = "through",
    owner_cap: int = 0,
    timeout_s: float = 1.0,
    behind_window_s: float = 1.0,
) -> SessionStore:
    """The store a `session_store` setting names: "memory", a redis:// URL or a
    redis+cluster:// one (Redis with the engine's own copy in front, written `write`
    "through" or "behind", at most `behind_window_s` behind; a Redis that does not answer
    within `timeout_s` is down); `owner_cap` sessions at most per owner (0: no cap)."""
    if url == "memory":
        return MemorySessionStore(ttl_s=ttl_s, cap=cap, owner_cap=owner_cap)
    # redis only when asked
    from service.config import CLUSTER_SCHEMES as SCHEMES
    from service.store.redis import RedisSessionStore  # noqa: PLC0415
    from service.store.redis_cluster import RedisClusterSessionStore  # noqa: PLC0415

    shared: RedisSessionStore
    if url.startswith(SCHEMES):
        shared = RedisClusterSessionStore.from_url(
            url, ttl_s=ttl_s, cap=cap, owner_cap=owner_cap, timeout_s=timeout_s
        )
    else:
        shared = RedisSessionStore.from_url(
            url, ttl_s=ttl_s, cap=cap, owner_cap=owner_cap, timeout_s=timeout_s
        )
    return TieredSessionStore(
        shared, write=write, cap=cap, ttl_s=ttl_s, behind_window_s=behind_window_s
    )
