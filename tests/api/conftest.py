"""Fixtures of the API tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.api import create_app
from tests.api_support import api_settings


@pytest.fixture(scope="module")
def client(tiny_artifacts: Path) -> Iterator[TestClient]:
    """The app over the tiny models, its lifespan (and in-process engine) running; modules
    that need other settings define their own."""
    with TestClient(create_app(api_settings(tiny_artifacts))) as client:
        yield client
