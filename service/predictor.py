"""The engine client: the only interface the API layer knows.

`Predictor` owns the models (one `OrtModel` each), the session store and one
`StepBatcher` per model. It validates every request (k, text length, model name),
turns texts into token ids, hands steps to the batchers and turns their answers into
plain dicts. It raises only `service.errors` types; the API maps them to HTTP/WS.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from service.artifact import MANIFEST_FILE, ArtifactError, ModelArtifact
from service.batcher import Step, StepBatcher, StepResult
from service.config import Settings
from service.engine import OrtModel, choose_providers, top_words
from service.errors import BadInput, UnknownModel, UnknownSession
from service.sessions import SessionStore, open_store

log = logging.getLogger(__name__)

MAX_K = 50
MAX_PREFIX_CHARS = 64
MAX_SESSION_ID_CHARS = 128


def load_models(models_dir: Path, providers: str = "auto", threads: int = 0) -> dict[str, OrtModel]:
    """Every artifact directory under `models_dir` (verified), by name; raises ArtifactError."""
    if not models_dir.is_dir():
        raise ArtifactError(f"{models_dir}: models directory not found")
    chosen = choose_providers(providers)
    models = {
        path.name: OrtModel(ModelArtifact.load(path), chosen, threads)
        for path in sorted(models_dir.iterdir())
        if (path / MANIFEST_FILE).is_file()
    }
    if not models:
        raise ArtifactError(f"{models_dir}: no model artifacts (directories with {MANIFEST_FILE})")
    return models


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).isoformat()


class Predictor:
    """Models, sessions and batchers behind a small async interface (see INTERFACE.md)."""

    def __init__(
        self, settings: Settings, models: dict[str, OrtModel], store: SessionStore
    ) -> None:
        if settings.default_model not in models:
            raise ArtifactError(
                f"default model {settings.default_model!r} is not in {settings.models_dir} "
                f"(found {sorted(models)})"
            )
        self.settings = settings
        self.default_model = settings.default_model
        self.store = store
        self._models = models
        self._batchers = {
            name: StepBatcher(
                model,
                store,
                max_batch=settings.max_batch,
                max_wait_ms=settings.max_wait_ms,
                max_queue=settings.max_queue,
            )
            for name, model in models.items()
        }
        # Which model a session belongs to, so a feed goes to the right batcher without
        # a store round trip; a miss (a session created by another replica) asks the store.
        self._session_models: OrderedDict[str, str] = OrderedDict()
        self._housekeeping: asyncio.Task[None] | None = None
        self.ready = False

    @classmethod
    async def start(cls, settings: Settings | None = None) -> Predictor:
        """Load every model, open the store and start the batchers."""
        settings = settings or Settings()
        models = await asyncio.to_thread(
            load_models, Path(settings.models_dir), settings.providers, settings.intra_op_threads
        )
        store = open_store(settings.session_store, settings.session_ttl_s, settings.session_cap)
        predictor = cls(settings, models, store)
        for batcher in predictor._batchers.values():
            await batcher.start()
        predictor._housekeeping = asyncio.get_running_loop().create_task(
            predictor._keep_house(), name="session-housekeeping"
        )
        predictor.ready = True
        log.info(
            "models loaded: %s (default %s); session store %s",
            sorted(models),
            predictor.default_model,
            settings.session_store.split("@")[-1],
        )
        return predictor

    async def close(self) -> None:
        """Finish the steps in flight, stop the batchers and close the store."""
        self.ready = False
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            await asyncio.wait([self._housekeeping])
            self._housekeeping = None
        await asyncio.gather(*(b.stop(drain=True) for b in self._batchers.values()))
        await self.store.close()

    async def _keep_house(self) -> None:
        """Drop expired sessions and refresh the active-sessions gauge now and then."""
        interval = min(5.0, max(0.05, self.settings.session_ttl_s / 10))
        while True:
            await asyncio.sleep(interval)
            with contextlib.suppress(Exception):  # a store outage is reported by /readyz
                await self.store.count()

    # --- models --------------------------------------------------------------------

    def models(self) -> list[dict[str, Any]]:
        """The loaded models, as listed by `GET /v1/models`."""
        out = []
        for name, model in self._models.items():
            manifest = model.artifact.manifest
            out.append(
                {
                    "name": name,
                    "cell": model.cell,
                    "vocab_size": len(model.vocab),
                    "layers": model.layers,
                    "hidden_size": model.hidden_size,
                    "embedding_size": int(manifest["embedding_size"]),
                    "quantization": (manifest.get("quantization") or {}).get("type", "none"),
                    "providers": list(model.providers),
                    "metrics": manifest.get("metrics", {}),
                }
            )
        return out

    def _model(self, name: str | None) -> OrtModel:
        if name is None:
            return self._models[self.default_model]
        if not isinstance(name, str) or name not in self._models:
            raise UnknownModel(f"no model {name!r}; loaded: {sorted(self._models)}")
        return self._models[name]

    async def _model_of(self, session_id: str) -> OrtModel:
        """The model of a session (the store is asked only when this process never saw it)."""
        if len(self._models) == 1:
            return next(iter(self._models.values()))
        name = self._session_models.get(session_id)
        if name is None:
            name = (await self.store.get(session_id)).model
            self._remember(session_id, name)
        if name not in self._models:
            raise UnknownSession(f"session {session_id!r} belongs to model {name!r}, not loaded")
        return self._models[name]

    def _remember(self, session_id: str, model: str) -> None:
        if len(self._models) == 1:
            return
        self._session_models[session_id] = model
        self._session_models.move_to_end(session_id)
        while len(self._session_models) > self.settings.session_cap:
            self._session_models.popitem(last=False)

    # --- validation ------------------------------------------------------------------

    def _tokens(self, model: OrtModel, text: Any) -> list[int]:
        if not isinstance(text, str):
            raise BadInput("text must be a string")
        limit = self.settings.max_text_chars
        if len(text) > limit:
            raise BadInput(f"text has {len(text)} characters; the limit is {limit}")
        ids = model.vocab.encode(text)
        if len(ids) > self.settings.max_tokens_per_request:
            raise BadInput(
                f"text has {len(ids)} tokens; the limit is {self.settings.max_tokens_per_request}"
            )
        return ids

    @staticmethod
    def _check_k(k: Any) -> int:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
            raise BadInput(f"k must be an integer from 1 to {MAX_K}, not {k!r}")
        return k

    @staticmethod
    def _prefix_ids(model: OrtModel, prefix: Any) -> np.ndarray | None:
        if prefix is None or prefix == "":
            return None
        if not isinstance(prefix, str):
            raise BadInput("prefix must be a string")
        if len(prefix) > MAX_PREFIX_CHARS:
            raise BadInput(f"prefix has {len(prefix)} characters; the limit is {MAX_PREFIX_CHARS}")
        return model.vocab.ids_with_prefix(prefix)

    @staticmethod
    def _check_session_id(session_id: Any) -> str:
        if not isinstance(session_id, str) or not 0 < len(session_id) <= MAX_SESSION_ID_CHARS:
            raise UnknownSession(f"no session {session_id!r}")
        return session_id

    @staticmethod
    def _predictions(model: OrtModel, ids: np.ndarray, probs: np.ndarray) -> list[dict[str, Any]]:
        words = model.vocab.display  # how each word is shown ("I", not "i")
        return [
            {"word": words[i], "probability": float(p)}
            for i, p in zip(ids.tolist(), probs.tolist())
        ]

    # --- requests ------------------------------------------------------------------

    async def _run(self, model: OrtModel, step: Step) -> StepResult:
        return await self._batchers[model.name].step(step)

    async def predict(
        self, text: str, k: int = 5, model: str | None = None, prefix: str | None = None
    ) -> dict[str, Any]:
        """Top k next words after `text` (stateless)."""
        m = self._model(model)
        k = self._check_k(k)
        prefix_ids = self._prefix_ids(m, prefix)
        tokens = self._tokens(m, text)
        if tokens:
            result = await self._run(m, Step(tokens, k=k, prefix_ids=prefix_ids))
            ids, probs = result.ids, result.probs
        else:  # the start of a text: cached per model, no queue
            ids, probs = top_words(m.start, 0, k, prefix_ids)
        return {
            "model": m.name,
            "tokens": len(tokens),
            "predictions": self._predictions(m, ids, probs),
        }

    async def create_session(
        self, text: str = "", k: int = 5, model: str | None = None, prefix: str | None = None
    ) -> dict[str, Any]:
        """A new session holding `text`, and its top k next words."""
        m = self._model(model)
        k = self._check_k(k)
        prefix_ids = self._prefix_ids(m, prefix)
        tokens = self._tokens(m, text)
        session_id = self.store.new_id()
        result = await self._run(
            m, Step(tokens, session_id=session_id, create=True, k=k, prefix_ids=prefix_ids)
        )
        self._remember(session_id, m.name)
        return self._session_answer(m, session_id, result)

    async def feed(
        self, session_id: str, text: str, k: int = 5, prefix: str | None = None
    ) -> dict[str, Any]:
        """Append `text` to a session's context; its top k next words."""
        session_id = self._check_session_id(session_id)
        k = self._check_k(k)
        if not isinstance(text, str):
            raise BadInput("text must be a string")
        m = await self._model_of(session_id)
        prefix_ids = self._prefix_ids(m, prefix)
        tokens = self._tokens(m, text)
        result = await self._run(m, Step(tokens, session_id=session_id, k=k, prefix_ids=prefix_ids))
        return self._session_answer(m, session_id, result)

    async def reset(self, session_id: str, k: int = 5, prefix: str | None = None) -> dict[str, Any]:
        """Start a session's text afresh; the predictions for an empty text."""
        session_id = self._check_session_id(session_id)
        k = self._check_k(k)
        m = await self._model_of(session_id)
        prefix_ids = self._prefix_ids(m, prefix)
        result = await self._run(
            m, Step([], session_id=session_id, fresh=True, k=k, prefix_ids=prefix_ids)
        )
        return self._session_answer(m, session_id, result)

    def _session_answer(self, m: OrtModel, session_id: str, result: StepResult) -> dict[str, Any]:
        return {
            "session_id": session_id,
            "model": m.name,
            "tokens": result.tokens,
            "predictions": self._predictions(m, result.ids, result.probs),
        }

    async def session_info(self, session_id: str) -> dict[str, Any]:
        """Model, token count and times (ISO 8601, UTC) of a session."""
        record = await self.store.get(self._check_session_id(session_id))
        return {
            "session_id": record.session_id,
            "model": record.model,
            "tokens": record.tokens,
            "created_at": _iso(record.created_at),
            "last_used_at": _iso(record.last_used_at),
        }

    async def delete_session(self, session_id: str) -> None:
        """Forget a session."""
        session_id = self._check_session_id(session_id)
        await self.store.delete(session_id)
        self._session_models.pop(session_id, None)

    async def check_ready(self) -> None:
        """Raise `StoreUnavailable` when the session store cannot be reached."""
        await self.store.ping()
