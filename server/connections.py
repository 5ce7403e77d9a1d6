"""What the workflow sees of client connections: who is connected, the records that ask it to
accept a connection or tell it one has ended, and the control it has over them.

A leaf module: plain data and one interface (``ConnectionControl``) that the connector
implements and processors reach through their context.
"""

from __future__ import annotations

import dataclasses
import datetime
from typing import Any, Protocol


@dataclasses.dataclass(frozen=True)
class ConnectionInfo:
    """A client connection, as processors see it (``ctx.connection``)."""

    id: int
    peer: str
    name: str
    metadata: dict[str, Any]
    tls_subject: str | None
    connected_at: datetime.datetime
    #: The name of the token the client presented (``[connector.auth.tokens]``); "" for the
    #: shared token, or when the server asks for none.
    user: str = ""
    #: The connector server the connection is attached to (its instance, with the NATS
    #: engine; "" with the local one).
    server: str = ""


@dataclasses.dataclass(frozen=True)
class ConnectionRequest:
    """On the connection-request route when a client asks to connect (``connection_control``).
    A processor answers with ``ctx.accept(request)`` or ``ctx.reject(request, reason)``."""

    connection: ConnectionInfo

    @property
    def id(self) -> int:
        return self.connection.id

    @property
    def peer(self) -> str:
        return self.connection.peer

    @property
    def name(self) -> str:
        return self.connection.name

    @property
    def metadata(self) -> dict[str, Any]:
        return self.connection.metadata

    @property
    def tls_subject(self) -> str | None:
        return self.connection.tls_subject

    @property
    def user(self) -> str:
        return self.connection.user


@dataclasses.dataclass(frozen=True)
class ConnectionEnded:
    """On the connection-request route when an accepted connection has closed, so that the
    workflow can clean up what it keeps per connection."""

    connection: ConnectionInfo
    reason: str

    @property
    def id(self) -> int:
        return self.connection.id


class ConnectionControl(Protocol):
    """What a workflow may do with connections (implemented by the connector)."""

    def decide(self, connection: ConnectionInfo, accept: bool, reason: str = "") -> None: ...

    def set_output_route(
        self, connection: ConnectionInfo | int, type_name: str, route: str | None
    ) -> None: ...

    def connections_info(self) -> list[ConnectionInfo]: ...
