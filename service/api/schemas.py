"""Request and response bodies of API v1 (see DESIGN.md), with their limits and examples.

Requests are strict (no type coercion: `"k": "5"` is refused) and closed (an unknown
field is refused). An integer field takes any JSON number without a fraction (`20` or
`20.0`: both are integers in JSON Schema, which the OpenAPI document uses); `2.5`, `"5"`
and `true` are refused. The text limit comes from the settings: each app subclasses the
`*Base` bodies with `text` limited to its `max_text_chars` (see `service.api`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, JsonValue, model_validator

from service.contract.limits import MAX_K, MAX_NAME_CHARS, MAX_PREFIX_CHARS

TEXT_DOC = "Whole words typed so far (may be empty: predictions for the start of a text)."


def integral(value: Any) -> Any:
    """A float without a fraction as the int it is (JSON Schema's `integer`); else as is."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


K = Annotated[
    int,
    Field(ge=1, le=MAX_K, description="How many predictions to return."),
    BeforeValidator(integral),  # last: it runs first, then the strict, bounded int
]
ModelName = Annotated[
    str | None,
    Field(max_length=MAX_NAME_CHARS, description="A loaded model; null = the default model."),
]
Prefix = Annotated[
    str | None,
    Field(
        max_length=MAX_PREFIX_CHARS,
        description="The partly typed current word: words starting with it "
        "(case-insensitive) are predicted, then words one typing slip away from it, marked "
        "`corrected`; a capital typed in it is kept in the words. It is not added to the "
        "context.",
    ),
]

Adapt = Annotated[
    bool | None,
    Field(
        description="Mix the writer's own recent words into the answer (the session's "
        "recency cache; typed words outside the vocabulary can be suggested). null = the "
        "session's default (for a new session or a predict: the service's, "
        "`NEXTWORD_ADAPT`). The words are remembered either way.",
    ),
]


class Request(BaseModel):
    """Base of every request body: strict types, unknown fields refused."""

    model_config = ConfigDict(strict=True, extra="forbid")


# --- responses ---------------------------------------------------------------------


class Prediction(BaseModel):
    """One candidate next word and the model's probability of it (not renormalised)."""

    word: str = Field(
        description="The word as it would be typed at this position: capitalised at the start "
        'of a sentence, names and acronyms in their usual case, "I" always, and any capital '
        "typed in the prefix kept. (Before 2026-12 words came lower-cased.)"
    )
    probability: float = Field(
        description="The model's probability of the word next (mixed with the writer's own "
        "words when adapting), not renormalised. Words are ranked by it, times the slip's "
        "likelihood for a corrected word."
    )
    corrected: bool = Field(
        False,
        description="True when the prefix does not start the word: the word is one typing slip "
        "away from it (a neighbouring QWERTY key, two letters swapped, a letter missing or "
        "extra). Such words rank below clean completions unless much more likely.",
    )


PREDICTIONS_EXAMPLE: list[JsonValue] = [
    {"word": "now", "probability": 0.1843, "corrected": False},
    {"word": "soon", "probability": 0.0721, "corrected": False},
    {"word": "late", "probability": 0.0412, "corrected": False},
]


class PredictResponse(BaseModel):
    """Answer of `POST /v1/predict`."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"model": "lstm", "tokens": 4, "predictions": PREDICTIONS_EXAMPLE}]
        }
    )

    model: str
    tokens: int = Field(description="Tokens of the text (the implicit start is not counted).")
    predictions: list[Prediction]


class SessionResponse(BaseModel):
    """Answer of creating, feeding or resetting a session."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "session_id": "kq3Zb8M2rXb1yWc0n4LQ5w",
                    "model": "lstm",
                    "tokens": 4,
                    "predictions": PREDICTIONS_EXAMPLE,
                }
            ]
        }
    )

    session_id: str
    model: str
    tokens: int = Field(description="Tokens the session's context now holds.")
    predictions: list[Prediction]


class MemoryInfo(BaseModel):
    """The size of a session's memory of its writer's words (bounded per model)."""

    words: int = Field(description="Distinct words remembered.")
    bytes: int = Field(description="Bytes the memory holds (its slots and typed words).")


class SessionInfo(BaseModel):
    """Answer of `GET /v1/sessions/{session_id}`; times are ISO 8601, UTC."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "session_id": "kq3Zb8M2rXb1yWc0n4LQ5w",
                    "model": "lstm",
                    "tokens": 4,
                    "created_at": "2026-01-05T09:30:00.123456+00:00",
                    "last_used_at": "2026-01-05T09:31:12.654321+00:00",
                    "adapt": True,
                    "memory": {"words": 3, "bytes": 2048},
                }
            ]
        }
    )

    session_id: str
    model: str
    tokens: int
    created_at: str
    last_used_at: str
    adapt: bool = Field(description="The session's default for `adapt`.")
    memory: MemoryInfo = Field(description="What the session remembers of its writer.")


class ModelInfo(BaseModel):
    """A loaded model; further fields (quantization, providers, metrics...) may follow."""

    model_config = ConfigDict(extra="allow")

    name: str
    cell: Literal["lstm", "gru"]
    vocab_size: int
    layers: int
    hidden_size: int
    keyboard: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        description="Held-out figures as a keyboard user takes the suggestions (k = 3, case "
        "exact), by text: next-word and completion top-1/3, completion with a typing slip, "
        "the share of lists echoing the word just typed, keystroke savings "
        "(`nextword evaluate --keyboard`; see docs/models.md).",
    )


class ModelsResponse(BaseModel):
    """Answer of `GET /v1/models`."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "default": "lstm",
                    "models": [
                        {
                            "name": "lstm",
                            "cell": "lstm",
                            "vocab_size": 20000,
                            "layers": 2,
                            "hidden_size": 512,
                            "embedding_size": 256,
                        },
                        {
                            "name": "gru",
                            "cell": "gru",
                            "vocab_size": 20000,
                            "layers": 2,
                            "hidden_size": 512,
                            "embedding_size": 256,
                        },
                    ],
                }
            ]
        }
    )

    default: str
    models: list[ModelInfo]


class ErrorDetail(BaseModel):
    """What went wrong: a stable machine-readable `code` and a message for people."""

    code: str = Field(examples=["unknown_session"])
    message: str = Field(examples=["no session 'kq3Zb8M2rXb1yWc0n4LQ5w' (expired or deleted)"])
    retry_after_ms: int | None = Field(
        default=None,
        description="`rate_limited`, `engine_restarting`: milliseconds to wait before a retry.",
    )
    maybe_applied: bool | None = Field(
        default=None,
        description="`engine_restarting`: whether the request may have been applied before "
        "the engine died (compare the session's `tokens`); false: it was not.",
    )


class ErrorResponse(BaseModel):
    """Body of every 4xx/5xx answer."""

    error: ErrorDetail


class Status(BaseModel):
    """Answer of `/healthz` and `/readyz`."""

    status: str = Field(examples=["ok"])


# --- requests carrying text (their limit comes from the settings) ------------------


class PredictRequestBase(Request):
    """Body of `POST /v1/predict`."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"text": "I am coming", "k": 3},
                {"text": "see you", "k": 5, "model": "gru", "prefix": "to"},
            ]
        }
    )

    text: str = Field(description=TEXT_DOC)
    k: K = 5
    model: ModelName = None
    prefix: Prefix = None
    adapt: Adapt = None


class SessionRequestBase(Request):
    """Body of `POST /v1/sessions` (every field optional)."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{}, {"text": "I am", "k": 5, "model": "lstm"}]}
    )

    text: str = Field("", description=TEXT_DOC)
    k: K = 5
    model: ModelName = None
    prefix: Prefix = None
    adapt: Adapt = None


class FeedRequestBase(Request):
    """Body of `POST /v1/sessions/{session_id}/feed`: words appended to the context."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"text": "coming home", "k": 5}, {"text": "", "prefix": "to"}]
        }
    )

    text: str = Field(description=TEXT_DOC)
    k: K = 5
    prefix: Prefix = None
    adapt: Adapt = None


class StreamMessageBase(Request):
    """A client message on `/v1/stream`: words to feed, or `{"type": "reset"}`."""

    type: Literal["text", "reset"] = "text"
    text: str | None = None
    k: K | None = None
    prefix: Prefix = None
    adapt: Adapt = None
    id: Any = None

    @model_validator(mode="after")
    def _text_iff_text_message(self) -> StreamMessageBase:
        if self.type == "text" and self.text is None:
            raise ValueError('a message needs "text" (or "type": "reset")')
        if self.type == "reset" and self.text is not None:
            raise ValueError('a "reset" message takes no "text"')
        return self
