"""Where the tests find the repository (one definition, whatever folder a test is in)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUNDLED_MODELS = ROOT / "service" / "models"
