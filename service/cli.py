"""The `nextword` command: serve the API, predict from the shell, and (with the `train`
extra installed) train, evaluate and export models.

    nextword serve [--host H] [--port P] [--models DIR] [--workers N] [--log-level L]
    nextword predict TEXT [--model NAME] [-k K] [--prefix P] [--models DIR]
    nextword train|evaluate|export|casing ... (model_export.cli; needs torch)

Every option of `serve` has a `NEXTWORD_*` variable (see service/config.py); an
option given on the command line wins. Options reach the processes through those same
variables: the API processes build the app themselves by calling
`service.api:create_app()` (see service/supervisor.py for the process model).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from service.config import Settings
from service.errors import NextwordError

SERVICE_COMMANDS = ("serve", "predict")
TRAINING_COMMANDS = ("train", "evaluate", "export", "casing")
# `serve` option -> the Settings field it overrides.
SERVE_OPTIONS = {
    "host": "host",
    "port": "port",
    "models": "models_dir",
    "workers": "workers",
    "log_level": "log_level",
}
SHUTDOWN_GRACE_S = 30  # longest wait for open connections to finish on SIGTERM


def env_name(field: str) -> str:
    """The environment variable of a Settings field."""
    return f"{Settings.model_config.get('env_prefix', '')}{field}".upper()


def load_settings() -> Settings:
    """Settings from the environment, or exit with what is wrong in it."""
    try:
        return Settings()
    except ValidationError as exc:
        raise SystemExit(f"nextword: bad configuration:\n{exc}") from exc


# --- serve -----------------------------------------------------------------------


def uvicorn_log_config(level: str) -> dict[str, Any]:
    """uvicorn's logging, with the service's own loggers printed the same way."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    py_level = "DEBUG" if level == "trace" else level.upper()
    config["loggers"]["service"] = {"handlers": ["default"], "level": py_level, "propagate": False}
    # Session ids and access tokens never reach a log line (paths, queries, WebSocket lines).
    config.setdefault("filters", {})["redact"] = {"()": "service.logs.RedactIds"}
    for handler in config["handlers"].values():
        handler.setdefault("filters", []).append("redact")
    return config


def check_exposure(settings: Settings) -> None:
    """Refuse unreadable API keys; say so when an open service listens beyond loopback."""
    from service.api.auth import ApiKeyError, ApiKeys

    try:
        keys = ApiKeys.parse(settings.api_keys)
    except ApiKeyError as exc:
        raise SystemExit(f"nextword: {exc}") from exc
    loopback = settings.host in ("127.0.0.1", "::1", "localhost")
    if keys is None and not loopback:
        print(
            f"nextword: warning: listening on {settings.host} without API keys: anyone who "
            "reaches the port can use and read every session (set NEXTWORD_API_KEYS)",
            file=sys.stderr,
        )


def check_providers(settings: Settings) -> None:
    """Refuse, before any process starts, providers that cannot run here (CUDA named on a
    machine without a usable GPU, say). "auto" always can: it falls back to CPU."""
    if settings.providers.strip().lower() == "auto":
        return  # the engine decides, and logs for each model what it runs on and why
    from service.engine.runtime import choose_providers

    try:
        choose_providers(settings.providers)
    except ValueError as exc:
        raise SystemExit(f"nextword: NEXTWORD_PROVIDERS: {exc}") from exc


def serve(args: argparse.Namespace) -> int:
    """Run the engine and the API processes (service.supervisor) with the given options."""
    from service.logs import configure_logging
    from service.supervisor import serve as run_service

    for option, field in SERVE_OPTIONS.items():
        value = getattr(args, option)
        if value is not None:
            os.environ[env_name(field)] = str(value)
    settings = load_settings()
    if not Path(settings.models_dir).is_dir():
        raise SystemExit(f"nextword: models directory {settings.models_dir} not found")
    check_exposure(settings)
    check_providers(settings)
    configure_logging(settings.log_level, "supervisor")
    return run_service(
        settings,
        log_level=settings.log_level,
        log_config=uvicorn_log_config(settings.log_level),
        ws_max_size=settings.max_ws_message_bytes,
        ws_per_message_deflate=settings.ws_per_message_deflate,
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
        timeout_keep_alive=settings.keep_alive_timeout_s,
        ws_ping_interval=settings.ws_ping_interval_s or None,
        ws_ping_timeout=settings.ws_ping_timeout_s,
    )


# --- predict ---------------------------------------------------------------------


def prediction_table(answer: dict[str, Any]) -> str:
    """The predictions of an answer as a small aligned table."""
    rows = [
        (str(i), p["word"], f"{p['probability']:.4f}")
        for i, p in enumerate(answer["predictions"], 1)
    ]
    header = ("#", "word", "probability")
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(3)]
    lines = [f"model {answer['model']}, {answer['tokens']} tokens of context"]
    for row in [header, *rows]:
        lines.append(f"{row[0]:>{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:>{widths[2]}}")
    return "\n".join(lines)


async def predict_once(
    settings: Settings, text: str, k: int, model: str | None, prefix: str | None
) -> dict[str, Any]:
    """Start a predictor in this process, answer one request, close it."""
    from service.api.predictor import Predictor

    predictor = await Predictor.start(settings.model_copy(update={"engine_address": ""}))
    try:
        return await predictor.predict(text, k=k, model=model, prefix=prefix)
    finally:
        await predictor.close()


def predict(args: argparse.Namespace) -> int:
    """Print the next-word predictions for a text."""
    if args.models is not None:
        os.environ[env_name("models_dir")] = args.models
    settings = load_settings()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        answer = asyncio.run(predict_once(settings, args.text, args.k, args.model, args.prefix))
    except NextwordError as exc:
        print(f"nextword: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    print(prediction_table(answer))
    return 0


# --- the parser ------------------------------------------------------------------


def add_training_commands(commands: argparse._SubParsersAction) -> None:
    """train/evaluate/export from model_export, or stubs that say what is missing."""
    try:
        from model_export.cli import add_subcommands

        add_subcommands(commands)
    except ImportError as exc:  # the serving image has no torch (nor model_export)
        reason = f"{exc}; install the training extra: pip install 'nextword[train]'"

        def unavailable(args: argparse.Namespace) -> int:
            print(f"nextword {args.command}: unavailable ({reason})", file=sys.stderr)
            return 2

        for name in TRAINING_COMMANDS:
            if name not in commands.choices:
                # No option prefix: whatever follows (--help included) is taken as is.
                stub = commands.add_parser(
                    name, help=f"unavailable: {exc}", prefix_chars="\0", add_help=False
                )
                stub.add_argument("args", nargs="*")
                stub.set_defaults(handler=unavailable)


def build_parser(with_training: bool = True) -> argparse.ArgumentParser:
    """The `nextword` parser; training commands only when asked (importing them loads torch)."""
    parser = argparse.ArgumentParser(
        prog="nextword", description="Next-word prediction with recurrent language models."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve_p = commands.add_parser(
        "serve",
        help="serve the HTTP and WebSocket API",
        description="Serve API v1 with uvicorn. Each option defaults to its NEXTWORD_* "
        "variable, then to the built-in default.",
    )
    serve_p.add_argument("--host", help="address to bind (NEXTWORD_HOST; default 127.0.0.1)")
    serve_p.add_argument("--port", type=int, help="port (NEXTWORD_PORT; default 8000)")
    serve_p.add_argument(
        "--models",
        metavar="DIR",
        help="directory of model artifacts (NEXTWORD_MODELS_DIR; default: the bundled models)",
    )
    serve_p.add_argument(
        "--workers",
        type=int,
        help="API processes (NEXTWORD_WORKERS; default 0: one per two cores, 1 to 8)",
    )
    serve_p.add_argument(
        "--log-level",
        choices=["critical", "error", "warning", "info", "debug", "trace"],
        help="log level (NEXTWORD_LOG_LEVEL; default info)",
    )
    serve_p.set_defaults(handler=serve)

    predict_p = commands.add_parser(
        "predict",
        help="print the most likely next words of a text",
        description="Load the models in this process and print the top next words.",
    )
    predict_p.add_argument("text", help='whole words typed so far, e.g. "I am coming"')
    predict_p.add_argument("--model", help="model name (default: NEXTWORD_DEFAULT_MODEL)")
    predict_p.add_argument("-k", type=int, default=5, help="how many words (1..50; default 5)")
    predict_p.add_argument("--prefix", help="the partly typed next word")
    predict_p.add_argument("--models", metavar="DIR", help="directory of model artifacts")
    predict_p.set_defaults(handler=predict)

    if with_training:
        add_training_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `nextword` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # `serve` and `predict` never need torch: skip importing the training commands.
    with_training = not (argv and argv[0] in SERVICE_COMMANDS)
    parser = build_parser(with_training)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.handler(args) or 0)
    except ModuleNotFoundError as exc:  # training needs the `train` extra (torch, onnx, nltk)
        if exc.name is None or exc.name.split(".")[0] in ("service", "model_export"):
            raise
        print(
            f"nextword {args.command}: needs {exc.name!r}; install the training extra: "
            "pip install 'nextword[train]'",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
