"""Sessions in Redis, so that any replica (or uvicorn worker) can continue any session.

`RedisSessionStore` implements the `SessionStore` protocol of `service.store` over
redis-py's asyncio client. Chosen by `NEXTWORD_SESSION_STORE=redis://host:port/db`.

Round trips. The batcher reads a whole batch with `get_many` (one MGET) and writes
it back with `put_many`: one MULTI/EXEC transaction, sent as one round trip, that
MSETs the new records under staging keys and runs a Lua script which, for each
session, compares the stored version with the expected one and RENAMEs the staged
record onto the session key where they match. Two replicas stepping the same
session at once cannot both win: the loser's step is retried on the new state (no
lost update). The records never pass through Lua: a script's arguments are copied
into Lua strings, which for 8 KB records costs Redis ~2x the time of the whole
staged transaction (measured with `benchmarks/bench_store.py`). Keys of one batch
may live anywhere: this needs a single Redis (or a Sentinel-managed primary); on a Redis
Cluster, `service.store.redis_cluster` writes a batch per hash slot instead.

Record. One binary string per session, key `nextword:session:<id>`:

    offset  size  field
    0       4     magic b"NWS" + format version (4; 3 had no revision, 2 no last step, 1 no owner)
    4       8     version        u64   (the CAS compares bytes 4..11)
    12      4     tokens         u32
    16      4     last_token     i32   id of the last token run (-1: none yet)
    20      8     created_at     f64   Unix time
    28      8     last_used_at   f64   Unix time
    36      3     dtype          numpy dtype string, b"<f4"
    39      1     arrays         state arrays: (h, h_prev) GRU, (h, c, h_prev, c_prev) LSTM
    40      2     layers         u16
    42      4     hidden         u32
    46      1     len(model)     u8
    47      n     model name     UTF-8
    47+n    2     len(owner)     u16
    49+n    m     owner          UTF-8: whose quota the session counts against ("" = none)
    49+n+m  1     adapt          u8    the session's default for `adapt`
            2     slots          u16   C: the memory's slots (0: no memory)
            2     words          u16   typed words, then each: u16 length, UTF-8
            1     len(last step) u8    (format 3) then the id of the last step applied, ASCII
            1     len(revision)  u8    (format 4) then the model revision that wrote it, ASCII
    ...           state          arrays * layers * hidden * 4 bytes, raw little-endian float32
    ...           memory         C keys (i32), then C weights (f32)

Owners. With `owner_cap` (`NEXTWORD_MAX_SESSIONS_PER_KEY`), each owner's sessions are the
members of a sorted set `nextword:owner:<owner>` scored by their last write; the CAS
script adds each written session to its owner's set and, past the cap, deletes the
owner's least recently written sessions (in the same atomic script as the write).

Expiry. Every write sets the key's TTL to `ttl_s` (PEXPIRE), so Redis drops idle
sessions itself. Reading does not refresh it; every step writes.

Memory sizing. Bytes per session = 56 + len(model) + len(owner) + len(last step id: 0
or 24) + len(revision: 16) + the typed words + arrays * layers * hidden * 4 + 8 * C (the memory's slots), plus
Redis's per-key overhead (key, dict and expiry entries, allocator rounding). Arrays is 4
for an LSTM (h and c, now and one token back), 2 for a GRU. The 2 x 512 LSTM without a
memory: 56 + 4 + 16 + 4*2*512*4 = 16,460 bytes of value (16,484 with a step id); `MEMORY
USAGE` reported ~20.5 KB per key for format 2 (jemalloc rounds the value up to its
20,480-byte size class, which formats 3 and 4 stay in), so 100,000 live sessions take
about 2 GB. A 1 x 512 GRU: 56 + 3 + 16 + 2*1*512*4 = 4,171 bytes of value (~5 KB a key). Bound it with Redis's own `maxmemory` and `maxmemory-policy volatile-lru` (the
store's `cap` is not enforced here: Redis evicts, and counts evictions and expirations
in `INFO stats`, `evicted_keys` and `expired_keys`).
`count()` is `DBSIZE`: give the sessions a database of their own.

Faults. Connection errors and timeouts become `StoreUnavailable` (HTTP 503), except a write
that timed out: `OutcomeUnknown` (it may still be applied when a hung Redis resumes). Its message
names no address (clients see it): where Redis is and what failed are logged here, at
warning, once when the store becomes unreachable (then at debug until it answers again,
which is logged at info). The client keeps no broken state: a failed connection is dropped from the pool and the
next call reconnects, so the service recovers by itself when Redis returns. A write
whose reply was lost may be retried: the script treats a key that already holds the
exact record being written as written, so a retry never applies a step twice.
Redis without persistence loses its sessions when restarted (clients get 404 and
start afresh); enable RDB or AOF where that matters.
"""

from __future__ import annotations

import logging
import secrets
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, ReadOnlyError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service import metrics
from service.errors import OutcomeUnknown, StoreUnavailable, UnknownSession
from service.store.base import SessionRecord, WordMemory

log = logging.getLogger(__name__)

# 2 added the owner and the memory, 3 the last step's id, 4 the model revision; formats 1
# to 3 are still read (owner "", last step "", revision "": accepted by any revision).
FORMAT = 4
MAGIC = b"NWS" + bytes([FORMAT])
_MAGICS = {b"NWS\x01": 1, b"NWS\x02": 2, b"NWS\x03": 3, MAGIC: FORMAT}
_STEP_LEN = struct.Struct("<B")
_OWNER_LEN = struct.Struct("<H")
_MEMORY_HEAD = struct.Struct("<BHH")  # adapt, memory slots, typed words
_WORD_LEN = struct.Struct("<H")
# magic+format, version, tokens, last_token, created_at, last_used_at, dtype, arrays,
# layers, hidden, len(model)
_HEAD = struct.Struct("<4sQIidd3sBHIB")
_VERSION = struct.Struct("<Q")
_DTYPE = np.dtype("<f4")
_UNREACHABLE = (RedisConnectionError, RedisTimeoutError, ReadOnlyError, OSError)

# Runs inside MULTI, right after an MSET of the new records under staging keys (see
# the module docstring for why the records do not go through the script's ARGV).
# KEYS[1..n]: session keys; KEYS[n+1..2n]: their staged records. ARGV[1]: TTL in ms;
# ARGV[2]: sessions per owner (0: no cap); ARGV[3]: the owners' key prefix;
# ARGV[3+i]: the expected version of key i (bytes 4..11; "" = must not exist);
# ARGV[3+n+i]: its owner ("" = none). Returns one flag per key, then the count of
# sessions evicted by owners' caps.
_CAS_SCRIPT = """
local n = #KEYS / 2
local ttl, cap, owners = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local clock = redis.call('TIME')  -- one clock for every replica's scores
local now = clock[1] * 1000 + math.floor(clock[2] / 1000)
local written, evicted, mine, capped = {}, 0, {}, {}
for i = 1, n do
  local key, staged, expect, owner = KEYS[i], KEYS[n + i], ARGV[3 + i], ARGV[3 + n + i]
  local ok
  if expect == '' then
    ok = redis.call('EXISTS', key) == 0
  else
    ok = redis.call('GETRANGE', key, 4, 11) == expect
  end
  if not ok and redis.call('GET', key) == redis.call('GET', staged) then
    ok = true  -- our own write, replayed after its reply was lost
  end
  if ok then
    redis.call('RENAME', staged, key)
    redis.call('PEXPIRE', key, ttl)
    written[i] = 1
    if cap > 0 and owner ~= '' then
      local set = owners .. owner
      redis.call('ZADD', set, now, key)
      redis.call('PEXPIRE', set, ttl)
      mine[key] = true
      capped[set] = true
    end
  else
    redis.call('DEL', staged)
    written[i] = 0
  end
end
-- Past an owner's cap its least recently written sessions go, never one this call wrote.
-- Members whose key expired are the oldest (idle past the TTL): they go first and evict
-- nothing.
for set in pairs(capped) do
  local excess = redis.call('ZCARD', set) - cap
  if excess > 0 then
    -- The oldest excess + n: enough however many of them this call wrote.
    for _, member in ipairs(redis.call('ZRANGE', set, 0, excess + n - 1)) do
      if excess <= 0 then break end
      if not mine[member] then
        redis.call('ZREM', set, member)
        evicted = evicted + redis.call('DEL', member)
        excess = excess - 1
      end
    end
  end
end
written[n + 1] = evicted
return written
"""


def encode_record(record: SessionRecord, version: int) -> bytes:
    """The binary form of `record`, stamped with `version`."""
    state = np.ascontiguousarray(np.stack(record.state), dtype=_DTYPE)  # (S, L, H)
    arrays, layers, hidden = state.shape
    name = record.model.encode()
    if len(name) > 255:
        raise ValueError(f"model name too long for the record format: {record.model!r}")
    owner = record.owner.encode()
    if len(owner) > 0xFFFF:
        raise ValueError("owner name too long for the record format")
    head = _HEAD.pack(
        MAGIC,
        version,
        record.tokens,
        record.last_token,
        record.created_at,
        record.last_used_at,
        _DTYPE.str.encode(),
        arrays,
        layers,
        hidden,
        len(name),
    )
    memory = record.memory
    slots = 0 if memory is None else len(memory.keys)
    words = [] if memory is None else [w.encode() for w in memory.words]
    parts = [head, name, _OWNER_LEN.pack(len(owner)), owner]
    parts.append(_MEMORY_HEAD.pack(record.adapt, slots, len(words)))
    for word in words:
        parts += (_WORD_LEN.pack(len(word)), word)
    last_step = record.last_step.encode()
    if len(last_step) > 255:
        raise ValueError("step id too long for the record format")
    parts += (_STEP_LEN.pack(len(last_step)), last_step)
    revision = record.revision.encode()
    if len(revision) > 255:
        raise ValueError("model revision too long for the record format")
    parts += (_STEP_LEN.pack(len(revision)), revision)
    parts.append(state.tobytes())
    if memory is not None:
        parts.append(np.ascontiguousarray(memory.keys, dtype="<i4").tobytes())
        parts.append(np.ascontiguousarray(memory.weights, dtype="<f4").tobytes())
    return b"".join(parts)


def decode_record(session_id: str, data: bytes) -> SessionRecord:
    """The record stored as `data`; raises ValueError when it is not one of ours."""
    form = _MAGICS.get(bytes(data[:4]))
    if form is None:
        raise ValueError(f"unknown record format {data[:4]!r}")
    (
        _,
        version,
        tokens,
        last_token,
        created_at,
        last_used_at,
        dtype,
        arrays,
        layers,
        hidden,
        name_len,
    ) = _HEAD.unpack_from(data)
    start = _HEAD.size + name_len
    model = data[_HEAD.size : start].decode()
    owner, adapt, slots, words, last_step, revision = "", True, 0, [], "", ""
    if form >= 2:
        try:
            (owner_len,) = _OWNER_LEN.unpack_from(data, start)
            start += _OWNER_LEN.size
            owner = data[start : start + owner_len].decode()
            start += owner_len
            adapt_flag, slots, count = _MEMORY_HEAD.unpack_from(data, start)
            adapt = bool(adapt_flag)
            start += _MEMORY_HEAD.size
            for _ in range(count):
                (size,) = _WORD_LEN.unpack_from(data, start)
                start += _WORD_LEN.size
                words.append(data[start : start + size].decode())
                start += size
            if form >= 3:
                (size,) = _STEP_LEN.unpack_from(data, start)
                start += _STEP_LEN.size
                last_step = data[start : start + size].decode()
                start += size
            if form >= 4:
                (size,) = _STEP_LEN.unpack_from(data, start)
                start += _STEP_LEN.size
                revision = data[start : start + size].decode()
                start += size
        except (struct.error, UnicodeDecodeError) as exc:
            raise ValueError(f"record of {len(data)} bytes does not match its header") from exc
    dt = np.dtype(dtype.decode())
    count = arrays * layers * hidden
    if len(data) != start + count * dt.itemsize + slots * 8:
        raise ValueError(f"record of {len(data)} bytes does not match its header")
    state = np.frombuffer(data, dtype=dt, count=count, offset=start).reshape(arrays, layers, hidden)
    memory = None
    if slots:
        start += count * dt.itemsize
        keys = np.frombuffer(data, dtype="<i4", count=slots, offset=start).astype(np.int32)
        weights = np.frombuffer(data, dtype="<f4", count=slots, offset=start + 4 * slots)
        memory = WordMemory(keys, weights.astype(np.float32), tuple(words))
    return SessionRecord(
        session_id=session_id,
        model=model,
        state=tuple(state.astype(np.float32, copy=False)),
        tokens=tokens,
        created_at=created_at,
        last_used_at=last_used_at,
        version=version,
        last_token=last_token,
        owner=owner,
        memory=memory,
        adapt=adapt,
        last_step=last_step,
        revision=revision,
    )


class RedisSessionStore:
    """Sessions in Redis: binary records, TTL by key expiry, batched CAS writes."""

    # What reaching Redis failed with (`StoreUnavailable`); a cluster adds its own.
    unreachable: tuple[type[BaseException], ...] = _UNREACHABLE

    def __init__(
        self,
        client: redis.Redis,
        *,
        ttl_s: float = 1800.0,
        cap: int | None = None,
        owner_cap: int = 0,
        prefix: str = "nextword:session:",
        stage_prefix: str = "nextword:stage:",
        owner_prefix: str = "nextword:owner:",
    ) -> None:
        self._redis = client
        self.ttl_s = ttl_s
        self.cap = cap  # informational: Redis's maxmemory policy bounds memory
        self.owner_cap = owner_cap
        self.prefix = prefix
        self.stage_prefix = stage_prefix
        self.owner_prefix = owner_prefix
        self._ttl_ms = max(1, round(ttl_s * 1000))
        self._where = _describe(client)
        self._down = False  # the last call failed to reach Redis (logged once per outage)
        # Redis expires and evicts keys itself and counts them (INFO stats); a
        # replica cannot attribute them. Counted here: evictions by owners' caps.
        self.evictions = 0
        self.expirations = 0

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        ttl_s: float = 1800.0,
        cap: int | None = None,
        owner_cap: int = 0,
        timeout_s: float = 1.0,
        prefix: str = "nextword:session:",
    ) -> RedisSessionStore:
        """A store on `redis://host:port/db` (or rediss://, unix://); connects lazily."""
        client = redis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            socket_keepalive=True,
            # A short retry rides over a dropped idle connection (Redis restarted)
            # without failing the request; writes are idempotent (see the script).
            # Only connection errors: a Redis that does not answer within `timeout_s` is
            # treated as down at once (retrying would triple the wait of every step).
            retry=Retry(
                ExponentialBackoff(cap=0.2, base=0.02),
                retries=2,
                supported_errors=(RedisConnectionError,),
            ),
            health_check_interval=30,
        )
        return cls(client, ttl_s=ttl_s, cap=cap, owner_cap=owner_cap, prefix=prefix)

    @contextmanager
    def _reachable(self, writing: bool = False) -> Iterator[None]:
        """Redis failures as `StoreUnavailable`; the details (address, cause) go to the log only.

        `writing`: a timeout is `OutcomeUnknown` (the write may have been sent: a hung Redis
        applies it when it resumes), not "not applied"."""
        try:
            yield
        except (RedisTimeoutError, TimeoutError) as exc:
            self._log_failure("not answering", exc)
            if writing:
                raise OutcomeUnknown(
                    "the session store did not answer in time: this step may or may not "
                    "have been applied; resend it with the same id (or Idempotency-Key)"
                ) from exc
            raise StoreUnavailable("session store not answering (Redis); retry later") from exc
        except self.unreachable as exc:
            self._log_failure("unreachable", exc)
            raise StoreUnavailable("session store unreachable (Redis); retry later") from exc
        except ResponseError as exc:
            # A write refused at maxmemory; inside a pipeline redis-py words it
            # "Command # 1 (MSET ...) of pipeline caused error: ..." (an OutOfMemoryError).
            if isinstance(exc, OutOfMemoryError) or str(exc).startswith("OOM"):
                self._log_failure("full (maxmemory)", exc)
                raise StoreUnavailable(
                    "session store full (Redis at maxmemory); retry later"
                ) from exc
            raise
        if self._down:
            self._down = False
            log.info("session store: Redis at %s answers again", self._where)

    def _log_failure(self, what: str, exc: BaseException) -> None:
        level = logging.DEBUG if self._down else logging.WARNING
        self._down = True
        log.log(level, "session store: Redis at %s %s: %s", self._where, what, exc)

    def _key(self, session_id: str) -> str:
        return self.prefix + session_id

    def new_id(self) -> str:
        """A fresh unguessable, URL-safe id (128 random bits)."""
        return secrets.token_urlsafe(16)

    def _decode(self, session_id: str, data: bytes | str | None) -> SessionRecord | None:
        if data is None:
            return None
        if not isinstance(data, bytes):  # the client never decodes responses
            raise TypeError("the Redis client must not decode responses")
        try:
            return decode_record(session_id, data)
        except ValueError as exc:
            log.warning("unreadable session record %s: %s", self._key(session_id), exc)
            return None

    async def get_many(self, ids: list[str]) -> list[SessionRecord | None]:
        """The live records of `ids` (None where unknown or expired): one MGET."""
        if not ids:
            return []
        with self._reachable():
            values = await self._redis.mget([self._key(i) for i in ids])
        return [self._decode(i, v) for i, v in zip(ids, values, strict=True)]

    async def put_many(
        self, records: list[SessionRecord], expected: list[int | None]
    ) -> list[bool]:
        """Compare-and-set each record on its version: one transaction, one round trip.

        True where written; the stored version is then `(expected or 0) + 1`.
        """
        if len(records) != len(expected):
            raise ValueError("one expected version per record")
        if not records:
            return []
        # Staging keys are unique to this call and live only inside its transaction:
        # MULTI makes the MSET and the script one atomic unit (nothing runs if the
        # connection drops before EXEC), so no other client ever sees them.
        stage = f"{self.stage_prefix}{secrets.token_hex(8)}:"
        keys = [self._key(r.session_id) for r in records]
        staged = [f"{stage}{i}" for i in range(len(records))]
        expect: list[Any] = [b"" if v is None else _VERSION.pack(v) for v in expected]
        owners = [r.owner for r in records]
        values = {
            name: encode_record(record, (version or 0) + 1)
            for name, record, version in zip(staged, records, expected, strict=True)
        }
        with self._reachable(writing=True):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.mset(values)
                # EVAL, not EVALSHA: Redis caches the compiled script by its hash, and
                # EVAL never fails with NOSCRIPT after a restart (which would leave
                # the staged records behind); the script text is ~800 bytes.
                pipe.eval(
                    _CAS_SCRIPT,
                    len(keys) * 2,
                    *keys,
                    *staged,
                    self._ttl_ms,
                    self.owner_cap,
                    self.owner_prefix,
                    *expect,
                    *owners,
                )
                _, written = await pipe.execute()
        evicted = int(written.pop())
        if evicted:
            self.evictions += evicted
            metrics.SESSION_EVICTIONS.inc(evicted)
        return [bool(w) for w in written]

    async def get(self, session_id: str) -> SessionRecord:
        """One live record; raises `UnknownSession`."""
        with self._reachable():
            data = await self._redis.get(self._key(session_id))
        record = self._decode(session_id, data)
        if record is None:
            raise UnknownSession(f"no session {session_id!r} (never created, deleted or expired)")
        return record

    async def delete(self, session_id: str) -> None:
        """Forget a session (and its place in its owner's quota); raises `UnknownSession`."""
        key = self._key(session_id)
        with self._reachable():
            record = self._decode(session_id, await self._redis.get(key))
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(key)
                if record is not None and record.owner:
                    pipe.zrem(self.owner_prefix + record.owner, key)
                deleted, *_ = await pipe.execute()
        if not deleted:
            raise UnknownSession(f"no session {session_id!r} (never created, deleted or expired)")

    async def count(self) -> int:
        """Live sessions: the keys of the store's database (DBSIZE)."""
        with self._reachable():
            n = int(await self._redis.dbsize())
        metrics.ACTIVE_SESSIONS.set(n)
        return n

    async def ping(self) -> None:
        """Raise `StoreUnavailable` unless Redis answers."""
        with self._reachable():
            await self._redis.ping()

    async def close(self) -> None:
        """Close the connection pool (sessions stay in Redis)."""
        await self._redis.aclose()


def _describe(client: Any) -> str:
    """host:port/db (or the socket path) of a client, without credentials."""
    if not hasattr(client, "connection_pool"):  # a cluster client: its seed nodes
        return "cluster " + ",".join(n.name for n in client.nodes_manager.startup_nodes.values())
    kw = client.connection_pool.connection_kwargs
    if "path" in kw:
        return f"{kw['path']} db {kw.get('db', 0)}"
    return f"{kw.get('host', 'localhost')}:{kw.get('port', 6379)}/{kw.get('db', 0)}"
