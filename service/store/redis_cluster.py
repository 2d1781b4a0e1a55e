"""Sessions in a Redis Cluster: the Redis store's records and guarantees, spread over nodes.

Chosen by `NEXTWORD_SESSION_STORE=redis+cluster://host:port[,host:port...]` (`rediss+cluster`
for TLS; user and password as in a redis:// URL). The nodes named are seeds: redis-py's
cluster client discovers the others and follows the slot map (MOVED, ASK, TRYAGAIN).

Keys. Redis Cluster runs a script or a MULTI only on keys of one hash slot, so each session's
keys share its slot through a hash tag, the session id itself: the record
`nextword:session:{<id>}` and the records staged for it, `nextword:stage:{<id>}:<nonce>`.
Sessions spread evenly over the 16,384 slots, with no hot slot for all of them.

Writes. `put_many` groups a batch by hash slot. Each group is written as on one Redis: the
new records under staging keys, then the compare-and-set script (`redis._CAS_SCRIPT`'s
checks: version compared, staged record renamed onto the session key, a replayed write
recognised as written). All groups go in one cluster pipeline, which sends each node its
commands on one connection, every node at once: one round trip, in parallel across nodes.
Without MULTI (one slot per transaction) a staged record could outlive a dropped
connection, so it is written with a 60 s expiry; and a staged record that is missing when the
script runs (written to a primary that failed before replicating it) fails that session's
compare-and-set: the scheduler reads it again and retries the step, which is applied once.

Owners' quotas. An owner's sorted set `nextword:owner:{<owner>}` lives in the owner's slot,
not in its sessions' (which spread), so the quota is kept by a second script, run on the
owner's slot after the write, for the sessions written: it records them, and past the cap
removes and returns the owner's least recently written other sessions, which are then
deleted. That costs a second round trip per batch with `NEXTWORD_MAX_SESSIONS_PER_KEY` set
(none without), and it is not atomic with the write as on one Redis: a session being fed at
the very moment it becomes its owner's least recently written may be deleted after that step
(its next request gets 404, as for any evicted session); an engine that dies between the two
round trips leaves a written session out of its owner's set until its next step.

Replication. A cluster's replicas copy their primary asynchronously: a write is acknowledged
once the primary has applied it. A primary that dies (SIGKILL, lost machine) before its
replica received the last writes takes them along: the promoted replica serves the sessions
as they were a few milliseconds earlier; the next step of such a session fails its
compare-and-set once and is applied to the older state (the words typed in that window are
gone from the context, never applied twice). `?wait_replicas=N` in the URL makes each write
wait (WAIT, at most `wait_timeout_ms`, default 100) until N replicas have it, which closes
that window except for a failure during the wait; its cost is measured in
`benchmarks/bench_store.py --cluster`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
from typing import Any

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.crc import key_slot
from redis.exceptions import ClusterError, MasterDownError, RedisClusterException, TryAgainError

from service import metrics
from service.config import parse_cluster_url
from service.errors import PartlyWritten, StoreUnavailable, UnknownSession
from service.store.base import SessionRecord
from service.store.redis import _UNREACHABLE, _VERSION, RedisSessionStore, encode_record

log = logging.getLogger(__name__)

STAGE_TTL_MS = 60_000  # a staged record outlives its write only if a connection dropped

# One slot's part of a batch, run right after SET of its staged records. KEYS[1..n]:
# session keys; KEYS[n+1..2n]: their staged records. ARGV[1]: TTL in ms; ARGV[1+i]: the
# expected version of key i (bytes 4..11; "" = must not exist). One flag per key: 1
# written, 0 conflict, -1 its staged record is missing (lost in a failover): not written.
_CAS_SLOT_SCRIPT = """
local n = #KEYS / 2
local ttl = ARGV[1]
local written = {}
for i = 1, n do
  local key, staged, expect = KEYS[i], KEYS[n + i], ARGV[1 + i]
  -- EXISTS, not GET: a record read into Lua is copied (16 KB for an LSTM session).
  if redis.call('EXISTS', staged) == 0 then
    written[i] = -1
  else
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
    else
      redis.call('DEL', staged)
      written[i] = 0
    end
  end
end
return written
"""

# One owner's quota, after its sessions were written. KEYS[1]: the owner's set. ARGV[1]:
# TTL in ms; ARGV[2]: the cap; ARGV[3..]: the session keys just written. Returns the
# members removed past the cap (never one of ARGV[3..]), for the caller to delete; members
# whose key expired are the oldest and go first (deleting them evicts nothing).
_OWNER_SCRIPT = """
local set, ttl, cap = KEYS[1], ARGV[1], tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = clock[1] * 1000 + math.floor(clock[2] / 1000)
local mine, n = {}, #ARGV - 2
for i = 3, #ARGV do
  redis.call('ZADD', set, now, ARGV[i])
  mine[ARGV[i]] = true
end
redis.call('PEXPIRE', set, ttl)
local removed = {}
local excess = redis.call('ZCARD', set) - cap
if excess > 0 then
  for _, member in ipairs(redis.call('ZRANGE', set, 0, excess + n - 1)) do
    if excess <= 0 then break end
    if not mine[member] then
      redis.call('ZREM', set, member)
      removed[#removed + 1] = member
      excess = excess - 1
    end
  end
end
return removed
"""


def _tag(session_id: str) -> tuple[str, str]:
    """The hash tag that keeps a session's keys in one slot, and what follows it in the key.

    The id itself where it can be one (server-made ids always can); an id Redis would not
    read as a tag (empty, or holding braces) is tagged by its digest instead."""
    if session_id and "{" not in session_id and "}" not in session_id:
        return session_id, ""
    return hashlib.sha1(session_id.encode("utf-8", "surrogatepass")).hexdigest(), session_id


def _well_formed(replies: list[Any], scripts: list[int], sizes: list[int]) -> bool:
    """Whether a batch's replies are what its commands answer: OK for each staged record,
    then one flag (-1, 0, 1) per session for each slot's script. A reply read out of turn
    (a connection left with an unread answer, seen once during a failover under load) must
    never be taken for a compare-and-set's result."""
    start = 0
    for at, size in zip(scripts, sizes, strict=True):
        if any(r is not True for r in replies[start:at]):
            return False
        flags = replies[at]
        if not isinstance(flags, list) or len(flags) != size:
            return False
        if any(f not in (-1, 0, 1) for f in flags):
            return False
        start = at + 1
    return True


class RedisClusterSessionStore(RedisSessionStore):
    """Sessions in a Redis Cluster: one slot per session, a batch written per slot, in parallel."""

    # ClusterError covers ClusterDownError and SlotNotCoveredError (a primary lost and no
    # replica promoted yet); RedisClusterException: no node known for a slot.
    unreachable = (
        *_UNREACHABLE,
        ClusterError,
        MasterDownError,
        TryAgainError,
        RedisClusterException,
    )

    def __init__(
        self,
        client: RedisCluster,
        *,
        ttl_s: float = 1800.0,
        cap: int | None = None,
        owner_cap: int = 0,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 100,
    ) -> None:
        super().__init__(client, ttl_s=ttl_s, cap=cap, owner_cap=owner_cap)  # type: ignore[arg-type]
        self._cluster = client
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self.unreplicated = 0  # writes WAIT returned from before enough replicas had them
        self._initialized = False
        self._initializing = asyncio.Lock()

    async def _connect(self) -> None:
        """Read the slot map once before any concurrent use: redis-py's cluster client, used
        concurrently before its first `initialize()`, races itself (commands fail with
        ConnectionError, even AttributeError, on connections being set up)."""
        if self._initialized:
            return
        async with self._initializing:
            if not self._initialized:
                await self._cluster.initialize()
                self._initialized = True

    @classmethod
    def from_url(  # type: ignore[override]
        cls,
        url: str,
        *,
        ttl_s: float = 1800.0,
        cap: int | None = None,
        owner_cap: int = 0,
        timeout_s: float = 2.0,
    ) -> RedisClusterSessionStore:
        """A store on `redis+cluster://host:port[,host:port...]`; connects lazily."""
        options = parse_cluster_url(url)
        if options["wait_timeout_ms"] >= timeout_s * 500:
            # A WAIT that outlasts the socket timeout fails the whole batch instead of
            # answering it (a primary without a replica, after a failover, waits it in full).
            raise ValueError(
                f"wait_timeout_ms must be under half the store's timeout ({timeout_s} s)"
            )
        client = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in options["seeds"]],
            username=options["username"],
            password=options["password"],
            ssl=options["ssl"],
            # While one shard fails over, the others' sessions go on.
            require_full_coverage=False,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            socket_keepalive=True,
            # Retried after a connection error or timeout, with the slot map read again:
            # about 2 s in all, which rides over a failover with the default
            # cluster-node-timeout of a few seconds only partly; the rest are 503s with
            # Retry-After. Writes are idempotent (see the script).
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=4),
        )
        return cls(
            client,
            ttl_s=ttl_s,
            cap=cap,
            owner_cap=owner_cap,
            wait_replicas=options["wait_replicas"],
            wait_timeout_ms=options["wait_timeout_ms"],
        )

    def _key(self, session_id: str) -> str:
        tag, rest = _tag(session_id)
        return f"{self.prefix}{{{tag}}}{rest}"

    def _owner_key(self, owner: str) -> str:
        tag, rest = _tag(owner)
        return f"{self.owner_prefix}{{{tag}}}{rest}"

    async def get_many(self, ids: list[str]) -> list[SessionRecord | None]:
        """The live records of `ids`: one MGET per slot, in one pipeline across nodes."""
        if not ids:
            return []
        with self._reachable():
            await self._connect()
            values = await self._cluster.mget_nonatomic([self._key(i) for i in ids])
        return [self._decode(i, v) for i, v in zip(ids, values, strict=True)]

    async def put_many(
        self, records: list[SessionRecord], expected: list[int | None]
    ) -> list[bool]:
        """Compare-and-set each record on its version: one script per hash slot, every node
        at once in one pipeline; then the owners' quotas (with a cap).

        True where written; the stored version is then `(expected or 0) + 1`.
        """
        if len(records) != len(expected):
            raise ValueError("one expected version per record")
        if not records:
            return []
        nonce = secrets.token_hex(8)
        slots: dict[int, list[int]] = {}
        keys = [self._key(r.session_id) for r in records]
        for i, key in enumerate(keys):
            slots.setdefault(key_slot(key.encode()), []).append(i)
        written = [False] * len(records)
        values = [encode_record(r, (v or 0) + 1) for r, v in zip(records, expected, strict=True)]
        try:
            await self._write(records, expected, keys, values, slots, nonce, written)
        except StoreUnavailable as exc:
            # Some slots' parts may be written: say which, so that those steps are answered
            # (a 503 for a step that was written would have its client send it again).
            known = await self._read_back(keys, values)
            if any(known):
                raise PartlyWritten(str(exc), known) from exc
            raise
        if self.owner_cap > 0:
            try:
                await self._keep_quotas(records, keys, written)
            except self.unreachable as exc:
                # The steps are written: failing them now would have clients send them
                # again. The owners' sets catch up at their sessions' next writes.
                self._log_failure("unreachable for the owners' quotas", exc)
        return written

    async def _write(
        self,
        records: list[SessionRecord],
        expected: list[int | None],
        keys: list[str],
        values: list[bytes],
        slots: dict[int, list[int]],
        nonce: str,
        written: list[bool],
    ) -> None:
        """The pipeline of `put_many`: each slot's staged records and script; `written` is
        filled in."""
        with self._reachable(writing=True):
            await self._connect()
            async with self._cluster.pipeline() as pipe:
                scripts = []
                for members in slots.values():
                    staged = []
                    for i in members:
                        tag, rest = _tag(records[i].session_id)
                        name = f"{self.stage_prefix}{{{tag}}}{rest}:{nonce}:{i}"
                        pipe.set(name, values[i], px=STAGE_TTL_MS)
                        staged.append(name)
                    expect = [
                        b"" if expected[i] is None else _VERSION.pack(expected[i]) for i in members
                    ]
                    scripts.append(len(pipe))
                    pipe.eval(
                        _CAS_SLOT_SCRIPT,
                        2 * len(members),
                        *(keys[i] for i in members),
                        *staged,
                        self._ttl_ms,
                        *expect,
                    )
                if self.wait_replicas:
                    self._queue_waits(pipe, slots)
                replies = await pipe.execute()
            if not _well_formed(replies, scripts, [len(m) for m in slots.values()]):
                await self._reset("a reply of the wrong shape")
                raise StoreUnavailable("session store answered out of turn (Redis); retry later")
            for members, at in zip(slots.values(), scripts, strict=True):
                for i, flag in zip(members, replies[at], strict=True):
                    written[i] = int(flag) == 1
            if self.wait_replicas:
                acked = [int(r) for r in replies[scripts[-1] + 1 :]]
                self.unreplicated += sum(1 for n in acked if n < self.wait_replicas)

    async def _read_back(self, keys: list[str], values: list[bytes]) -> list[bool | None]:
        """After a failed write: True where the key holds exactly the record written (ours:
        the record carries its new version), None where it does not or cannot be read. One
        read per node, each on its own, so that a node that is down costs only its keys."""
        try:
            # The slot map afresh, once, before the reads run side by side (a failed
            # pipeline leaves the client to re-initialise, which concurrent calls race).
            async with self._initializing:
                await self._cluster.initialize()
        except self.unreachable as exc:
            log.debug("session store: no fresh slot map after a failed write: %s", exc)
        nodes: dict[str, Any] = {}  # name -> the node serving a slot now
        by_node: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            try:
                node = self._cluster.nodes_manager.get_node_from_slot(key_slot(key.encode()))
            except (*self.unreachable, KeyError):
                continue  # a slot no node serves now: not known
            nodes[node.name] = node
            by_node.setdefault(node.name, []).append(i)

        async def read(node: Any, members: list[int]) -> list[Any]:
            # Straight to the node, not through the cluster client's pipeline: a pipeline
            # that fails (the lost node's) closes the client's connections to every node,
            # failing the other nodes' reads running beside it.
            return await asyncio.gather(
                *(node.execute_command("GET", keys[i]) for i in members), return_exceptions=True
            )

        known: list[bool | None] = [None] * len(keys)
        groups = list(by_node.items())
        answers = await asyncio.gather(
            *(read(nodes[name], m) for name, m in groups), return_exceptions=True
        )
        for (_, members), answer in zip(groups, answers, strict=True):
            if isinstance(answer, BaseException):
                continue
            for i, value in zip(members, answer, strict=True):
                if value == values[i]:
                    known[i] = True
        return known

    async def _reset(self, why: str) -> None:
        """Drop every connection and the slot map: read afresh at the next call."""
        log.warning("session store: Redis Cluster %s; reconnecting", why)
        self._initialized = False
        await self._cluster.aclose()

    def _queue_waits(self, pipe: Any, slots: dict[int, list[int]]) -> None:
        """WAIT on every node the batch writes to, on the connection that wrote."""
        nodes = {}
        for slot in slots:
            node = self._cluster.nodes_manager.get_node_from_slot(slot)
            nodes[node.name] = node
        for node in nodes.values():
            pipe.execute_command(
                "WAIT", self.wait_replicas, self.wait_timeout_ms, target_nodes=node
            )

    async def _keep_quotas(
        self, records: list[SessionRecord], keys: list[str], written: list[bool]
    ) -> None:
        """Each owner's set records its sessions just written; past the cap, its least
        recently written others are deleted."""
        owners: dict[str, list[str]] = {}
        for record, key, ok in zip(records, keys, written, strict=True):
            if ok and record.owner:
                owners.setdefault(record.owner, []).append(key)
        if not owners:
            return
        async with self._cluster.pipeline() as pipe:
            for owner, members in owners.items():
                pipe.eval(
                    _OWNER_SCRIPT,
                    1,
                    self._owner_key(owner),
                    self._ttl_ms,
                    self.owner_cap,
                    *members,
                )
            removed = [m for reply in await pipe.execute() for m in reply]
        if removed:
            async with self._cluster.pipeline() as pipe:
                for member in removed:
                    pipe.delete(member)
                evicted = sum(int(n) for n in await pipe.execute())
            if evicted:
                self.evictions += evicted
                metrics.SESSION_EVICTIONS.inc(evicted)

    async def delete(self, session_id: str) -> None:
        """Forget a session (and its place in its owner's quota); raises `UnknownSession`."""
        key = self._key(session_id)
        with self._reachable():
            await self._connect()
            record = self._decode(session_id, await self._cluster.get(key))
            deleted = await self._cluster.delete(key)
            if record is not None and record.owner:
                await self._cluster.zrem(self._owner_key(record.owner), key)
        if not deleted:
            raise UnknownSession(f"no session {session_id!r} (never created, deleted or expired)")

    async def count(self) -> int:
        """Live sessions: the keys of every primary (DBSIZE, summed)."""
        with self._reachable():
            await self._connect()
            sizes = await self._cluster.dbsize(target_nodes=RedisCluster.PRIMARIES)
        n = sum(sizes.values()) if isinstance(sizes, dict) else int(sizes)
        metrics.ACTIVE_SESSIONS.set(n)
        return n

    async def ping(self) -> None:
        """Raise `StoreUnavailable` unless every primary answers."""
        with self._reachable():
            await self._connect()
            await self._cluster.ping(target_nodes=RedisCluster.PRIMARIES)

    async def close(self) -> None:
        """Close every node's connections (sessions stay in the cluster)."""
        await self._cluster.aclose()

    async def get(self, session_id: str) -> SessionRecord:
        """One live record; raises `UnknownSession`."""
        with self._reachable():
            await self._connect()
        return await super().get(session_id)

    async def flush(self) -> None:
        """Empty every primary (tests and benchmarks only)."""
        await self._connect()
        await self._cluster.flushdb(target_nodes=RedisCluster.PRIMARIES)
