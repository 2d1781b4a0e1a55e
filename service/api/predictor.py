"""The API side of a prediction: text in, words out; the engine does the rest.

`Predictor` is the one object the routes know. It validates a request against the limits
(`service.contract.limits`), tokenizes the text and turns a prefix into candidate ids with
the model's vocabulary, sends token ids to the engine through an `EngineClient`, and turns
the ids and probabilities it gets back into words in their display form. It raises only
`service.errors` types; the API maps them to HTTP and WebSocket answers.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from service.config import Settings
from service.contract import slips
from service.contract.artifact import (
    DISPLAY_FILE,
    PAIR_DISPLAY_FILE,
    VOCAB_FILE,
    ArtifactError,
    ModelArtifact,
)
from service.contract.casing import at_sentence_start, display_form, written_form
from service.contract.ids import new_session_id
from service.contract.limits import MAX_K, MAX_PREFIX_CHARS, MAX_SESSION_ID_CHARS
from service.contract.protocol import DeleteRequest, EngineOutput, InfoRequest, StepRequest
from service.contract.vocab import Vocabulary
from service.engine.client import EngineClient, InprocClient, connect_engine
from service.errors import BadInput, UnknownModel, UnknownSession, error_from_code

log = logging.getLogger(__name__)

SESSION_MODELS_CACHED = 100_000  # session -> model entries kept per API process
# Texts of up to this many characters keep their tokenization, per model and API process:
# the common stream message is a word or two, and a writer's words repeat.
CACHED_TEXT_CHARS = 48
CACHED_TEXTS = 16_384

Tokenized = tuple[tuple[int, ...], tuple[str, ...]]


def cached_encoder(vocab: Vocabulary) -> Callable[[str], Tokenized]:
    """`vocab.encode_typed` with its answers for the last `CACHED_TEXTS` texts kept (as
    tuples: one answer is shared by every caller, so none may change it)."""

    @functools.lru_cache(maxsize=CACHED_TEXTS)
    def encode(text: str) -> Tokenized:
        ids, typed = vocab.encode_typed(text)
        return tuple(ids), tuple(typed)

    return encode


def owned_id(session_id: str, owner: str) -> str:
    """The engine's id of a client's session: the owner's name, then the id the client sees.

    A key's sessions live in its own namespace, so another key's request for the same id
    finds no session (404), exactly like an id that never existed.
    """
    return f"{owner}/{session_id}" if owner else session_id


def step_id(key: str | None, tokens: list[int], typed: list[str], fresh: bool = False) -> str:
    """The id of a session step ("" without a `key`): the client's key for the step (the
    stream message's `id`, the `Idempotency-Key` header) and what the step adds, so that
    two different steps under one key are not taken for one."""
    if not key:
        return ""
    digest = hashlib.blake2b(digest_size=12)
    digest.update(key.encode("utf-8", "surrogatepass"))
    digest.update(b"\x00reset\x00" if fresh else b"\x00step\x00")
    digest.update(np.asarray(tokens, dtype="<i8").tobytes())
    for word in typed:
        digest.update(b"\x00" + word.encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


@dataclass(frozen=True)
class _Prefix:
    """A prefix as the engine gets it (its candidate ids and their slip likelihoods), and
    what the answer needs of it (what was typed; how many ids complete it cleanly)."""

    typed: str = ""
    ids: bytes | None = None  # sorted int64
    slips: bytes | None = None  # float32 per id; None when every id completes it cleanly
    clean: frozenset[int] = frozenset()


NO_PREFIX = _Prefix()


def _has_capital(typed: str) -> bool:
    """Whether a typed prefix has a capital letter (its answer's words then keep it)."""
    return bool(typed) and not typed.islower() and any(ch.isupper() for ch in typed)


class _DisplayCache:
    """A vocabulary's words as written after a given word, computed once each.

    One table per sentence-start flag and previous token where the artifact has a pair
    form after it (`Vocabulary.pair_display`); any other previous token shares one table.
    Forms are read when first asked for: a vocabulary's display forms are set when its
    artifact loads, before it answers.
    """

    def __init__(self, vocab: Vocabulary) -> None:
        self.with_pairs = frozenset(previous for previous, _ in vocab.pair_display)
        self.tables: dict[tuple[int, bool], dict[int, str]] = {}
        self.plain: tuple[dict[int, str], dict[int, str]] = (
            {},
            {},
        )  # after a token without pair forms: (mid-sentence, start)

    def forms(self, previous: int, start: bool) -> dict[int, str]:
        """The table for words written after `previous` (at a sentence start or not): id
        -> written form, filled by the caller."""
        if previous not in self.with_pairs:
            return self.plain[start]
        return self.tables.setdefault((previous, start), {})


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).isoformat()


def load_vocabularies(settings: Settings, engine: EngineClient) -> dict[str, Vocabulary]:
    """The vocabulary of every model the engine serves (read here: no onnxruntime)."""
    if isinstance(engine, InprocClient):
        return {name: model.vocab for name, model in engine.core.models.items()}
    root = Path(settings.models_dir)
    # The engine verified every file; this process reads (and hashes) only what it uses.
    return {
        m["name"]: ModelArtifact.load(
            root / m["name"], hashed=(VOCAB_FILE, DISPLAY_FILE, PAIR_DISPLAY_FILE)
        ).vocab
        for m in engine.models
    }


class Predictor:
    """Texts to token ids to the engine, and its answers to words."""

    def __init__(
        self, settings: Settings, engine: EngineClient, vocabularies: dict[str, Vocabulary]
    ) -> None:
        if settings.default_model not in vocabularies:
            raise ArtifactError(
                f"default model {settings.default_model!r} is not in {settings.models_dir} "
                f"(found {sorted(vocabularies)})"
            )
        self.settings = settings
        self.engine = engine
        self.default_model = settings.default_model
        self.vocabularies = vocabularies
        self._single_model = next(iter(vocabularies)) if len(vocabularies) == 1 else None
        # Which model a session belongs to, so a feed is tokenized with the right
        # vocabulary without asking the engine first; a miss asks it once.
        self._session_models: OrderedDict[str, str] = OrderedDict()
        self._encoders = {vocab: cached_encoder(vocab) for vocab in vocabularies.values()}
        self._displays = {vocab: _DisplayCache(vocab) for vocab in vocabularies.values()}
        self.ready = False

    @classmethod
    async def start(cls, settings: Settings | None = None) -> Predictor:
        """Connect to the engine (or start one in this process when no address is set)."""
        settings = settings or Settings()
        engine = await connect_engine(settings)
        try:
            predictor = cls(settings, engine, load_vocabularies(settings, engine))
        except BaseException:
            await engine.close()
            raise
        predictor.ready = True
        return predictor

    async def close(self) -> None:
        """Stop taking requests; an in-process engine answers what it holds, then stops."""
        self.ready = False
        await self.engine.close()

    # --- models --------------------------------------------------------------------

    def models(self) -> list[dict[str, Any]]:
        """The loaded models, as listed by `GET /v1/models`."""
        return self.engine.models

    def _vocabulary(self, name: str | None) -> tuple[str, Vocabulary]:
        if name is None:
            name = self.default_model
        if not isinstance(name, str) or name not in self.vocabularies:
            raise UnknownModel(f"no model {name!r}; loaded: {sorted(self.vocabularies)}")
        return name, self.vocabularies[name]

    async def _model_of(self, session_id: str) -> str:
        """The model of a session (the engine is asked only when this process never saw it)."""
        if self._single_model is not None:
            return self._single_model
        name = self._session_models.get(session_id)
        if name is None:
            name = (await self._call(InfoRequest(self.engine.next_id(), session_id))).model
            self._remember(session_id, name)
        if name not in self.vocabularies:
            raise UnknownSession(f"session {session_id!r} belongs to model {name!r}, not loaded")
        return name

    def _remember(self, session_id: str, model: str) -> None:
        if self._single_model is not None:
            return
        self._session_models[session_id] = model
        self._session_models.move_to_end(session_id)
        while len(self._session_models) > SESSION_MODELS_CACHED:
            self._session_models.popitem(last=False)

    # --- validation ------------------------------------------------------------------

    def _tokens(self, vocab: Vocabulary, text: Any) -> tuple[list[int], list[str]]:
        """A text's token ids, and the typed forms of its `<unk>` tokens (adaptation)."""
        if not isinstance(text, str):
            raise BadInput("text must be a string")
        limit = self.settings.max_text_chars
        if len(text) > limit:
            raise BadInput(f"text has {len(text)} characters; the limit is {limit}")
        if len(text) <= CACHED_TEXT_CHARS:
            cached_ids, cached_typed = self._encoders[vocab](text)
            ids, typed = list(cached_ids), list(cached_typed)
        else:
            ids, typed = vocab.encode_typed(text)
        if len(ids) > self.settings.max_tokens_per_request:
            raise BadInput(
                f"text has {len(ids)} tokens; the limit is {self.settings.max_tokens_per_request}"
            )
        return ids, typed

    @staticmethod
    def _check_adapt(adapt: Any) -> bool | None:
        if adapt is not None and not isinstance(adapt, bool):
            raise BadInput(f"adapt must be true, false or null, not {adapt!r}")
        return adapt

    @staticmethod
    def _check_k(k: Any) -> int:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
            raise BadInput(f"k must be an integer from 1 to {MAX_K}, not {k!r}")
        return k

    @staticmethod
    def _prefix(vocab: Vocabulary, prefix: Any) -> _Prefix:
        """The words a prefix may complete to: those it starts (case-insensitive), and
        those one typing slip away (`service.contract.slips`), less likely."""
        if prefix is None or prefix == "":
            return NO_PREFIX
        if not isinstance(prefix, str):
            raise BadInput("prefix must be a string")
        if len(prefix) > MAX_PREFIX_CHARS:
            raise BadInput(f"prefix has {len(prefix)} characters; the limit is {MAX_PREFIX_CHARS}")
        ids, likelihoods, clean = slips.candidates(vocab, prefix)
        clean_ids = frozenset(ids[likelihoods >= 1.0].tolist())
        return _Prefix(
            prefix,
            np.ascontiguousarray(ids, dtype=np.int64).tobytes(),
            None if clean == len(ids) else likelihoods.tobytes(),
            clean_ids,
        )

    @staticmethod
    def _check_session_id(session_id: Any) -> str:
        if not isinstance(session_id, str) or not 0 < len(session_id) <= MAX_SESSION_ID_CHARS:
            raise UnknownSession(f"no session {session_id!r}")
        return session_id

    def _predictions(
        self, vocab: Vocabulary, output: EngineOutput, prefix: _Prefix = NO_PREFIX
    ) -> list[dict[str, Any]]:
        """Each word as it would be typed there (`service.contract.casing`), and whether it
        is a correction (the prefix does not start it: a slip away)."""
        size = len(vocab)
        last = output.last_token
        start = at_sentence_start(last, vocab.eos_id, output.tokens)
        typed = prefix.typed
        ids = output.ids
        # Without a capital typed, a word's written form depends only on the word, the word
        # before (where a pair form exists) and the sentence start: kept once computed.
        forms = None if _has_capital(typed) else self._displays[vocab].forms(last, start)
        try:
            words = [forms[i] for i in ids] if forms is not None else None
        except KeyError:  # a word not written there yet, or one of the writer's own
            words = None
        if words is None:
            words = []
            for i in ids:
                # An id past the vocabulary is one of the writer's own typed words (they
                # match the prefix cleanly); a word is shown as it is there ("I", not "i";
                # "Kingdom" after "united").
                form = display_form(vocab, i, last) if i < size else output.words[i - size]
                word = written_form(form, start, typed)
                if forms is not None and i < size:
                    forms[i] = word
                words.append(word)
        if prefix.ids is None or prefix.slips is None:  # no prefix, or none with slips
            return [
                {"word": word, "probability": p, "corrected": False}
                for word, p in zip(words, output.probs)
            ]
        clean = prefix.clean
        return [
            {"word": word, "probability": p, "corrected": i < size and i not in clean}
            for word, i, p in zip(words, ids, output.probs)
        ]

    # --- requests ------------------------------------------------------------------

    async def _call(self, request: Any) -> EngineOutput:
        output = await self.engine.call(request)
        if output.error is not None:
            raise error_from_code(output.error, output.message, output.retry_after_s)
        return output

    async def _step(
        self,
        model: str,
        tokens: list[int],
        k: int,
        prefix: _Prefix,
        session_id: str | None = None,
        create: bool = False,
        fresh: bool = False,
        owner: str = "",
        adapt: bool | None = None,
        typed: list[str] | None = None,
        forget: bool = False,
        client: str = "",
        step_key: str = "",
    ) -> EngineOutput:
        request = StepRequest(
            self.engine.next_id(),
            model,
            tokens,
            k,
            session_id=session_id,
            create=create,
            fresh=fresh,
            prefix_ids=prefix.ids,
            owner=owner,
            adapt=adapt,
            typed=typed or [],
            prefix=prefix.typed,
            forget=forget,
            client=client,
            step_id=step_key,
            prefix_slips=prefix.slips,
        )
        return await self._call(request)

    async def predict(
        self,
        text: str,
        k: int = 5,
        model: str | None = None,
        prefix: str | None = None,
        adapt: bool | None = None,
        client: str = "",
    ) -> dict[str, Any]:
        """Top k next words after `text` (stateless; adapted to the text itself); `client`:
        whose share of the engine's queue the step takes."""
        name, vocab = self._vocabulary(model)
        k = self._check_k(k)
        adapt = self._check_adapt(adapt)
        typed_prefix = self._prefix(vocab, prefix)
        tokens, typed = self._tokens(vocab, text)
        output = await self._step(
            name, tokens, k, typed_prefix, adapt=adapt, typed=typed, client=client
        )
        return {
            "model": name,
            "tokens": len(tokens),
            "predictions": self._predictions(vocab, output, typed_prefix),
        }

    async def create_session(
        self,
        text: str = "",
        k: int = 5,
        model: str | None = None,
        prefix: str | None = None,
        owner: str = "",
        quota: str = "",
        adapt: bool | None = None,
        client: str = "",
    ) -> dict[str, Any]:
        """A new session holding `text`, and its top k next words; it belongs to `owner`
        and counts against the session quota of `quota` (`NEXTWORD_MAX_SESSIONS_PER_KEY`).
        `adapt` is the session's default (None: the service's)."""
        name, vocab = self._vocabulary(model)
        k = self._check_k(k)
        adapt = self._check_adapt(adapt)
        typed_prefix = self._prefix(vocab, prefix)
        tokens, typed = self._tokens(vocab, text)
        session_id = new_session_id()
        engine_id = owned_id(session_id, owner)
        output = await self._step(
            name,
            tokens,
            k,
            typed_prefix,
            engine_id,
            create=True,
            owner=quota or owner,
            adapt=adapt,
            typed=typed,
            client=client,
        )
        self._remember(engine_id, name)
        return self._session_answer(name, vocab, session_id, output, typed_prefix)

    async def feed(
        self,
        session_id: str,
        text: str,
        k: int = 5,
        prefix: str | None = None,
        owner: str = "",
        adapt: bool | None = None,
        client: str = "",
        request_key: str | None = None,
    ) -> dict[str, Any]:
        """Append `text` to a session (of `owner`); its top k next words (`adapt`: with the
        writer's words mixed in or not; None: the session's default). `request_key`: the
        client's id for this step; sent again with the same text after an unknown outcome,
        the step is answered, not applied twice."""
        session_id = self._check_session_id(session_id)
        k = self._check_k(k)
        adapt = self._check_adapt(adapt)
        if not isinstance(text, str):
            raise BadInput("text must be a string")
        engine_id = owned_id(session_id, owner)
        name = await self._model_of(engine_id)
        vocab = self.vocabularies[name]
        typed_prefix = self._prefix(vocab, prefix)
        tokens, typed = self._tokens(vocab, text)
        output = await self._step(
            name,
            tokens,
            k,
            typed_prefix,
            engine_id,
            adapt=adapt,
            typed=typed,
            client=client,
            step_key=step_id(request_key, tokens, typed),
        )
        return self._session_answer(name, vocab, session_id, output, typed_prefix)

    async def reset(
        self,
        session_id: str,
        k: int = 5,
        prefix: str | None = None,
        owner: str = "",
        client: str = "",
        request_key: str | None = None,
    ) -> dict[str, Any]:
        """Start a session's text afresh (its words forgotten too); the predictions for an
        empty text (`request_key`: as for `feed`)."""
        session_id = self._check_session_id(session_id)
        k = self._check_k(k)
        engine_id = owned_id(session_id, owner)
        name = await self._model_of(engine_id)
        vocab = self.vocabularies[name]
        typed_prefix = self._prefix(vocab, prefix)
        output = await self._step(
            name,
            [],
            k,
            typed_prefix,
            engine_id,
            fresh=True,
            client=client,
            step_key=step_id(request_key, [], [], fresh=True),
        )
        return self._session_answer(name, vocab, session_id, output, typed_prefix)

    async def forget_words(self, session_id: str, owner: str = "", client: str = "") -> None:
        """Forget the words a session remembers of its writer; its context stays."""
        session_id = self._check_session_id(session_id)
        engine_id = owned_id(session_id, owner)
        name = await self._model_of(engine_id)
        await self._step(name, [], 1, NO_PREFIX, engine_id, forget=True, client=client)

    def _session_answer(
        self,
        name: str,
        vocab: Vocabulary,
        session_id: str,
        output: EngineOutput,
        prefix: _Prefix = NO_PREFIX,
    ) -> dict[str, Any]:
        return {
            "session_id": session_id,
            "model": name,
            "tokens": output.tokens,
            "predictions": self._predictions(vocab, output, prefix),
        }

    async def session_info(self, session_id: str, owner: str = "") -> dict[str, Any]:
        """Model, token count and times (ISO 8601, UTC) of a session."""
        session_id = self._check_session_id(session_id)
        engine_id = owned_id(session_id, owner)
        output = await self._call(InfoRequest(self.engine.next_id(), engine_id))
        return {
            "session_id": session_id,
            "model": output.model,
            "tokens": output.tokens,
            "created_at": _iso(output.created_at),
            "last_used_at": _iso(output.last_used_at),
            "adapt": output.adapt,
            "memory": {"words": output.remembered, "bytes": output.memory_bytes},
        }

    async def delete_session(self, session_id: str, owner: str = "") -> None:
        """Forget a session."""
        engine_id = owned_id(self._check_session_id(session_id), owner)
        await self._call(DeleteRequest(self.engine.next_id(), engine_id))
        self._session_models.pop(engine_id, None)

    async def check_ready(self) -> None:
        """Raise `NotReady` or `StoreUnavailable` when the engine cannot serve."""
        await self.engine.ping()


class OwnedPredictor:
    """The predictor as one API key (or one client address) sees it: the sessions that key
    created, no others, and its share of the engine's queue.

    `quota` is whose session quota a new session counts against: the key (`owner`), or
    on an open service (no owner: every session is shared) the client's address. `client`
    is whose share of the engine's queue its steps take (the key, else the address)."""

    def __init__(self, predictor: Predictor, owner: str, quota: str = "", client: str = "") -> None:
        self.predictor = predictor
        self.owner = owner
        self.quota = quota or owner
        self.client = client or owner

    def __getattr__(self, name: str) -> Any:  # models, ready, ...: shared
        return getattr(self.predictor, name)

    async def predict(
        self,
        text: str,
        k: int = 5,
        model: str | None = None,
        prefix: str | None = None,
        adapt: bool | None = None,
    ) -> dict[str, Any]:
        return await self.predictor.predict(text, k, model, prefix, adapt, client=self.client)

    async def create_session(
        self,
        text: str = "",
        k: int = 5,
        model: str | None = None,
        prefix: str | None = None,
        adapt: bool | None = None,
    ) -> dict[str, Any]:
        return await self.predictor.create_session(
            text,
            k,
            model,
            prefix,
            owner=self.owner,
            quota=self.quota,
            adapt=adapt,
            client=self.client,
        )

    async def feed(
        self,
        session_id: str,
        text: str,
        k: int = 5,
        prefix: str | None = None,
        adapt: bool | None = None,
        request_key: str | None = None,
    ) -> dict[str, Any]:
        return await self.predictor.feed(
            session_id,
            text,
            k,
            prefix,
            owner=self.owner,
            adapt=adapt,
            client=self.client,
            request_key=request_key,
        )

    async def reset(
        self,
        session_id: str,
        k: int = 5,
        prefix: str | None = None,
        request_key: str | None = None,
    ) -> dict[str, Any]:
        return await self.predictor.reset(
            session_id, k, prefix, owner=self.owner, client=self.client, request_key=request_key
        )

    async def session_info(self, session_id: str) -> dict[str, Any]:
        return await self.predictor.session_info(session_id, owner=self.owner)

    async def delete_session(self, session_id: str) -> None:
        await self.predictor.delete_session(session_id, owner=self.owner)

    async def forget_words(self, session_id: str) -> None:
        await self.predictor.forget_words(session_id, owner=self.owner, client=self.client)
