"""Vocabulary: token <-> id, and the sorted index used for prefix completion."""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from service.contract.tokenizer import (
    EOS,
    PAD,
    SPECIALS,
    UNK,
    is_word,
    normalize,
    tokenize,
    typed_forms,
)

BLOCKLIST_FILE = Path(__file__).with_name("blocklist.txt")


def _read_blocklist(path: Path = BLOCKLIST_FILE) -> frozenset[str]:
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    return frozenset(ln.strip() for ln in lines if ln.strip() and not ln.startswith("#"))


# Offensive words a keyboard must not suggest (the model still reads them as context).
BLOCKED = _read_blocklist()


class Vocabulary:
    """Token list whose index is the id; specials first (`<pad>`, `<unk>`, `</s>`)."""

    def __init__(self, tokens: Sequence[str]) -> None:
        if list(tokens[: len(SPECIALS)]) != list(SPECIALS):
            raise ValueError(f"vocabulary must start with {SPECIALS}")
        self.tokens: list[str] = list(tokens)
        self.index: dict[str, int] = {tok: i for i, tok in enumerate(self.tokens)}
        if len(self.index) != len(self.tokens):
            raise ValueError("vocabulary has duplicate tokens")
        self.pad_id = self.index[PAD]
        self.unk_id = self.index[UNK]
        self.eos_id = self.index[EOS]
        # Prefix completion: suggestible words in sorted order, so the words that
        # start with a prefix are one contiguous slice found by two bisections.
        words = sorted(
            (tok, i) for i, tok in enumerate(self.tokens) if is_word(tok) and tok not in BLOCKED
        )
        self._sorted_words = [w for w, _ in words]
        self._sorted_ids = np.array([i for _, i in words], dtype=np.int64)
        self.suggestible = np.zeros(len(self.tokens), dtype=bool)
        self.suggestible[self._sorted_ids] = True
        # How each word is shown to a user ("i" -> "I"); the token itself by default.
        self.display: list[str] = list(self.tokens)
        # How a word is shown right after a given word, where that differs from `display`
        # ("united" then "kingdom" -> "Kingdom"): {(previous id, id): form}.
        self.pair_display: dict[tuple[int, int], str] = {}

    def set_display_forms(self, forms: dict[str, str]) -> None:
        """Show these tokens as given (each form must lower-case to its token)."""
        for token, form in forms.items():
            if token in self.index and normalize(form) == token:
                self.display[self.index[token]] = form

    def set_pair_forms(self, forms: dict[tuple[str, str], str]) -> None:
        """Show a token as given right after a previous token (both in the vocabulary; each
        form must lower-case to its token); other pairs are ignored."""
        for (previous, token), form in forms.items():
            if previous in self.index and token in self.index and normalize(form) == token:
                self.pair_display[self.index[previous], self.index[token]] = form

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> list[int]:
        """Tokenize a text and map each token to its id (`<unk>` when unknown)."""
        return self.encode_tokens(tokenize(text))

    def encode_typed(self, text: str) -> tuple[list[int], list[str]]:
        """`encode(text)`, and the typed form of each `<unk>` in order ("" for a blocked
        word: it is never remembered, so never suggested)."""
        tokens = tokenize(text)
        ids = self.encode_tokens(tokens)
        unk = self.unk_id
        unknown = [i for i, token_id in enumerate(ids) if token_id == unk]
        if not unknown:
            return ids, []
        forms = typed_forms(text, tokens)
        typed = [forms[i] if tokens[i] not in BLOCKED else "" for i in unknown]
        return ids, typed

    def encode_tokens(self, tokens: Iterable[str]) -> list[int]:
        """Map tokens to ids (`<unk>` when unknown)."""
        unk = self.unk_id
        return [self.index.get(tok, unk) for tok in tokens]

    def ids_with_prefix(self, prefix: str) -> np.ndarray:
        """Ids of the suggestible words starting with `prefix` (case-insensitive)."""
        key = normalize(prefix)
        lo = bisect.bisect_left(self._sorted_words, key)
        hi = bisect.bisect_left(self._sorted_words, key + "\U0010ffff")
        return self._sorted_ids[lo:hi]

    def save(self, path: Path) -> None:
        """Write one token per line; the id is the line number."""
        path.write_text("".join(tok + "\n" for tok in self.tokens), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> Vocabulary:
        """Read a vocab.txt written by `save`."""
        text = path.read_text(encoding="utf-8")
        if not text.endswith("\n"):
            raise ValueError(f"{path}: truncated (no final newline)")
        return cls(text[:-1].split("\n"))
