"""OS-level thread names (service.engine.threads)."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

from service.engine.threads import name_os_thread


@pytest.mark.skipif(sys.platform != "linux", reason="names are read from /proc")
def test_a_thread_named_shows_under_that_name_cut_to_the_kernels_15_bytes() -> None:
    seen: list[str] = []

    def run() -> None:
        name_os_thread("nw-run-a-long-model-name")
        seen.append(Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().strip())

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert seen == ["nw-run-a-long-m"]
