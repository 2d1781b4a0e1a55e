"""The one word-level tokenizer shared by training, evaluation and the service.

Chosen for typing suggestions: text is NFKC-normalised and lower-cased (a keyboard
capitalises on its own), words keep inner apostrophes and hyphens ("don't",
"well-known"), commas/semicolons/colons are tokens of their own, a run of sentence
punctuation (``.``, ``!``, ``?``) becomes the end-of-sentence token, and everything
else (quotes, brackets, emoji, control characters) separates words and is dropped.

Tokens never span whitespace, so a text split at any word boundary tokenizes to the
same tokens as the whole text.
"""

from __future__ import annotations

import re
import unicodedata

UNK = "<unk>"
EOS = "</s>"
PAD = "<pad>"
SPECIALS = (PAD, UNK, EOS)

# Longest word kept whole; longer runs of letters are cut (they are never in a
# vocabulary, and this bounds the work a hostile input can cause).
MAX_WORD_CHARS = 64

_TOKEN = re.compile(
    r"(?P<word>[^\W_]+(?:['\u2019\-][^\W_]+)*)"
    r"|(?P<eos>[.!?\u2026]+)"
    r"|(?P<punct>[,;:])"
)


def normalize(text: str) -> str:
    """NFKC-normalise and lower-case a text (curly apostrophes become straight)."""
    return unicodedata.normalize("NFKC", text).lower().replace("\u2019", "'")


def tokenize(text: str) -> list[str]:
    """Split a text into word, punctuation and end-of-sentence tokens."""
    tokens: list[str] = []
    for match in _TOKEN.finditer(normalize(text)):
        kind = match.lastgroup
        if kind == "word":
            tokens.append(match.group()[:MAX_WORD_CHARS])
        elif kind == "eos":
            tokens.append(EOS)
        else:
            tokens.append(match.group())
    return tokens


def typed_forms(text: str, tokens: list[str]) -> list[str]:
    """Each of `tokenize(text)`'s tokens as it was typed (NFKC, case kept): how a word the
    vocabulary lacks is shown back to its writer. Where lower-casing splits a typed word
    differently (a rare letter whose lower case is two characters), its pieces are kept
    as tokens."""
    cased = unicodedata.normalize("NFKC", text).replace("\u2019", "'")
    forms: list[str] = []
    for match in _TOKEN.finditer(cased):
        pieces = tokenize(match.group())
        if len(pieces) == 1 and match.lastgroup == "word":
            form = match.group()[:MAX_WORD_CHARS]
            forms.append(form if form.lower() == pieces[0] else pieces[0])
        else:
            forms.extend(pieces)
    return forms if len(forms) == len(tokens) else list(tokens)


def is_word(token: str) -> bool:
    """True for a token a keyboard may suggest: not special, holds a letter or digit."""
    return token not in SPECIALS and any(ch.isalnum() for ch in token)
