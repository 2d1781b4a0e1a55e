"""How a suggested word is written where it goes: the case a writer would type.

A vocabulary word comes in its display form (`display.tsv`: "I", names, acronyms; the
token itself otherwise), or, right after a word it forms a name with, in the form the
corpora give that pair (`display_pairs.tsv`: "united" then "kingdom" -> "Kingdom";
`display_form`). At the start of a sentence (an empty text, or after `.`, `!`,
`?`) its first letter is capitalised. A capital the writer typed in the prefix is kept
(so "Ap" completes to "Apple", and "USA" typed in capitals stays so): the service never
lowers a letter the writer raised.
"""

from __future__ import annotations

from service.contract.vocab import Vocabulary


def display_form(vocab: Vocabulary, token_id: int, previous_id: int | None = None) -> str:
    """How the vocabulary word `token_id` is shown right after the token `previous_id`:
    the pair's form where the artifact has one, else the word's display form."""
    if previous_id is not None:
        form = vocab.pair_display.get((previous_id, token_id))
        if form is not None:
            return form
    return vocab.display[token_id]


def capitalised(form: str) -> str:
    """The form with its first character in upper case ("the" -> "The", "iPod" -> "IPod")."""
    return form[:1].upper() + form[1:]


def written_form(form: str, sentence_start: bool, prefix: str = "") -> str:
    """`form` as it would be typed: capitalised at a sentence start, the prefix's capitals
    kept (letter by letter where the word starts with the same letters; a prefix of two or
    more letters all in capitals writes the whole word so)."""
    if sentence_start:
        form = capitalised(form)
    if not prefix or prefix.islower() or not any(ch.isupper() for ch in prefix):
        return form
    letters = [ch for ch in prefix if ch.isalpha()]
    if len(letters) >= 2 and all(ch.isupper() for ch in letters):
        return form.upper()
    chars = list(form)
    for i, ch in enumerate(prefix[: len(chars)]):
        if ch.isupper() and chars[i].lower() == ch.lower():
            chars[i] = ch
    if prefix[:1].isupper():  # a corrected word (a slip in the prefix) still starts so
        chars[:1] = [chars[0].upper()] if chars else []
    return "".join(chars)


def at_sentence_start(last_token: int, eos_id: int, tokens: int) -> bool:
    """Whether the next word starts a sentence: after an end of sentence, or at the start
    of a text (no tokens yet)."""
    return last_token == eos_id or tokens == 0
