"""The probes of hardening round 2 (issue 26), run by `python -m benchmarks.bench_limits`.

    headers   --header-connections connections each sending --header-mb MB of one header
              that never ends (one request each, from 127.0.0.1): the API processes' RSS
              before and at its peak, what each connection got, how many bytes it could
              send. Without a cap (NEXTWORD_MAX_HEADER_BYTES=0: as before round 2) and with
              the default cap.
    abandon   --abandon predicts of --abandon-tokens tokens each (raw HTTP/1.1, one
              connection each), every client gone --abandon-after seconds after sending:
              from /metrics, the tokens the engine ran of them and the steps answered or
              cancelled, and the queue depth --abandon-settle seconds after they left.
              Against this checkout, and against --before (a checkout of the service
              before round 2, e.g. /work/main) when given.
    fair      API keys alice and bob: alice floods --flood predicts of --flood-tokens
              tokens at once (one connection each), bob then sends --fair-steps one-word
              feeds to his session, one at a time: how many of bob's were refused
              (overloaded) and their latency; the Retry-After values alice got.
              NEXTWORD_MAX_QUEUE=--fair-queue. Against this checkout and --before.
    behind    a redis-server, NEXTWORD_SESSION_STORE_WRITE=behind: --behind-streams
              WebSocket streams type a word a message; Redis is frozen (SIGSTOP) for
              --behind-frozen s, then every process of the service is killed (SIGKILL) and
              Redis resumed: the words acknowledged against the tokens each session's record
              in Redis holds. Against this checkout and --before.
    retry     a redis-server, written through: --retry-streams streams type --retry-words
              words each, resending a message (same id) until it is answered; Redis frozen
              --retry-frozen s meanwhile: the sessions whose tokens exceed their words
              (a word applied twice). Against this checkout and --before.

Sessions, tokens and statuses are counted from this side and from the service's /metrics;
times are noisy on a shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.lib.wsload import run_loop

MB = 1024 * 1024
WORDS = ("i", "am", "going", "to", "the", "store", "and", "then", "we", "will", "see", "what")
KEYS = {"alice": "alice-key-0123456789abcdef", "bob": "bob-key-0123456789abcdef"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of these probes."""
    parser.add_argument(
        "--before",
        type=Path,
        help="a checkout of the service before round 2 (e.g. /work/main): the abandon and "
        "fair probes run against it too",
    )
    head = parser.add_argument_group("headers")
    head.add_argument("--header-connections", type=int, default=24)
    head.add_argument("--header-mb", type=float, default=8.0)
    gone = parser.add_argument_group("abandon")
    gone.add_argument("--abandon", type=int, default=100)
    gone.add_argument("--abandon-tokens", type=int, default=2000)
    gone.add_argument("--abandon-after", type=float, default=0.3)
    gone.add_argument("--abandon-settle", type=float, default=10.0)
    fair = parser.add_argument_group("fair")
    fair.add_argument("--flood", type=int, default=500)
    fair.add_argument("--flood-tokens", type=int, default=2000)
    fair.add_argument("--fair-steps", type=int, default=50)
    fair.add_argument("--fair-queue", type=int, default=256, help="NEXTWORD_MAX_QUEUE")
    behind = parser.add_argument_group("behind")
    behind.add_argument("--behind-streams", type=int, default=50)
    behind.add_argument("--behind-frozen", type=float, default=5.0)
    retry = parser.add_argument_group("retry")
    retry.add_argument("--retry-streams", type=int, default=50)
    retry.add_argument("--retry-words", type=int, default=60)
    retry.add_argument("--retry-frozen", type=float, default=10.0)


def keys_env() -> dict[str, str]:
    return {"NEXTWORD_API_KEYS": ",".join(f"{n}:{k}" for n, k in KEYS.items())}


def long_text(tokens: int) -> str:
    """A text of `tokens` words (each one token in the bundled vocabularies)."""
    return " ".join(WORDS[i % len(WORDS)] for i in range(tokens))


def post(path: str, body: dict[str, Any], key: str | None = None) -> bytes:
    """A whole HTTP/1.1 POST of JSON."""
    data = json.dumps(body).encode()
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    ).encode() + data


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One response: status, headers (lower-case names), body."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(lines[0].split()[1]), headers, body


def engine_counts(url: str) -> dict[str, float]:
    """Steps by outcome, tokens run and queue depth from /metrics, summed over models."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "nextword_steps_total":
                key = "steps_" + sample.labels["outcome"]
            elif sample.name == "nextword_tokens_total":
                key = "tokens"
            elif sample.name == "nextword_queue_depth":
                key = "queue"
            else:
                continue
            found[key] = found.get(key, 0.0) + sample.value
    return found


def delta(after: dict[str, float], before: dict[str, float], key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


# --- headers ---------------------------------------------------------------------------------


async def header_flood(svc: Any, args: argparse.Namespace, deadline_s: float) -> dict[str, Any]:
    """--header-connections connections, each one header of --header-mb MB, never ended."""
    rss_before = svc.rss()
    peak = dict(rss_before)
    size = int(args.header_mb * MB)
    chunk = b"a" * 65536
    outcomes: Counter[str] = Counter()
    sent_bytes: list[int] = []

    async def one() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ")
        sent = 0
        try:
            while sent < size:
                writer.write(chunk)
                await writer.drain()
                sent += len(chunk)
            first = await asyncio.wait_for(reader.read(65536), deadline_s + 30)
            outcome = first[9:12].decode() if first.startswith(b"HTTP/1.") else "closed"
        except OSError:  # a reset or broken pipe: refused while sending
            # The answer, if it came before the reset, is already in the reader's buffer.
            try:
                first = await asyncio.wait_for(reader.read(65536), 5)
                outcome = first[9:12].decode() if first.startswith(b"HTTP/1.") else "reset"
            except (OSError, asyncio.TimeoutError):
                outcome = "reset"
        except asyncio.TimeoutError:
            outcome = "held"
        outcomes[outcome] += 1
        sent_bytes.append(sent)
        writer.close()

    started = time.monotonic()
    flood = asyncio.gather(*(one() for _ in range(args.header_connections)))
    while not flood.done():
        for role, value in svc.rss().items():
            peak[role] = max(peak[role], value)
        await asyncio.sleep(0.05)
    await flood
    elapsed = time.monotonic() - started
    await asyncio.sleep(1.0)
    return {
        "connections": args.header_connections,
        "header_mb": args.header_mb,
        "seconds": elapsed,
        "outcomes": dict(outcomes),
        "sent_mb_max": max(sent_bytes) / MB,
        "sent_mb_total": sum(sent_bytes) / MB,
        "rss_before": rss_before,
        "rss_peak": peak,
        "rss_after": svc.rss(),
        "api_growth_mb": (peak["api"] - rss_before["api"]) / MB,
        "healthz_after": httpx.get(f"{svc.server.url}/healthz", timeout=30).status_code,
    }


def probe_headers(args: argparse.Namespace, models: Path) -> list[dict[str, Any]]:
    from benchmarks.bench_limits import DEFAULTS, log_problems, service

    rows = []
    for variant, cap in (("no cap (before)", 0), ("default cap", DEFAULTS.max_header_bytes)):
        print(f"headers, {variant} ...", file=sys.stderr, flush=True)
        env = {"NEXTWORD_MAX_HEADER_BYTES": str(cap)}
        with service(f"headers-{cap}", env, args, models) as svc:
            row: dict[str, Any] = run_loop(header_flood(svc, args, DEFAULTS.header_timeout_s))
        row.update(variant=variant, max_header_bytes=cap, server_log=log_problems(svc.server))
        rows.append(row)
    return rows


def table_headers(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "headers: connections each sending one header that never ends",
        "| variant | connections x MB | outcomes | most MB one could send | API RSS before "
        "-> peak (growth) | /healthz after |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['connections']} x {r['header_mb']:g} | "
            f"{', '.join(f'{k}: {v}' for k, v in sorted(r['outcomes'].items()))} | "
            f"{r['sent_mb_max']:,.2f} | {r['rss_before']['api'] / MB:,.0f} -> "
            f"{r['rss_peak']['api'] / MB:,.0f} MB (+{r['api_growth_mb']:,.0f}) | "
            f"{r['healthz_after']} |"
        )
    return lines


# --- abandoned requests ----------------------------------------------------------------------


async def abandon_run(svc: Any, args: argparse.Namespace) -> dict[str, Any]:
    url = svc.server.url
    before = await asyncio.to_thread(engine_counts, url)
    request = post("/v1/predict", {"text": long_text(args.abandon_tokens), "k": 5})
    writers = []
    for _ in range(args.abandon):
        _, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        writer.write(request)
        writers.append(writer)
    await asyncio.gather(*(w.drain() for w in writers))
    await asyncio.sleep(args.abandon_after)
    for writer in writers:
        writer.transport.abort()  # gone, as a client that gave up
    left_at = time.monotonic()
    queue_at: list[tuple[float, float]] = []
    while time.monotonic() - left_at < args.abandon_settle:
        await asyncio.sleep(0.5)
        counts = await asyncio.to_thread(engine_counts, url)
        queue_at.append((time.monotonic() - left_at, counts.get("queue", 0.0)))
    after = await asyncio.to_thread(engine_counts, url)
    emptied = next((t for t, depth in queue_at if depth == 0), None)
    offered = args.abandon * args.abandon_tokens
    return {
        "requests": args.abandon,
        "tokens_each": args.abandon_tokens,
        "left_after_s": args.abandon_after,
        "tokens_run": delta(after, before, "tokens"),
        "tokens_share": delta(after, before, "tokens") / offered,
        "steps_answered": delta(after, before, "steps_ok"),
        "steps_cancelled": delta(after, before, "steps_cancelled"),
        "queue_at_settle": after.get("queue", 0.0),
        "settle_s": args.abandon_settle,
        "queue_empty_after_s": emptied,
    }


def variants(args: argparse.Namespace) -> list[tuple[str, Path | None]]:
    """(name, checkout root) of each service a before/after probe runs against."""
    found: list[tuple[str, Path | None]] = []
    if args.before is not None:
        found.append((f"before ({args.before})", args.before))
    found.append(("now", None))
    return found


def probe_abandon(args: argparse.Namespace, models: Path) -> list[dict[str, Any]]:
    from benchmarks.bench_limits import log_problems, service

    rows = []
    for variant, root in variants(args):
        print(f"abandon, {variant} ...", file=sys.stderr, flush=True)
        with service("abandon", {}, args, models, root) as svc:
            row: dict[str, Any] = run_loop(abandon_run(svc, args))
        row.update(variant=variant, server_log=log_problems(svc.server))
        rows.append(row)
    return rows


def table_abandon(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "abandon: long predicts whose clients leave before the answer",
        "| variant | requests x tokens | left after | tokens run (share) | answered | "
        "cancelled | queue after settle | queue empty after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        emptied = r["queue_empty_after_s"]
        lines.append(
            f"| {r['variant']} | {r['requests']} x {r['tokens_each']:,} | "
            f"{r['left_after_s']:g} s | {r['tokens_run']:,.0f} ({r['tokens_share']:.1%}) | "
            f"{r['steps_answered']:,.0f} | {r['steps_cancelled']:,.0f} | "
            f"{r['queue_at_settle']:,.0f} at {r['settle_s']:g} s | "
            f"{'-' if emptied is None else f'{emptied:.1f} s'} |"
        )
    return lines


# --- fair queueing ---------------------------------------------------------------------------


async def fair_run(svc: Any, args: argparse.Namespace) -> dict[str, Any]:
    """alice keeps --flood long predicts in flight (each connection sends the next as soon
    as it is answered, Retry-After ignored) while bob feeds one word at a time."""
    port = svc.port
    alice_key, bob_key = KEYS["alice"], KEYS["bob"]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    status, _, body = await read_after(reader, writer, post("/v1/sessions", {}, bob_key))
    if status != 201:
        raise RuntimeError(f"bob's session: {status} {body[:200]!r}")
    feed = post(f"/v1/sessions/{json.loads(body)['session_id']}/feed", {"text": "the"}, bob_key)
    flood = post("/v1/predict", {"text": long_text(args.flood_tokens)}, alice_key)
    alice: Counter[int] = Counter()
    retry_after: Counter[str] = Counter()
    done = asyncio.Event()

    async def flooder() -> None:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        while not done.is_set():
            try:
                status, headers, _ = await read_after(r, w, flood)
            except (OSError, asyncio.IncompleteReadError):
                w.close()
                r, w = await asyncio.open_connection("127.0.0.1", port)
                continue
            alice[status] += 1
            if "retry-after" in headers:
                retry_after[headers["retry-after"]] += 1
        w.close()

    flooders = [asyncio.create_task(flooder()) for _ in range(args.flood)]
    await asyncio.sleep(2.0)  # the flood under way
    bob: Counter[int] = Counter()
    latencies: list[float] = []
    for _ in range(args.fair_steps):
        started = time.perf_counter()
        status, _, _ = await read_after(reader, writer, feed)
        latencies.append((time.perf_counter() - started) * 1e3)
        bob[status] += 1
        await asyncio.sleep(0.05)
    done.set()
    writer.close()
    for task in flooders:
        task.cancel()
    await asyncio.gather(*flooders, return_exceptions=True)
    latencies.sort()
    return {
        "flood": args.flood,
        "flood_tokens": args.flood_tokens,
        "max_queue": args.fair_queue,
        "bob_steps": args.fair_steps,
        "bob_statuses": {str(k): v for k, v in sorted(bob.items())},
        "bob_refused": bob[503],
        "bob_ms_p50": latencies[len(latencies) // 2],
        "bob_ms_max": latencies[-1],
        "alice_statuses": {str(k): v for k, v in sorted(alice.items())},
        "alice_retry_after": dict(sorted(retry_after.items(), key=lambda kv: int(kv[0]))),
    }


async def read_after(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[int, dict[str, str], bytes]:
    writer.write(request)
    return await read_response(reader)


def probe_fair(args: argparse.Namespace, models: Path) -> list[dict[str, Any]]:
    from benchmarks.bench_limits import log_problems, service

    env = {
        **keys_env(),
        "NEXTWORD_MAX_QUEUE": str(args.fair_queue),
        "NEXTWORD_MAX_CONNECTIONS_PER_CLIENT": str(args.flood + 64),
    }
    rows = []
    for variant, root in variants(args):
        print(f"fair, {variant} ...", file=sys.stderr, flush=True)
        with service("fair", env, args, models, root) as svc:
            row: dict[str, Any] = run_loop(fair_run(svc, args))
        row.update(variant=variant, server_log=log_problems(svc.server))
        rows.append(row)
    return rows


def table_fair(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "fair: alice keeps long predicts in flight, bob feeds one word at a time",
        "| variant | alice in flight x tokens | queue | bob's steps: statuses | bob p50 / max | "
        "alice's statuses | alice's Retry-After (s: count) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['flood']} x {r['flood_tokens']:,} | {r['max_queue']} | "
            f"{r['bob_statuses']} | {r['bob_ms_p50']:,.0f} / {r['bob_ms_max']:,.0f} ms | "
            f"{r['alice_statuses']} | {r['alice_retry_after']} |"
        )
    return lines


# --- write-behind under a frozen Redis, then a crash -----------------------------------------


async def behind_run(
    svc: Any, args: argparse.Namespace, url: str, redis_pid: int
) -> dict[str, Any]:
    """--behind-streams streams type a word per message; Redis is frozen (SIGSTOP) for
    --behind-frozen seconds, then the whole service is killed (SIGKILL) and Redis resumed:
    what each session's record in Redis holds against the words it had acknowledged."""
    import os
    import signal

    import psutil
    from websockets.asyncio.client import connect

    from service.store.redis import RedisSessionStore

    acked: dict[str, int] = {}
    acked_frozen = 0
    refused: Counter[str] = Counter()
    frozen = asyncio.Event()
    uri = f"ws://127.0.0.1:{svc.port}/v1/stream"

    async def streamer() -> None:
        nonlocal acked_frozen
        async with connect(uri) as ws:
            sid = json.loads(await ws.recv())["session_id"]
            acked[sid] = 0
            for i in range(10**9):
                await ws.send(json.dumps({"text": WORDS[i % len(WORDS)], "id": i}))
                answer = json.loads(await ws.recv())
                if answer["type"] == "predictions":
                    acked[sid] = answer["tokens"]
                    acked_frozen += frozen.is_set()
                else:
                    refused[answer["error"]["code"]] += 1
                    await asyncio.sleep(0.05)

    tasks = [asyncio.create_task(streamer()) for _ in range(args.behind_streams)]
    await asyncio.sleep(3.0)  # streaming, flushed every 50 ms
    os.kill(redis_pid, signal.SIGSTOP)
    frozen.set()
    await asyncio.sleep(args.behind_frozen)
    root = psutil.Process(svc.server.pid)
    for process in [root, *root.children(recursive=True)]:
        process.kill()  # a crash: nothing is flushed
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    os.kill(redis_pid, signal.SIGCONT)
    store = RedisSessionStore.from_url(url, timeout_s=10)
    stored = {}
    for sid in acked:
        try:
            stored[sid] = (await store.get(sid)).tokens
        except Exception:  # never flushed at all
            stored[sid] = 0
    await store.close()
    lost = sorted(max(0, acked[sid] - stored[sid]) for sid in acked)
    over = sum(stored[sid] > acked[sid] for sid in acked)
    return {
        "streams": args.behind_streams,
        "frozen_s": args.behind_frozen,
        "acked_words": sum(acked.values()),
        "acked_while_frozen": acked_frozen,
        "refused": dict(refused),
        "lost_words": sum(lost),
        "lost_per_session_max": lost[-1] if lost else 0,
        "lost_per_session_median": lost[len(lost) // 2] if lost else 0,
        "sessions_over_acked": over,
    }


def probe_behind(args: argparse.Namespace, models: Path) -> list[dict[str, Any]]:
    from benchmarks.bench_limits import log_problems, service
    from benchmarks.lib.server import redis_server

    rows = []
    # Write-behind before and now; then written through (the default), now: the other bound.
    runs = [(f"{name}, behind", root, "behind") for name, root in variants(args)]
    runs.append(("now, through", None, "through"))
    for variant, root, write in runs:
        print(f"behind, {variant} ...", file=sys.stderr, flush=True)
        with redis_server() as (url, pid):
            env = {"NEXTWORD_SESSION_STORE": url, "NEXTWORD_SESSION_STORE_WRITE": write}
            with service("behind", env, args, models, root) as svc:
                row: dict[str, Any] = run_loop(behind_run(svc, args, url, pid))
        row.update(variant=variant, write=write, server_log=log_problems(svc.server))
        rows.append(row)
    return rows


def table_behind(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "behind: streams typing, Redis frozen (SIGSTOP), then the service killed (SIGKILL)",
        "| variant | streams | Redis frozen | words acknowledged (of them while frozen) | "
        "refused | words lost (per session: median, max) | sessions holding a step never "
        "acknowledged |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['streams']} | {r['frozen_s']:g} s | {r['acked_words']:,} "
            f"({r['acked_while_frozen']:,}) | {r['refused']} | {r['lost_words']:,} "
            f"({r['lost_per_session_median']}, {r['lost_per_session_max']}) | "
            f"{r['sessions_over_acked']} |"
        )
    return lines


# --- retries after a frozen Redis ------------------------------------------------------------


async def retry_run(svc: Any, args: argparse.Namespace, redis_pid: int) -> dict[str, Any]:
    """--retry-streams streams type --retry-words words each, resending a message (same
    `id`) until it is answered; Redis frozen (SIGSTOP) --retry-frozen seconds meanwhile.
    Then each session's tokens against the words its stream had acknowledged."""
    import os
    import signal

    from websockets.asyncio.client import connect

    acked: dict[str, int] = {}  # words acknowledged (one token each), not `tokens`
    errors: Counter[str] = Counter()
    frozen = asyncio.Event()
    uri = f"ws://127.0.0.1:{svc.port}/v1/stream"

    async def streamer() -> None:
        async with connect(uri) as ws:
            sid = json.loads(await ws.recv())["session_id"]
            acked[sid] = 0
            for i in range(args.retry_words):
                if i == args.retry_words // 4:
                    await frozen.wait()  # every stream types across the freeze
                message = json.dumps({"text": WORDS[i % len(WORDS)], "id": i})
                while True:
                    await ws.send(message)
                    answer = json.loads(await ws.recv())
                    if answer["type"] == "predictions":
                        # Its `tokens` would count a word applied twice: count the words.
                        acked[sid] += 1
                        break
                    errors[answer["error"]["code"]] += 1
                    await asyncio.sleep(0.05)

    tasks = asyncio.gather(*(streamer() for _ in range(args.retry_streams)))
    await asyncio.sleep(2.0)
    os.kill(redis_pid, signal.SIGSTOP)
    frozen.set()
    await asyncio.sleep(args.retry_frozen)
    os.kill(redis_pid, signal.SIGCONT)
    await asyncio.wait_for(tasks, 600)
    extra = []
    async with httpx.AsyncClient(base_url=svc.server.url, timeout=30) as http:
        for sid, words in acked.items():
            stored = (await http.get(f"/v1/sessions/{sid}")).json()["tokens"]
            extra.append(stored - words)
    return {
        "streams": args.retry_streams,
        "words_each": args.retry_words,
        "frozen_s": args.retry_frozen,
        "errors": dict(errors),
        "sessions_with_words_applied_twice": sum(e > 0 for e in extra),
        "words_applied_twice": sum(e for e in extra if e > 0),
        "sessions_short": sum(e < 0 for e in extra),
    }


def probe_retry(args: argparse.Namespace, models: Path) -> list[dict[str, Any]]:
    from benchmarks.bench_limits import log_problems, service
    from benchmarks.lib.server import redis_server

    rows = []
    for variant, root in variants(args):
        print(f"retry, {variant} ...", file=sys.stderr, flush=True)
        with redis_server() as (url, pid):
            env = {"NEXTWORD_SESSION_STORE": url}  # written through
            with service("retry", env, args, models, root) as svc:
                row: dict[str, Any] = run_loop(retry_run(svc, args, pid))
        row.update(variant=variant, server_log=log_problems(svc.server))
        rows.append(row)
    return rows


def table_retry(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "retry: streams resend a message (same id) until answered, Redis frozen meanwhile",
        "| variant | streams x words | Redis frozen | errors answered (then resent) | "
        "sessions with a word applied twice | words applied twice |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['streams']} x {r['words_each']} | {r['frozen_s']:g} s | "
            f"{r['errors']} | {r['sessions_with_words_applied_twice']} | "
            f"{r['words_applied_twice']} |"
        )
    return lines
