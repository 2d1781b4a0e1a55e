"""Owner quotas: who each session counts against, and which sessions an owner's cap drops.

With a cap (`NEXTWORD_MAX_SESSIONS_PER_KEY`), an owner (`SessionRecord.owner`: an API key's
name, or a client address on an open service) holds at most that many sessions: a new one
past it evicts the owner's own least recently written session, never another owner's.
A session keeps the owner it was first written with; every write moves it to the end of
that owner's order, whatever owner the record names. Each owner's sessions are an ordered
dict of their own (write order), so that eviction takes from its front. Without a cap
(0) no owner is tracked and every method is a no-op.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Container


class OwnerQuotas:
    """Sessions per owner, each owner's in least recently written order, under `cap`."""

    def __init__(self, cap: int) -> None:
        self.cap = cap  # sessions per owner (0: no cap, owners not tracked)
        self.owned: dict[str, OrderedDict[str, None]] = {}  # owner -> its sessions
        self.owner_of: dict[str, str] = {}  # session -> owner (owned sessions only)

    def written(self, session_id: str, owner: str) -> None:
        """A session was written naming `owner`: track it (under the owner it was first
        written with) as that owner's most recently written session."""
        tracked = self.owner_of.get(session_id) if self.owner_of else None
        if tracked is None and self.cap > 0 and owner:
            tracked = self.owner_of[session_id] = owner
        if tracked is not None:
            sessions = self.owned.setdefault(tracked, OrderedDict())
            sessions[session_id] = None
            sessions.move_to_end(session_id)

    def owner(self, session_id: str) -> str:
        """The owner a session counts against ("" for none tracked)."""
        return self.owner_of.get(session_id, "") if self.owner_of else ""

    def forget(self, session_id: str) -> None:
        """A session is gone: it no longer counts against its owner."""
        if not self.owner_of:
            return
        owner = self.owner_of.pop(session_id, None)
        if owner is not None:
            sessions = self.owned[owner]
            del sessions[session_id]
            if not sessions:
                del self.owned[owner]

    def victims(self, new: dict[str, int], keep: Container[str] = ()) -> list[str]:
        """The sessions to drop so that each owner has room under the cap for `new[owner]`
        more: the owner's least recently written first, skipping those in `keep`
        (nothing is removed here)."""
        victims = []
        for owner, count in new.items():
            sessions = self.owned.get(owner)
            if sessions is None:
                continue
            excess = len(sessions) + count - self.cap
            for session_id in sessions:
                if excess <= 0:
                    break
                if session_id not in keep:
                    victims.append(session_id)
                    excess -= 1
        return victims

    def clear(self) -> None:
        """Forget every owner."""
        self.owned.clear()
        self.owner_of.clear()
