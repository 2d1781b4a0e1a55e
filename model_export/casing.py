"""Display forms: how a keyboard should show a lower-cased vocabulary word ("i" -> "I").

The model works on lower-cased tokens. From the cased training text we count the
forms of each word where case carries meaning (not at the start of a sentence) and
keep the most common one when it is not the lower-case form and clearly dominates; a
word with no such form is written as an acronym ("NASA", "TV") when its capitals
dominate (lines in capitals not counted).

Some words are written differently after a given word ("united kingdom" -> "Kingdom",
"new jersey" -> "Jersey", while "kingdom" alone stays lower-case): `pair_forms` counts the
forms of each word after each previous word and keeps those frequent pairs whose usual
form clearly differs from the word's own display form (`display_pairs.tsv`).
"""

from __future__ import annotations

import json
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from model_export.corpora import documents, split_of
from service.contract.artifact import (
    DISPLAY_FILE,
    MANIFEST_FILE,
    PAIR_DISPLAY_FILE,
    ModelArtifact,
    write_display_forms,
    write_manifest,
    write_pair_forms,
)
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


@dataclass
class FormCounts:
    """How often each vocabulary word was written in each form, counted once over the
    cased corpora (headlines and lower-cased corpora skipped)."""

    # token -> mixed-case forms and "I", outside sentence starts
    forms: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    # token -> acronym forms ("": any other), outside sentence starts and lines in capitals
    caps: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    # (previous token, token) -> every form of the token right after that word, outside
    # sentence starts and lines in capitals
    pairs: dict[tuple[str, str], Counter[str]] = field(default_factory=lambda: defaultdict(Counter))


def count_forms(
    corpora: list[str],
    vocab: Vocabulary,
    nltk_data: str | None = None,
    split: str | None = "train",
) -> FormCounts:
    """Count the written forms of the vocabulary's words in the cased corpora's documents of
    `split` (by default those `nextword train` trains on, so that validation and test text
    stays held out for `nextword evaluate --keyboard`; None: every document).

    A pair is counted only where the previous token is a vocabulary word right before the
    word (no punctuation between): what the service sees as the last token of a context.
    """
    counts = FormCounts()
    wanted = set(vocab.tokens)
    for spec in corpora:
        if spec in LOWER_CASED_CORPORA:
            continue
        for doc in tqdm(documents(spec, nltk_data), desc=f"casing {spec}", unit="doc", leave=False):
            if split is not None and split_of(doc.name) != split:
                continue
            for line in doc.lines:
                matches = list(_TOKEN.finditer(unicodedata.normalize("NFKC", line)))
                words = [m.group() for m in matches if m.lastgroup == "word"]
                if _title_case(words):
                    continue
                shouting = _shouting(words)
                sentence_start = True
                previous: str | None = None
                for match in matches:
                    if match.lastgroup != "word":
                        sentence_start = match.lastgroup == "eos" or match.group() == ":"
                        previous = None
                        continue
                    form = match.group().replace("\u2019", "'")
                    token = form.lower()
                    if token in wanted:
                        if not sentence_start and not form.isupper() or form == "I":
                            counts.forms[token][form] += 1
                        if not sentence_start and not shouting:
                            counts.caps[token][form if _acronym(form) else ""] += 1
                            if previous is not None:
                                counts.pairs[previous, token][form] += 1
                    sentence_start = False
                    previous = token if token in wanted else None
    return counts


def display_forms(
    corpora: list[str],
    vocab: Vocabulary,
    nltk_data: str | None = None,
    min_share: float = 0.8,
    min_count: int = 5,
    counts: FormCounts | None = None,
) -> dict[str, str]:
    """{token: display form} for the vocabulary words usually written otherwise than lower-case.

    Mixed-case forms ("Paris", "iPod") and "I" are counted outside sentence starts; an
    acronym ("NASA") is kept for a word that has no such form when its capitals, counted
    outside sentence starts and lines in capitals, are `min_share` of all its forms there.
    `counts` (from `count_forms`) saves reading the corpora again.
    """
    if counts is None:
        counts = count_forms(corpora, vocab, nltk_data)
    result = {}
    for token, forms in counts.forms.items():
        form, n = forms.most_common(1)[0]
        total = sum(forms.values())
        if form != token and n >= min_count and n / total >= min_share:
            result[token] = form
    for token, caps in counts.caps.items():
        upper = Counter({f: n for f, n in caps.items() if f})
        if token in result or not upper:
            continue
        form, n = upper.most_common(1)[0]
        if n >= min_count and n / sum(caps.values()) >= min_share:
            result[token] = form
    return result


def pair_forms(
    corpora: list[str],
    vocab: Vocabulary,
    nltk_data: str | None = None,
    min_share: float = 0.8,
    min_count: int = 5,
    counts: FormCounts | None = None,
    display: dict[str, str] | None = None,
) -> dict[tuple[str, str], str]:
    """{(previous token, token): form} where a word is written otherwise after that word.

    A pair is kept when it occurs `min_count` times or more (outside sentence starts and
    lines in capitals), its most common form makes `min_share` of them, and that form is
    not the word's own display form (`display`, by default `display_forms` of the same
    counts): "united kingdom" -> "Kingdom" although "kingdom" is shown lower-case, and
    "the bush" -> "bush" although "Bush" is a name.
    """
    if counts is None:
        counts = count_forms(corpora, vocab, nltk_data)
    if display is None:
        display = display_forms(corpora, vocab, min_share=min_share, counts=counts)
    result = {}
    for (previous, token), forms in counts.pairs.items():
        form, n = forms.most_common(1)[0]
        if (
            form != display.get(token, token)
            and n >= min_count
            and n / sum(forms.values()) >= min_share
        ):
            result[previous, token] = form
    return result


def casing_tables(
    corpora: list[str],
    vocab: Vocabulary,
    nltk_data: str | None = None,
    split: str | None = "train",
) -> tuple[dict[str, str], dict[tuple[str, str], str]]:
    """`display_forms` and `pair_forms` of a vocabulary, the corpora (`split` of them, see
    `count_forms`) read once."""
    counts = count_forms(corpora, vocab, nltk_data, split)
    display = display_forms(corpora, vocab, counts=counts)
    return display, pair_forms(corpora, vocab, counts=counts, display=display)


def write_casing(
    artifact_dir: Path | str,
    corpora: list[str] | None = None,
    nltk_data: str | None = None,
    split: str | None = "train",
) -> dict[str, int]:
    """(Re)write an artifact's display.tsv and display_pairs.tsv from cased corpora (by
    default the training split of the corpora its manifest names; `split` as in
    `count_forms`) and update its manifest's hashes.

    The artifact is loaded (and so verified) first; returns how many forms each table holds.
    """
    artifact = ModelArtifact.load(artifact_dir)
    path = artifact.path
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    training = manifest.get("training", {})
    if corpora is None:
        corpora = [c["name"] for c in training.get("corpora", [])]
    if not corpora:
        raise ValueError(f"{path}: no corpora given and its manifest names none")
    display, pairs = casing_tables(corpora, artifact.vocab, nltk_data, split)
    files = dict(manifest["files"])
    for name in (DISPLAY_FILE, PAIR_DISPLAY_FILE):  # an empty table is no file
        files.pop(name, None)
        (path / name).unlink(missing_ok=True)
    if display:
        write_display_forms(path / DISPLAY_FILE, display)
        files[DISPLAY_FILE] = {}
    if pairs:
        write_pair_forms(path / PAIR_DISPLAY_FILE, pairs)
        files[PAIR_DISPLAY_FILE] = {}
    manifest["files"] = files
    write_manifest(path, manifest)
    ModelArtifact.load(path)  # the manifest agrees with what was written
    return {DISPLAY_FILE: len(display), PAIR_DISPLAY_FILE: len(pairs)}


def agreement(documents: list[tuple[str, list[str]]], vocab: Vocabulary) -> dict[str, float]:
    """How often the vocabulary's display forms write held-out words as their writer did.

    Over the vocabulary words of the documents' lines that are not at a sentence start
    (where the service capitalises anyway) nor in headlines or lines in capitals: the share
    written exactly as the word's own display form shows it (`own`), and as the form after
    its previous word shows it (`with_pairs`: what the service shows), and their count.
    """
    own = pairs = words = 0
    for _, lines in documents:
        for line in lines:
            matches = list(_TOKEN.finditer(unicodedata.normalize("NFKC", line)))
            written = [m.group() for m in matches if m.lastgroup == "word"]
            if _title_case(written) or _shouting(written):
                continue
            sentence_start, previous = True, -1
            for match in matches:
                if match.lastgroup != "word":
                    sentence_start = match.lastgroup == "eos" or match.group() == ":"
                    previous = -1
                    continue
                form = match.group().replace("\u2019", "'")
                token_id = vocab.index.get(form.lower(), -1)
                if token_id >= 0 and not sentence_start:
                    words += 1
                    own += vocab.display[token_id] == form
                    shown = vocab.pair_display.get((previous, token_id), vocab.display[token_id])
                    pairs += shown == form
                sentence_start, previous = False, token_id
    return {"words": words, "own": own / max(words, 1), "with_pairs": pairs / max(words, 1)}
