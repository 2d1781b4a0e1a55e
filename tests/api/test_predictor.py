"""Predictor on tiny real artifacts: the invariant, batching, sessions, bad input, closing."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.api.predictor import Predictor
from service.config import Settings
from service.contract.artifact import ArtifactError
from service.errors import BadInput, UnknownModel, UnknownSession
from service.store import MemorySessionStore

TEXTS = [
    "I am coming home.",
    "what do you think about the world",
    "she said that he would go there, and then come back",
    "the cat and the dog were at home. it was a good day!",
    "hello world",
    "can you tell me how to find the house",
    "Don't leave now; it's a long way back",
    "i think so",
]
TOL = 1e-4


def settings(models: Path, **overrides: Any) -> Settings:
    return Settings(**{"models_dir": models, "max_wait_ms": 1.0, **overrides})


@pytest.fixture
async def predictor(tiny_artifacts: Path) -> AsyncIterator[Predictor]:
    p = await Predictor.start(settings(tiny_artifacts))
    yield p
    await p.close()


def assert_same(got: list[dict[str, Any]], want: list[dict[str, Any]], tol: float = TOL) -> None:
    """Same words with probabilities within `tol` (words may swap only inside a tie)."""
    assert len(got) == len(want)
    gp = np.array([p["probability"] for p in got])
    wp = np.array([p["probability"] for p in want])
    np.testing.assert_allclose(gp, wp, atol=tol, rtol=0)
    want_prob = {p["word"]: p["probability"] for p in want}
    for i, (g, w) in enumerate(zip(got, want)):
        if g["word"] != w["word"]:
            tied = want_prob.get(g["word"], wp[-1] if i >= len(want) - 2 else -1.0)
            assert abs(tied - g["probability"]) <= 2 * tol, (got, want)


def words_of(text: str) -> list[str]:
    return text.split()


async def feed_in_chunks(
    p: Predictor, text: str, model: str, sizes: list[int], k: int = 10, prefix: str | None = None
) -> dict[str, Any]:
    words = words_of(text)
    session = await p.create_session(model=model, k=k)
    answer = session
    i = 0
    for n in sizes:
        answer = await p.feed(session["session_id"], " ".join(words[i : i + n]), k=k, prefix=prefix)
        i += n
    assert i == len(words)
    return answer


def random_split(n: int, rng: random.Random) -> list[int]:
    sizes = []
    while n > 0:
        sizes.append(min(n, rng.randint(1, 4)))
        n -= sizes[-1]
    return sizes


@pytest.mark.parametrize("model", ["lstm", "gru"])
async def test_feeding_in_any_split_equals_predict(predictor: Predictor, model: str) -> None:
    rng = random.Random(0)
    for text in TEXTS:
        whole = await predictor.predict(text, k=10, model=model)
        n = len(words_of(text))
        for sizes in ([1] * n, random_split(n, rng), random_split(n, rng), [n]):
            answer = await feed_in_chunks(predictor, text, model, sizes)
            assert answer["tokens"] == whole["tokens"]
            assert answer["model"] == whole["model"] == model
            assert_same(answer["predictions"], whole["predictions"])


@pytest.mark.parametrize("model", ["lstm", "gru"])
async def test_prefix_without_new_words_equals_predict(predictor: Predictor, model: str) -> None:
    for text in TEXTS[:4]:
        for prefix in ("th", "W", "zzz"):
            whole = await predictor.predict(text, k=5, model=model, prefix=prefix)
            # Words the prefix starts (case aside: "The" at a sentence start), or
            # corrections one slip away.
            assert all(
                p["word"].lower().startswith(prefix.lower()) or p["corrected"]
                for p in whole["predictions"]
            )
            session = await predictor.create_session(text, model=model)
            got = await predictor.feed(session["session_id"], "", k=5, prefix=prefix)
            assert got["tokens"] == whole["tokens"]
            assert_same(got["predictions"], whole["predictions"])
            # The prefix is not consumed: the context goes on as if it was never asked.
            nxt = await predictor.feed(session["session_id"], "now", k=5)
            want = await predictor.predict(text + " now", model=model)
            assert_same(nxt["predictions"], want["predictions"])


async def test_64_concurrent_sessions_equal_each_alone(predictor: Predictor) -> None:
    rng = random.Random(1)
    vocab = [w for w in predictor.vocabularies["lstm"].tokens[3:] if w.isalpha()]
    texts = [" ".join(rng.choice(vocab) for _ in range(rng.randint(1, 12))) for _ in range(64)]
    alone = [await predictor.predict(t, k=5) for t in texts]

    async def one(text: str) -> dict[str, Any]:
        session = await predictor.create_session(k=5)
        answer = session
        for word in text.split():
            answer = await predictor.feed(session["session_id"], word, k=5)
        return answer

    together = await asyncio.gather(*(one(t) for t in texts))
    for a, b in zip(together, alone):
        assert a["tokens"] == b["tokens"]
        assert_same(a["predictions"], b["predictions"])
    concurrent = await asyncio.gather(*(predictor.predict(t, k=5) for t in texts))
    for a, b in zip(concurrent, alone):
        assert_same(a["predictions"], b["predictions"])


async def test_answers_shapes(predictor: Predictor) -> None:
    answer = await predictor.predict("I am coming home", k=3)
    assert set(answer) == {"model", "tokens", "predictions"}
    assert answer["model"] == predictor.default_model == "lstm"
    assert answer["tokens"] == 4
    assert len(answer["predictions"]) == 3
    vocab = predictor.vocabularies["lstm"]
    for p in answer["predictions"]:
        assert set(p) == {"word", "probability", "corrected"}
        assert isinstance(p["probability"], float) and 0 < p["probability"] <= 1
        assert vocab.suggestible[vocab.index[p["word"]]]  # never specials or punctuation
    session = await predictor.create_session("I am", k=2, model="gru")
    assert set(session) == {"session_id", "model", "tokens", "predictions"}
    assert session["model"] == "gru" and session["tokens"] == 2
    fed = await predictor.feed(session["session_id"], "coming home", k=4)
    assert set(fed) == set(session) and fed["tokens"] == 4 and fed["model"] == "gru"
    assert len(fed["predictions"]) == 4


async def test_models(predictor: Predictor) -> None:
    models = {m["name"]: m for m in predictor.models()}
    assert set(models) == {"lstm", "gru"}
    for name, m in models.items():
        assert m["cell"] == name
        assert {
            "vocab_size",
            "layers",
            "hidden_size",
            "embedding_size",
            "quantization",
            "providers",
            "metrics",
        } <= set(m)
        assert m["providers"][-1] == "CPUExecutionProvider"
    assert predictor.ready


async def test_empty_text_is_the_start_of_a_text(predictor: Predictor) -> None:
    start = await predictor.predict("", k=5)
    assert start["tokens"] == 0 and len(start["predictions"]) == 5
    session = await predictor.create_session(k=5)
    assert session["tokens"] == 0
    assert_same(session["predictions"], start["predictions"])
    # Text without tokens (emoji, control characters) is an empty text too.
    odd = await predictor.predict("\U0001f600 \x00\x07\u200b", k=5)
    assert odd["tokens"] == 0
    assert_same(odd["predictions"], start["predictions"])
    fed = await predictor.feed(session["session_id"], "\U0001f600", k=5)
    assert fed["tokens"] == 0
    assert_same(fed["predictions"], start["predictions"])
    # An explicit start of sentence ("." ends one) is a token like any other.
    assert (await predictor.predict(". hello", k=5))["tokens"] == 2


async def test_reset_session_info_and_delete(predictor: Predictor) -> None:
    session = await predictor.create_session("I am coming", k=5)
    sid = session["session_id"]
    info = await predictor.session_info(sid)
    assert info["session_id"] == sid and info["model"] == "lstm" and info["tokens"] == 3
    created = datetime.fromisoformat(info["created_at"])
    assert created.utcoffset() is not None and created.utcoffset().total_seconds() == 0
    reset = await predictor.reset(sid, k=5)
    assert reset["tokens"] == 0
    assert_same(reset["predictions"], (await predictor.predict("", k=5))["predictions"])
    after = await predictor.feed(sid, "hello world", k=5)
    assert_same(after["predictions"], (await predictor.predict("hello world", k=5))["predictions"])
    info2 = await predictor.session_info(sid)
    assert info2["created_at"] == info["created_at"] and info2["tokens"] == 2
    assert info2["last_used_at"] >= info["last_used_at"]
    await predictor.delete_session(sid)
    for call in (
        predictor.feed(sid, "x"),
        predictor.reset(sid),
        predictor.session_info(sid),
        predictor.delete_session(sid),
    ):
        with pytest.raises(UnknownSession):
            await call


async def test_unknown_and_malformed_session_ids(predictor: Predictor) -> None:
    for sid in ("nope", "", "x" * 10_000, None, 5):
        with pytest.raises(UnknownSession):
            await predictor.feed(sid, "hello")  # type: ignore[arg-type]
        with pytest.raises(UnknownSession):
            await predictor.session_info(sid)  # type: ignore[arg-type]


async def test_bad_input_is_refused(predictor: Predictor) -> None:
    sid = (await predictor.create_session())["session_id"]
    for k in (0, 51, 1000, -1, True, "5", 2.0, None):
        with pytest.raises(BadInput):
            await predictor.predict("hello", k=k)  # type: ignore[arg-type]
        with pytest.raises(BadInput):
            await predictor.feed(sid, "hello", k=k)  # type: ignore[arg-type]
    with pytest.raises(BadInput):
        await predictor.predict("a" * 10_001)
    with pytest.raises(BadInput):
        await predictor.predict("word " * 2_000 + "more " * 100)  # 2,100 tokens
    with pytest.raises(BadInput):
        await predictor.create_session("x" * 2_000_000)
    with pytest.raises(BadInput):
        await predictor.feed(sid, "x" * 2_000_000)
    for text in (None, 5, ["a"], b"bytes"):
        with pytest.raises(BadInput):
            await predictor.predict(text)  # type: ignore[arg-type]
        with pytest.raises(BadInput):
            await predictor.feed(sid, text)  # type: ignore[arg-type]
    with pytest.raises(BadInput):
        await predictor.predict("hello", prefix="p" * 65)
    with pytest.raises(BadInput):
        await predictor.predict("hello", prefix=5)  # type: ignore[arg-type]
    for model in ("nope", "", 5, "../lstm"):
        with pytest.raises(UnknownModel):
            await predictor.predict("hello", model=model)  # type: ignore[arg-type]
        with pytest.raises(UnknownModel):
            await predictor.create_session(model=model)  # type: ignore[arg-type]
    # Nothing of this harmed the session.
    assert (await predictor.session_info(sid))["tokens"] == 0
    assert (await predictor.feed(sid, "hello", k=50))["tokens"] == 1


async def test_k_above_the_model_limit_returns_what_there_is(predictor: Predictor) -> None:
    answer = await predictor.predict("hello", k=50, prefix="w")
    words = [p["word"] for p in answer["predictions"]]
    assert words and len(words) == len(set(words)) <= 50
    assert all(w.startswith("w") for w in words)


async def test_idle_sessions_expire_and_lru_cap(tiny_artifacts: Path) -> None:
    p = await Predictor.start(settings(tiny_artifacts, session_ttl_s=60, session_cap=2))
    try:
        store = p.engine.core.store
        assert isinstance(store, MemorySessionStore)
        now = [100.0]
        store.clock = lambda: now[0]
        a = (await p.create_session("hello"))["session_id"]
        b = (await p.create_session("hello", model="gru"))["session_id"]
        now[0] += 30
        await p.feed(a, "world")  # a used again: b is now the least recently used
        c = (await p.create_session())["session_id"]
        with pytest.raises(UnknownSession):
            await p.feed(b, "world")  # evicted
        now[0] += 61
        for sid in (a, c):
            with pytest.raises(UnknownSession):
                await p.feed(sid, "world")  # expired
        assert store.evictions == 1 and store.expirations == 2
    finally:
        await p.close()


async def test_close_finishes_steps_in_flight(tiny_artifacts: Path) -> None:
    p = await Predictor.start(settings(tiny_artifacts, max_wait_ms=20.0))
    sid = (await p.create_session())["session_id"]
    feeds = [asyncio.ensure_future(p.predict(t)) for t in TEXTS]
    feeds.append(asyncio.ensure_future(p.feed(sid, "hello world")))
    await asyncio.sleep(0)
    await p.close()
    answers = await asyncio.gather(*feeds)
    assert answers[-1]["tokens"] == 2
    assert not p.ready


async def test_check_ready(predictor: Predictor) -> None:
    await predictor.check_ready()


async def test_start_refuses_a_missing_default_model(tiny_artifacts: Path, tmp_path: Path) -> None:
    with pytest.raises(ArtifactError):
        await Predictor.start(settings(tiny_artifacts, default_model="nope"))
    with pytest.raises(ArtifactError):
        await Predictor.start(settings(tmp_path))  # no artifacts at all
    with pytest.raises(ArtifactError):
        await Predictor.start(settings(tmp_path / "missing"))


async def test_words_are_returned_in_their_display_form(tmp_path: Path) -> None:
    import torch

    from model_export.export import export_artifact
    from model_export.model import RNNLM, ModelConfig
    from service.contract.vocab import Vocabulary
    from tests.conftest import tiny_vocab_tokens

    vocab = Vocabulary(tiny_vocab_tokens())
    torch.manual_seed(3)
    model = RNNLM(ModelConfig(len(vocab), "gru", 8, 8, 1, 0.0))
    export_artifact(model, vocab, tmp_path / "lstm", display_forms={"i": "I", "i'm": "I'm"})
    p = await Predictor.start(settings(tmp_path))
    try:
        result = await p.predict("well", k=50, prefix="i")
        words = {w["word"] for w in result["predictions"]}
        assert {"I", "I'm", "if", "in", "is", "it"} <= words
        assert "i" not in words
        prefixed = await p.predict("well", k=50, prefix="I'")
        clean = [w["word"] for w in prefixed["predictions"] if not w["corrected"]]
        assert clean == ["I'm"]  # (and corrections: "It's", a letter missing)
    finally:
        await p.close()


def test_short_texts_tokenize_from_the_cache_exactly_as_uncached(tiny_artifacts: Path) -> None:
    from service.api.predictor import CACHED_TEXT_CHARS
    from service.contract.artifact import ModelArtifact

    vocab = ModelArtifact.load(tiny_artifacts / "lstm").vocab
    p = Predictor(settings(tiny_artifacts), engine=None, vocabularies={"lstm": vocab})  # type: ignore[arg-type]
    texts = [
        *TEXTS,
        "",
        "the",
        "The",
        "Zyzzx qwrtp",
        "Zyzzx",
        "well-known",
        "x" * CACHED_TEXT_CHARS,
    ]
    for text in texts + texts:  # the second pass answers from the cache
        assert p._tokens(vocab, text) == vocab.encode_typed(text), text
    ids, typed = p._tokens(vocab, "Zyzzx")
    assert typed == ["Zyzzx"]  # a word outside the vocabulary keeps its typed form
    ids.append(1)
    typed.append("changed")  # a caller changing its answer does not change the next one
    assert p._tokens(vocab, "Zyzzx") == vocab.encode_typed("Zyzzx")


def test_answer_words_from_the_cache_are_written_as_uncached() -> None:
    from service.contract.casing import at_sentence_start, display_form, written_form
    from service.contract.protocol import EngineOutput
    from service.contract.vocab import Vocabulary
    from tests.conftest import tiny_vocab_tokens

    vocab = Vocabulary(tiny_vocab_tokens())
    vocab.set_display_forms({"i": "I", "house": "House"})
    vocab.set_pair_forms({("the", "house"): "house", ("big", "dog"): "Dog"})
    idx = vocab.index
    predictor = Predictor(Settings(default_model="tiny"), None, {"tiny": vocab})  # type: ignore[arg-type]
    words = [idx[w] for w in ("i", "house", "dog", "the", "if", "in")]
    size = len(vocab)
    for last in (idx["the"], idx["big"], idx["well"], vocab.eos_id, -1):
        for tokens in (0, 7):
            for typed in ("", "i", "I", "IN", "do", "Do", "ho"):
                # A prefix's answer: ids past the vocabulary are the writer's own words.
                prefix = Predictor._prefix(vocab, typed)
                ids = [*words, size]
                output = EngineOutput(
                    1,
                    ids=ids,
                    probs=[0.1] * len(ids),
                    tokens=tokens,
                    last_token=last,
                    words=["Zyzzx"],
                )
                start = at_sentence_start(last, vocab.eos_id, tokens)
                expected = [
                    written_form(
                        display_form(vocab, i, last) if i < size else "Zyzzx", start, typed
                    )
                    for i in ids
                ]
                for _ in range(2):  # the second answers from the cache
                    got = predictor._predictions(vocab, output, prefix)
                    assert [w["word"] for w in got] == expected, (last, tokens, typed)
    # The pair form is the one written after its word, and only there.
    after = {
        last: [
            w["word"]
            for w in predictor._predictions(
                vocab,
                EngineOutput(
                    1, ids=[idx["house"], idx["dog"]], probs=[0.5, 0.4], tokens=3, last_token=last
                ),
            )
        ]
        for last in (idx["the"], idx["big"], idx["well"])
    }
    assert after == {
        idx["the"]: ["house", "dog"],
        idx["big"]: ["House", "Dog"],
        idx["well"]: ["House", "dog"],
    }
