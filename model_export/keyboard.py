"""Measure like a keyboard (`nextword evaluate --keyboard`): text typed through the service.

Each held-out document is typed by a simulated writer into one session of the service
itself (the in-process engine, the API's `Predictor`: tokenizer, adaptation, casing and
slip correction exactly as served), k = 3 suggestions, and a suggestion counts only when
it is the word exactly as the text writes it (case included: "The" at a sentence start,
"Paris", "I"). Words of the text outside the vocabulary count as misses unless the
writer's memory offers them (as the service does).

- `next_top1`, `next_top3`: the next word among the first 1 / 3 suggestions before any of
  its letters is typed (`next_top3_plain`: the same with adaptation off, one extra query).
- `completion_top1`, `completion_top3`: the word among the suggestions once a random part
  of it is typed (1 to len - 1 letters, uniform; words of 2 letters or more).
- `slip_completion_top1`, `slip_completion_top3`: the same typed part (at least 2 letters;
  words of 3 or more) with one slip drawn from the noise model of
  `service.contract.slips` (neighbouring QWERTY key, swapped letters, a letter missing or
  extra, in proportion to 0.05 : 0.05 : 0.02 : 0.02; the place uniform; a capital typed
  stays a capital).
- `echo_top3` (`echo_top3_plain`: adaptation off): the share of suggestion lists, right
  after a word, whose top 3 holds that word again (compared without case).
- `keystroke_savings`: a typist who types each word letter by letter and takes the word as
  soon as it is among the 3 suggestions (one key, which also types the space) saves this
  share of the keys the words and their spaces take (punctuation not counted).

Words are drawn from the documents in order, up to `max_words` in all; the random parts
come from a seeded generator, so a run is repeatable.
"""

from __future__ import annotations

import asyncio
import random
import re
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from service.contract import slips
from service.contract.tokenizer import _TOKEN

K = 3
_WIKITEXT_TITLE = re.compile(r"^= [^=].* =$")


@dataclass
class KeyboardTally:
    """Counts over the words typed (see the module docstring)."""

    words: int = 0
    next_hits: dict[int, int] = field(default_factory=lambda: {1: 0, 3: 0})
    next_hits_plain: int = 0
    completions: int = 0
    completion_hits: dict[int, int] = field(default_factory=lambda: {1: 0, 3: 0})
    slipped: int = 0
    slip_hits: dict[int, int] = field(default_factory=lambda: {1: 0, 3: 0})
    after_word: int = 0
    echoes: int = 0
    echoes_plain: int = 0
    keys_needed: int = 0
    keys_used: int = 0

    def metrics(self) -> dict[str, float]:
        """The figures, as shares."""

        def share(n: int, d: int) -> float:
            return n / d if d else float("nan")

        return {
            "words": self.words,
            "next_top1": share(self.next_hits[1], self.words),
            "next_top3": share(self.next_hits[3], self.words),
            "next_top3_plain": share(self.next_hits_plain, self.words),
            "completion_top1": share(self.completion_hits[1], self.completions),
            "completion_top3": share(self.completion_hits[3], self.completions),
            "slip_completion_top1": share(self.slip_hits[1], self.slipped),
            "slip_completion_top3": share(self.slip_hits[3], self.slipped),
            "echo_top3": share(self.echoes, self.after_word),
            "echo_top3_plain": share(self.echoes_plain, self.after_word),
            "keystroke_savings": 1.0 - share(self.keys_used, self.keys_needed),
        }


def _wikitext_text(line: str) -> str:
    from model_export.corpora import _WIKITEXT_JOINERS  # noqa: PLC0415

    # A WikiText `<unk>` is no word anyone types: dropped from the text.
    return _WIKITEXT_JOINERS.sub(r"\1", line).replace(" <unk> ", " ").replace("<unk>", "")


def cased_documents(
    texts: Sequence[str], corpora: Sequence[str], split: str, nltk_data: str | None
) -> dict[str, list[tuple[str, list[str]]]]:
    """Named sets of (document name, its lines as written): the articles of WikiText files
    (other text files whole), and the documents of the `split` of the named corpora."""
    from model_export.corpora import documents, split_of  # noqa: PLC0415

    sets: dict[str, list[tuple[str, list[str]]]] = {}
    for text in texts:
        path = Path(text)
        docs: list[tuple[str, list[str]]] = []
        for raw in path.read_text(encoding="utf-8").splitlines():
            line = raw.strip()
            if "wikitext" in path.name and _WIKITEXT_TITLE.match(line):
                docs.append((line.strip("= ").strip(), []))
            elif line and not line.startswith("= "):
                if not docs:
                    docs.append((path.name, []))
                docs[-1][1].append(_wikitext_text(line) if "wikitext" in path.name else line)
        sets[path.name] = [d for d in docs if d[1]]
    if corpora:
        grouped: dict[str, list[str]] = {}
        for spec in corpora:
            for doc in documents(spec, nltk_data):
                if split_of(doc.name) == split:
                    grouped.setdefault(doc.name.rpartition("#")[0] or doc.name, []).extend(
                        doc.lines
                    )
        sets[f"{'+'.join(corpora)}:{split}"] = list(grouped.items())
    return sets


def typed_pieces(lines: Sequence[str]) -> Iterator[tuple[bool, str]]:
    """(is a word, the piece as written) for each word and mark of the lines, in order."""
    for line in lines:
        for match in _TOKEN.finditer(unicodedata.normalize("NFKC", line)):
            yield match.lastgroup == "word", match.group().replace("\u2019", "'")


def _words(answer: dict[str, Any]) -> list[str]:
    return [p["word"] for p in answer["predictions"]]


def _slipped(prefix: str, rng: random.Random) -> str:
    typed = slips.slip(prefix.lower(), rng)
    return typed[:1].upper() + typed[1:] if prefix[:1].isupper() else typed


class _Budget:
    """The words left to type, shared by the documents typed at once."""

    def __init__(self, words: int, progress: Any) -> None:
        self.left = words
        self.progress = progress

    def take(self) -> bool:
        if self.left <= 0:
            return False
        self.left -= 1
        self.progress.update(1)
        return True


async def type_document(
    predictor: Any,
    model: str,
    lines: Sequence[str],
    rng: random.Random,
    tally: KeyboardTally,
    budget: _Budget,
) -> None:
    """Type one document into a new session, scoring every word (module docstring)."""
    session = await predictor.create_session("", k=K, model=model)
    sid = session["session_id"]
    answer, pending, previous = session, "", None
    for is_word, piece in typed_pieces(lines):
        if not is_word:
            pending += piece + " "
            previous = None
            continue
        if not budget.take():
            break
        if pending:
            answer = await predictor.feed(sid, pending, k=K)
            pending = ""
        word = piece
        suggested = _words(answer)
        plain = _words(await predictor.feed(sid, "", k=K, adapt=False))
        tally.words += 1
        tally.next_hits[1] += word in suggested[:1]
        tally.next_hits[3] += word in suggested[:3]
        tally.next_hits_plain += word in plain[:3]
        if previous is not None:
            tally.after_word += 1
            tally.echoes += previous.lower() in (w.lower() for w in suggested[:3])
            tally.echoes_plain += previous.lower() in (w.lower() for w in plain[:3])
        if len(word) >= 2:
            cut = rng.randint(1, len(word) - 1)
            got = _words(await predictor.feed(sid, "", k=K, prefix=word[:cut]))
            tally.completions += 1
            tally.completion_hits[1] += word in got[:1]
            tally.completion_hits[3] += word in got[:3]
            if len(word) >= 3:
                typed = _slipped(word[: max(cut, 2)], rng)
                got = _words(await predictor.feed(sid, "", k=K, prefix=typed))
                tally.slipped += 1
                tally.slip_hits[1] += word in got[:1]
                tally.slip_hits[3] += word in got[:3]
        # The typist: letter by letter, the word taken once it is among the suggestions.
        tally.keys_needed += len(word) + 1
        used = len(word) + 1
        for typed_letters in range(len(word)):
            if typed_letters:
                listed = _words(await predictor.feed(sid, "", k=K, prefix=word[:typed_letters]))
            else:
                listed = suggested
            if word in listed[:K]:
                used = typed_letters + 1
                break
        tally.keys_used += used
        pending, previous = word + " ", word


async def _type_documents(
    predictor: Any,
    model: str,
    docs: list[tuple[str, list[str]]],
    budget: _Budget,
    parallel: int,
    seed: int,
) -> KeyboardTally:
    """Type the documents, `parallel` at a time (their steps batch in the engine)."""
    tally = KeyboardTally()
    queue = iter(docs)

    async def worker() -> None:
        for doc_name, lines in queue:
            if budget.left <= 0:
                return
            # One generator per document: repeatable whatever the interleaving.
            rng = random.Random(f"{seed}:{doc_name}")
            await type_document(predictor, model, lines, rng, tally, budget)

    await asyncio.gather(*(worker() for _ in range(parallel)))
    return tally


async def evaluate_keyboard_async(
    artifact: str,
    texts: Sequence[str],
    corpora: Sequence[str],
    split: str = "test",
    nltk_data: str | None = None,
    max_words: int = 2000,
    parallel: int = 16,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """The keyboard figures of an artifact on each set of documents."""
    from service.api.predictor import Predictor  # noqa: PLC0415
    from service.config import Settings  # noqa: PLC0415

    path = Path(artifact).resolve()
    settings = Settings(
        models_dir=path.parent, default_model=path.name, providers="CPUExecutionProvider"
    )
    predictor = await Predictor.start(settings)
    results = {}
    try:
        for name, docs in cased_documents(texts, corpora, split, nltk_data).items():
            with tqdm(total=max_words, desc=f"keyboard {name}", unit="word", leave=False) as bar:
                tally = await _type_documents(
                    predictor, path.name, docs, _Budget(max_words, bar), parallel, seed
                )
            results[name] = tally.metrics()
    finally:
        await predictor.close()
    return results


def format_keyboard(name: str, m: dict[str, float]) -> str:
    """A text table of one set's figures."""
    rows = [f"{name}: {int(m['words']):,} words typed, k = {K}"]
    for key, value in m.items():
        if key != "words":
            rows.append(f"  {key:24} {100 * value:6.2f} %")
    return "\n".join(rows)


def evaluate_keyboard(
    artifact: str,
    texts: Sequence[str],
    corpora: Sequence[str],
    split: str = "test",
    nltk_data: str | None = None,
    max_words: int = 2000,
    record: bool = False,
) -> dict[str, dict[str, float]]:
    """`evaluate_keyboard_async`, printed; with `record`, stored in the artifact's manifest
    under "keyboard" (with how they were made), which `GET /v1/models` and the card show."""
    results = asyncio.run(
        evaluate_keyboard_async(artifact, texts, corpora, split, nltk_data, max_words)
    )
    for name, m in results.items():
        print(format_keyboard(name, m))
    if record:
        from model_export.evaluate import record_metrics  # noqa: PLC0415

        record_metrics(Path(artifact), "keyboard", results)
    return results
