"""Authentication by token: the server's tokens, kept where no repr, str or log line shows them.

A leaf module. ``Secret`` wraps one token from the configuration (``[connector.auth]``, or the
environment variable ``MZCONNECTOR_AUTH_TOKEN``); ``Authenticator`` maps a client's token to a
user name. Every comparison is constant-time and every token is compared, whichever matches:
how long a check takes says nothing about which token, or how much of one, was right.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

#: The environment variable that holds the one shared token when the file has no
#: ``[connector.auth]`` (the client reads the same variable when ``connect`` gets no token).
TOKEN_VARIABLE = "MZCONNECTOR_AUTH_TOKEN"
#: What a client is told when its token is wrong or missing: the same words for both.
AUTH_FAILED = "authentication failed"


class Secret:
    """A token from the configuration. Its repr and str are redacted (configurations get
    printed); only ``digest`` leaves it, for ``Authenticator``."""

    __slots__ = ("_digest", "_empty")

    def __init__(self, value: str) -> None:
        self._empty = not value
        self._digest = _digest(value)

    @property
    def empty(self) -> bool:
        return self._empty

    @property
    def digest(self) -> bytes:
        """SHA-256 of the token: what is compared (so that its length does not leak either)."""
        return self._digest

    def __repr__(self) -> str:
        return "Secret(<redacted>)"

    __str__ = __repr__

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("a Secret cannot be pickled")


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()


class Authenticator:
    """The tokens a server accepts: user name -> ``Secret`` (``""``: the one shared token)."""

    def __init__(self, tokens: Mapping[str, Secret], source: str) -> None:
        self._tokens = [(name, secret.digest) for name, secret in tokens.items()]
        #: Where the tokens come from, for the log ("the file", "MZCONNECTOR_AUTH_TOKEN").
        self.source = source

    def __repr__(self) -> str:
        names = [n for n, _ in self._tokens if n]
        shared = any(not n for n, _ in self._tokens)
        parts = ([f"named tokens for {', '.join(names)}"] if names else []) + (
            ["a shared token"] if shared else []
        )
        return f"<Authenticator: {' and '.join(parts)} (from {self.source})>"

    def user(self, token: str) -> str | None:
        """The user name ``token`` belongs to ("" for the shared token), or None."""
        digest = _digest(token)
        found = None
        for name, expected in self._tokens:  # all of them, always: no early exit
            if hmac.compare_digest(digest, expected) and found is None:
                found = name
        return found
