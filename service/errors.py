"""The errors of the service, raised where they arise and translated once, at the edge.

NextwordError            code, status (HTTP), ws_close (None: answered in-band)
├── BadInput             422  bad_input        text too long, k out of range, wrong fields
├── UnknownModel         404  unknown_model
├── UnknownSession       404  unknown_session  (WebSocket close 4404 on connect)
├── Overloaded           503  overloaded       queue full, or this client's share of it
├── StoreUnavailable     503  store_unavailable  session store (Redis) unreachable: not applied
│   └── OutcomeUnknown   503  outcome_unknown  a write went unanswered: applied or not
├── NotReady             503  not_ready        starting, shutting down, or the engine is away
│   └── EngineRestarting 503  engine_restarting  the engine process died and is restarting
└── StepFailed           500  step_failed      the model run failed; sessions keep their state
    └── Contended        503  contended        the session kept changing under the step (other
                                               replicas wrote it first) past the retries: retry

A `Contended` step was not applied, like any `StepFailed` one; it is a 503 with Retry-After
(the client should simply retry), never a 500. An `EngineRestarting` step was not applied
unless its `maybe_applied` says it may have been (it reached the engine, and the store is
Redis, written before the engine died): the session's `tokens` then tells which.

`details()` holds the fields an error adds to its body beyond `code` and `message`.

The engine sends only the `code` and the message over the wire (`error_from_code` rebuilds
the error in the API process); the API maps each type to an HTTP status and a WebSocket
close code in one place (`service.api.errors`).
"""

from __future__ import annotations

import math
from typing import Any


class NextwordError(Exception):
    """Base class: a machine-readable `code`, an HTTP `status` and a message."""

    code = "error"
    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def details(self) -> dict[str, Any]:
        """Fields of the error's body besides `code` and `message` (none by default)."""
        return {}


class BadInput(NextwordError):
    """The request is well-formed JSON but its content is not acceptable."""

    code = "bad_input"
    status = 422


class UnknownModel(NextwordError):
    """No model of that name is loaded."""

    code = "unknown_model"
    status = 404


class UnknownSession(NextwordError):
    """No live session with that id (never created, deleted or expired)."""

    code = "unknown_session"
    status = 404


class Overloaded(NextwordError):
    """Too many steps are waiting (in all, or of this client); retry after `retry_after_s`
    (None: the default)."""

    code = "overloaded"
    status = 503

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def details(self) -> dict[str, Any]:
        if not self.retry_after_s:
            return {}
        return {"retry_after_ms": math.ceil(self.retry_after_s * 1000)}


class StoreUnavailable(NextwordError):
    """The session store cannot be reached."""

    code = "store_unavailable"
    status = 503


class OutcomeUnknown(StoreUnavailable):
    """The session store did not answer a write in time: the step may have been applied (a
    hung Redis applies it when it resumes) or not. Resent with its id (the stream message's
    `id`, the `Idempotency-Key` header), it is recognised if it was applied."""

    code = "outcome_unknown"
    status = 503


class PartlyWritten(OutcomeUnknown):
    """A batch's write failed part-way (a Redis Cluster shard lost mid-write): `written[i]`
    is True where record i is known to be stored, None where that is not known. The
    known ones are answered; the others fail with this error: `outcome_unknown`, since a
    part not read back may have been stored (resent with its id, it is recognised)."""

    def __init__(self, message: str, written: list[bool | None]) -> None:
        super().__init__(message)
        self.written = written


class StepFailed(NextwordError):
    """The model run of a batch failed; no session state was changed."""

    code = "step_failed"
    status = 500


class Contended(StepFailed):
    """The session's compare-and-set write kept losing to other writers: nothing was applied."""

    code = "contended"
    status = 503


class RateLimited(NextwordError):
    """Over the key's (or client address's) request rate; retry after `retry_after_s`."""

    code = "rate_limited"
    status = 429

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def details(self) -> dict[str, Any]:
        return {"retry_after_ms": math.ceil(self.retry_after_s * 1000)}


class NotReady(NextwordError):
    """The service is starting or shutting down, or the engine process does not answer."""

    code = "not_ready"
    status = 503


class EngineRestarting(NotReady):
    """The engine process died and the supervisor is starting another: retry after
    `retry_after_s`. `maybe_applied`: the step had reached the engine before it died and the
    store is durable (Redis), so it may have been applied; False: it was not."""

    code = "engine_restarting"
    status = 503

    def __init__(
        self, message: str, retry_after_s: float = 1.0, maybe_applied: bool = False
    ) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.maybe_applied = maybe_applied

    def details(self) -> dict[str, Any]:
        return {
            "retry_after_ms": math.ceil(self.retry_after_s * 1000),
            "maybe_applied": self.maybe_applied,
        }


ERRORS_BY_CODE: dict[str, type[NextwordError]] = {
    cls.code: cls
    for cls in (
        BadInput,
        UnknownModel,
        UnknownSession,
        Overloaded,
        StoreUnavailable,
        OutcomeUnknown,
        NotReady,
        EngineRestarting,
        StepFailed,
        Contended,
    )
}


def error_from_code(code: str, message: str, retry_after_s: float = 0.0) -> NextwordError:
    """The typed error of a code received from the engine (StepFailed when unknown);
    `retry_after_s` (0: none) of an `Overloaded` one."""
    if code == Overloaded.code:
        return Overloaded(message, retry_after_s or None)
    return ERRORS_BY_CODE.get(code, StepFailed)(message)
