"""The `nextword` command (service/cli.py): serve wiring, predict, training commands."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from service import cli
from tests.paths import ROOT as REPO_ROOT

ROOT = REPO_ROOT
SERVE_ENV = (
    "NEXTWORD_HOST",
    "NEXTWORD_PORT",
    "NEXTWORD_MODELS_DIR",
    "NEXTWORD_WORKERS",
    "NEXTWORD_LOG_LEVEL",
    "NEXTWORD_SESSION_STORE",
    "NEXTWORD_PROVIDERS",
)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No NEXTWORD_* serve variables; whatever the CLI sets is undone after the test."""
    for name in SERVE_ENV:
        monkeypatch.setenv(name, "")  # recorded, so that teardown restores the original
        monkeypatch.delenv(name)
    return monkeypatch


@pytest.fixture
def uvicorn_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Record what the supervisor would start instead of serving."""
    from service.supervisor import Supervisor

    calls: list[dict[str, Any]] = []

    def record(self: Supervisor) -> int:
        config = self.config
        calls.append(
            {
                "app": config.app,
                "factory": config.factory,
                "host": config.host,
                "port": config.port,
                "workers": self.settings.api_processes(),
                "ws_max_size": config.ws_max_size,
                "log_level": config.log_level,
                "log_config": config.log_config,
            }
        )
        return 0

    monkeypatch.setattr(Supervisor, "run", record)
    return calls


def default_api_processes() -> int:
    """One API process per two cores, 1 to 8."""
    import os

    return max(1, min(8, (os.cpu_count() or 1) // 2))


def test_serve_runs_the_app_factory_with_the_defaults(
    clean_env: pytest.MonkeyPatch, uvicorn_calls: list[dict[str, Any]]
) -> None:
    assert cli.main(["serve"]) == 0
    (call,) = uvicorn_calls
    assert call["app"] == "service.api:create_app" and call["factory"] is True
    assert (call["host"], call["port"]) == ("127.0.0.1", 8000)
    assert call["workers"] == default_api_processes()
    assert call["ws_max_size"] == 65_536
    assert call["log_config"]["loggers"]["service"]["level"] == "INFO"


def test_serve_options_win_over_the_environment_and_reach_the_workers(
    clean_env: pytest.MonkeyPatch, uvicorn_calls: list[dict[str, Any]], tmp_path: Path
) -> None:
    clean_env.setenv("NEXTWORD_PORT", "9000")
    clean_env.setenv("NEXTWORD_HOST", "0.0.0.0")
    assert (
        cli.main(
            [
                "serve",
                "--port",
                "9123",
                "--models",
                str(tmp_path),
                "--workers",
                "3",
                "--log-level",
                "debug",
            ]
        )
        == 0
    )
    (call,) = uvicorn_calls
    assert (call["host"], call["port"], call["workers"]) == ("0.0.0.0", 9123, 3)
    assert call["log_level"] == "debug"
    # Workers build the app from the environment: the options must be there.
    from service.config import Settings

    settings = Settings()
    assert (settings.port, settings.models_dir, settings.workers) == (9123, tmp_path, 3)


def test_serve_refuses_bad_configuration(
    clean_env: pytest.MonkeyPatch, uvicorn_calls: list[dict[str, Any]], tmp_path: Path
) -> None:
    clean_env.setenv("NEXTWORD_PORT", "not-a-port")
    with pytest.raises(SystemExit, match="bad configuration"):
        cli.main(["serve"])
    clean_env.delenv("NEXTWORD_PORT")
    with pytest.raises(SystemExit, match="not found"):
        cli.main(["serve", "--models", str(tmp_path / "missing")])
    assert uvicorn_calls == []


def test_predict_prints_a_table(
    clean_env: pytest.MonkeyPatch, tiny_artifacts: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_env.setenv("NEXTWORD_PROVIDERS", "CPUExecutionProvider")
    code = cli.main(
        [
            "predict",
            "I am coming home",
            "--models",
            str(tiny_artifacts),
            "-k",
            "3",
            "--model",
            "gru",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    lines = out.strip().splitlines()
    assert lines[0] == "model gru, 4 tokens of context"
    assert lines[1].split() == ["#", "word", "probability"]
    rows = [line.split() for line in lines[2:]]
    assert [row[0] for row in rows] == ["1", "2", "3"]
    probabilities = [float(row[2]) for row in rows]
    assert all(0 < p <= 1 for p in probabilities)
    assert probabilities == sorted(probabilities, reverse=True)


def test_predict_with_prefix(
    clean_env: pytest.MonkeyPatch, tiny_artifacts: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_env.setenv("NEXTWORD_PROVIDERS", "CPUExecutionProvider")
    assert cli.main(["predict", "i am", "--models", str(tiny_artifacts), "--prefix", "th"]) == 0
    words = [line.split()[1] for line in capsys.readouterr().out.strip().splitlines()[2:]]
    assert words and all(word.startswith("th") for word in words)


def test_predict_reports_errors(
    clean_env: pytest.MonkeyPatch, tiny_artifacts: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_env.setenv("NEXTWORD_PROVIDERS", "CPUExecutionProvider")
    assert cli.main(["predict", "i am", "--models", str(tiny_artifacts), "--model", "nope"]) == 1
    assert "unknown_model" in capsys.readouterr().err
    assert cli.main(["predict", "i am", "--models", str(tiny_artifacts), "-k", "0"]) == 1
    assert "bad_input" in capsys.readouterr().err


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    for command in ("serve", "predict", "train", "evaluate", "export"):
        assert command in err


def test_service_commands_work_without_the_training_package(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "model_export.cli", None)  # import fails like without torch
    parser = cli.build_parser()
    assert {"serve", "predict", "train", "evaluate", "export"} <= set(
        parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    )
    assert cli.main(["train", "--out", "runs/x"]) == 2
    assert "install the training extra" in capsys.readouterr().err


def test_python_m_service_is_nextword_serve() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "service", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    for option in ("--host", "--port", "--models", "--workers"):
        assert option in out.stdout
