"""The shared tokenizer: word-boundary invariance and robustness."""

from __future__ import annotations

import random

import pytest

from service.contract.tokenizer import EOS, MAX_WORD_CHARS, is_word, tokenize
from service.contract.vocab import Vocabulary
from tests.conftest import tiny_vocab_tokens

TEXTS = [
    "I am coming home. Don't wait for me, it's late!",
    "The well-known cat sat on the mat; then: nothing?!",
    "Hello   world\n\nnew paragraph\tand tabs",
    "Numbers 1,000 and 3.14 and 42 stay words.",
    "Curly \u2019quotes\u2019 and \u201cdouble\u201d ones\u2026 done",
]


def test_basic_tokens() -> None:
    assert tokenize("I am coming home. Don't!") == ["i", "am", "coming", "home", EOS, "don't", EOS]
    assert tokenize("well-known, yes; no: maybe?") == [
        "well-known",
        ",",
        "yes",
        ";",
        "no",
        ":",
        "maybe",
        EOS,
    ]
    assert tokenize("It\u2019s") == ["it's"]


@pytest.mark.parametrize("text", TEXTS)
def test_split_at_any_word_boundary_gives_the_same_ids(text: str) -> None:
    vocab = Vocabulary(tiny_vocab_tokens())
    whole = vocab.encode(text)
    words = text.split(" ")
    for cut in range(1, len(words)):
        left, right = " ".join(words[:cut]), " ".join(words[cut:])
        assert vocab.encode(left) + vocab.encode(right) == whole


def test_random_chunkings_give_the_same_tokens() -> None:
    rng = random.Random(7)
    text = " ".join(TEXTS)
    words = text.split()
    for _ in range(50):
        chunks, i = [], 0
        while i < len(words):
            n = rng.randint(1, 5)
            chunks.append(" ".join(words[i : i + n]))
            i += n
        assert [t for c in chunks for t in tokenize(c)] == tokenize(" ".join(words))


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "\x00\x01\x02\x7f",
        "\u200b\u200d",
        "\U0001f600\U0001f44d\U0001f3fd",
        "a\U0001f600b",
        "x" * 10_000,
        ("word " * 2000),
        "\ud800".encode("utf-8", "surrogatepass").decode("utf-8", "replace"),
        "\u0301\u0301",
        "\uffff\ufffe",
        "Ⅻ ﬁ ＡＢＣ",
    ],
)
def test_odd_inputs_never_raise(text: str) -> None:
    tokens = tokenize(text)
    assert all(len(t) <= MAX_WORD_CHARS for t in tokens)
    Vocabulary(tiny_vocab_tokens()).encode(text)


def test_emoji_and_control_characters_separate_words() -> None:
    assert tokenize("cat\U0001f600dog") == ["cat", "dog"]
    assert tokenize("cat\x00dog") == ["cat", "dog"]
    assert tokenize("") == []


def test_is_word() -> None:
    assert is_word("home") and is_word("don't") and is_word("42")
    assert not is_word(",") and not is_word(EOS) and not is_word("<unk>")


def test_prefix_index() -> None:
    vocab = Vocabulary(tiny_vocab_tokens())
    words = sorted(vocab.tokens[i] for i in vocab.ids_with_prefix("wh"))
    assert words == sorted(t for t in vocab.tokens if t.startswith("wh"))
    assert [vocab.tokens[i] for i in vocab.ids_with_prefix("HOM")] == ["home"]
    assert len(vocab.ids_with_prefix("zzz")) == 0
    assert len(vocab.ids_with_prefix("")) == int(vocab.suggestible.sum())


def test_offensive_words_are_never_suggestible() -> None:
    vocab = Vocabulary([*tiny_vocab_tokens(), "fuck", "fucking", "full"])
    assert not vocab.suggestible[vocab.index["fucking"]]
    assert vocab.suggestible[vocab.index["full"]]
    assert [vocab.tokens[i] for i in vocab.ids_with_prefix("fu")] == ["full"]
    assert vocab.encode("fucking hell")[0] == vocab.index["fucking"]  # still read as context
