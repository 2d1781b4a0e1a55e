"""The per-session cache (service.engine.adapt): counts, eviction, the mixture's top k."""

from __future__ import annotations

import numpy as np
import pytest

from service.engine import adapt
from service.engine.adapt import AdaptParams

V = 40  # vocabulary of the hand-made cases: 0..2 specials, 3..39 words
UNK = 1
SUGGESTIBLE = np.arange(V) >= 3


def params(**kw) -> AdaptParams:
    base = {"lam": 0.3, "decay": 0.5, "window": 50, "capacity": 4, "max_oov": 3}
    return AdaptParams(**{**base, **kw})


def feed(keys, weights, tokens, p, split=None) -> None:
    """Feed one row's tokens (row 0 of a batch of 1) in the given split."""
    tokens = list(tokens)
    cuts = [0, *(split or []), len(tokens)]
    for a, b in zip(cuts, cuts[1:]):
        part = np.array([tokens[a:b] or [0]], dtype=np.int32)
        adapt.update(keys, weights, part, np.array([b - a]), p)


def cache_of(keys, weights, row=0) -> dict[int, float]:
    return {int(k): float(w) for k, w in zip(keys[row], weights[row]) if k >= 0}


def model_probs(rng, batch: int, vocab: int = V) -> np.ndarray:
    """Peaked random distributions (no ties)."""
    logits = rng.normal(0, 2.5, size=(batch, vocab))
    p = np.exp(logits)
    return (p / p.sum(1, keepdims=True)).astype(np.float32)


def graph_topk(probs: np.ndarray, suggestible: np.ndarray, k: int) -> tuple:
    """What the graph returns: top k over suggestible words, best first (ties: lower id)."""
    masked = np.where(suggestible, probs, -1.0)
    order = np.lexsort((np.broadcast_to(np.arange(probs.shape[1]), probs.shape), -masked))
    ids = order[:, :k]
    return ids, np.take_along_axis(probs, ids, 1)


def reference(keys, weights, probs, lam, k, allowed=None, allowed_oov=None):
    """The mixture over every suggestible word and cached typed word, ranked densely."""
    total = weights.sum()
    scores = {}
    for w in range(V):
        if SUGGESTIBLE[w] and (allowed is None or w in allowed):
            scores[w] = float(probs[w])
    if total > 0:
        oov_total = weights[keys >= V].sum()
        cached = dict(zip(keys.tolist(), weights.tolist()))
        for w in scores:
            scores[w] = (1 - lam) * probs[w] + lam * cached.get(w, 0.0) / total
        for key, wt in cached.items():
            if key >= V and (allowed_oov is None or allowed_oov[key - V]):
                share = probs[UNK] * wt / oov_total
                scores[key] = (1 - lam) * share + lam * wt / total
    ranked = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
    return [key for key, _ in ranked], [s for _, s in ranked]


def test_params_round_trip_and_checks() -> None:
    p = params()
    assert AdaptParams.from_dict(p.to_dict()) == p
    assert p.threshold == pytest.approx(0.5**50)
    with pytest.raises(ValueError):
        AdaptParams.from_dict({**p.to_dict(), "extra": 1})
    for bad in ({"lam": 1.5}, {"decay": 0.0}, {"decay": 1.1}, {"capacity": 0}, {"max_oov": -1}):
        with pytest.raises(ValueError):
            params(**bad)
    assert adapt.params_of({}) == adapt.DEFAULT_PARAMS
    assert adapt.params_of({"adaptation": {"params": p.to_dict()}}) == p


def test_weights_are_decayed_counts_and_skipped_tokens_decay_too() -> None:
    keys, weights = adapt.empty_cache(1, 4)
    assert keys.dtype == np.int32 and weights.dtype == np.float32
    assert (keys == -1).all() and (weights == 0).all()
    feed(keys, weights, [5, 7, -1, 5], params())
    # 5: 0.5**3 + 1; 7: 0.5**2 (the -1 counted as a token)
    assert cache_of(keys, weights) == {5: 1.125, 7: 0.25}
    keys2, weights2 = adapt.empty_cache(1, 4)
    feed(keys2, weights2, [5, 7, -1, 5], params(), split=[1, 3])
    assert (keys == keys2).all() and (weights == weights2).all()


def test_new_word_takes_an_empty_slot_then_evicts_the_smallest_lowest_slot_on_ties() -> None:
    keys, weights = adapt.empty_cache(1, 3)
    feed(keys, weights, [5, 6, 7], params(decay=1.0))
    assert keys[0].tolist() == [5, 6, 7]
    feed(keys, weights, [6, 8], params(decay=1.0))  # 5 and 7 tie at 1: slot 0 goes
    assert keys[0].tolist() == [8, 6, 7] and weights[0].tolist() == [1.0, 2.0, 1.0]
    feed(keys, weights, [9], params(decay=1.0))  # 8 and 7 tie at 1: slot 0 again
    assert keys[0].tolist() == [9, 6, 7]
    keys, weights = adapt.empty_cache(1, 3)
    feed(keys, weights, [5, 6, 7, 8], params(decay=0.5))  # the oldest, smallest, goes
    assert keys[0].tolist() == [8, 6, 7]
    assert weights[0].tolist() == [1.0, 0.25, 0.5]


def test_entries_below_the_window_are_dropped_and_their_slot_reused() -> None:
    p = params(decay=0.5, window=2)  # dropped below 0.25
    keys, weights = adapt.empty_cache(1, 4)
    feed(keys, weights, [5, -1, -1], p)
    assert cache_of(keys, weights) == {5: 0.25}
    feed(keys, weights, [-1], p)
    assert cache_of(keys, weights) == {} and (keys == -1).all() and (weights == 0).all()
    feed(keys, weights, [6, 5], p)
    assert keys[0].tolist()[:2] == [6, 5]


def test_a_batch_of_mixed_lengths_equals_its_rows_fed_one_by_one() -> None:
    rng = np.random.default_rng(1)
    p = params(capacity=5, decay=0.8, window=6)
    lengths = np.array([0, 1, 7, 3, 12])
    new = np.full((5, 12), 99, dtype=np.int32)  # padding past each length is ignored
    for b, n in enumerate(lengths):
        new[b, :n] = rng.integers(-1, 12, size=n)
    keys, weights = adapt.empty_cache(5, 5)
    feed_rows = [rng.integers(-1, 12, size=9) for _ in range(5)]
    history = np.array(feed_rows, dtype=np.int32)
    adapt.update(keys, weights, history, np.full(5, 9), p)
    alone = []
    for b in range(5):
        k1, w1 = adapt.empty_cache(1, 5)
        feed(k1, w1, feed_rows[b], p)
        feed(k1, w1, new[b, : lengths[b]], p)
        alone.append((k1[0], w1[0]))
    adapt.update(keys, weights, new, lengths, p)
    for b in range(5):
        assert (keys[b] == alone[b][0]).all()
        assert (weights[b] == alone[b][1]).all()


@pytest.mark.parametrize("long", [False, True])
def test_any_split_gives_the_same_cache_and_predictions(long: bool) -> None:
    rng = np.random.default_rng(2 if long else 3)
    if long:  # over capacity, entries evicted and dropped by the window
        p = params(capacity=8, decay=0.95, window=40)
        tokens = rng.integers(-1, V, size=2000)
    else:  # fewer distinct words than the capacity
        p = params(capacity=32, decay=0.9, window=100)
        tokens = rng.integers(-1, 20, size=60)
    tokens = np.where((tokens >= 0) & ~SUGGESTIBLE[np.clip(tokens, 0, V - 1)], -1, tokens)
    whole_k, whole_w = adapt.empty_cache(1, p.capacity)
    feed(whole_k, whole_w, tokens, p)
    probs = model_probs(rng, 1)
    ids, tp = graph_topk(probs, SUGGESTIBLE, 10)
    want = adapt.top_k(whole_k, whole_w, probs, ids, tp, UNK, SUGGESTIBLE, 5, p.lam)
    for trial in range(5):
        cuts = sorted(rng.choice(np.arange(1, len(tokens)), size=trial * 7 + 1, replace=False))
        k, w = adapt.empty_cache(1, p.capacity)
        feed(k, w, tokens, p, split=list(cuts))
        assert (k == whole_k).all() and (w == whole_w).all()
        got = adapt.top_k(k, w, probs, ids, tp, UNK, SUGGESTIBLE, 5, p.lam)
        assert (got[0] == want[0]).all()
        np.testing.assert_allclose(got[1], want[1], atol=1e-5)


def test_an_empty_cache_answers_the_model_unmixed() -> None:
    rng = np.random.default_rng(4)
    probs = model_probs(rng, 3)
    ids, tp = graph_topk(probs, SUGGESTIBLE, 10)
    keys, weights = adapt.empty_cache(3, 4)
    got_ids, got_p = adapt.top_k(keys, weights, probs, ids, tp, UNK, SUGGESTIBLE, 5, 0.4)
    assert (got_ids == ids[:, :5]).all() and (got_p == tp[:, :5]).all()
    prefix = np.array([30, 4, 17, 9], dtype=np.int64)
    got_ids, got_p = adapt.top_k(
        keys, weights, probs, ids, tp, UNK, SUGGESTIBLE, 3, 0.4, candidates=[None, prefix, None]
    )
    order = prefix[np.argsort(-probs[1, prefix])][:3]
    assert got_ids[1].tolist() == order.tolist()
    assert (got_p[1] == probs[1, order]).all()
    target = np.array([5, UNK, 2])
    assert (
        adapt.probability(keys, weights, probs, target, UNK, SUGGESTIBLE, 0.4)
        == probs[[0, 1, 2], target]
    ).all()


def _random_caches(rng, batch: int, p: AdaptParams, oov: bool = True):
    keys, weights = adapt.empty_cache(batch, p.capacity)
    tables: list[list[str]] = [[] for _ in range(batch)]
    for _ in range(30):
        new = rng.integers(3, V, size=batch).astype(np.int32)
        for b in range(batch):
            if oov and rng.random() < 0.3:
                word = f"w{rng.integers(0, 5)}"
                new[b] = adapt.oov_keys(tables[b], [word], V, keys[b], weights[b], p)[0]
        adapt.update(keys, weights, new[:, None], np.ones(batch, dtype=np.int64), p)
    return keys, weights, tables


def test_top_k_is_the_dense_mixtures_top_k() -> None:
    rng = np.random.default_rng(5)
    p = params(capacity=10, decay=0.9, max_oov=4, lam=0.35)
    batch = 16
    keys, weights, _ = _random_caches(rng, batch, p)
    keys[3], weights[3] = -1, 0.0  # one fresh session in the batch
    probs = model_probs(rng, batch)
    ids, tp = graph_topk(probs, SUGGESTIBLE, 12)
    for k in (1, 5, 12):
        got_ids, got_p = adapt.top_k(keys, weights, probs, ids, tp, UNK, SUGGESTIBLE, k, p.lam)
        assert got_ids.shape == got_p.shape == (batch, k)
        for b in range(batch):
            want_ids, want_p = reference(keys[b], weights[b], probs[b], p.lam, k)
            assert got_ids[b].tolist() == want_ids
            np.testing.assert_allclose(got_p[b], want_p, rtol=1e-5)
        sel = (got_ids >= 0) & (got_ids < V)
        shown = np.where(sel, got_ids, 0)
        assert not (~SUGGESTIBLE[shown] & sel).any()
        # what probability() gives a shown key is what top_k shows
        for j in range(k):
            again = adapt.probability(keys, weights, probs, got_ids[:, j], UNK, SUGGESTIBLE, p.lam)
            np.testing.assert_allclose(again, got_p[:, j], rtol=1e-5)


def test_what_is_shown_sums_to_at_most_one_and_the_mixture_to_one() -> None:
    rng = np.random.default_rng(6)
    p = params(capacity=12, decay=0.95, max_oov=4, lam=0.6)
    keys, weights, _ = _random_caches(rng, 8, p)
    probs = model_probs(rng, 8)
    count = int(SUGGESTIBLE.sum())
    ids, tp = graph_topk(probs, SUGGESTIBLE, count)
    got_ids, got_p = adapt.top_k(keys, weights, probs, ids, tp, UNK, SUGGESTIBLE, count, p.lam)
    assert (got_p.sum(1) <= 1.0 + 1e-6).all()
    # every token of the vocabulary (<unk>: the class of typed words) sums to one
    mass = sum(
        adapt.probability(keys, weights, probs, np.full(8, w), UNK, SUGGESTIBLE, p.lam)
        for w in range(V)
    )
    np.testing.assert_allclose(mass, 1.0, rtol=1e-5)


def test_ties_rank_the_lower_key_first() -> None:
    probs = np.full((1, V), 1.0 / V, dtype=np.float32)
    ids, tp = graph_topk(probs, SUGGESTIBLE, 10)
    keys, weights = adapt.empty_cache(1, 4)
    feed(keys, weights, [30, 20], params(decay=1.0))  # equal weights
    got, _ = adapt.top_k(keys, weights, probs, ids, tp, UNK, SUGGESTIBLE, 4, 0.5)
    assert got[0].tolist() == [20, 30, 3, 4]


def test_prefix_ranks_its_candidates_and_matching_typed_words() -> None:
    rng = np.random.default_rng(7)
    p = params(capacity=6, decay=0.9, max_oov=3, lam=0.5)
    keys, weights = adapt.empty_cache(2, p.capacity)
    tables: list[list[str]] = [[], []]
    for word in ("zebra", "zoom", "apple"):
        key = adapt.oov_keys(tables[0], [word], V, keys[0], weights[0], p)
        adapt.update(keys, weights, np.array([[key[0]], [-1]]), np.array([1, 1]), p)
    adapt.update(keys, weights, np.array([[12], [15]], dtype=np.int32), np.array([1, 1]), p)
    probs = model_probs(rng, 2)
    ids, tp = graph_topk(probs, SUGGESTIBLE, 10)
    prefix = np.array([25, 12, 7], dtype=np.int64)  # any order
    match = np.array([True, True, False])  # "z": zebra, zoom
    got_ids, got_p = adapt.top_k(
        keys, weights, probs, ids, tp, UNK, SUGGESTIBLE, 5, p.lam,
        candidates=[prefix, None], oov_match=[match, None],
    )  # fmt: skip
    want_ids, want_p = reference(keys[0], weights[0], probs[0], p.lam, 5, set(prefix), match)
    assert got_ids[0].tolist() == want_ids
    assert set(want_ids) == {25, 12, 7, V, V + 1}
    np.testing.assert_allclose(got_p[0], want_p, rtol=1e-5)
    # fewer candidates than k: padded
    got_ids, got_p = adapt.top_k(
        keys, weights, probs, ids, tp, UNK, SUGGESTIBLE, 5, p.lam, candidates=[prefix[:1], None]
    )
    assert got_ids[0].tolist() == [25, -1, -1, -1, -1] and got_p[0, 1:].tolist() == [0.0] * 4
    # the row without a prefix is the plain mixture
    assert got_ids[1].tolist() == reference(keys[1], weights[1], probs[1], p.lam, 5)[0]


def test_top_k_from_the_gathered_probabilities_equals_the_full_distribution() -> None:
    """What a resident run sends out (each row's probabilities at its keys and at <unk>,
    and whole distributions only for the rows completing a prefix) gives the same answers
    as the full distribution."""
    rng = np.random.default_rng(8)
    p = params(capacity=10, decay=0.9, max_oov=4, lam=0.35)
    batch = 12
    keys, weights, tables = _random_caches(rng, batch, p)
    keys[3], weights[3] = -1, 0.0  # one fresh session
    probs = model_probs(rng, batch)
    ids, tp = graph_topk(probs, SUGGESTIBLE, 12)
    prefixed = [2, 3, 7]
    candidates = [
        np.array([5, 9, 20, 31], dtype=np.int64) if b in prefixed else None for b in range(batch)
    ]
    matches = [
        np.array([True] * len(tables[b])) if b in prefixed and tables[b] else None
        for b in range(batch)
    ]
    at_keys = np.take_along_axis(probs, adapt.gather_ids(keys, V, UNK).astype(np.int64), 1)
    index = np.full(batch, -1, dtype=np.int64)
    index[prefixed] = np.arange(len(prefixed))
    for k in (1, 5):
        full = adapt.top_k(
            keys, weights, probs, ids, tp, UNK, SUGGESTIBLE, k, p.lam, candidates, matches
        )
        gathered = adapt.top_k(
            keys, weights, probs[prefixed], ids, tp, UNK, SUGGESTIBLE, k, p.lam,
            candidates, matches, at_keys, index,
        )  # fmt: skip
        np.testing.assert_array_equal(gathered[0], full[0])
        np.testing.assert_allclose(gathered[1], full[1], rtol=1e-6)
    with pytest.raises(ValueError, match="needs at_keys"):
        adapt.top_k(
            keys, weights, probs[prefixed], ids, tp, UNK, SUGGESTIBLE, 5, p.lam,
            candidates, matches, None, index,
        )  # fmt: skip


def test_oov_words_get_slots_matched_by_normalized_form() -> None:
    p = params(max_oov=2, capacity=8, decay=0.5)
    keys, weights = adapt.empty_cache(1, 8)
    table: list[str] = []
    got = adapt.oov_keys(table, ["Zebra", "quux", "zebra"], V, keys[0], weights[0], p)
    assert got == [V, V + 1, V] and table == ["zebra", "quux"]  # the latest typed form
    adapt.update(keys, weights, np.array([got], dtype=np.int32), np.array([3]), p)
    assert cache_of(keys, weights) == {V: 1.25, V + 1: 0.5}
    assert adapt.oov_keys(table, ["ZEBRA"], V, keys[0], weights[0], p) == [V]
    assert table[0] == "ZEBRA"


def test_a_full_table_reuses_the_slot_of_least_weight_and_clears_its_entry() -> None:
    p = params(max_oov=2, capacity=8, decay=0.5)
    keys, weights = adapt.empty_cache(1, 8)
    table: list[str] = []
    got = adapt.oov_keys(table, ["alpha", "beta"], V, keys[0], weights[0], p)
    adapt.update(
        keys, weights, np.array([[got[0], got[1], got[0]]], dtype=np.int32), np.array([3]), p
    )
    assert cache_of(keys, weights) == {V: 1.25, V + 1: 0.5}
    assert adapt.oov_keys(table, ["gamma"], V, keys[0], weights[0], p) == [V + 1]
    assert table == ["alpha", "gamma"] and cache_of(keys, weights) == {V: 1.25}
    # a slot absent from the cache (weight 0) goes first; slots given out in this call never
    keys[0, keys[0] == V] = -1
    weights[0] = np.where(keys[0] >= 0, weights[0], 0)
    got = adapt.oov_keys(table, ["delta", "epsilon", "zeta"], V, keys[0], weights[0], p)
    assert got == [V, V + 1, -1] and table == ["delta", "epsilon"]


def test_blocked_and_unkept_words_are_not_remembered() -> None:
    from service.contract.vocab import BLOCKED

    keys, weights = adapt.empty_cache(1, 4)
    table: list[str] = []
    blocked = sorted(BLOCKED)[0] if BLOCKED else None
    words = ["<unk>", "..."] + ([blocked] if blocked else [])
    assert adapt.oov_keys(table, words, V, keys[0], weights[0], params()) == [-1] * len(words)
    assert table == []
    assert adapt.oov_keys([], ["fine"], V, keys[0], weights[0], params(max_oov=0)) == [-1]


# --- the evaluation (nextword evaluate --adapt) -------------------------------------------

# As published: a space either side of every line, `@,@` joiners, `<unk>`.
WIKI = "\n".join(
    f" {line} "
    for line in (
        "= First Article =",
        "",
        "The cat and the <unk> are good . The zebra is coming home .",
        "",
        "= = A Section = =",
        "",
        "The zebra was coming home , and the zebra is good .",
        "= Second Article =",
        "",
        "She is very good , and the 1 @,@ 000 dogs are not .",
    )
)


def test_wikitext_articles_are_documents_and_match_the_stream(tmp_path) -> None:
    from model_export.corpora import WIKITEXT_UNK, text_documents, text_tokens

    path = tmp_path / "wikitext-tiny.txt"
    path.write_text(WIKI)
    docs = text_documents(path)
    assert [name for name, _ in docs] == ["First Article", "Second Article"]
    assert all(tokens[0] == "</s>" for _, tokens in docs)
    assert [t for _, tokens in docs for t in tokens[1:]] == text_tokens(path)[1:]
    assert WIKITEXT_UNK in docs[0][1] and "section" not in docs[0][1]
    assert "1,000" in " ".join(docs[1][1]).replace(" , ", ",")


def test_split_documents_group_a_splits_blocks_by_file(tmp_path) -> None:
    from model_export import corpora

    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(40):
        lines = [f"line {j} of file {i} ." for j in range(corpora.LINES_PER_DOCUMENT + 5)]
        (folder / f"f{i}.txt").write_text("\n".join(lines))
    streams = corpora.load_splits([str(folder)])
    for split in corpora.SPLITS:
        docs = corpora.split_documents([str(folder)], split)
        assert len({name for name, _ in docs}) == len(docs)
        assert all(name.startswith("corpus/f") and "#" not in name for name, _ in docs)
        assert [t for _, tokens in docs for t in tokens[1:]] == streams[split][1:]


def _documents() -> list[tuple[str, list[str]]]:
    from service.contract.tokenizer import EOS, tokenize

    texts = [
        "the zebra is coming home. the zebra is good. i think the zebra is very good.",
        "you are very good, and she is not. the cat and the dog are good.",
        "quux and quux and quux and quux. i am quux.",
    ]
    return [(f"doc{i}", [EOS, *tokenize(t)]) for i, t in enumerate(texts)]


def test_evaluate_documents_counts_and_compares(tiny_artifacts) -> None:
    from model_export.evaluate_adapt import evaluate_documents
    from service.contract.artifact import ModelArtifact
    from service.engine.runtime import OrtModel

    model = OrtModel(ModelArtifact.load(tiny_artifacts / "gru"), ["CPUExecutionProvider"])
    docs = _documents()
    strong = AdaptParams(lam=0.9, decay=0.99, window=500, capacity=64, max_oov=8)
    off = AdaptParams(lam=0.0, decay=0.99, window=500, capacity=64, max_oov=8)
    base, (tally, plain) = evaluate_documents(model, docs, [strong, off], rows=2)
    counts = base.counts()
    assert counts == tally.counts()
    assert counts["targets"] == sum(len(t) - 1 for _, t in docs)
    assert counts["oov_word_targets"] == 8 and counts["oov_untyped"] == 0  # zebra x3, quux x5
    without, with_ = base.metrics(), tally.metrics()
    assert without["top5_oov"] == 0.0
    # typed twice, a word comes back: every repeat of zebra and quux is suggested
    assert with_["top5_oov"] == pytest.approx(6 / 8)
    assert with_["oov_cached"] == 6
    # lam 0 on in-vocabulary targets is the model itself
    assert plain.metrics()["perplexity_iv"] == pytest.approx(without["perplexity_iv"], rel=1e-5)
    assert plain.metrics()["top5_iv"] == without["top5_iv"]


def test_evaluate_adapt_command_records_in_the_manifest(tiny_artifacts, tmp_path, capsys) -> None:
    import json
    import shutil

    from service import cli
    from service.contract.artifact import ModelArtifact

    artifact = tmp_path / "gru"
    shutil.copytree(tiny_artifacts / "gru", artifact)
    text = tmp_path / "held_out.txt"
    text.write_text("\n".join(" ".join(t[1:]) for _, t in _documents()))
    args = ["evaluate", "--artifact", str(artifact), "--text", str(text), "--adapt"]
    assert cli.main([*args, "--record", "--rows", "2"]) == 0
    out = capsys.readouterr().out
    assert "top3 %" in out and "without" in out
    section = json.loads((artifact / "manifest.json").read_text())["adaptation"]
    metrics = section["metrics"]["held_out.txt"]
    assert metrics["documents"] == 1 and {"without", "with"} <= set(metrics)
    ModelArtifact.load(artifact)  # still a valid artifact
    # figures of other parameters are not recorded as the artifact's
    assert cli.main([*args, "--record", "--adapt-param", "lam=0.5"]) == 2
    assert cli.main([*args, "--adapt-param", "lam=0.5", "--max-tokens", "10"]) == 0
    assert cli.main([*args, "--adapt-param", "nope=1"]) == 2


def test_tune_adapt_records_parameters_that_the_service_reads(tiny_artifacts, tmp_path) -> None:
    import json
    import shutil

    from model_export import tune_adapt
    from service.contract.artifact import ModelArtifact

    artifact = tmp_path / "lstm"
    shutil.copytree(tiny_artifacts / "lstm", artifact)
    text = tmp_path / "valid.txt"
    text.write_text("\n".join(" ".join(t[1:]) for _, t in _documents()))
    args = ["--artifact", str(artifact), "--text", str(text), "--rows", "2"]
    assert tune_adapt.main([*args, "--record", "--json", str(tmp_path / "t.json")]) == 0
    section = json.loads((artifact / "manifest.json").read_text())["adaptation"]
    params = adapt.params_of(ModelArtifact.load(artifact).manifest)
    assert section["params"] == params.to_dict()
    assert params.capacity in tune_adapt.CAPACITIES and "valid.txt" in section["tuned_on"]
    assert section["tuning"]["points"] == tune_adapt.TUNING_FILE
    grid = json.loads((artifact / tune_adapt.TUNING_FILE).read_text())["grid_lam_decay"]
    assert len(grid) == len(tune_adapt.LAMS) * len(tune_adapt.DECAYS)
    assert {row["lam"] for row in grid} == set(tune_adapt.LAMS)
    assert tune_adapt.window_for(0.5, 0.01) == 7  # 0.5**7 < 0.01 <= 0.5**6


def _typed(tokens, p, vocab=V):
    """One row's cache after typing `tokens` (vocabulary ids) with recency and bigrams."""
    keys, weights = adapt.empty_cache(1, p.capacity)
    ids = np.array([tokens], dtype=np.int64)
    new = np.where(SUGGESTIBLE[ids], ids, -1).astype(np.int32)
    adapt.update(keys, weights, new, np.array([len(tokens)]), p, vocab, ids, np.array([2]))
    return keys, weights


def test_recent_words_are_never_raised_above_the_models_rank() -> None:
    rng = np.random.default_rng(11)
    probs = model_probs(rng, 1)
    ids, tp = graph_topk(probs, SUGGESTIBLE, 10)
    rare = int(np.argsort(probs[0])[3])  # a word the model ranks low
    rare = rare if SUGGESTIBLE[rare] else 30
    text = [rare] * 5 + [7, 8, 9] * 3 + [rare]  # typed often, and just now
    echo = params(capacity=16, decay=0.9, recent=0)
    keys, weights = _typed(text, echo)
    got, _ = adapt.top_k(keys, weights, probs, ids, tp, UNK, SUGGESTIBLE, 3, echo.lam, params=echo)
    assert rare in got[0]  # without the recency rule the memory pushes it up
    for recent in (1, 3):
        p = params(capacity=16, decay=0.9, recent=recent)
        keys, weights = _typed(text, p)
        got, shown = adapt.top_k(
            keys, weights, probs, ids, tp, UNK, SUGGESTIBLE, 3, p.lam, params=p
        )
        model_rank = int((probs[0][SUGGESTIBLE] > probs[0, rare]).sum())
        assert rare not in got[0] or list(got[0]).index(rare) >= model_rank
        # Its probability is the model's share, no more.
        target = np.array([rare])
        got_p = adapt.probability(keys, weights, probs, target, UNK, SUGGESTIBLE, p.lam, p)
        assert got_p[0] == pytest.approx((1 - p.lam) * probs[0, rare], rel=1e-5)
    # Three tokens later the mark is gone and the memory raises it again.
    p = params(capacity=16, decay=0.9, recent=3)
    keys, weights = _typed([*text, 7, 8, 9], p)
    got, _ = adapt.top_k(keys, weights, probs, ids, tp, UNK, SUGGESTIBLE, 5, p.lam, params=p)
    assert rare in got[0]


def test_mixing_waits_for_enough_text_then_grows() -> None:
    rng = np.random.default_rng(12)
    probs = model_probs(rng, 1)
    ids, tp = graph_topk(probs, SUGGESTIBLE, 10)
    p = params(capacity=32, decay=1.0, warmup=4.0)
    for n, mixed in ((3, False), (4, False), (6, True)):
        keys, weights = _typed([30, 31, 32, 33, 34, 35][:n], p)
        got_ids, got_p = adapt.top_k(
            keys, weights, probs, ids, tp, UNK, SUGGESTIBLE, 5, p.lam, params=p
        )
        if not mixed:  # the model's own answer, unmixed
            assert (got_ids[0] == ids[0, :5]).all() and (got_p[0] == tp[0, :5]).all()
        else:
            assert not (got_p[0] == tp[0, :5]).all()
    # Half-way (weight 6 of 4..8): half the weight.
    keys, weights = _typed([30, 31, 32, 33, 34, 35], p)
    got = adapt.probability(keys, weights, probs, np.array([5]), UNK, SUGGESTIBLE, p.lam, p)
    assert got[0] == pytest.approx((1 - p.lam / 2) * probs[0, 5], rel=1e-5)


def test_a_pair_the_writer_typed_raises_its_second_word_after_its_first() -> None:
    rng = np.random.default_rng(13)
    probs = model_probs(rng, 2)
    p = params(capacity=64, decay=0.99, window=500, lam=0.1, lam_bigram=0.3, recent=1)
    text = [10, 20, 11, 12, 10, 20, 13, 14, 15, 16]
    keys, weights = _typed(text, p)
    keys, weights = np.repeat(keys, 2, 0), np.repeat(weights, 2, 0)
    last = np.array([10, 11])  # after 10 the writer typed 20 twice; after 11, never
    target = np.array([20, 20])
    got = adapt.probability(keys, weights, probs, target, UNK, SUGGESTIBLE, p.lam, p, last)
    assert got[0] > got[1]
    # After 10: pairs weigh n = w(10 20) twice; lb = 0.3 * n / (n + 1); all of it on 20.
    n = float(weights[0][keys[0] == 2 * (V + p.max_oov) + 10 * (V + p.max_oov) + 20][0])
    lb = 0.3 * n / (n + 1)
    total = float(weights[0][(keys[0] >= 0) & (keys[0] < V + p.max_oov)].sum())
    w20 = float(weights[0][keys[0] == 20][0])
    want = (1 - 0.1 - lb) * probs[0, 20] + 0.1 * w20 / total + lb
    assert got[0] == pytest.approx(want, rel=1e-5)
    # Every word's probability together stays within 1, pairs and all.
    for row in range(2):
        every = np.arange(V)
        k = np.repeat(keys[row : row + 1], V, 0)
        w = np.repeat(weights[row : row + 1], V, 0)
        pr = np.repeat(probs[row : row + 1], V, 0)
        each = adapt.probability(k, w, pr, every, UNK, SUGGESTIBLE, p.lam, p, np.full(V, last[row]))
        assert each[SUGGESTIBLE | (every == UNK)].sum() <= 1.0 + 1e-5


def test_recency_and_pairs_are_counted_the_same_in_any_split() -> None:
    rng = np.random.default_rng(14)
    p = params(capacity=24, decay=0.9, window=60, recent=3, lam_bigram=0.2, max_oov=2)
    tokens = rng.integers(2, 25, size=120)
    whole_k, whole_w = _typed(list(tokens), p)
    for trial in range(4):
        cuts = [0, *sorted(rng.choice(np.arange(1, 120), size=5 + trial, replace=False)), 120]
        keys, weights = adapt.empty_cache(1, p.capacity)
        for a, b in zip(cuts, cuts[1:]):
            ids = np.array([tokens[a:b]], dtype=np.int64)
            new = np.where(SUGGESTIBLE[ids], ids, -1).astype(np.int32)
            before = np.array([tokens[a - 1] if a else 2])
            adapt.update(keys, weights, new, np.array([b - a]), p, V, ids, before)
        assert (keys == whole_k).all() and (weights == whole_w).all()


def test_a_typed_word_takes_only_its_share_of_unk() -> None:
    rng = np.random.default_rng(15)
    probs = model_probs(rng, 1)
    p = params(capacity=8, decay=0.5, oov_share=0.1)
    keys, weights = adapt.empty_cache(1, p.capacity)
    table: list[str] = []
    key = adapt.oov_keys(table, ["Zorblax"], V, keys[0], weights[0], p)[0]
    adapt.update(keys, weights, np.array([[key, 5]], dtype=np.int32), np.array([2]), p)
    got = adapt.probability(keys, weights, probs, np.array([V]), UNK, SUGGESTIBLE, p.lam, p)
    share = weights[0][keys[0] == V][0] / weights[0].sum()
    want = (1 - p.lam) * 0.1 * probs[0, UNK] + p.lam * share
    assert got[0] == pytest.approx(want, rel=1e-5)


def test_old_manifests_load_with_neutral_new_parameters() -> None:
    old = {"lam": 0.05, "decay": 0.995, "window": 919, "capacity": 256, "max_oov": 64}
    p = AdaptParams.from_dict(old)
    assert (p.warmup, p.recent, p.oov_share, p.lam_bigram) == (0.0, 0, 1.0, 0.0)
    with pytest.raises(ValueError):
        params(lam=0.8, lam_bigram=0.3)  # more than all of the mixture


def test_gathered_probabilities_serve_recency_and_pairs_as_the_full_distribution() -> None:
    """The resident (device) path: each row's probabilities at its keys and at <unk> give
    the same answers as the full distribution, with the no-echo rule and pairs on."""
    rng = np.random.default_rng(16)
    p = params(capacity=48, decay=0.95, window=200, lam=0.2, lam_bigram=0.3, recent=2, warmup=3.0)
    batch = 8
    keys, weights = adapt.empty_cache(batch, p.capacity)
    history = rng.integers(3, 15, size=(batch, 40)).astype(np.int64)  # few words: pairs repeat
    before = np.full(batch, 2)
    adapt.update(keys, weights, history.astype(np.int32), np.full(batch, 40), p, V, history, before)
    last = history[:, -1]
    probs = model_probs(rng, batch)
    ids, tp = graph_topk(probs, SUGGESTIBLE, 12)
    at_keys = np.take_along_axis(probs, adapt.gather_ids(keys, V, UNK).astype(np.int64), 1)
    full = adapt.top_k(
        keys, weights, probs, ids, tp, UNK, SUGGESTIBLE, 5, p.lam, params=p, last=last
    )
    gathered = adapt.top_k(
        keys, weights, None, ids, tp, UNK, SUGGESTIBLE, 5, p.lam,
        at_keys=at_keys, params=p, last=last,
    )  # fmt: skip
    np.testing.assert_array_equal(gathered[0], full[0])
    np.testing.assert_allclose(gathered[1], full[1], rtol=1e-6)
    # And each shown probability is the one `probability` gives that word.
    for j in range(5):
        again = adapt.probability(
            keys, weights, probs, full[0][:, j], UNK, SUGGESTIBLE, p.lam, p, last
        )
        np.testing.assert_allclose(full[1][:, j], again, rtol=1e-5)
    # The last word typed is never shown above the model's own rank for it.
    for b in range(batch):
        if last[b] in full[0][b]:
            model_rank = int((probs[b][SUGGESTIBLE] > probs[b, last[b]]).sum())
            assert list(full[0][b]).index(last[b]) >= model_rank
            assert full[1][b][list(full[0][b]).index(last[b])] <= probs[b, last[b]]


def mixture_reference(keys, weights, probs, last, p: AdaptParams) -> tuple[dict, bool]:
    """One row's mixture written out from the module's formulas, slot by slot in plain
    Python: {key: probability} over every suggestible word and every held typed word that
    may be shown, and whether the memory mixes at all (past its warm-up)."""
    words = V + p.max_oov
    held = {int(k): float(w) for k, w in zip(keys, weights) if 0 <= k < words}
    total = sum(held.values())
    ramp = min(max((total - p.warmup) / p.warmup, 0.0), 1.0) if p.warmup else float(total > 0)
    if ramp == 0:
        return {w: float(probs[w]) for w in range(V) if SUGGESTIBLE[w]}, False
    lo = 2 * words + int(last) * words
    pairs = {
        int(k) - lo: float(w) for k, w in zip(keys, weights) if last >= 0 and lo <= k < lo + words
    }
    n = sum(pairs.values())
    lu, lb = p.lam * ramp, p.lam_bigram * ramp * n / (n + 1)
    model = 1 - lu - lb
    oov_total = sum(w for k, w in held.items() if k >= V)
    recent = {int(k) - words for k in keys[: p.recent] if k >= words}

    def share(k: int) -> float:
        return float(probs[k]) if k < V else float(probs[UNK]) * p.oov_share * held[k] / oov_total

    out = {}
    for k in [*range(V), *(k for k in held if k >= V)]:
        if k < V and not SUGGESTIBLE[k]:
            continue
        if k in held and k not in recent:
            out[k] = (
                model * share(k) + lu * held[k] / total + lb * pairs.get(k, 0.0) / max(n, 1e-30)
            )
        elif k < V:  # not held, or typed just now: the model's share only
            out[k] = model * float(probs[k])
    return out, True


@pytest.mark.parametrize("seed", [21, 22, 23])
def test_top_k_and_probability_are_the_written_out_mixture_with_every_feature(seed) -> None:
    """Recency marks, pairs after the last word, typed words' share of <unk> and the warm-up
    ramp together, on memories filled by `update` (evictions and window drops included):
    `top_k` (from the full distribution and from the gathered probabilities) ranks as the
    plain-Python mixture does, and `probability` gives each key that mixture's value."""
    rng = np.random.default_rng(seed)
    p = params(
        capacity=24, decay=0.9, window=40, max_oov=3, lam=0.2, lam_bigram=0.25, recent=2,
        warmup=2.0, oov_share=0.4,
    )  # fmt: skip
    batch, steps = 12, 60
    keys, weights = adapt.empty_cache(batch, p.capacity)
    tables: list[list[str]] = [[] for _ in range(batch)]
    last = np.full(batch, 2, dtype=np.int64)
    for t in range(steps):
        ids = rng.integers(3, 30, size=batch).astype(np.int64)  # few words: pairs repeat
        ids[rng.random(batch) < 0.15] = UNK
        new = np.where(SUGGESTIBLE[ids], ids, -1).astype(np.int32)
        for b in np.flatnonzero(ids == UNK):
            word = f"name{rng.integers(0, 5)}"
            new[b] = adapt.oov_keys(tables[b], [word], V, keys[b], weights[b], p)[0]
        lengths = np.ones(batch, dtype=np.int64)
        lengths[0] = 1 if t < 2 else 0  # row 0 stops before its warm-up ends
        adapt.update(keys, weights, new[:, None], lengths, p, V, ids[:, None], last)
        last = np.where(lengths > 0, ids, last)
    last[1] = -1  # a row that names no last token: no pairs count
    probs = model_probs(rng, batch)
    top, tp = graph_topk(probs, SUGGESTIBLE, 12)
    at_keys = np.take_along_axis(probs, adapt.gather_ids(keys, V, UNK).astype(np.int64), 1)
    live = adapt.live(keys, weights, V, p)
    assert not live[0] and live[1:].all()
    for k in (1, 4, 12):
        full = adapt.top_k(
            keys, weights, probs, top, tp, UNK, SUGGESTIBLE, k, p.lam, params=p, last=last
        )
        gathered = adapt.top_k(
            keys, weights, None, top, tp, UNK, SUGGESTIBLE, k, p.lam, at_keys=at_keys, params=p,
            last=last,
        )  # fmt: skip
        for got_ids, got_p in (full, gathered):
            for b in range(batch):
                mixture, mixed = mixture_reference(keys[b], weights[b], probs[b], last[b], p)
                assert mixed == live[b]
                ranked = sorted(mixture.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
                assert got_ids[b].tolist() == [key for key, _ in ranked]
                np.testing.assert_allclose(got_p[b], [s for _, s in ranked], rtol=1e-5)
    for b in range(batch):
        mixture, mixed = mixture_reference(keys[b], weights[b], probs[b], last[b], p)
        targets = np.array(sorted(mixture))
        rows = np.full(len(targets), b)
        got = adapt.probability(
            keys[rows], weights[rows], probs[rows], targets, UNK, SUGGESTIBLE, p.lam, p, last[rows]
        )
        np.testing.assert_allclose(got, [mixture[t] for t in targets], rtol=1e-5)


def test_a_held_key_at_weight_zero_is_not_an_empty_slot() -> None:
    # A new key takes the lowest empty slot, and only then the least weight, even where a
    # held key weighs 0 before it (a memory kept under other parameters can hold one).
    p = params(capacity=4, decay=1.0, window=5)
    keys = np.array([[5, -1, 7, 8]], dtype=np.int32)
    weights = np.array([[0.0, 0.0, 1.0, 2.0]], dtype=np.float32)
    adapt.update(keys, weights, np.array([[9]], dtype=np.int32), np.array([1]), p)
    # 9 took slot 1; key 5 (below the window's weight, 1) was dropped.
    assert keys[0].tolist() == [-1, 9, 7, 8] and weights[0].tolist() == [0.0, 1.0, 1.0, 2.0]


def test_wide_keys_and_many_pairs_give_the_same_answers(monkeypatch) -> None:
    """int64 keys (the pairs' differences taken in int64), the pairs' slots found a few
    rows at a time, and among the keys as they are rather than as int16, give what int32
    keys and one comparison give."""
    rng = np.random.default_rng(24)
    p = params(capacity=48, decay=0.95, window=200, lam=0.2, lam_bigram=0.3, recent=2)
    batch = 10
    keys, weights = adapt.empty_cache(batch, p.capacity)
    history = rng.integers(3, 12, size=(batch, 60)).astype(np.int64)
    adapt.update(
        keys, weights, history.astype(np.int32), np.full(batch, 60), p, V, history,
        np.full(batch, 2),
    )  # fmt: skip
    last = history[:, -1]
    probs = model_probs(rng, batch)
    top, tp = graph_topk(probs, SUGGESTIBLE, 10)

    def answer(k: np.ndarray) -> tuple:
        return adapt.top_k(
            k, weights, probs, top, tp, UNK, SUGGESTIBLE, 5, p.lam, params=p, last=last
        )

    want = answer(keys)
    monkeypatch.setattr(adapt, "_CHUNK", 2 * p.capacity)  # two pairs a comparison
    for got in (answer(keys), answer(keys.astype(np.int64))):
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
    monkeypatch.setattr(adapt, "_NARROW", 0)  # the keys compared as they are, not as int16
    for got in (answer(keys), answer(keys.astype(np.int64))):
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


def test_count_of_flat_tokens_is_update_of_the_padded_rows() -> None:
    rng = np.random.default_rng(25)
    p = params(capacity=16, decay=0.9, window=60, recent=2, lam_bigram=0.2, max_oov=2)
    batch = 6
    want_k, want_w = adapt.empty_cache(batch, p.capacity)
    got_k, got_w = adapt.empty_cache(batch, p.capacity)
    last = np.full(batch, 2, dtype=np.int64)
    for step in range(12):
        lengths = rng.integers(0, 4, size=batch) if step % 2 else np.ones(batch, dtype=np.int64)
        flat = rng.integers(0, 20, size=int(lengths.sum())).astype(np.int64)
        remembered = np.where(SUGGESTIBLE[flat], flat, -1)
        remembered[flat == UNK] = V  # a typed word's key, as oov_keys gives it
        padded = np.full((batch, max(1, int(lengths.max()))), -1, dtype=np.int64)
        for b, (a, n) in enumerate(zip(np.cumsum(lengths) - lengths, lengths)):
            padded[b, :n] = flat[a : a + n]
        new = np.where(SUGGESTIBLE[np.maximum(padded, 0)] & (padded >= 0), padded, -1)
        new[padded == UNK] = V
        adapt.update(want_k, want_w, new.astype(np.int32), lengths, p, V, padded, last)
        adapt.count(got_k, got_w, flat, lengths, p, SUGGESTIBLE, last, remembered)
        np.testing.assert_array_equal(got_k, want_k)
        np.testing.assert_array_equal(got_w, want_w)
        last = np.where(lengths > 0, padded[np.arange(batch), np.maximum(lengths - 1, 0)], last)
    with pytest.raises(ValueError, match="flat tokens"):
        adapt.count(got_k, got_w, np.arange(3), np.array([1, 1, 0, 0, 0, 0]), p, SUGGESTIBLE)


def test_the_best_k_rank_by_score_then_id_and_pad_short_rows() -> None:
    ids = np.array([[7, 3, 9, 5, -1, 4], [2, 8, -1, -1, -1, -1]], dtype=np.int64)
    scores = np.array(
        [[0.5, 0.25, 0.5, 0.0, -1.0, 0.25], [0.0, 1e-30, -1.0, -1.0, -1.0, -1.0]],
        dtype=np.float32,
    )
    got_ids, got_scores = adapt._best(ids, scores, 4)
    # Ties: the lower id first; a score of 0 is still a candidate; padding last, as -1, 0.
    assert got_ids.tolist() == [[7, 9, 3, 4], [8, 2, -1, -1]]
    assert got_scores.dtype == np.float32
    assert got_scores.tolist() == [[0.5, 0.5, 0.25, 0.25], [np.float32(1e-30), 0.0, 0.0, 0.0]]
    # At most N columns.
    assert adapt._best(ids[:, :2], scores[:, :2], 5)[0].shape == (2, 2)


def test_a_cached_word_among_the_models_first_k_is_one_candidate_at_its_mixed_score() -> None:
    # Row 0's cache holds word 5, which is also the model's second: it is shown once, at
    # its mixed probability (above its model share), and the model's third moves up.
    p = params(lam=0.5)
    keys, weights = adapt.empty_cache(1, p.capacity)
    adapt.update(keys, weights, np.array([[5]]), np.array([1]), p)
    probs = np.zeros((1, V), dtype=np.float32)
    probs[0, [4, 5, 6, 7]] = [0.4, 0.3, 0.2, 0.1]
    topk_ids = np.array([[4, 5, 6, 7]])
    topk_probs = probs[:, [4, 5, 6, 7]]
    ids, got = adapt.top_k(
        keys, weights, probs, topk_ids, topk_probs, UNK, SUGGESTIBLE, 3, p.lam, params=p
    )
    assert ids.tolist() == [[5, 4, 6]]
    np.testing.assert_allclose(got[0], [0.5 * 0.3 + 0.5, 0.5 * 0.4, 0.5 * 0.2], rtol=1e-6)
