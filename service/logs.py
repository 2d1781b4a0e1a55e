"""Logging of every process of the service, in one format that names the process."""

from __future__ import annotations

import logging
import re

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


# A session id in a path, and the values of query parameters that identify or authorize.
_SESSION_PATH = re.compile(r"(/v1/sessions/)[^/?\s\"]+")
_SECRET_QUERY = re.compile(r"((?:session_id|access_token)=)[^&\s\"]*")


def redact(text: str) -> str:
    """`text` without session ids and access tokens (for access and connection logs)."""
    return _SECRET_QUERY.sub(r"\1***", _SESSION_PATH.sub(r"\1***", text))


class RedactIds(logging.Filter):
    """Removes session ids and access tokens from a record's message and arguments: they
    are capabilities (whoever holds a session id may feed the session) and never logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        return True
