"""model_export.step_cost: artifacts and untrained shapes timed in turn, one table."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_step_cost_compares_artifacts_and_shapes(
    tiny_artifacts: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from model_export.step_cost import main

    lstm, gru = str(tiny_artifacts / "lstm"), str(tiny_artifacts / "gru")
    code = main(
        ["--artifact", lstm, "--artifact", gru, "--shape", "lstm:300:8:16:1"]
        + ["--batch", "4", "--rounds", "3"]
    )
    assert code == 0
    out = capsys.readouterr().out
    rows = {line.split(" | ")[0].strip("| "): line for line in out.splitlines() if "|" in line}
    assert set(rows) >= {lstm, gru, "lstm:300:8:16:1"}
    # each cell's first model is its reference: ratios of exactly 1
    assert rows[lstm].endswith("| 1.000 | 1.000 |") and rows[gru].endswith("| 1.000 | 1.000 |")
    assert "| 300/8/16/1 |" in rows["lstm:300:8:16:1"]
    assert "load average" in out and "onnxruntime" in out


def test_step_cost_needs_a_model() -> None:
    from model_export.step_cost import main

    with pytest.raises(SystemExit):
        main([])
