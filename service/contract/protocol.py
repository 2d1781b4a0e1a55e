"""The wire protocol between API processes and the engine: msgspec Structs, batched per tick.

Every frame is a list: an API process sends `list[EngineRequest]` gathered during one tick
of its event loop, the engine answers with `list[EngineOutput]` gathered the same way, so the
per-send cost (syscall, ZeroMQ, encoding setup) is paid per batch, not per message. Structs
are `array_like` (no field names on the wire) and `gc=False` (they hold no cycles).

API processes send token ids, never text; the engine answers ids and probabilities, never
vocabulary words: tokenizing and display forms are the API side's work. The exception is
the writer's own words outside the vocabulary (adaptation): a step carries the typed form
of each of its `<unk>` tokens, and an answer that suggests one carries the session's typed
words (an id V + j is `words[j]`, V the vocabulary's size).
"""

from __future__ import annotations

import msgspec


class StepRequest(msgspec.Struct, array_like=True, gc=False, tag=1):
    """Add `tokens` to a context (a session's, or a stateless one) and answer its top `k`."""

    request_id: int
    model: str
    tokens: list[int]
    k: int
    session_id: str | None = None  # None: stateless (predict)
    create: bool = False  # a new session: it must not exist yet
    fresh: bool = False  # start the session's context afresh (reset)
    prefix_ids: bytes | None = None  # sorted int64 ids of the words matching a prefix
    owner: str = ""  # a new session's quota owner (an API key's name, or a client address)
    # Adaptation (service.engine.adapt): use the writer's words in this answer (None: the
    # session's default; for a new session or a predict, the engine's); the typed forms
    # of this step's `<unk>` tokens, in order; the prefix as the user typed it (the engine
    # normalizes it to match the writer's typed words).
    adapt: bool | None = None
    typed: list[str] = []
    prefix: str = ""
    forget: bool = False  # forget the writer's words (the context stays)
    client: str = ""  # whose share of the queue the step takes (service.engine.fairness)
    # The step's id (a digest of the client's message id or Idempotency-Key and the step's
    # content; "" = none): a session keeps its last step's id, and a step with that id
    # again is a retry, answered without being applied a second time.
    step_id: str = ""
    # float32 per prefix id: how likely the prefix was typed for it (1: a clean prefix, less:
    # a slip, `service.contract.slips`); the words rank by probability times it. None: all 1.
    prefix_slips: bytes | None = None


class InfoRequest(msgspec.Struct, array_like=True, gc=False, tag=2):
    """A session's model, token count and timestamps."""

    request_id: int
    session_id: str


class DeleteRequest(msgspec.Struct, array_like=True, gc=False, tag=3):
    """Forget a session."""

    request_id: int
    session_id: str


class PingRequest(msgspec.Struct, array_like=True, gc=False, tag=4):
    """Is the engine up, and does its session store answer?"""

    request_id: int


class AbortRequest(msgspec.Struct, array_like=True, gc=False, tag=5):
    """The clients of these requests went away: drop them if they have not run yet."""

    request_ids: list[int]


EngineCall = StepRequest | InfoRequest | DeleteRequest | PingRequest  # each gets one output
EngineRequest = EngineCall | AbortRequest


class EngineOutput(msgspec.Struct, array_like=True, gc=False):
    """The answer to one request; `error` is a `NextwordError` code, or None on success."""

    request_id: int
    error: str | None = None
    message: str = ""
    ids: list[int] = []  # best first
    probs: list[float] = []
    tokens: int = 0  # tokens in the context now
    model: str = ""
    created_at: float = 0.0
    last_used_at: float = 0.0
    words: list[str] = []  # the session's typed words, when an id >= V refers to them
    adapt: bool = True  # (info) the session's default for `adapt`
    remembered: int = 0  # (info) distinct words the session remembers
    memory_bytes: int = 0  # (info) bytes its memory holds
    retry_after_s: float = 0.0  # (error `overloaded`) when to retry, from the drain rate
    # Last, so that an output without it decodes (array_like): the context's last token,
    # the end-of-sentence id at the start of a text (where a word is capitalised).
    last_token: int = -1


request_encoder = msgspec.msgpack.Encoder()
request_decoder = msgspec.msgpack.Decoder(list[EngineRequest])
output_encoder = msgspec.msgpack.Encoder()
output_decoder = msgspec.msgpack.Decoder(list[EngineOutput])
