"""The server's exceptions::

ServerError
├── ConfigError       the configuration cannot be used; names the file, the key and the problem
├── BindError         the server cannot listen where it was told to (e.g. the port is in use)
└── RouteError        a processor routed to a route that does not exist
"""

from __future__ import annotations


class ServerError(Exception):
    """Base class of the server's errors."""


class ConfigError(ServerError):
    """The configuration cannot be used."""

    def __init__(self, source: str, key: str, problem: str) -> None:
        where = f"{source}: {key}: " if key else f"{source}: "
        super().__init__(where + problem)
        self.source = source
        self.key = key
        self.problem = problem


class BindError(ServerError):
    """The server cannot listen on the configured address."""


class RouteError(ServerError, KeyError):
    """A record was routed to a route that does not exist."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])
