"""Client sessions: how far the server has taken each client's numbered records, so that a
batch resent after a reconnection is taken once.

A leaf module, without I/O (the clock is passed in). A client names its session in its Hello
and numbers its records in it from 1; the server keeps, per session, the highest number it has
taken. A session is held by the connection that uses it; once that connection ends, it is
remembered for ``seconds`` (``[connector] session_memory``), and at most ``limit`` sessions are
remembered (the oldest is forgotten first). A session the server does not know (it was
restarted, or forgot) starts from nothing: what the client resends then is taken again
(at least once).
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

#: A session: (the user its token names, the session name the client chose).
Key = tuple[str, str]


class Session:
    """One client session: the highest record number taken, and the connection holding it."""

    __slots__ = ("holder", "key", "left_at", "taken")

    def __init__(self, key: Key) -> None:
        self.key = key
        self.taken = 0
        self.holder: Any = None  # the connection using it now, or None
        self.left_at = 0.0

    def __repr__(self) -> str:
        return f"<Session {self.key[1]!r} of {self.key[0]!r}: taken {self.taken}>"


class SessionTable:
    """Every session held by a connection, and those remembered after their connection ended."""

    def __init__(self, seconds: float, limit: int, clock: Callable[[], float]) -> None:
        self.seconds = seconds
        self.limit = limit
        self._clock = clock
        self._held: dict[Key, Session] = {}
        self._resting: collections.OrderedDict[Key, Session] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._held) + len(self._resting)

    def attach(self, key: Key, holder: Any) -> tuple[Session, Any, bool]:
        """The session ``key``, now held by ``holder``; the connection that held it until now
        (None if none did); and whether the table knew the session (if not, it is new)."""
        self._forget()
        session = self._held.get(key)
        known = session is not None
        if session is None:
            session = self._resting.pop(key, None)
            known = session is not None
            if session is None:
                session = Session(key)
            self._held[key] = session
        previous, session.holder = session.holder, holder
        return session, previous, known

    def detach(self, session: Session, holder: Any) -> None:
        """``holder``'s connection ended: the session is remembered, unless a newer connection
        holds it now."""
        if session.holder is not holder:
            return
        session.holder = None
        if self._held.get(session.key) is session:
            del self._held[session.key]
            session.left_at = self._clock()
            self._resting[session.key] = session
        self._forget()

    def _forget(self) -> None:
        now = self._clock()
        resting = self._resting
        while resting:
            key, oldest = next(iter(resting.items()))
            if now - oldest.left_at < self.seconds and len(resting) <= self.limit:
                break
            del resting[key]
