"""A key's request rate held across every API process and replica: one bucket per owner in Redis.

With a Redis session store (one node or a cluster), `SharedRateLimiter` keeps each owner's
bucket in Redis as a GCRA ("generic cell rate algorithm") cell: one number, the theoretical
arrival time (TAT) of the owner's next request, in microseconds of the Redis clock. A request
is admitted when TAT - now <= (burst - 1) / rate, and then moves TAT by 1 / rate: exactly a
token bucket of `burst` tokens filled at `rate` per second, in one key, updated by one Lua
script (EVALSHA): one round trip per request, every process and replica on the same bucket and
the same clock. Keys `nextword:rate:<owner>` expire once their bucket would be full again.

When Redis cannot be reached (down, timing out, a cluster slot without a primary), the
process's own bucket (`auth.RateLimiter`, the rate divided by the API processes of this
replica) takes over, logged at warning once per outage; Redis is tried again after
`retry_s`, and its return is logged at info. Without a Redis store only the process's buckets
exist (the rate then holds per replica: N replicas give a key N times its rate).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisClusterException, RedisError

from service.api.auth import RateLimiter

log = logging.getLogger(__name__)

# KEYS[1]: the owner's cell. ARGV[1]: the emission interval 1/rate (µs); ARGV[2]: burst.
# Returns 0 when admitted, else the microseconds until a request would be.
_GCRA_SCRIPT = """
local interval, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = clock[1] * 1000000 + clock[2]
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local next_tat = tat + interval
local allowed_at = next_tat - burst * interval
if now < allowed_at then
  return math.ceil(allowed_at - now)
end
redis.call('SET', KEYS[1], string.format('%.0f', next_tat), 'PX', math.ceil((next_tat - now) / 1000) + 1)
return 0
"""


class SharedRateLimiter:
    """One token bucket per owner in Redis, shared by every process; the process's own
    buckets while Redis cannot be reached."""

    def __init__(
        self,
        client: Any,
        rate: float,
        burst: float,
        fallback: RateLimiter,
        *,
        prefix: str = "nextword:rate:",
        retry_s: float = 1.0,
    ) -> None:
        self.redis = client
        self.rate = rate
        self.burst = burst
        self.fallback = fallback
        self.prefix = prefix
        self.retry_s = retry_s
        self._interval_us = max(1, round(1_000_000 / rate))
        self._script = client.register_script(_GCRA_SCRIPT)
        self._down_until = 0.0  # monotonic time before which Redis is not tried again
        # A cluster client reads its slot map once before concurrent use (see
        # `RedisClusterSessionStore._connect`).
        self._initialized = not isinstance(client, RedisCluster)
        self._initializing = asyncio.Lock()
        self.global_scope = True  # the last answer came from Redis (False: this process)

    async def admit(self, owner: str) -> float:
        """0.0 when a request may go now, else the seconds until it may."""
        if time.monotonic() >= self._down_until:
            try:
                if not self._initialized:
                    async with self._initializing:
                        if not self._initialized:
                            await self.redis.initialize()
                            self._initialized = True
                wait_us = await self._script(
                    keys=[self.prefix + owner], args=[self._interval_us, self.burst]
                )
            except (RedisError, RedisClusterException, OSError) as exc:
                self._down_until = time.monotonic() + self.retry_s
                if self.global_scope:
                    self.global_scope = False
                    log.warning(
                        "rate limits: Redis unreachable (%s); each API process limits keys "
                        "on its own share of the rate until it answers",
                        exc,
                    )
            else:
                if not self.global_scope:
                    self.global_scope = True
                    log.info("rate limits: Redis answers again; rates are global")
                return int(wait_us) / 1_000_000
        return self.fallback.take(owner)

    async def close(self) -> None:
        await self.redis.aclose()
