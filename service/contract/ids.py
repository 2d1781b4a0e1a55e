"""Session ids: made by whichever layer opens a session (the API for a new stream, the
store for a REST session), so they live in the contract both import."""

from __future__ import annotations

import secrets


def new_session_id() -> str:
    """An unguessable, URL-safe session id (128 random bits)."""
    return secrets.token_urlsafe(16)
