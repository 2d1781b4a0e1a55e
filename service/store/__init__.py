"""Where sessions live: the record and protocol (`base`), in this process (`memory`), Redis."""

from __future__ import annotations

from service.store.base import SessionRecord, SessionStore, State, new_session_id
from service.store.memory import MemorySessionStore
from service.store.tiered import TieredSessionStore, WriteMode

__all__ = [
    "MemorySessionStore",
    "SessionRecord",
    "SessionStore",
    "State",
    "TieredSessionStore",
    "new_session_id",
    "open_store",
]


def open_store(
    url: str, ttl_s: float, cap: int, write: WriteMode = "through", owner_cap: int = 0
) -> SessionStore:
    """The store a `session_store` setting names: "memory", a redis:// URL or a
    redis+cluster:// one (Redis with the engine's own copy in front, written `write`
    "through" or "behind"); `owner_cap` sessions at most per owner (0: no cap)."""
    if url == "memory":
        return MemorySessionStore(ttl_s=ttl_s, cap=cap, owner_cap=owner_cap)
    # redis only when asked
    from service.store.redis import RedisSessionStore  # noqa: PLC0415
    from service.store.redis_cluster import SCHEMES, RedisClusterSessionStore  # noqa: PLC0415

    shared: RedisSessionStore
    if url.startswith(SCHEMES):
        shared = RedisClusterSessionStore.from_url(url, ttl_s=ttl_s, cap=cap, owner_cap=owner_cap)
    else:
        shared = RedisSessionStore.from_url(url, ttl_s=ttl_s, cap=cap, owner_cap=owner_cap)
    return TieredSessionStore(shared, write=write, cap=cap, ttl_s=ttl_s)
