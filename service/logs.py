"""Logging of every process of the service, in one format that names the process."""

from __future__ import annotations

import logging

FORMAT = "%(levelname)s:     [%(process)d %(role)s] %(name)s: %(message)s"


def configure_logging(level: str, role: str) -> None:
    """Log the service's records at `level` to stderr, each line naming its process `role`."""
    py_level = "DEBUG" if level == "trace" else level.upper()
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(FORMAT, defaults={"role": role}))
    root = logging.getLogger("service")
    root.handlers[:] = [handler]
    root.setLevel(py_level)
    root.propagate = False
