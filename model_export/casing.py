"""Display forms: how a keyboard should show a lower-cased vocabulary word ("i" -> "I").

The model works on lower-cased tokens. From the cased training text we count the
forms of each word where case carries meaning (not at the start of a sentence) and
keep the most common one when it is not the lower-case form and clearly dominates; a
word with no such form is written as an acronym ("NASA", "TV") when its capitals
dominate (lines in capitals not counted).
"""

from __future__ import annotations

import unicodedata
from collections import Counter, defaultdict

from tqdm import tqdm

from model_export.corpora import documents
from service.contract.tokenizer import _TOKEN
from service.contract.vocab import Vocabulary

# Published lower-cased: they say nothing about case.
LOWER_CASED_CORPORA = {"movie_reviews"}


def _title_case(words: list[str]) -> bool:
    """A headline or heading: most of its words start upper-case."""
    return len(words) >= 3 and sum(w[:1].isupper() for w in words) > 0.6 * len(words)


def _shouting(words: list[str]) -> bool:
    """A line in capitals: half its words or more are."""
    return len(words) >= 2 and sum(w.isupper() for w in words) >= 0.5 * len(words)


def _acronym(form: str) -> bool:
    """Two or more letters, all capitals ("NASA", "TV", "CO2")."""
    return form.isupper() and sum(ch.isalpha() for ch in form) >= 2


def display_forms(
    corpora: list[str],
    vocab: Vocabulary,
    nltk_data: str | None = None,
    min_share: float = 0.8,
    min_count: int = 5,
) -> dict[str, str]:
    """{token: display form} for the vocabulary words usually written otherwise than lower-case.

    Mixed-case forms ("Paris", "iPod") and "I" are counted outside sentence starts; an
    acronym ("NASA") is kept for a word that has no such form when its capitals, counted
    outside sentence starts and lines in capitals, are `min_share` of all its forms there.
    """
    forms: dict[str, Counter[str]] = defaultdict(Counter)
    caps: dict[str, Counter[str]] = defaultdict(Counter)  # acronym forms ("": any other)
    wanted = set(vocab.tokens)
    for spec in corpora:
        if spec in LOWER_CASED_CORPORA:
            continue
        for doc in tqdm(documents(spec, nltk_data), desc=f"casing {spec}", unit="doc", leave=False):
            for line in doc.lines:
                matches = list(_TOKEN.finditer(unicodedata.normalize("NFKC", line)))
                words = [m.group() for m in matches if m.lastgroup == "word"]
                if _title_case(words):
                    continue
                shouting = _shouting(words)
                sentence_start = True
                for match in matches:
                    if match.lastgroup != "word":
                        sentence_start = match.lastgroup == "eos" or match.group() == ":"
                        continue
                    form = match.group().replace("\u2019", "'")
                    token = form.lower()
                    if token in wanted:
                        if not sentence_start and not form.isupper() or form == "I":
                            forms[token][form] += 1
                        if not sentence_start and not shouting:
                            caps[token][form if _acronym(form) else ""] += 1
                    sentence_start = False
    result = {}
    for token, counts in forms.items():
        form, n = counts.most_common(1)[0]
        total = sum(counts.values())
        if form != token and n >= min_count and n / total >= min_share:
            result[token] = form
    for token, counts in caps.items():
        upper = Counter({f: n for f, n in counts.items() if f})
        if token in result or not upper:
            continue
        form, n = upper.most_common(1)[0]
        if n >= min_count and n / sum(counts.values()) >= min_share:
            result[token] = form
    return result
