"""The OpenAPI contract, fuzzed: schemathesis with every check against a real server.

`python -m service` over the tiny test models; schemathesis reads its `/openapi.json` and
runs all its phases: the schema's examples; coverage (boundary and wrong-type values,
bodies that are not JSON, undeclared methods, `OPTIONS`); random valid and invalid
requests; and stateful chains (create a session, feed it, read it, delete it, read it
again). `--checks all`: no 5xx, every status and header declared, every body matching its
schema, schema-valid requests accepted and invalid ones refused, `Allow` listing the
path's methods, ...

It runs schemathesis's command line, `st run ... --checks all`, in a subprocess: the one
interface that runs every phase (its pytest plugin covers fewer, and its fixture loader
does not work with pytest 9). Bounded: `MAX_EXAMPLES` per operation and phase, a fixed
seed (the same cases on every run), ~10 s on two cores. Explore further with, e.g.,
`NEXTWORD_CONTRACT_EXAMPLES=1000 NEXTWORD_CONTRACT_SEED=7 pytest tests/api/test_contract.py`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.live_server import LiveServer

pytest.importorskip("schemathesis")  # the dev extra has it

pytestmark = pytest.mark.slow

MAX_EXAMPLES = int(os.environ.get("NEXTWORD_CONTRACT_EXAMPLES", "50"))
SEED = os.environ.get("NEXTWORD_CONTRACT_SEED", "20260101")
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def server(tiny_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    live = LiveServer(
        tiny_artifacts,
        tmp_path_factory.mktemp("contract") / "server.log",
        NEXTWORD_LOG_LEVEL="warning",
    ).start()
    try:
        yield live.url
    finally:
        live.stop()


def test_the_api_keeps_its_openapi_contract(server: str, tmp_path: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        f"{server}/openapi.json",
        "--checks",
        "all",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--seed",
        SEED,
        "--generation-database",
        "none",
        "--no-color",
        "--max-failures",
        "20",
    ]
    result = subprocess.run(
        command,
        cwd=tmp_path,  # its caches (.hypothesis, .schemathesis) stay out of the repository
        env={**os.environ, "SCHEMATHESIS_HOOKS": "", "NO_COLOR": "1"},
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"schemathesis found failures:\n{output[-20_000:]}"
    assert "No issues found" in output, output[-5_000:]
    for phase in ("Examples", "Coverage", "Fuzzing", "Stateful"):
        assert f"✅ {phase}" in output, f"phase {phase} did not pass:\n{output[-5_000:]}"
