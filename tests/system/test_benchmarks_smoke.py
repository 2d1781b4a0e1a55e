"""Benchmarks that run: the trigram baseline on hand-made corpora (ranking, backoff, words only,
OOV targets are misses), and the end-to-end WebSocket benchmark in --quick mode."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks.trigram_baseline import (
    NO_TOKEN,
    KneserNey,
    StupidBackoff,
    TrigramCounts,
    frequent_vocabulary,
    ngram_stepper,
)
from model_export.evaluate import evaluate_stream
from service.contract.tokenizer import EOS, SPECIALS, is_word, tokenize
from service.contract.vocab import Vocabulary
from tests.paths import ROOT as REPO_ROOT

TRAIN = "the cat sat on the mat. the cat sat down. the dog ran home. a dog sat. my dog ran."
RANKERS = {"kneser_ney": KneserNey, "stupid_backoff": StupidBackoff}


def fit(text: str, ranker: str, vocab: Vocabulary | None = None):
    stream = [EOS, *tokenize(text)]  # as load_splits builds a stream
    vocab = vocab or frequent_vocabulary(stream, 100, 1)
    counts = TrigramCounts(np.array(vocab.encode_tokens(stream)), len(vocab))
    return RANKERS[ranker](counts), vocab


def predict(model, vocab: Vocabulary, text: str, k: int = 5) -> list[str]:
    """Top-k words after a text, stepping from a fresh context like the engine does."""
    step, zero = ngram_stepper(model, vocab, k)
    state = zero(1)
    for token_id in [vocab.eos_id, *vocab.encode(text)]:
        _, top, state = step(np.array([[token_id]]), state)
    return [vocab.tokens[i] for i in top[0]]


@pytest.mark.parametrize("ranker", RANKERS)
def test_the_only_continuation_seen_ranks_first(ranker: str) -> None:
    model, vocab = fit(TRAIN, ranker)
    assert predict(model, vocab, "the cat")[0] == "sat"
    assert predict(model, vocab, "the")[0] == "cat"
    assert predict(model, vocab, "my dog")[0] == "ran"


@pytest.mark.parametrize("ranker", RANKERS)
def test_an_unseen_trigram_backs_off_to_the_bigram(ranker: str) -> None:
    model, vocab = fit(TRAIN, ranker)
    assert predict(model, vocab, "a cat")[0] == "sat"  # "a cat" never seen, "cat sat" twice


def test_an_unseen_context_backs_off_to_the_unigram() -> None:
    # An unknown word was never a context: stupid backoff ranks by frequency ("the", 4x),
    # Kneser-Ney by how many different words precede ("dog" follows the/a/my).
    sb, vocab = fit(TRAIN, "stupid_backoff")
    assert predict(sb, vocab, "zebra")[0] == "the"
    kn, vocab = fit(TRAIN, "kneser_ney")
    assert predict(kn, vocab, "zebra")[0] == "dog"


@pytest.mark.parametrize("ranker", RANKERS)
def test_predictions_are_distinct_words(ranker: str) -> None:
    model, vocab = fit(TRAIN, ranker)
    for text in ("", "sat down", "zebra", "the"):
        words = predict(model, vocab, text)
        assert len(set(words)) == 5
        assert all(is_word(w) and w not in SPECIALS for w in words), words


def test_kneser_ney_is_a_distribution_over_the_vocabulary() -> None:
    model, vocab = fit(TRAIN, "kneser_ney")
    ids = vocab.encode("the cat zebra dog")
    prev = np.array([NO_TOKEN, ids[0], ids[1], vocab.unk_id, vocab.eos_id])
    cur = np.array([ids[0], ids[1], vocab.unk_id, ids[3], ids[0]])
    probs = model.distribution(prev, cur)
    assert probs.shape == (5, len(vocab))
    assert (probs > 0).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)


def test_an_out_of_vocabulary_target_is_a_miss() -> None:
    # "zebra" is outside the vocabulary: after "the cat" <unk> is the likeliest token,
    # yet only words are suggested, and the zebra target counts as a miss.
    vocab = Vocabulary([*SPECIALS, "the", "cat", "sat"])
    model, _ = fit("the cat zebra. the cat zebra. the cat sat.", "kneser_ney", vocab)
    prev, cur = np.array(vocab.encode("the")), np.array(vocab.encode("cat"))
    assert model.distribution(prev, cur).argmax() == vocab.unk_id
    assert predict(model, vocab, "the cat")[0] == "sat"
    stream = [EOS, *tokenize("the cat zebra. the cat sat.")]
    result = evaluate_stream(*ngram_stepper(model, vocab), vocab, stream, rows=1)
    assert result["word_targets"] == 6
    assert result["oov_rate"] == pytest.approx(1 / 6)
    assert result["top1"] == pytest.approx(5 / 6)  # every known word right, zebra missed


def test_the_built_vocabulary_follows_the_training_rule() -> None:
    pytest.importorskip("torch")
    from model_export.train import build_vocab

    tokens = [EOS, *tokenize(TRAIN * 3 + " rare words once")]
    for size, min_count in ((100, 1), (8, 1), (100, 2)):
        assert (
            frequent_vocabulary(tokens, size, min_count).tokens
            == build_vocab(tokens, size, min_count).tokens
        )


@pytest.mark.slow
def test_the_e2e_benchmark_measures_every_row(tiny_artifacts: Path, tmp_path: Path) -> None:
    # A real run, made small: one API process, 8 sessions from one client process, the tiny
    # models standing in for both the ceiling's and the bundled ones. Throughput and errors
    # only: the figures themselves depend on the machine.
    out = tmp_path / "e2e.json"
    command = [
        *(sys.executable, "-m", "benchmarks.bench_e2e", "--quick"),
        *("--configs", "ceiling,paced", "--workers", "1", "--base-workers", "1"),
        *("--sessions", "8", "--clients", "1"),
        *("--models", str(tiny_artifacts), "--ceiling-models", str(tiny_artifacts)),
        *("--json", str(out)),
    ]
    root = REPO_ROOT
    run = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(out.read_text())["summary"]
    assert {r["configuration"].split(",")[0] for r in summary.values()} == {
        "bare WS app",
        "ceiling: service",
        "service",
    }
    assert any("paced" in r["configuration"] for r in summary.values())
    for row in summary.values():
        assert row["msgs_per_s"] > 0, row
        assert row["errors"] == 0, row["error_samples"]
        # CPU per message by role: the bare app's serving process is an API process too
        assert row["cpu_ms_per_msg"]["api"] > 0, row
    assert "| bare WS app | 1 |" in out.with_suffix(".txt").read_text()


@pytest.mark.slow
def test_the_rest_benchmark_measures_the_service_against_the_bare_endpoint(
    tmp_path: Path,
) -> None:
    out = tmp_path / "rest.json"
    command = [
        *(sys.executable, "-m", "benchmarks.bench_rest", "--quick", "--parsers", ""),
        *("--connections", "4", "--clients", "1", "--seconds", "1", "--warmup", "0.5"),
        *("--json", str(out)),
    ]
    run = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(out.read_text())["summary"]
    assert [r["configuration"] for r in summary.values()] == [
        "bare FastAPI JSON endpoint",
        "service predict, tiny model",
        "service feed, tiny model",
    ]
    for row in summary.values():
        assert row["requests_per_s"] > 0 and row["errors"] == 0, row
        assert row["cpu_ms_per_request"]["api"] > 0, row
    assert all("ratio_to_bare" in r for r in list(summary.values())[1:])


@pytest.mark.slow
def test_the_limits_benchmark_probes_count_what_the_limits_do(
    tiny_artifacts: Path, tmp_path: Path
) -> None:
    # Every probe of bench_limits at tiny counts, against two servers started side by side
    # (each probe's own server, as the benchmark starts them, would take a start each): an
    # open one with a 1 s header deadline (slow-loris, idle WebSockets, then SIGTERM), and
    # one with keys, a rate limit and a quota (the quota's creations, then the burst).
    from benchmarks import bench_limits as bench
    from benchmarks.lib.machine import machine
    from benchmarks.lib.results import write_report
    from benchmarks.lib.wsload import run_loop

    args = bench.parse_args(
        [
            *("--connections", "8", "--checkpoints", "0.3,1.6", "--header-timeout", "1"),
            *("--websockets", "6", "--ws-rounds", "1", "--settle", "0.1"),
            *("--clients", "3", "--sigterm-after", "0.3"),
            *("--burst", "150", "--concurrency", "4", "--rate-limit", "50"),
            *("--bob", "3", "--alice", "12", "--quota", "5", "--session-cap", "20"),
            *("--log-dir", str(tmp_path), "--json", str(tmp_path / "limits.json")),
        ]
    )
    assert bench.parse_args([]).connections == 2000  # the counts by default
    open_server = bench.service_process(
        "open", {"NEXTWORD_HEADER_TIMEOUT_S": "1"}, args, tiny_artifacts
    )
    keyed_env = {
        **bench.keys_env(),
        "NEXTWORD_RATE_LIMIT": "50",
        "NEXTWORD_SESSION_CAP": "20",
        "NEXTWORD_MAX_SESSIONS_PER_KEY": "5",
    }
    keyed_server = bench.service_process("keyed", keyed_env, args, tiny_artifacts)
    servers = (open_server, keyed_server)
    try:
        for server in servers:
            server.start()
        for server in servers:
            server.wait_ready()
        open_svc, keyed_svc = (bench.attach(server, 1) for server in servers)

        async def on_open() -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
            flood = await bench.slowloris_flood(open_svc, args, 1.0)
            idle = await bench.idle_rounds(open_svc, args, 1)
            return flood, idle, await bench.stream_then_sigterm(open_svc, args)

        async def on_keyed() -> tuple[dict[str, Any], dict[str, Any]]:
            quota = await bench.quota_run(keyed_svc, args)
            return quota, await bench.burst(keyed_svc, args)

        async def both() -> Any:
            return await asyncio.gather(on_open(), on_keyed())

        (flood, idle, sigterm), (quota, burst) = run_loop(both())
    finally:
        for server in servers:
            server.stop()

    assert flood["outcomes"] == {"408": 8}, flood  # the deadline closes every one
    assert [c["open"] for c in flood["checkpoints"]] == [8, 0]
    assert flood["healthz_during"]["status"] == 200 and flood["refused_at_once"] == 0
    assert idle[0]["server_held"] == 6 and idle[0]["server_held_after_close"] == 0
    assert idle[0]["api_bytes_per_ws"] is not None and "engine" in idle[0]["rss_open"]
    assert sigterm["exit_status"] == 0, sigterm
    assert sigterm["clients_1001"] == sigterm["clients_in_order"] == 3, sigterm
    assert sigterm["answered"] > 0 and sigterm["error_answers"] == 0
    assert 0 <= sigterm["unanswered"] <= 3 * args.window
    assert (quota["bob_answer"], quota["alice_answer"], quota["alice_newest_answer"]) == (3, 5, 5)
    assert burst["ok"] + burst["limited"] == 150 and burst["limited"] > 0, burst
    assert burst["ok"] <= burst["allowed_at_most"]
    assert burst["limited_without_retry_after"] == 0 and burst["other_key_status"] == 200
    for server in servers:
        assert bench.log_problems(server)["tracebacks"] == 0, server.log_tail()

    log = {"tracebacks": 0, "error_lines": 0}
    report = {
        "command": "python -m benchmarks.bench_limits (test)",
        "machine": machine(bench.MODULES),
        "workers": 1,
        "models_note": f"models: {tiny_artifacts}",
        "probes": {
            "slowloris": [
                {
                    **flood,
                    "variant": "test",
                    "header_timeout_s": 1.0,
                    "max_connections": 4096,
                    "max_connections_per_client": 512,
                    "server_log": log,
                }
            ],
            "websockets": {
                "rounds": idle,
                "max_connections": 4096,
                "max_connections_per_client": 512,
                "server_log": log,
            },
            "sigterm": {**sigterm, "server_log": log},
            "burst": {**burst, "server_log": log},
            "quota": [
                {**quota, "max_sessions_per_key": 5, "session_cap": 20, "bob": 3, "alice": 12}
                | {"server_log": log}
            ],
        },
    }
    text = bench.table(report)
    write_report(args.json, report, text)
    for heading in ("1. Slow-loris", "2. Idle WebSockets", "3. SIGTERM", "4. Burst", "5. Session"):
        assert heading in text
    assert json.loads(args.json.read_text())["probes"]["quota"][0]["bob_answer"] == 3


def test_the_adaptation_benchmark_measures_every_mode(tiny_artifacts: Path, tmp_path: Path) -> None:
    from benchmarks import bench_adapt

    out = tmp_path / "adapt.json"
    bench_adapt.main(
        [
            *("--models", str(tiny_artifacts), "--sessions", "4", "--rounds", "2"),
            *("--warm-tokens", "30", "--json", str(out)),
        ]
    )
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["mode"]) for r in rows] == [
        (model, mode) for model in ("gru", "lstm") for mode in bench_adapt.MODES
    ]
    no_memory = [r for r in rows if r["mode"] == "no memory"]
    remembered = [r for r in rows if r["mode"] != "no memory"]
    assert all(r["memory_bytes"] == 0 and r["remembered"] == 0 for r in no_memory)
    assert all(r["memory_bytes"] > 0 and r["remembered"] > 0 for r in remembered)


def test_the_adaptation_benchmark_times_a_baseline_beside_this_tree(
    tiny_artifacts: Path, tmp_path: Path
) -> None:
    from benchmarks import bench_adapt
    from service.engine import adapt

    baseline = str(Path(adapt.__file__))  # a path stands for a git ref too
    common = ["--models", str(tiny_artifacts), "--sessions", "4", "--rounds", "2"]
    out = tmp_path / "adapt.json"
    bench_adapt.main([*common, "--warm-tokens", "30", "--baseline", baseline, "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["mode"] for r in rows if r["model"] == "gru"] == list(
        bench_adapt.modes_of(bench_adapt.load_baseline(baseline))
    )
    assert adapt.top_k is not bench_adapt.load_baseline(baseline).top_k  # restored after
    out = tmp_path / "functions.json"
    bench_adapt.main(
        [*common, "--functions", "--history", "30", "--baseline", baseline, "--json", str(out)]
    )
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["version"]) for r in rows] == [
        (model, version) for model in ("gru", "lstm") for version in ("baseline", "this tree")
    ]
    assert all(r["same_as_baseline"] and r["top_k_us"] > 0 for r in rows)


@pytest.mark.parametrize("probe", ["headers", "abandon", "fair", "behind", "retry"])
def test_bench_limits_round2_reports_render(probe: str) -> None:
    # The probes of hardening round 2 start servers (and Redis) of their own for minutes:
    # their committed reports are rendered again by today's table code.
    from benchmarks import bench_limits as bench
    from benchmarks.lib.results import RESULTS

    report = json.loads((RESULTS / f"limits-round2-{probe}.json").read_text())
    assert probe in bench.PROBES and list(report["probes"]) == [probe]
    text = bench.table(report)
    rows = [line for line in text.splitlines() if line.startswith("| ") and "variant" not in line]
    assert f"{probe}:" in text and len(rows) >= 2  # before and now (behind: and through)


def test_the_stream_path_benchmark_times_every_piece_and_the_whole_message() -> None:
    command = [
        *(sys.executable, "-m", "benchmarks.bench_stream_path", "--messages", "300"),
        *("--repeat", "1", "--rounds", "1", "--baseline", str(REPO_ROOT)),
    ]
    run = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line for line in run.stdout.splitlines() if line.startswith("| ")]
    assert len(rows) == 2 + 9 + 2, run.stdout  # two header rows, nine pieces, two wholes
    assert "new / old:" in run.stdout
