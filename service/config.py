"""Settings of the service: one pydantic-settings class, read from `NEXTWORD_*` variables.

This is the only module that reads the environment; everything else gets its
configuration as arguments.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

BUNDLED_MODELS = Path(__file__).resolve().parent / "models"


class Settings(BaseSettings):
    """Everything configurable, with defaults for a keyboard-style workload."""

    model_config = SettingsConfigDict(env_prefix="NEXTWORD_", extra="ignore")

    # Models and ONNX Runtime.
    models_dir: Path = Field(default=BUNDLED_MODELS, description="directory of model artifacts")
    default_model: str = Field(default="lstm", description="model of requests that name none")
    providers: str = Field(
        default="auto",
        description='"auto" (CUDA when usable, else CPU) or a comma list of providers',
    )
    intra_op_threads: int = Field(
        default=0, ge=0, description="ORT threads per run; 0 = one per core"
    )
    cuda_tf32: bool = Field(
        default=False,
        description="let ORT's CUDA provider use TF32 (faster; breaks the 1e-4 invariant)",
    )

    # HTTP server.
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    workers: int = Field(
        default=0, ge=0, description="API processes; 0 = one per two cores, 1 to 8"
    )
    engine_address: str = Field(
        default="",
        description="ZeroMQ address prefix of the engine process (set by `nextword serve` "
        'for its API processes); "" = run the engine inside this process',
    )
    metrics_dir: str = Field(
        default="",
        validation_alias="PROMETHEUS_MULTIPROC_DIR",
        description="prometheus_client's multiprocess directory (set by `nextword serve`)",
    )
    ws_per_message_deflate: bool = Field(
        default=False,
        description="offer WebSocket per-message compression (costs CPU on small messages)",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = "info"

    # Sessions.
    session_ttl_s: float = Field(default=1800.0, gt=0, description="idle seconds to expiry")
    session_cap: int = Field(default=100_000, ge=1, description="most sessions; LRU evicted")
    session_store: str = Field(default="memory", description='"memory" or "redis://host:port/db"')
    session_store_write: Literal["through", "behind"] = Field(
        default="through",
        description='with Redis: "through" writes each batch before answering (loses '
        'nothing answered); "behind" answers first and flushes every 50 ms',
    )

    # Batching.
    max_batch: int = Field(default=256, ge=1, description="most steps in one model run")
    max_wait_ms: float = Field(default=2.0, ge=0, description="longest wait for a batch to fill")
    max_queue: int = Field(default=10_000, ge=1, description="queued steps per model before 503")

    # Limits on requests.
    max_text_chars: int = Field(default=10_000, ge=1)
    max_tokens_per_request: int = Field(default=2_048, ge=1)
    max_ws_message_bytes: int = Field(default=65_536, ge=1)

    def api_processes(self) -> int:
        """How many API processes `nextword serve` starts."""
        return self.workers or max(1, min(8, (os.cpu_count() or 1) // 2))

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("session_store")
    @classmethod
    def _store_url(cls, value: str) -> str:
        if value != "memory" and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError('session_store must be "memory" or a redis:// URL')
        return value
