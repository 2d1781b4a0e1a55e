"""The resident state pool (service/engine/pool.py): on CPU always, on CUDA where usable.

A resident run (gather, model and scatter in one graph) answers what the copied run
answers from the same states; rows are write-once, held by explicit counts and free
again exactly when their count reaches 0; idle sessions spill to host memory and come
back on their next step, with every answer unchanged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.api import create_app
from service.contract.artifact import ModelArtifact
from service.engine.pool import PoolExhausted, StatePool, pool_rows
from service.engine.residency import Residency
from service.engine.runtime import OrtModel
from service.store import SessionRecord
from service.store.memory import MemorySessionStore
from tests.api_support import TEXTS, api_settings, assert_same_predictions, splits
from tests.gpu_support import provider_params, providers_for

EXACT = 1e-6  # the same kernels on the same device; only the batch's layout differs
ATOL = 1e-4


@pytest.fixture(scope="module", params=["lstm", "gru"])
def cell(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module", params=provider_params())
def provider(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def model(tiny_artifacts: Path, cell: str, provider: str) -> OrtModel:
    model = OrtModel(ModelArtifact.load(tiny_artifacts / cell), providers_for(provider))
    assert model.on_cuda == (provider == "cuda"), model.providers
    return model


@pytest.fixture(scope="module")
def pool(model: OrtModel) -> StatePool:
    return StatePool(model, 64)


def random_states(model: OrtModel, batch: int, seed: int = 0) -> list[tuple[np.ndarray, ...]]:
    rng = np.random.default_rng(seed)
    shape = (model.layers, model.hidden_size)
    return [
        tuple(rng.standard_normal(shape).astype(np.float32) * 0.5 for _ in model.state_inputs)
        for _ in range(batch)
    ]


def stacked(states: list[tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
    return tuple(np.stack([s[i] for s in states], axis=1) for i in range(len(states[0])))


def test_a_resident_run_answers_what_the_copied_run_answers(
    model: OrtModel, pool: StatePool
) -> None:
    free = pool.free
    states = random_states(model, 6)
    rows = pool.upload(states)
    taken = [rows]
    host = stacked(states)
    rng = np.random.default_rng(1)
    for length in (1, 3, 1, 2):  # steps and prefills, each from the last one's states
        tokens = rng.integers(3, len(model.vocab), size=(6, length))
        copied = model.run(tokens, host, want_probs=True)
        resident = pool.run(tokens, rows, want_probs=True)
        taken.append(resident.rows)
        assert resident.state == () and resident.rows.shape == (6,)
        np.testing.assert_array_equal(resident.topk_ids, copied.topk_ids)
        np.testing.assert_allclose(resident.topk_probs, copied.topk_probs, atol=EXACT)
        assert resident.probs is not None and copied.probs is not None
        np.testing.assert_allclose(resident.probs, copied.probs, atol=EXACT)
        got = stacked([tuple(s) for s in pool.download(resident.rows)])
        for a, b in zip(got, copied.state):
            np.testing.assert_allclose(a, b, atol=EXACT)
        host, rows = copied.state, resident.rows
    last = pool.run(tokens, rows, want_probs=False)
    assert last.probs is None
    pool.release(np.concatenate([*taken, last.rows]))
    assert pool.free == free


def test_a_narrower_top_k_is_the_first_words_of_the_full_one(
    model: OrtModel, pool: StatePool
) -> None:
    rows = pool.upload(random_states(model, 5, seed=2))
    tokens = np.random.default_rng(3).integers(3, len(model.vocab), size=(5, 1))
    full = pool.run(tokens, rows, want_probs=False)
    assert full.topk_ids.shape == (5, model.max_k)
    runs = [full]
    # A tie at the cut is ordered by id, so any width's words are the full list's first.
    for top, width in ((1, 1), (2, 2), (5, 5), (model.max_k, model.max_k), (0, 1)):
        narrow = pool.run(tokens, rows, want_probs=False, top=top)
        runs.append(narrow)
        assert narrow.topk_ids.shape == narrow.topk_probs.shape == (5, width)
        np.testing.assert_array_equal(narrow.topk_ids, full.topk_ids[:, :width])
        np.testing.assert_array_equal(narrow.topk_probs, full.topk_probs[:, :width])
        for a, b in zip(pool.download(narrow.rows), pool.download(full.rows)):
            for x, y in zip(a, b):
                np.testing.assert_array_equal(x, y)
    wide = pool.run(tokens, rows, want_probs=False, top=model.max_k + 7)
    runs.append(wide)
    assert wide.topk_ids.shape == (5, model.max_k)
    pool.release(np.concatenate([rows, *(r.rows for r in runs)]))


def test_rows_are_write_once_and_free_when_their_count_reaches_zero(
    model: OrtModel, pool: StatePool
) -> None:
    free = pool.free
    states = random_states(model, 4, seed=2)
    kept = pool.upload(states)
    assert pool.free == free - 4
    before = pool.download(kept)
    for a, b in zip(before, states):  # bit-exact round trip
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    # Runs write only the rows they take: the rows a run started from are unchanged.
    tokens = np.full((4, 2), 5, dtype=np.int64)
    output = pool.run(tokens, kept, want_probs=False)
    assert set(output.rows.tolist()).isdisjoint(kept.tolist())
    for a, b in zip(pool.download(kept), before):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    pool.release(output.rows)
    assert pool.free == free - 4  # the run's new rows went back
    pool.hold(kept[:2])  # two rows held twice (as a session and a step in flight)
    pool.hold(kept[:1])  # ... and one three times
    pool.release(np.concatenate([kept, kept[:2]]))
    assert pool.free == free - 1  # only the row still held once is not free
    with pytest.raises(ValueError, match="release of a free state row"):
        pool.release(kept[1:2])
    with pytest.raises(ValueError, match="hold of a free state row"):
        pool.hold(kept[1:2])
    pool.release(kept[:1])
    assert pool.free == free


def test_counts_equal_the_holds_and_a_row_shared_is_released_once_per_hold(
    tiny_artifacts: Path,
) -> None:
    model = OrtModel(ModelArtifact.load(tiny_artifacts / "gru"), providers_for("cpu"))
    pool = StatePool(model, 16)
    pinned = pool.upload(random_states(model, 2, seed=6))
    pool.pin(pinned)
    rows = pool.take(5)
    pool.hold(np.array([rows[0], rows[0], pinned[0]]))  # repeats counted as many times
    pool.check_counts(np.concatenate([pinned, rows, [rows[0], rows[0], pinned[0]]]))
    with pytest.raises(AssertionError, match="counts differ"):
        pool.check_counts(np.concatenate([pinned, rows]))
    pool.release(np.array([rows[0], pinned[0], rows[0], *rows]))
    pool.check_counts(pinned)
    assert pool.free == 14 and pool.pinned(pinned).all()


def test_the_cpu_pool_is_written_in_place(tiny_artifacts: Path) -> None:
    """The pool tensors are bound as the fused graph's input and output: the scatter
    writes into the same buffer (the host array the OrtValue wraps, on CPU)."""
    model = OrtModel(ModelArtifact.load(tiny_artifacts / "gru"), providers_for("cpu"))
    pool = StatePool(model, 32)
    start = pool.upload(random_states(model, 2, seed=3))
    output = pool.run(np.array([[7], [9]], dtype=np.int64), start, want_probs=False)
    downloaded = pool.download(output.rows)
    for row, state in zip(output.rows, downloaded):
        np.testing.assert_array_equal(pool._host[0][row], state[0])
    assert np.abs(downloaded[0][0]).sum() > 0


def test_a_full_pool_refuses_and_takes_nothing(tiny_artifacts: Path) -> None:
    model = OrtModel(ModelArtifact.load(tiny_artifacts / "gru"), providers_for("cpu"))
    pool = StatePool(model, 8)
    held = pool.take(6)
    with pytest.raises(PoolExhausted, match="3 state rows needed, 2 free of 8"):
        pool.take(3)
    assert pool.free == 2
    pool.release(held[-1:])
    assert len(pool.take(3)) == 3


@pytest.mark.parametrize("cuda", provider_params(cpu=False))
def test_cuda_and_cpu_pools_agree(tiny_artifacts: Path, cell: str, cuda: str) -> None:
    answers = {}
    for name in ("cpu", cuda):
        model = OrtModel(ModelArtifact.load(tiny_artifacts / cell), providers_for(name))
        pool = StatePool(model, 32)
        rows = pool.upload(random_states(model, 3, seed=4))
        for _ in range(5):
            output = pool.run(np.array([[4], [8], [12]], dtype=np.int64), rows, True)
            pool.release(rows)
            rows = output.rows
        answers[name] = (output.probs, stacked([tuple(s) for s in pool.download(rows)]))
    np.testing.assert_allclose(answers[cuda][0], answers["cpu"][0], atol=ATOL)
    for a, b in zip(answers[cuda][1], answers["cpu"][1]):
        np.testing.assert_allclose(a, b, atol=ATOL)


def test_pool_rows_follow_the_cap_the_budget_and_the_batches() -> None:
    assert pool_rows(0, 1000, 16, 8192, None) == 2 * 1000 + 8 * 16 + 16
    assert pool_rows(0, 1_000_000, 256, 8192, 8192 * 50_000) == 50_000
    assert pool_rows(0, 1_000_000, 256, 8192, 0) == 8 * 256 + 16  # never below a batch's
    assert pool_rows(5000, 10, 16, 8192, None) == 5000
    with pytest.raises(ValueError, match="below 144"):
        pool_rows(100, 10, 16, 8192, None)


async def test_a_spilled_session_keeps_its_state_version_and_place_and_stale_rows_go(
    tiny_artifacts: Path,
) -> None:
    model = OrtModel(ModelArtifact.load(tiny_artifacts / "lstm"), providers_for("cpu"))
    pool = StatePool(model, 32)
    store = MemorySessionStore(cap=100)
    residency = Residency(pool, store)
    states = random_states(model, 8, seed=5)
    rows = pool.upload(states).reshape(4, 2)
    records = [
        SessionRecord(f"s{i}", "lstm", (), i, 1.0, 2.0, state_on_device=True) for i in range(4)
    ]
    assert await store.put_many(records, [None] * 4) == [True] * 4
    residency.commit([r.session_id for r in records], [1] * 4, [1.0] * 4, rows)
    pool.release(rows.ravel())  # the entries hold them now
    pool.check_counts(residency.holders())
    assert pool.used == 8 and len(residency) == 4
    await store.delete("s1")  # its rows are reclaimed lazily, by the spill that meets it
    assert pool.used == 8
    assert residency.spill(5, keep={"s0"}) == 6  # whole sessions, oldest first
    assert pool.used == 2 and len(residency) == 1  # s0 kept; s1 stale; s2 and s3 spilled
    pool.check_counts(residency.holders())
    got = await store.get_many(["s0", "s1", "s2", "s3"])
    assert got[1] is None
    for i in (2, 3):
        record = got[i]
        assert record is not None and record.version == 1
        for array, want in zip(record.state, (*states[2 * i], *states[2 * i + 1])):
            np.testing.assert_array_equal(array, want)
        assert residency.find([record])[0, 0] == -1  # host state: its next step uploads it
    assert got[0] is not None and got[0].state == () and got[0].state_on_device
    assert not any(r.state_on_device for r in got[2:])  # type: ignore[union-attr]
    np.testing.assert_array_equal(residency.find([got[0]])[0], rows[0])
    residency.close()
    assert pool.used == 0
    # The LRU order is the write order still: a new session past the cap evicts s0 first,
    # then s2 (s1 was deleted).
    store.cap = 3
    extra = SessionRecord("s4", "lstm", got[2].state, 1, 1.0, 2.0)  # type: ignore[union-attr]
    assert await store.put_many([extra], [None]) == [True]
    assert [r is None for r in await store.get_many(["s0", "s2", "s3", "s4"])] == [
        True,
        False,
        False,
        False,
    ]


@pytest.mark.parametrize("model_name", ["lstm", "gru"])
def test_sessions_past_the_pool_spill_and_come_back_with_the_same_answers(
    tiny_artifacts: Path, model_name: str
) -> None:
    """A pool of 48 rows (the least for batches of 4) under 27 interleaved sessions (54
    rows) plus their steps: sessions spill to host memory and back on every round, and
    every answer still equals a stateless predict of the whole text."""
    settings = api_settings(tiny_artifacts, max_batch=4, state_pool_rows=48)
    plain = api_settings(tiny_artifacts, state_pool=False)
    with TestClient(create_app(settings)) as client, TestClient(create_app(plain)) as copied:
        sessions = []
        for i, text in enumerate(TEXTS * 3):
            chunks = splits(text, seed=i)["random chunks"]
            r = client.post("/v1/sessions", json={"model": model_name, "k": 8})
            assert r.status_code == 201, r.text
            sessions.append((r.json()["session_id"], chunks))
        fed: dict[str, list[str]] = {sid: [] for sid, _ in sessions}
        for round_ in range(max(len(c) for _, c in sessions)):
            for sid, chunks in sessions:
                if round_ >= len(chunks):
                    continue
                r = client.post(f"/v1/sessions/{sid}/feed", json={"text": chunks[round_], "k": 8})
                assert r.status_code == 200, r.text
                fed[sid].append(chunks[round_])
                whole = copied.post(
                    "/v1/predict", json={"text": " ".join(fed[sid]), "model": model_name, "k": 8}
                ).json()
                assert r.json()["tokens"] == whole["tokens"]
                assert_same_predictions(r.json()["predictions"], whole["predictions"])
        metrics = client.get("/metrics").text
        spilled = [
            line
            for line in metrics.splitlines()
            if line.startswith("nextword_state_pool_spills_total") and f'"{model_name}"' in line
        ]
        assert spilled and float(spilled[0].split()[-1]) > 0, spilled


@pytest.mark.parametrize("model_name", ["lstm", "gru"])
def test_the_writers_words_mix_in_alike_from_the_pool_and_copied(
    tiny_artifacts: Path, model_name: str
) -> None:
    """With a memory of the writer's words, a resident run sends out only the model's
    probabilities at the memory's words (and `<unk>`, for typed names); the answers equal
    those mixed from the full distribution of the copied path, typed names included."""
    apps = [api_settings(tiny_artifacts), api_settings(tiny_artifacts, state_pool=False)]
    with TestClient(create_app(apps[0])) as resident, TestClient(create_app(apps[1])) as copied:
        sessions = []
        for client in (resident, copied):
            r = client.post("/v1/sessions", json={"model": model_name, "k": 8})
            assert r.status_code == 201, r.text
            sessions.append(r.json()["session_id"])
        shown = set()
        for word in (TEXTS[-1] + " " + TEXTS[1]).split():
            answers = []
            for client, sid in zip((resident, copied), sessions):
                r = client.post(f"/v1/sessions/{sid}/feed", json={"text": word, "k": 8})
                assert r.status_code == 200, r.text
                answers.append(r.json()["predictions"])
            assert_same_predictions(*answers)
            shown |= {p["word"] for p in answers[0]}
        assert {"Zorblax", "Quux"} & shown, shown  # typed names were suggested


def test_a_small_pool_serves_empty_sessions_and_concurrent_steps(tiny_artifacts: Path) -> None:
    """Sessions created without text hold only the start rows (spilling them frees
    nothing), and the least recently written sessions are often the ones a batch steps
    (spilling them would free nothing either): every step still runs, none fails for
    want of rows, and each answer equals a stateless predict."""
    from concurrent.futures import ThreadPoolExecutor

    settings = api_settings(tiny_artifacts, max_batch=4, max_wait_ms=20, state_pool_rows=48)
    with TestClient(create_app(settings)) as client:
        empty = [client.post("/v1/sessions", json={"model": "gru"}) for _ in range(10)]
        assert all(r.status_code == 201 for r in empty)
        texts = [f"the cat and {w}" for w in ("dog", "world", "home", "car")] * 6
        created = [client.post("/v1/sessions", json={"model": "gru", "text": t}) for t in texts]
        assert all(r.status_code == 201 for r in created), [r.text for r in created]
        ids = [r.json()["session_id"] for r in created]

        def feed(sid: str) -> dict:
            r = client.post(f"/v1/sessions/{sid}/feed", json={"text": "went home", "k": 8})
            assert r.status_code == 200, r.text
            return r.json()

        for _ in range(2):  # rounds of concurrent steps, batched four at a time
            with ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(feed, ids))
        for text, answer in zip(texts, answers):
            whole = client.post(
                "/v1/predict",
                json={"text": f"{text} went home went home", "model": "gru", "k": 8},
            ).json()
            assert answer["tokens"] == whole["tokens"]
            assert_same_predictions(answer["predictions"], whole["predictions"])
        for r in empty:  # the empty sessions still answer
            feed(r.json()["session_id"])


def test_prefixes_and_plain_steps_batched_together_answer_as_copied(tiny_artifacts: Path) -> None:
    """Concurrent steps, some completing a prefix, some not, with the writer's words: one
    resident run sends out whole distributions only for the prefix rows, and every answer
    equals the copied path's (which sends out the whole batch's)."""
    from concurrent.futures import ThreadPoolExecutor

    apps = [
        api_settings(tiny_artifacts, max_wait_ms=30),
        api_settings(tiny_artifacts, max_wait_ms=30, state_pool=False),
    ]
    with TestClient(create_app(apps[0])) as resident, TestClient(create_app(apps[1])) as copied:
        texts = [TEXTS[i % len(TEXTS)] for i in range(12)]
        prefixes = ["", "h", "t", "", "w", "", "Zo", "a", "", "s", "", "go"]

        def run(client: TestClient, i: int) -> list[list[dict]]:
            r = client.post("/v1/sessions", json={"model": "lstm", "text": texts[i], "k": 6})
            assert r.status_code == 201, r.text
            sid, answers = r.json()["session_id"], []
            for word in ("and", "the", ""):
                body = {"text": word, "k": 6, "prefix": prefixes[i] or None}
                r = client.post(f"/v1/sessions/{sid}/feed", json=body)
                assert r.status_code == 200, r.text
                answers.append(r.json()["predictions"])
            return answers

        with ThreadPoolExecutor(12) as pool:
            got = list(pool.map(lambda i: run(resident, i), range(12)))
        metrics = {
            line.split("{")[0]: float(line.split()[-1])
            for line in resident.get("/metrics").text.splitlines()
            if line.startswith("nextword_batch_size_") and 'model="lstm"' in line
        }
        assert metrics["nextword_batch_size_sum"] > metrics["nextword_batch_size_count"]
        want = [run(copied, i) for i in range(12)]
        for g, w in zip(got, want):
            for a, b in zip(g, w):
                assert_same_predictions(a, b)


def test_the_pool_checks_itself_against_the_copied_path(model: OrtModel, pool: StatePool) -> None:
    assert pool.check() is None


def test_a_pool_that_fails_its_check_is_not_used(
    tiny_artifacts: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from service.engine.core import attach_pools, load_models

    model = OrtModel(ModelArtifact.load(tiny_artifacts / "gru"), providers_for("cpu"))
    pool = StatePool(model, 32)
    real = StatePool.download
    monkeypatch.setattr(  # a device that loses what was written to it
        StatePool,
        "download",
        lambda self, rows: [tuple(a * 0 for a in s) for s in real(self, rows)],
    )
    problem = pool.check()
    assert problem is not None and problem.startswith("states read back differ"), problem
    settings = api_settings(tiny_artifacts)
    assert attach_pools(settings, load_models(settings)) == {}
    assert "fails its check (states read back differ" in caplog.text


def test_the_models_route_says_where_states_live(tiny_artifacts: Path) -> None:
    pooled = api_settings(tiny_artifacts, max_batch=4, state_pool_rows=100)
    with TestClient(create_app(pooled)) as client:
        models = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
        pool = models["lstm"]["state_pool"]
        assert pool["device"] == "cpu" and pool["rows"] == 100
        lstm = models["lstm"]
        assert pool["bytes_per_session"] == 2 * 2 * lstm["layers"] * lstm["hidden_size"] * 4
    with TestClient(create_app(api_settings(tiny_artifacts, state_pool=False))) as client:
        assert all(m["state_pool"] is None for m in client.get("/v1/models").json()["models"])


def test_a_pool_whose_check_raises_is_not_used(
    tiny_artifacts: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A provider that cannot run the pool's graph at all: the engine still starts, and
    copies its states per batch."""
    from service.engine.core import attach_pools, load_models

    def broken(self: StatePool, *args: object, **kwargs: object) -> None:
        raise RuntimeError("no kernel for GatherElements here")

    monkeypatch.setattr(StatePool, "run", broken)
    settings = api_settings(tiny_artifacts)
    assert attach_pools(settings, load_models(settings)) == {}
    assert "fails its check (RuntimeError: no kernel for GatherElements here)" in caplog.text


def test_a_deleted_sessions_rows_go_back_at_once(tiny_artifacts: Path) -> None:
    """Deleting a session through the engine drops its residency entry: the pool's used
    rows (the gauge, refreshed by the next batch) are back where they were."""

    def used(client: TestClient) -> float:
        client.post("/v1/predict", json={"text": "the cat", "model": "gru"})  # a batch
        for line in client.get("/metrics").text.splitlines():
            gru = line.startswith("nextword_state_pool_rows") and 'model="gru"' in line
            if gru and 'use="used"' in line:
                return float(line.split()[-1])
        raise AssertionError("no pool gauge")

    settings = api_settings(tiny_artifacts, max_batch=4, state_pool_rows=100)
    with TestClient(create_app(settings)) as client:
        before = used(client)
        r = client.post("/v1/sessions", json={"model": "gru", "text": "the cat sat"})
        assert r.status_code == 201, r.text
        assert used(client) == before + 2
        assert client.delete(f"/v1/sessions/{r.json()['session_id']}").status_code == 204
        assert used(client) == before
