"""The engine core: the models, one step scheduler per model and the session store.

`EngineCore` answers `EngineRequest`s (token ids in, ids and probabilities out) and is the
only writer of session state. It runs inside the engine process (`service.engine.proc`), or
inside an API process for tests and single-process use (`service.engine.client.InprocClient`):
the same object either way. It never sees text; the API side tokenizes and validates.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from itertools import repeat
from operator import attrgetter
from pathlib import Path
from typing import Any

import numpy as np

from service.config import Settings
from service.contract.artifact import ArtifactError, ModelArtifact, model_dirs
from service.contract.protocol import (
    AbortRequest,
    DeleteRequest,
    EngineOutput,
    EngineRequest,
    InfoRequest,
    PingRequest,
    StepRequest,
)
from service.engine import adapt
from service.engine.adapt_hooks import Adaptation
from service.engine.pool import StatePool, device_free_bytes, pool_rows, row_bytes
from service.engine.runtime import CUDA, OrtModel, choose_providers
from service.engine.scheduler import StepBatcher
from service.engine.steps import BatchResults, Outcome, Step, StepResult
from service.errors import NextwordError, StepFailed, UnknownModel
from service.store import SessionStore, open_store

_TAG = attrgetter("tag")  # a step's request id

log = logging.getLogger(__name__)

Reply = Callable[[EngineOutput], None]


def artifact_dirs(models_dir: Path) -> list[Path]:
    """The artifact directories under `models_dir`, sorted; raises ArtifactError when none.

    Every subdirectory must be an artifact (hidden ones and `__pycache__` are skipped): a
    directory without a manifest is an error naming it, not a model silently missing.
    """
    return model_dirs(models_dir)


def load_models(settings: Settings) -> dict[str, OrtModel]:
    """Every artifact directory of the settings' models directory (verified), by name."""
    chosen = choose_providers(settings.providers)
    auto = settings.providers.strip().lower() == "auto"
    models = {
        path.name: OrtModel(
            ModelArtifact.load(path),
            chosen,
            settings.intra_op_threads,
            allow_tf32=settings.cuda_tf32,
        )
        for path in artifact_dirs(Path(settings.models_dir))
    }
    for model in models.values():
        if model.cuda_fallback is not None and not auto:
            # Asked for by name, CUDA is required: no silent CPU service.
            raise ValueError(
                f"providers {settings.providers!r}: model {model.name}: {model.cuda_fallback}"
            )
        # "auto" on a machine without a usable GPU is the ordinary case: info, with why.
        level = logging.WARNING if model.cuda_fallback else logging.INFO
        log.log(level, model.describe_providers(cuda_wanted=CUDA in chosen or auto))
    return models


def attach_pools(settings: Settings, models: dict[str, OrtModel]) -> dict[str, StatePool]:
    """A resident state pool per model that passes its check (`StatePool.check`), by name;
    a model without one copies its states per batch."""
    if not settings.state_pool:
        return {}
    budget = None
    if any(model.on_cuda for model in models.values()):
        free = device_free_bytes()
        if free is None:
            log.warning("free GPU memory unknown: state pools sized from the session cap")
        else:
            budget = int(free * settings.state_pool_memory) // len(models)
    pools = {}
    for name, model in models.items():
        rows = pool_rows(
            settings.state_pool_rows,
            settings.session_cap,
            settings.max_batch,
            row_bytes(model),
            budget,
        )
        try:
            pool = StatePool(model, rows)
            problem = pool.check()
        except Exception as exc:  # e.g. a provider without a kernel the pool's graph uses
            problem = f"{type(exc).__name__}: {exc}"
        if problem is not None:  # never seen so far
            log.error(
                "model %s: the state pool on %s fails its check (%s): states are copied "
                "per batch instead",
                name,
                model.providers[0],
                problem,
            )
            continue
        pools[name] = pool
    return pools


def describe_model(model: OrtModel, pool: StatePool | None = None) -> dict[str, Any]:
    """One model as `GET /v1/models` lists it."""
    manifest = model.artifact.manifest
    return {
        "name": model.name,
        "cell": model.cell,
        "vocab_size": len(model.vocab),
        "layers": model.layers,
        "hidden_size": model.hidden_size,
        "embedding_size": int(manifest["embedding_size"]),
        "quantization": (manifest.get("quantization") or {}).get("type", "none"),
        "providers": list(model.providers),
        "metrics": manifest.get("metrics", {}),
        # As a keyboard user takes the suggestions (`nextword evaluate --keyboard`).
        "keyboard": manifest.get("keyboard", {}),
        "adaptation": describe_adaptation(model),
        "state_pool": describe_pool(pool),
    }


def describe_pool(pool: StatePool | None) -> dict[str, Any] | None:
    """Where a model keeps its sessions' states (None: copied per batch, no pool)."""
    if pool is None:
        return None
    return {
        "device": pool.device,
        "rows": pool.rows,
        "bytes_per_session": 2 * pool.row_bytes,  # the states after and before the last word
        "bytes": pool.nbytes,
    }


def describe_adaptation(model: OrtModel) -> dict[str, Any]:
    """A model's adaptation parameters and what a session's memory of its writer costs:
    `capacity` words (an int32 key and a float32 weight each) and up to `max_oov` typed
    words outside the vocabulary."""
    params = adapt.params_of(model.artifact.manifest)
    return {
        "params": params.to_dict(),
        "memory_bytes_per_session": 8 * params.capacity,
        "metrics": (model.artifact.manifest.get("adaptation") or {}).get("metrics", {}),
    }


def _failure(request_id: int, error: BaseException) -> EngineOutput:
    if not isinstance(error, NextwordError):
        log.error("request %d failed", request_id, exc_info=error)
        error = StepFailed(f"the step failed ({type(error).__name__})")
    retry_after_s = getattr(error, "retry_after_s", None) or 0.0
    return EngineOutput(
        request_id, error=error.code, message=error.message, retry_after_s=retry_after_s
    )


class _FrameAnswers:
    """Where a frame's steps for one model end (a `StepSink`): each outcome becomes its
    request's `EngineOutput` (the step's tag is the request id) passed to the frame's
    `reply`, and the step leaves its origin's pending table. A cancelled step is owed no
    answer."""

    __slots__ = ("reply", "model", "pending", "scheduler")

    def __init__(
        self, reply: Reply, model: str, pending: dict[int, Step], scheduler: StepBatcher
    ) -> None:
        self.reply = reply
        self.model = model
        self.pending = pending
        self.scheduler = scheduler  # the steps' scheduler: an abort cancels through it

    def __call__(self, steps: list[Step], outcomes: Sequence[Outcome]) -> None:
        reply, model, pending = self.reply, self.model, self.pending
        if isinstance(outcomes, BatchResults):
            self._answer_batch(steps, outcomes)
            return
        for step, outcome in zip(steps, outcomes):
            request_id = step.tag
            pending.pop(request_id, None)
            if outcome is None:
                continue  # cancelled: its client is gone
            if isinstance(outcome, StepResult):
                reply(
                    EngineOutput(
                        request_id,
                        ids=outcome.ids.tolist(),
                        probs=outcome.probs.tolist(),
                        tokens=outcome.tokens,
                        model=model,
                        words=list(outcome.words),
                        last_token=outcome.last_token,
                    )
                )
            else:
                reply(_failure(request_id, outcome))

    def _answer_batch(self, steps: list[Step], results: BatchResults) -> None:
        """Every step answered from one batch's columns: its ids and probabilities as lists
        made once for the batch, the same `EngineOutput`s (the same bytes on the wire)."""
        reply, model, pending = self.reply, self.model, self.pending
        ids, probs = results.answer_lists()
        written = results.written
        words = results.words
        tokens_of = np.asarray(written.tokens).tolist()
        last_of = np.asarray(written.last_token).tolist()
        tags = list(map(_TAG, steps))
        deque(map(pending.pop, tags, repeat(None)), maxlen=0)  # ended: no abort finds them
        if words is None:  # no typed words: `words` left at its default, [] (same bytes)
            for request_id, ids_i, probs_i, tokens, last in zip(
                tags, ids, probs, tokens_of, last_of
            ):
                reply(
                    EngineOutput(
                        request_id,
                        ids=ids_i,
                        probs=probs_i,
                        tokens=tokens,
                        model=model,
                        last_token=last,
                    )
                )
            return
        for request_id, ids_i, probs_i, tokens, last, typed in zip(
            tags, ids, probs, tokens_of, last_of, words
        ):
            reply(
                EngineOutput(
                    request_id,
                    ids=ids_i,
                    probs=probs_i,
                    tokens=tokens,
                    model=model,
                    words=list(typed),
                    last_token=last,
                )
            )


def _queue(frame: dict[str, tuple[_FrameAnswers, list[Step]]]) -> None:
    """Queue a frame's steps, one call per model."""
    for answers, steps in frame.values():
        answers.scheduler.submit_many(steps, answers)


class EngineCore:
    """Models, schedulers and sessions behind one entry point, `handle`."""

    def __init__(
        self,
        settings: Settings,
        models: dict[str, OrtModel],
        store: SessionStore,
        pools: dict[str, StatePool] | None = None,
        keep_states: bool = False,
        cache_states: bool = False,
    ) -> None:
        """`keep_states`: `store` is this process's memory store (opened here), so sessions'
        states may stay on a pool's device between steps, their records written without
        state (`service.engine.residency`); any other store is given host states, and with
        `cache_states` (a shared store written through) the engine keeps the rows of what
        it wrote as well."""
        if settings.default_model not in models:
            raise ArtifactError(
                f"default model {settings.default_model!r} is not in {settings.models_dir} "
                f"(found {sorted(models)})"
            )
        self.settings = settings
        self.models = models
        self.pools = pools or {}  # a model's resident states; none: copied per batch
        self.store = store
        self.schedulers = {
            name: StepBatcher(
                model,
                store,
                max_batch=settings.max_batch,
                max_wait_ms=settings.max_wait_ms,
                max_queue=settings.max_queue,
                prefill_chunk=settings.prefill_chunk,
                queue_share=settings.queue_share,
                adaptation=Adaptation.of(model) if settings.adapt_memory else None,
                adapt_default=settings.adapt,
                pool=self.pools.get(name),
                keep_states=keep_states,
                cache_states=cache_states,
            )
            for name, model in models.items()
        }
        # Steps not ended yet, by origin and request id: an abort cancels them. An origin's
        # table stays (empty) once made: origins are the API processes, a handful.
        self._pending: dict[Hashable, dict[int, Step]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._housekeeping: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, settings: Settings) -> EngineCore:
        """Load every model, open the store and start the schedulers."""
        models = await asyncio.to_thread(load_models, settings)
        pools = await asyncio.to_thread(attach_pools, settings, models)
        store = open_store(
            settings.session_store,
            settings.session_ttl_s,
            settings.session_cap,
            settings.session_store_write,
            owner_cap=settings.max_sessions_per_key,
            timeout_s=settings.session_store_timeout_s,
            behind_window_s=settings.session_store_behind_window_s,
        )
        # The in-process store keeps the engine's sessions: their states may stay resident.
        # Through a shared store, every version answered is in Redis: rows may be kept too.
        memory = settings.session_store == "memory"
        through = not memory and settings.session_store_write == "through"
        core = cls(settings, models, store, pools, keep_states=memory, cache_states=through)
        for scheduler in core.schedulers.values():
            await scheduler.start()
        core._housekeeping = asyncio.get_running_loop().create_task(
            core._keep_house(), name="session-housekeeping"
        )
        log.info(
            "engine: models %s (default %s); session store %s",
            sorted(models),
            settings.default_model,
            settings.session_store.split("@")[-1],
        )
        return core

    async def close(self) -> None:
        """Answer every queued step, stop the schedulers and close the store."""
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            await asyncio.wait([self._housekeeping])
            self._housekeeping = None
        await asyncio.gather(*(s.stop(drain=True) for s in self.schedulers.values()))
        if self._tasks:
            await asyncio.wait(list(self._tasks))
        await self.store.close()

    def describe(self) -> list[dict[str, Any]]:
        """The loaded models, as `GET /v1/models` lists them."""
        return [describe_model(model, self.pools.get(name)) for name, model in self.models.items()]

    async def _keep_house(self) -> None:
        """Drop expired sessions and refresh the active-sessions gauge now and then."""
        interval = min(5.0, max(0.05, self.settings.session_ttl_s / 10))
        while True:
            await asyncio.sleep(interval)
            with contextlib.suppress(Exception):  # a store outage is reported by /readyz
                await self.store.count()

    # --- requests ----------------------------------------------------------------

    def handle(self, requests: list[EngineRequest], reply: Reply, origin: Hashable = None) -> None:
        """Take a frame of requests from `origin`; each answer is passed to `reply` once.

        Runs on the engine's event loop; it never blocks. The frame's steps are made in one
        pass and queued per model (one `_FrameAnswers` sink per model and frame, no closure
        per request); an abort or a query queues the steps before it first, so that it sees
        them. The rare session queries run as tasks.
        """
        pending = self._pending.get(origin)
        if pending is None:
            pending = self._pending[origin] = {}
        frame: dict[str, tuple[_FrameAnswers, list[Step]]] = {}  # its steps not queued yet
        for request in requests:
            if isinstance(request, StepRequest):
                group = frame.get(request.model)
                if group is None:
                    scheduler = self.schedulers.get(request.model)
                    if scheduler is None:
                        loaded = sorted(self.models)
                        error = UnknownModel(f"no model {request.model!r}; loaded: {loaded}")
                        reply(_failure(request.request_id, error))
                        continue
                    answers = _FrameAnswers(reply, request.model, pending, scheduler)
                    group = frame[request.model] = (answers, [])
                try:
                    step = Step.from_request(request)
                except NextwordError as exc:
                    reply(_failure(request.request_id, exc))
                    continue
                pending[request.request_id] = step
                group[1].append(step)
                continue
            if frame:
                _queue(frame)
                frame = {}
            if isinstance(request, AbortRequest):
                for request_id in request.request_ids:
                    aborted = pending.pop(request_id, None)
                    if aborted is not None and isinstance(aborted.sink, _FrameAnswers):
                        # Dropped before its run, never written after it; no answer.
                        aborted.sink.scheduler.cancel(aborted)
            else:
                self._spawn(self._query(request), reply, request.request_id)
        if frame:
            _queue(frame)

    def _spawn(self, coroutine: Any, reply: Reply, request_id: int) -> None:
        async def run() -> None:
            try:
                output = await coroutine
            except Exception as exc:
                output = _failure(request_id, exc)
            reply(output)

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _words_remembered(self, model: str, memory: Any) -> int:
        """Distinct words a memory holds (not its recency marks and pairs)."""
        loaded = self.models.get(model)
        if loaded is None:
            return int((memory.keys >= 0).sum())
        layout = adapt.Layout.of(len(loaded.vocab), adapt.params_of(loaded.artifact.manifest))
        return int(layout.word_keys(memory.keys).sum())

    async def _query(self, request: InfoRequest | DeleteRequest | PingRequest) -> EngineOutput:
        if isinstance(request, InfoRequest):
            record = await self.store.get(request.session_id)
            memory = record.memory
            return EngineOutput(
                request.request_id,
                tokens=record.tokens,
                model=record.model,
                created_at=record.created_at,
                last_used_at=record.last_used_at,
                adapt=record.adapt,
                remembered=0 if memory is None else self._words_remembered(record.model, memory),
                memory_bytes=0 if memory is None else memory.nbytes,
            )
        if isinstance(request, DeleteRequest):
            await self.store.delete(request.session_id)
            for scheduler in self.schedulers.values():  # its rows go back at once
                if scheduler.residency is not None:
                    scheduler.residency.drop([request.session_id])
            return EngineOutput(request.request_id)
        await self.store.ping()
        # The answer to a ping describes the models: what an API process lists.
        return EngineOutput(request.request_id, message=json.dumps(self.describe()))
