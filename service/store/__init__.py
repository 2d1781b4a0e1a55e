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
    url: str,
    ttl_s: float,
    cap: int,
    write: WriteMode = "through",
    owner_cap: int = 0,
    timeout_s: float = 1.0,
    behind_window_s: float = 1.0,
) -> SessionStore:
    """The store a `session_store` setting names: "memory", or a redis:// URL (Redis with
    the engine's own copy in front, written `write` "through" or "behind", at most
    `behind_window_s` behind; a Redis that does not answer within `timeout_s` is down);
    `owner_cap` sessions at most per owner (0: no cap)."""
    if url == "memory":
        return MemorySessionStore(ttl_s=ttl_s, cap=cap, owner_cap=owner_cap)
    from service.store.redis import RedisSessionStore  # noqa: PLC0415 (redis only when asked)

    shared = RedisSessionStore.from_url(
        url, ttl_s=ttl_s, cap=cap, owner_cap=owner_cap, timeout_s=timeout_s
    )
    return TieredSessionStore(
        shared, write=write, cap=cap, ttl_s=ttl_s, behind_window_s=behind_window_s
    )
