"""The fixed limits of API v1, in one table; the configurable ones are in `service.config`.

The edge (request schemas, query parameters) validates against these; the `Predictor`
checks the same values for callers that bypass the edge (the CLI, the Python API).
"""

from __future__ import annotations

MAX_K = 50  # predictions per answer: 1..MAX_K
DEFAULT_K = 5
MAX_PREFIX_CHARS = 64  # the partly typed word
MAX_SESSION_ID_CHARS = 128
MAX_NAME_CHARS = 64  # a model's name
