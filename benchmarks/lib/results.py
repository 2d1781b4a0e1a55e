"""The files a benchmark leaves in benchmarks/results/: its figures as JSON, its table as text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent.parent / "results"


def _plain(value: Any) -> Any:
    """JSON for what json does not know: paths, numpy scalars and arrays."""
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # numpy
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def write_report(path: Path, report: dict[str, Any], table: str | None = None) -> None:
    """Write `report` as JSON to `path`, and `table` (if any) beside it as `.txt`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=_plain) + "\n")
    if table is not None:
        path.with_suffix(".txt").write_text(table + "\n")
