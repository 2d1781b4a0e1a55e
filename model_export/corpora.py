"""Corpora as token streams: NLTK corpora by name, text files or folders by path.

A corpus is cut into documents (a file, or a block of lines of a long file); each
document goes whole into train, validation or test by a hash of its name, so the
split is deterministic and no document leaks across it. Each line ends a sentence.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from service.contract.tokenizer import EOS, tokenize

NLTK_CORPORA = {
    # name: licence as stated by NLTK's package index
    "brown": "non-commercial use",
    "movie_reviews": "CC BY 4.0",
    "abc": "not stated",
    "state_union": "public domain",
    "webtext": "not stated",
    "inaugural": "public domain",
}
LINES_PER_DOCUMENT = 200
SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class Document:
    """A named run of lines from one corpus."""

    name: str
    lines: list[str]


def split_of(name: str, valid_pct: int = 5, test_pct: int = 5) -> str:
    """Deterministic split of a document by a hash of its name."""
    bucket = int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) % 100
    if bucket < test_pct:
        return "test"
    if bucket < test_pct + valid_pct:
        return "valid"
    return "train"


def line_tokens(line: str) -> list[str]:
    """Tokens of one line, closed by an end-of-sentence token."""
    tokens = tokenize(line)
    if tokens and tokens[-1] != EOS:
        tokens.append(EOS)
    return tokens


def _blocks(name: str, text: str) -> Iterator[Document]:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    for start in range(0, len(lines), LINES_PER_DOCUMENT):
        yield Document(
            f"{name}#{start // LINES_PER_DOCUMENT}", lines[start : start + LINES_PER_DOCUMENT]
        )


def _nltk_documents(corpus: str, nltk_data: str | None) -> Iterator[Document]:
    import nltk  # noqa: PLC0415 (only training needs nltk)

    if nltk_data:
        nltk.data.path.insert(0, nltk_data)
    reader = getattr(nltk.corpus, corpus)
    for fileid in reader.fileids():
        if corpus == "brown":
            # Brown is word/tag text; its reader gives the words of each sentence.
            text = "\n".join(" ".join(sent) for sent in reader.sents(fileid))
        else:
            text = reader.raw(fileid)
        yield from _blocks(f"{corpus}/{fileid}", text)


def _path_documents(path: Path) -> Iterator[Document]:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        yield from _blocks(
            f"{path.name}/{file.relative_to(path) if path.is_dir() else file.name}",
            file.read_text(encoding="utf-8", errors="replace"),
        )


def documents(spec: str, nltk_data: str | None = None) -> Iterator[Document]:
    """Documents of a corpus named by NLTK name or by a file/folder path."""
    if spec in NLTK_CORPORA:
        yield from _nltk_documents(spec, nltk_data or os.environ.get("NLTK_DATA"))
    elif Path(spec).exists():
        yield from _path_documents(Path(spec))
    else:
        raise FileNotFoundError(
            f"corpus {spec!r} is neither an NLTK corpus ({', '.join(NLTK_CORPORA)}) nor a path"
        )


def load_splits(specs: list[str], nltk_data: str | None = None) -> dict[str, list[str]]:
    """Token streams for train/valid/test over several corpora."""
    streams: dict[str, list[str]] = {s: [EOS] for s in SPLITS}
    for spec in specs:
        for doc in documents(spec, nltk_data):
            out = streams[split_of(doc.name)]
            for line in doc.lines:
                out.extend(line_tokens(line))
    return streams


_WIKITEXT_JOINERS = re.compile(r" @(.)@ ")
# What a WikiText `<unk>` becomes: a word no vocabulary holds, so it stays unknown. It is
# no typed word: the adaptation's evaluation never remembers it (`wikitext_articles`).
WIKITEXT_UNK = "zzunknownzz"
_WIKITEXT_TITLE = re.compile(r"^= [^=].* =$")  # " = Title = "; " = = Section = = " is not one


def _wikitext_text(line: str) -> str:
    """A WikiText line as typed text (`@-@` joiners undone, `<unk>` kept unknown)."""
    return _WIKITEXT_JOINERS.sub(r"\1", line).replace("<unk>", WIKITEXT_UNK)


def wikitext_lines(path: Path) -> Iterator[str]:
    """Lines of a published WikiText file as typed text (no headings, `<unk>` kept unknown)."""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("= "):
            continue
        yield _wikitext_text(line)


def wikitext_articles(path: Path) -> list[tuple[str, list[str]]]:
    """(title, token stream) of each article of a WikiText file, in order.

    An article starts at a ` = Title = ` heading line (section headings ` = = ... = = ` stay
    inside it and, as in `wikitext_lines`, are not text). Each stream starts with `</s>`.
    """
    articles: list[tuple[str, list[str]]] = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if _WIKITEXT_TITLE.match(line):
            articles.append((line.strip("= ").strip(), [EOS]))
        elif line and not line.startswith("= "):
            if not articles:
                articles.append((path.name, [EOS]))
            articles[-1][1].extend(line_tokens(_wikitext_text(line)))
    return [(title, stream) for title, stream in articles if len(stream) > 1]


def text_tokens(path: Path) -> list[str]:
    """Token stream of a held-out text file (WikiText format recognised by name)."""
    lines = (
        wikitext_lines(path)
        if "wikitext" in path.name
        else (ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip())
    )
    stream = [EOS]
    for line in lines:
        stream.extend(line_tokens(line))
    return stream


def text_documents(path: Path) -> list[tuple[str, list[str]]]:
    """Documents of a held-out text file as (name, token stream starting with `</s>`): the
    articles of a WikiText file (recognised by name), else the whole file as one."""
    if "wikitext" in path.name:
        return wikitext_articles(path)
    return [(path.name, text_tokens(path))]


def split_documents(
    specs: list[str], split: str, nltk_data: str | None = None
) -> list[tuple[str, list[str]]]:
    """One token stream per corpus file in a split, as (file id, stream starting with `</s>`).

    The same documents as `load_splits`' stream of that split (a file's blocks that fall in
    it, in order), grouped by the file they come from: one writer's text, as a session
    would see it.
    """
    streams: dict[str, list[str]] = {}
    for spec in specs:
        for doc in documents(spec, nltk_data):
            if split_of(doc.name) != split:
                continue
            out = streams.setdefault(doc.name.rpartition("#")[0] or doc.name, [EOS])
            for line in doc.lines:
                out.extend(line_tokens(line))
    return list(streams.items())
