"""mzconnector: explore a running workflow from a notebook or a script.

Copy this one file next to a notebook; it needs only ``msgspec`` (``pip install msgspec``).
Optional: ``pandas`` (DataFrame helpers), ``tqdm`` (progress bars), ``anyio`` (the async
client under trio), ``pyarrow`` (Parquet recordings).

    import mzconnector
    with mzconnector.connect("127.0.0.1", 7777, timeout=10) as conn:
        conn.submit(conn.udrs.Subscriber(msisdn="46700000001", balance=10))
        conn.flush()
        print(conn.receive(timeout=5), conn.mim(), conn.api.double(21))

The file is also the home of the wire protocol: the connector server imports its protocol from
here, so client and server can never disagree about a byte. Sections, in dependency order:

1. Errors            one exception tree (below)
2. Protocol          frames, messages and the sans-IO state machine (bytes in, events out)
3. Records           the builder that turns a type schema into record (UDR) classes, and their codec
4. API modules       server-shipped source, executed in a fresh module namespace on the client
5. Transports        plain TCP and TLS (over ``ssl.MemoryBIO``), safe to share between two
                     threads; what both clients share: the connect step (``_Handshake``: the
                     Hello, the answer, errors mapped once) and the ledger of what was sent
6. Connection        the blocking client: ``connect()``, ``Connection``, and who reads its
                     socket (``_ReadTurn``)
7. pandas helpers    records to a DataFrame and back
8. Async connection  ``connect_async()``, ``AsyncConnection``: asyncio, or anyio (asyncio, trio)
9. Command line      ``mzconnector COMMAND`` (or ``python mzconnector.py COMMAND``), and
                     ``record``/``replay``: traffic to a file and back into a workflow

Exceptions::

    MZConnectorError
    ├── ConnectError                could not open a connection (unreachable, TLS, handshake)
    │   ├── ConnectionRefused       the server refused it, for one of these reasons:
    │   │   ├── ConnectionLimitReached  its connection limit is reached
    │   │   ├── HelloRefused        a protocol version it does not speak, or metadata too deep
    │   │   └── ServerShuttingDown  it is shutting down
    │   ├── ConnectionRejected      the workflow rejected it (connection control); ``.reason``
    │   └── ApiModuleError          an API module cannot run here; ``.module``
    ├── ConnectionClosed            the connection is gone; ``.unacknowledged`` lists the records
    │   │                           submitted but never acknowledged by the server
    │   └── ConnectionLost (+ Timeout)  no answer to flush/mim within the timeout: closed
    ├── ProtocolError
    │   ├── LocalProtocolError      this side broke the protocol (a bug, or a record too large)
    │   └── RemoteProtocolError     the peer broke the protocol
    ├── RecordRefused               records refused (by the server, or here: not encodable, too
    │                               large); ``.errors`` names index, type and field
    ├── NotAccepted (+ TypeError)   ``submit`` of a type this connector does not accept
    ├── QueryError                  a query failed: ``.code``, ``.template``, ``.parameters``
    ├── SubscriptionError (+ ValueError)  the server refused a subscription or an operation
    ├── KvError (+ ValueError)      a key-value map refused a key or a value
    ├── Timeout (+ TimeoutError)    no answer within the timeout
    └── SchemaError (+ ValueError)  a record type declaration that cannot be built
"""

from __future__ import annotations

import array
import ast
import collections
import contextlib
import datetime
import enum
import itertools
import keyword
import linecache
import operator
import os
import pickle
import random
import re
import secrets
import select
import selectors
import socket
import ssl
import struct
import sys
import threading
import time
import traceback
import types
import typing
import warnings
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Any, Optional, TypeVar, Union

import msgspec

__all__ = [
    "DEFAULT_PORT",
    "PROTOCOL_VERSION",
    "ConnectError",
    "Connection",
    "ConnectionClosed",
    "ConnectionLost",
    "ConnectionRefused",
    "ConnectionRejected",
    "KvError",
    "KvMap",
    "LocalProtocolError",
    "MZConnectorError",
    "NotAccepted",
    "ProtocolError",
    "QueryError",
    "RecordError",
    "RecordRefused",
    "RemoteProtocolError",
    "SchemaError",
    "Subscription",
    "SubscriptionError",
    "Timeout",
    "UnloadableObject",
    "connect",
]

#: The protocol core, for the connector server (``mzserver``): not what a notebook calls, but a
#: contract all the same, since the server speaks the protocol through these names.
#: tests/test_contract.py fails when the server uses a name of this file that neither list
#: declares.
__protocol__ = [
    "API_PROVIDED",
    "DEFAULT_MAX_FRAME_SIZE",
    "MAGIC",
    "MAX_BATCH_RECORDS",
    "NEED_DATA",
    "Ack",
    "Answer",
    "ApiModule",
    "Bye",
    "Column",
    "ColumnBatch",
    "Columns",
    "CancelQuery",
    "Closed",
    "Error",
    "FieldMismatch",
    "FRAME_BATCH_BYTES",
    "Flush",
    "FrameColumns",
    "GetMim",
    "Hello",
    "Keepalive",
    "KvRequest",
    "Message",
    "Mim",
    "Namespace",
    "Notice",
    "Pickled",
    "Ping",
    "Pong",
    "Protocol",
    "Query",
    "QueryFailed",
    "QueryInfo",
    "QueryReply",
    "RecordCodec",
    "Records",
    "Refuse",
    "Refused",
    "Role",
    "State",
    "SubAck",
    "SubRecords",
    "Subscribe",
    "SubscriptionControl",
    "Welcome",
    "api_exports",
    "batch_length",
    "batches_dataframe",
    "build_record_types",
    "decode_problem",
    "encode_frame",
    "encode_record_frames",
    "frame_columns",
    "naive_datetime",
    "parse_type",
    "recast_columns",
    "type_name",
]

__version__ = "0.1.0"

DEFAULT_PORT = 7777
PROTOCOL_VERSION = 1
#: The first bytes a client sends: lets a server tell a stray client (or a TLS hello) at once.
MAGIC = b"MZC\x00"
DEFAULT_MAX_FRAME_SIZE = 16 * 1024 * 1024
#: Records in one batch (one frame) at most, whatever their size.
MAX_BATCH_RECORDS = 65536
#: After a call last read the socket, the background reader waits this long before it reads.
_IDLE = 0.05
_HEADER = struct.Struct(">I")
#: The environment variable a client reads its token from when ``connect`` is given none (the
#: server reads it too, when its file has no ``[connector.auth]``).
TOKEN_VARIABLE = "MZCONNECTOR_AUTH_TOKEN"
_E = TypeVar("_E", bound=BaseException)


# ---------------------------------------------------------------------------------------------
# 1. Errors
# ---------------------------------------------------------------------------------------------


class MZConnectorError(Exception):
    """Base class of every error this module raises. One that comes from a message the server
    sent keeps it as ``raw`` (the decoded message, for bug reports; None otherwise), and its
    repr shows it."""

    #: The server's message this error comes from (None: it comes from this side).
    raw: Any = None

    def __repr__(self) -> str:
        if self.raw is None:
            return super().__repr__()
        return f"{type(self).__name__}({str(self)!r}, raw={self.raw!r})"


def _with_raw(error: _E, raw: Any) -> _E:
    """``error``, keeping the server's message it comes from."""
    error.raw = raw
    return error


class ConnectError(MZConnectorError):
    """A connection could not be opened."""


class ConnectionRefused(ConnectError):
    """The server refused the connection (for instance, a connection limit is reached)."""


class ConnectionRejected(ConnectError):
    """The workflow rejected the connection request; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"the workflow rejected the connection: {reason}")
        self.reason = reason


class ConnectionLimitReached(ConnectionRefused):
    """The server refused the connection: its connection limit is reached (or it takes one
    connection at a time, and one is open)."""


class HelloRefused(ConnectionRefused):
    """The server refused what this client said when connecting: a protocol version it does
    not speak, or ``metadata`` nested deeper than it allows (the message says which)."""


class ServerShuttingDown(ConnectionRefused):
    """The server refused the connection: it is shutting down."""


class AuthenticationFailed(ConnectionRefused):
    """The server refused the connection: the token is wrong or missing (it says no more, and
    the same for both)."""


class ApiModuleError(ConnectError):
    """An API module the server ships cannot run here: it imports a package this Python does
    not have, or it raised. ``module`` names it; the connection was not opened."""

    def __init__(self, module: str, message: str) -> None:
        super().__init__(message)
        self.module = module


__all__ += [
    "ApiModuleError",
    "AuthenticationFailed",
    "ConnectionLimitReached",
    "HelloRefused",
    "ServerShuttingDown",
]


class ConnectionClosed(MZConnectorError):
    """The connection is closed. ``unacknowledged`` holds the records submitted on it that the
    server never acknowledged (they may or may not have been processed)."""

    def __init__(self, message: str, unacknowledged: list[Any] | None = None) -> None:
        super().__init__(message)
        self.unacknowledged: list[Any] = unacknowledged or []


class ProtocolError(MZConnectorError):
    """The protocol was broken."""


class LocalProtocolError(ProtocolError):
    """This side tried to do something the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow."""


class RecordError(msgspec.Struct, array_like=True, frozen=True):
    """Why the server refused one record: its position among all records submitted on the
    connection (0-based), its type name, the offending field (if known) and the problem."""

    index: int
    type: str
    field: str | None
    message: str

    def __str__(self) -> str:
        where = f"{self.type}.{self.field}" if self.field else self.type
        return f"record #{self.index} ({where}): {self.message}"


class RecordRefused(MZConnectorError):
    """Records were refused (by the server, or by the client when it cannot send them);
    ``errors`` has a ``RecordError`` for each one described, ``omitted`` counts the others
    (the server describes the first 100 of a batch). The other records were delivered."""

    def __init__(self, errors: list[RecordError], omitted: int = 0) -> None:
        total = len(errors) + omitted
        head = "; ".join(str(e) for e in errors[:3])
        more = f" (and {total - 3} more)" if total > 3 else ""
        super().__init__(f"{total} record(s) were refused: {head}{more}")
        self.errors = errors
        self.omitted = omitted


class NotAccepted(MZConnectorError, TypeError):
    """``submit`` was given something the connector does not accept. Nothing was sent."""


class Timeout(MZConnectorError, TimeoutError):
    """No answer within the timeout."""


class ConnectionLost(ConnectionClosed, Timeout):
    """The server did not answer: a ``flush``, ``mim`` or ``close`` within its timeout, or the
    keepalive's pings. The connection is taken for lost and closed (``unacknowledged`` holds
    what it did not take). Also a ``Timeout``. With ``auto_reconnect``, the connection goes on
    and this ends only what was in flight when the link broke (a query, a key-value or
    subscription request), naming it."""


class SchemaChanged(ConnectionClosed):
    """After reconnecting, the server declares other record types than before (it was
    restarted with another workflow); ``changes`` says what changed. The connection is closed:
    records of the old types would not fit the new ones."""

    def __init__(self, changes: list[str], unacknowledged: list[Any] | None = None) -> None:
        super().__init__(
            "the server's record types changed while reconnecting: " + "; ".join(changes),
            unacknowledged,
        )
        self.changes = changes


class SchemaError(MZConnectorError, ValueError):
    """A record type declaration that cannot be turned into a record class."""


class QueryError(MZConnectorError):
    """A query ended with an error: a short ``code`` (``"bad-request"``, ``"bad-reply"``,
    ``"unknown-query"``, ``"processor-error"``, or one of the workflow's own), the message
    ``template`` with ``{0}``-style placeholders, its ``parameters``, and the formatted
    ``message`` (what ``str(err)`` shows)."""

    def __init__(self, code: str, template: str, parameters: Iterable[Any] = ()) -> None:
        self.code = code
        self.template = template
        self.parameters = list(parameters)
        try:
            self.message = template.format(*self.parameters)
        except (IndexError, KeyError, ValueError):  # a template that does not fit its values
            self.message = f"{template} {self.parameters}"
        super().__init__(self.message)

    def __repr__(self) -> str:
        raw = "" if self.raw is None else f", raw={self.raw!r}"
        return f"QueryError(code={self.code!r}, message={self.message!r}{raw})"


class SubscriptionError(MZConnectorError, ValueError):
    """The server refused a subscription, or an operation on one; the message says why."""


class KvError(MZConnectorError, ValueError):
    """A key-value map refused a key or a value; the message says why."""


# ---------------------------------------------------------------------------------------------
# 2. Protocol: frames, messages, sans-IO state machine
# ---------------------------------------------------------------------------------------------
#
# A frame is a 4-byte big-endian length followed by that many bytes of msgpack: one message,
# a tagged msgspec Struct encoded as an array. Records travel in batches: the ``items`` of a
# ``Records`` message is a msgpack array of records, kept undecoded (``msgspec.Raw``) by the
# protocol layer so that the receiver decodes a whole batch with one typed call.


class Message(msgspec.Struct, tag=True, array_like=True):
    """Base of every message on the wire."""


class ApiModule(msgspec.Struct, array_like=True):
    """An API module as the server ships it: its name and source text."""

    name: str
    source: str


class Hello(Message):
    """Client -> server, first frame after ``MAGIC``."""

    protocol: int
    name: str = ""
    metadata: dict[str, Any] = {}
    client: str = ""
    client_id: str = ""  # names the client across connections (durable subscriptions)
    token: str = ""  # authentication: never shown (see __repr__)
    session: str = ""  # names this client's session across reconnections (records numbered in it)
    keepalive: float = 0.0  # seconds: the client pings an idle link, and answers pings

    def __repr__(self) -> str:
        fields = (f"{f}={getattr(self, f)!r}" for f in self.__struct_fields__ if f != "token")
        return f"Hello({', '.join(fields)}{', token=<redacted>' if self.token else ''})"


class QueryInfo(msgspec.Struct, array_like=True, frozen=True):
    """A query the workflow answers: the record types of its request and its replies."""

    request: str
    reply: str


class Welcome(Message):
    """Server -> client: the connection is open."""

    protocol: int
    connection_id: int
    workflow: str
    schema: dict[str, dict[str, str]]
    accepted: list[str]
    api: list[ApiModule]
    max_frame_size: int
    server: str = ""
    queries: dict[str, QueryInfo] = {}
    routes: list[str] = []  # routes a client can subscribe to: the connector's input routes
    taps: list[str] = []  # internal routes a client can tap
    resumed: int = -1  # records of the client's session the server has taken; -1: unknown
    keepalive: float = 0.0  # seconds: the server pings an idle link (0: it does not)


class Refuse(Message):
    """Server -> client, instead of ``Welcome``: the connection is refused. ``code`` is one of
    ``"limit"``, ``"rejected"``, ``"protocol"``, ``"shutdown"``, ``"auth"``."""

    code: str
    reason: str


class Records(Message):
    """A batch of records, in either direction. From a client, ``first`` numbers its first
    record in the client's session (records are numbered from 1; 0: not numbered), so that a
    batch resent after a reconnection is taken once."""

    items: msgspec.Raw
    first: int = 0


class Column(msgspec.Struct, array_like=True):
    """One column of a ``Columns`` message: the field ``name``; ``kind``, how its values
    travel (``"int"``, ``"float"``, ``"bool"``, ``"datetime"``, ``"datetime-utc"``, ``"str"``
    or ``"values"``, see "Column batches" in section 3); the ``data``; for ``"str"`` the
    rows + 1 int32 ``offsets`` of the values in it; and ``valid``, one byte a row (0: the
    value is None), empty when no value is None."""

    name: str
    kind: str
    data: memoryview
    offsets: memoryview = memoryview(b"")
    valid: memoryview = memoryview(b"")


class Columns(Message):
    """A batch of ``rows`` records of the type named ``record``, a column at a time, in either
    direction. A field of the type without a column is None in every row. ``first`` numbers
    its first row as ``Records.first`` numbers its first record."""

    record: str
    rows: int
    columns: list[Column]
    first: int = 0


class Flush(Message):
    """Client -> server: acknowledge everything taken so far."""


class Ack(Message):
    """Server -> client: ``taken`` records of this connection have been handed to their routes
    (or refused, with a ``Refused`` message sent before this one)."""

    taken: int


class Refused(Message):
    """Server -> client: records the server refused; the first of a batch are described in
    ``errors``, and ``omitted`` counts the rest."""

    errors: list[RecordError]
    omitted: int = 0


class GetMim(Message):
    """Client -> server: ask for the MIM values."""


class Mim(Message):
    """Server -> client: the MIM values, name -> value."""

    values: dict[str, Any]


class Notice(Message):
    """Server -> client: something the user should know (e.g. records that could not be
    delivered to this connection). ``dropped`` counts such records."""

    message: str
    dropped: int = 0


# Conversations: each has an ``id`` the client chose (unique on its connection), so that many
# interleave with each other and with pushes.

_NIL = msgspec.Raw(b"\xc0")


class Query(Message):
    """Client -> server: ask query ``name`` with an encoded request record."""

    id: int
    name: str
    request: msgspec.Raw


class CancelQuery(Message):
    """Client -> server: the client gave up on query ``id`` (timeout, Ctrl-C, closed)."""

    id: int


class QueryReply(Message):
    """Server -> client: replies to query ``id`` (an encoded list of reply records); ``final``
    when the query is over (complete, or empty if the list is empty)."""

    id: int
    replies: msgspec.Raw
    final: bool = False


class QueryFailed(Message):
    """Server -> client: query ``id`` ended with an error: a short ``code``, a message
    ``template`` with ``{0}``-style placeholders, and its ``parameters``."""

    id: int
    code: str
    template: str
    parameters: list[Any] = []


class Subscribe(Message):
    """Client -> server: subscription ``id`` on ``route`` (see ``Connection.subscribe``)."""

    id: int
    route: str
    matcher: dict[str, Any] = {}
    ack: str = "auto"
    max_pending: int = 1000
    durable: str = ""
    kind: str = "standard"
    key: str = ""
    tap: bool = False


class SubscriptionControl(Message):
    """Client -> server: ``op`` is ``"stop"``, ``"start"`` or ``"close"`` subscription ``id``."""

    id: int
    op: str


class SubAck(Message):
    """Client -> server: acknowledge record ``seq`` of subscription ``id`` (``through``: and
    every record before it)."""

    id: int
    seq: int
    through: bool = False


class SubRecords(Message):
    """Server -> client: records of subscription ``id``, numbered from ``first``; ``dropped``
    counts the records it missed (it fell behind) since the last of these."""

    id: int
    first: int
    items: msgspec.Raw
    dropped: int = 0


class KvRequest(Message):
    """Client -> server: operation ``op`` (``get``, ``set``, ``remove``, ``items``, ``len``)
    on key-value map ``map``; ``kind`` names the record type of ``value`` ("" if plain)."""

    id: int
    map: str
    op: str
    key: msgspec.Raw = _NIL
    kind: str = ""
    value: msgspec.Raw = _NIL


class Answer(Message):
    """Server -> client: the answer to request ``id`` (a subscription's start or control, a
    key-value operation): ``error`` if it failed; else ``value`` (encoded, of record type
    ``kind`` if not "") and whether it was ``found``."""

    id: int
    error: str = ""
    found: bool = False
    kind: str = ""
    value: msgspec.Raw = _NIL


class Ping(Message):
    """Either side: is the link alive? The peer answers ``Pong`` with the same ``id``."""

    id: int


class Pong(Message):
    """Either side: the answer to ``Ping``."""

    id: int


class Bye(Message):
    """Either side: the sender is closing the connection."""

    reason: str = ""


class Error(Message):
    """Either side: a fatal error; the sender closes the connection after it."""

    message: str


class Pickled(msgspec.Struct, tag="__pickled__", array_like=True):
    """A Python object that is not a declared record, pickled by the server (server -> client
    only: a server never unpickles anything)."""

    data: bytes


_MESSAGES = (
    Hello,
    Welcome,
    Refuse,
    Records,
    Columns,
    Flush,
    Ack,
    Refused,
    GetMim,
    Mim,
    Notice,
    Query,
    CancelQuery,
    QueryReply,
    QueryFailed,
    Subscribe,
    SubscriptionControl,
    SubAck,
    SubRecords,
    KvRequest,
    Answer,
    Ping,
    Pong,
    Bye,
    Error,
)
_encoder = msgspec.msgpack.Encoder()
_message_decoder = msgspec.msgpack.Decoder(Union[_MESSAGES])  # type: ignore[valid-type]
_MESSAGE_TYPES = {m.__name__: m for m in _MESSAGES}


def encode_frame(message: Message) -> bytearray:
    """One frame: length prefix and the encoded message."""
    buf = bytearray(4)
    _encoder.encode_into(message, buf, 4)
    _HEADER.pack_into(buf, 0, len(buf) - 4)
    return buf


def encode_record_frames(items: list[Any], max_frame_size: int, first: int = 0) -> list[bytearray]:
    """``Records`` frames holding ``items`` (declared records, bytes or ``Pickled``), split so
    that no frame exceeds ``max_frame_size`` nor holds more than ``MAX_BATCH_RECORDS``. A
    single item too large raises ``LocalProtocolError``. ``first`` numbers the first item in
    the client's session (each frame says the number of its own first item); 0: unnumbered."""
    if len(items) > MAX_BATCH_RECORDS:
        return [
            frame
            for start in range(0, len(items), MAX_BATCH_RECORDS)
            for frame in encode_record_frames(
                items[start : start + MAX_BATCH_RECORDS],
                max_frame_size,
                first + start if first else 0,
            )
        ]
    frame = encode_frame(Records(msgspec.Raw(_encoder.encode(items)), first))
    if len(frame) - 4 <= max_frame_size:
        return [frame]
    if len(items) == 1:
        raise LocalProtocolError(
            f"a {type(items[0]).__name__} of {len(frame) - 4} bytes does not fit in a frame "
            f"(the maximum frame size is {max_frame_size} bytes)"
        )
    half = len(items) // 2
    return encode_record_frames(items[:half], max_frame_size, first) + encode_record_frames(
        items[half:], max_frame_size, first + half if first else 0
    )


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"

    __hash__ = object.__hash__  # Enum's own hashes by name, in Python: this is on the hot path


class State(enum.Enum):
    __hash__ = object.__hash__

    HELLO = "hello"  # the client has not said hello yet
    WELCOME = "welcome"  # the server owes the answer: Welcome or Refuse
    OPEN = "open"
    CLOSED = "closed"
    ERROR = "error"  # this side broke the protocol (or was found to): nothing more passes


class Closed(msgspec.Struct):
    """Event (never on the wire): the peer closed the connection cleanly."""


class _Sentinel(type):
    def __repr__(cls) -> str:
        return cls.__name__


class NEED_DATA(metaclass=_Sentinel):
    """Returned by ``Protocol.next_event`` (the class itself, never an instance) when no
    complete event is buffered: feed more bytes."""


# Each side has its own state. (sender, sender's state, message type) -> (sender's next state,
# receiver's next state or None for unchanged). Anything not in the table is a protocol error,
# and puts the side that broke it in State.ERROR for good. Bye closes only the sender's side:
# the peer may still send what it owes until its own Bye.
_TRANSITIONS: dict[tuple[Role, State, type], tuple[State, State | None]] = {
    (Role.CLIENT, State.HELLO, Hello): (State.WELCOME, State.WELCOME),
    (Role.SERVER, State.HELLO, Error): (State.CLOSED, State.CLOSED),
    (Role.SERVER, State.WELCOME, Welcome): (State.OPEN, State.OPEN),
    (Role.SERVER, State.WELCOME, Refuse): (State.CLOSED, State.CLOSED),
    (Role.SERVER, State.WELCOME, Error): (State.CLOSED, State.CLOSED),
    **{
        (Role.CLIENT, State.OPEN, m): (State.OPEN, None)
        for m in (
            Records,
            Columns,
            Flush,
            GetMim,
            Query,
            CancelQuery,
            Subscribe,
            SubscriptionControl,
            SubAck,
            KvRequest,
        )
    },
    **{
        (Role.SERVER, State.OPEN, m): (State.OPEN, None)
        for m in (
            Records,
            Columns,
            Ack,
            Refused,
            Mim,
            Notice,
            QueryReply,
            QueryFailed,
            SubRecords,
            Answer,
        )
    },
    **{(r, State.OPEN, m): (State.OPEN, None) for r in Role for m in (Ping, Pong)},
    **{(r, State.OPEN, Bye): (State.CLOSED, None) for r in Role},
    **{(r, State.OPEN, Error): (State.CLOSED, State.CLOSED) for r in Role},
}


class Protocol:
    """The sans-IO protocol of one connection, for one side (``role``).

    ``receive_data(bytes)`` feeds what arrived (``b""`` for end of stream); ``next_event()``
    returns the next message, ``NEED_DATA`` or ``Closed()``, and raises ``RemoteProtocolError``
    for anything the peer may not send; ``send(message)`` returns the bytes to write, and
    raises ``LocalProtocolError`` for anything this side may not send now. Either error is
    final, as in h11: the side at fault is in ``State.ERROR`` and nothing more passes from it
    (after a remote error this side may still send an ``Error`` to say why it closes).
    """

    def __init__(self, role: Role, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        self.role = role
        self.peer = Role.SERVER if role is Role.CLIENT else Role.CLIENT
        self.max_frame_size = max_frame_size
        self.states = {Role.CLIENT: State.HELLO, Role.SERVER: State.HELLO}
        self._buf: bytes | bytearray = b""
        self._pos = 0
        self._eof = False
        # The server must see the magic first; the client sends it with its Hello.
        self._need_magic = role is Role.SERVER

    # -- receiving --------------------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        if self._eof:
            raise RuntimeError("receive_data after end of stream")
        if not data:
            self._eof = True
        elif self._pos == len(self._buf):
            # Nothing is buffered: frames are decoded straight from the bytes received
            # (immutable, so views of them stay valid), without copying them.
            self._buf = bytes(data)
            self._pos = 0
        else:
            if type(self._buf) is bytes:
                self._buf = bytearray(memoryview(self._buf)[self._pos :])
                self._pos = 0
            self._buf += data

    def next_event(self) -> Message | Closed | type[NEED_DATA]:
        if self.states[self.peer] is State.ERROR:
            raise RemoteProtocolError(f"the {self.peer.value} already broke the protocol")
        try:
            return self._next_event()
        except RemoteProtocolError:
            self.states[self.peer] = State.ERROR
            raise

    def _next_event(self) -> Message | Closed | type[NEED_DATA]:
        buf, pos = self._buf, self._pos
        available = len(buf) - pos
        if self._need_magic:
            if available < len(MAGIC):
                if self._eof:
                    raise RemoteProtocolError("connection closed before the client said hello")
                if bytes(buf[pos : pos + available]) != MAGIC[:available]:
                    raise RemoteProtocolError(self._not_a_client(bytes(buf[pos:])))
                return NEED_DATA
            if bytes(buf[pos : pos + 4]) != MAGIC:
                raise RemoteProtocolError(self._not_a_client(bytes(buf[pos : pos + 4])))
            self._need_magic = False
            pos = self._pos = pos + 4
            available -= 4
        if available < 4:
            if self._eof:
                if available:
                    raise RemoteProtocolError("connection closed in the middle of a frame")
                if self.states[self.peer] is State.HELLO:
                    raise RemoteProtocolError("connection closed before the client said hello")
                self.states[self.peer] = State.CLOSED
                return Closed()
            return NEED_DATA
        (size,) = _HEADER.unpack_from(buf, pos)
        if size > self.max_frame_size:
            raise RemoteProtocolError(
                f"frame of {size} bytes exceeds the maximum frame size of {self.max_frame_size}"
            )
        if available < 4 + size:
            if self._eof:
                raise RemoteProtocolError("connection closed in the middle of a frame")
            return NEED_DATA
        if type(buf) is bytes:
            body: bytes | memoryview = memoryview(buf)[pos + 4 : pos + 4 + size]
        else:  # a bytearray changes under a view: copy the frame out
            with memoryview(buf) as view:
                body = bytes(view[pos + 4 : pos + 4 + size])
        pos += 4 + size
        if pos > 65536 and pos * 2 > len(buf) and type(buf) is bytearray:
            del buf[:pos]
            pos = 0
        self._pos = pos
        try:
            message = _message_decoder.decode(body)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise RemoteProtocolError(f"malformed frame: {_message_problem(body, exc)}") from None
        except RecursionError:
            raise RemoteProtocolError("malformed frame: nested too deeply") from None
        if type(message) is Records:
            _check_batch(message.items)
        elif type(message) is Columns:
            recast_columns(message)
            _check_columns(message)
        self._transition(self.peer, type(message), RemoteProtocolError)
        return message

    def events(self) -> Iterator[Message | Closed]:
        """Every complete event buffered so far."""
        while (event := self.next_event()) is not NEED_DATA:
            yield event  # type: ignore[misc]
            if isinstance(event, Closed):
                return

    @staticmethod
    def _not_a_client(head: bytes) -> str:
        if head[:1] == b"\x16":
            return "a TLS handshake arrived, but this server does not use TLS"
        return f"not an mzconnector client (first bytes {head!r})"

    # -- sending ----------------------------------------------------------------------------
    @property
    def state(self) -> State:
        """This side's state."""
        return self.states[self.role]

    @property
    def ended(self) -> bool:
        """Whether the end of the stream was fed: a frame cut short then is a lost link, not
        a peer that broke the protocol."""
        return self._eof

    def send(self, message: Message) -> bytearray:
        frame = encode_frame(message)
        if len(frame) - 4 > self.max_frame_size:
            self.states[self.role] = State.ERROR
            raise LocalProtocolError(
                f"a frame of {len(frame) - 4} bytes exceeds the maximum of {self.max_frame_size}"
            )
        self._transition(self.role, type(message), LocalProtocolError)
        if type(message) is Hello:
            return bytearray(MAGIC) + frame
        return frame

    def send_records(self, frames: list[bytearray]) -> list[bytearray]:
        """``Records`` frames made by ``encode_record_frames`` (encoded once, e.g. for every
        client of a broadcast), checked against the table like any message."""
        self._transition(self.role, Records, LocalProtocolError)
        return frames

    def send_columns(self, frames: list[bytearray]) -> list[bytearray]:
        """``Columns`` frames made by ``ColumnBatch.frames`` or ``FrameColumns.frame``,
        checked against the table like any message."""
        self._transition(self.role, Columns, LocalProtocolError)
        return frames

    def may_send(self, kind: type[Message]) -> bool:
        """Whether this side may send a message of ``kind`` now."""
        return (self.role, self.states[self.role], kind) in _TRANSITIONS

    def _transition(self, sender: Role, kind: type, error: type[ProtocolError]) -> None:
        states = self.states
        change = _TRANSITIONS.get((sender, states[sender], kind))
        if change is None:
            state = states[sender]
            states[sender] = State.ERROR
            raise error(
                f"{sender.value} may not send {kind.__name__} while the connection "
                f"is in state {state.value}"
            )
        states[sender] = change[0]
        if change[1] is not None:
            receiver = Role.SERVER if sender is Role.CLIENT else Role.CLIENT
            if states[receiver] is not State.ERROR:
                states[receiver] = change[1]


class Keepalive:
    """When to ping an idle link and when to give it up, for either side, without I/O: the
    caller passes the time and sends the ``Ping`` it is handed.

    ``heard()`` says something arrived (a flag: no clock is read on the hot path). At each
    ``deadline`` the caller calls ``tick(now)``: after traffic it just moves the deadline on;
    after ``interval`` seconds of silence it returns a ``Ping`` to send; once ``misses`` pings
    in a row went unanswered, ``dead`` is True. So a silent link is given up between
    ``misses + 1`` and ``misses + 2`` intervals after the last thing heard.
    """

    def __init__(self, interval: float, misses: int, now: float) -> None:
        self.interval = interval
        self.misses = misses
        self.deadline = now + interval
        self.dead = False
        self.unanswered = 0
        self._heard = False
        self._ids = itertools.count(1)

    def heard(self) -> None:
        self._heard = True

    def tick(self, now: float) -> Ping | None:
        """The ``Ping`` to send now, if one is due (None otherwise; see ``dead``)."""
        if self._heard:
            self._heard = False
            self.unanswered = 0
            self.deadline = now + self.interval
            return None
        if now < self.deadline or self.dead:
            return None
        if self.unanswered >= self.misses:
            self.dead = True
            return None
        self.unanswered += 1
        self.deadline = now + self.interval
        return Ping(next(self._ids))


def batch_length(items: msgspec.Raw | bytes) -> int:
    """How many records an encoded batch (a msgpack array) holds, read from its header alone;
    -1 if it is not an array."""
    head = memoryview(items)[:5]
    marker = head[0] if len(head) else 0
    if 0x90 <= marker <= 0x9F:
        return marker - 0x90
    if marker == 0xDC and len(head) >= 3:
        return int.from_bytes(head[1:3], "big")
    if marker == 0xDD and len(head) >= 5:
        return int.from_bytes(head[1:5], "big")
    return -1


def _check_batch(items: msgspec.Raw) -> None:
    """A batch is a msgpack array of at most ``MAX_BATCH_RECORDS`` items: checked from its
    header, before anything in it is decoded, so that the work (and the memory) a frame can
    cost a receiver is bounded by its count as well as its size."""
    count = batch_length(items)
    if count < 0:
        raise RemoteProtocolError("malformed frame: a batch of records must be an array")
    if count > MAX_BATCH_RECORDS:
        raise RemoteProtocolError(
            f"a batch of {count} records exceeds the maximum of {MAX_BATCH_RECORDS} a batch"
        )


#: Column kinds that travel as fixed-width little-endian buffers, and their widths in bytes.
_FIXED_KINDS = {"int": 8, "float": 8, "bool": 1, "datetime": 8, "datetime-utc": 8}


def _memoryview_decoding_is_sound() -> bool:
    """Whether msgspec gives a decoded ``memoryview`` its own length. Without the fix of
    msgspec issue 835 (0.18.6, our lower bound, lacks it; 0.23 has it) a decoded view has the
    right bytes but the shape of the whole message, so ``len()`` and slices of it are wrong
    (``nbytes`` is right)."""
    views = msgspec.msgpack.decode(msgspec.msgpack.encode([b"ab", b"c"]), type=list[memoryview])
    return len(views[1]) == 1


_SOUND_VIEWS = _memoryview_decoding_is_sound()


def recast_columns(message: Columns) -> None:
    """Give the buffers of a decoded ``Columns`` message their own shape (a cast of each
    view, which costs no copy) where msgspec's decoding does not (``_SOUND_VIEWS``)."""
    if _SOUND_VIEWS:
        return
    for column in message.columns:
        column.data = column.data.cast("B")
        column.offsets = column.offsets.cast("B")
        column.valid = column.valid.cast("B")


def _check_columns(message: Columns) -> None:
    """A column batch holds at most ``MAX_BATCH_RECORDS`` rows, and each of its columns
    exactly ``rows`` values: checked from the sizes of the buffers (and a string column's
    first and last offsets) before anything in them is read."""
    rows = message.rows
    if not 0 <= rows <= MAX_BATCH_RECORDS:
        raise RemoteProtocolError(
            f"a batch of {rows} rows exceeds the maximum of {MAX_BATCH_RECORDS} a batch"
            if rows > 0
            else f"malformed frame: a batch of {rows} rows"
        )
    seen: set[str] = set()
    for column in message.columns:
        where = f"malformed frame: column {column.name!r} of a batch of {message.record}"
        if column.name in seen:
            raise RemoteProtocolError(f"{where} appears twice")
        seen.add(column.name)
        kind, size = column.kind, len(column.data)
        width = _FIXED_KINDS.get(kind)
        if width is not None:
            fits = size == rows * width and not column.offsets
        elif kind == "str":
            offsets = column.offsets
            fits = (
                len(offsets) == 4 * (rows + 1)
                and int.from_bytes(offsets[:4], "little", signed=True) == 0
                and int.from_bytes(offsets[4 * rows :], "little", signed=True) == size
            )
        elif kind == "values":
            fits = batch_length(column.data) == rows and not column.offsets
        else:
            raise RemoteProtocolError(f"{where}: unknown kind {kind!r}")
        if not fits:
            raise RemoteProtocolError(f"{where}: its buffers do not hold {rows} {kind} values")
        if len(column.valid) not in (0, rows) or (column.valid and kind == "values"):
            raise RemoteProtocolError(f"{where}: {len(column.valid)} validity bytes, {rows} rows")


_STR_MARKERS = frozenset([*range(0xA0, 0xC0), 0xD9, 0xDA, 0xDB])
_MAP_MARKERS = frozenset([*range(0x80, 0x90), 0xDE, 0xDF])
_ARRAY_MARKERS = frozenset([*range(0x90, 0xA0), 0xDC, 0xDD])
_raw_array = msgspec.msgpack.Decoder(list[msgspec.Raw])
_raw_map = msgspec.msgpack.Decoder(dict[str, msgspec.Raw])


def _message_problem(body: Any, exc: Exception) -> str:
    """What is wrong with a frame that is not a valid message, in our words."""
    if not isinstance(exc, msgspec.ValidationError):
        return decode_problem(body, exc)
    try:
        parts = _record_parts.decode(body)
        name = _tag(parts) if isinstance(parts, list) else None
        kind = _MESSAGE_TYPES.get(name or "")
        if kind is None:
            return f"unknown message type {name!r}" if name else "not a message"
        field, problem = _record_problem(parts, kind)  # type: ignore[arg-type]
    except msgspec.ValidationError:
        return f"not a message: {_describe_raw(body)}"
    except (msgspec.DecodeError, UnicodeDecodeError) as inner:
        return decode_problem(body, inner)
    return f"{name}.{field}: {problem}" if field else f"{name}: {problem}"


def decode_problem(data: Any, exc: Exception) -> str:
    """What is wrong with msgpack ``data`` that failed to decode with ``exc``, in our words
    where we can tell (msgspec words bad UTF-8 differently from release to release)."""
    if not isinstance(exc, msgspec.ValidationError) and _has_bad_utf8(data):
        return "a string is not valid UTF-8"
    return str(exc)


def _has_bad_utf8(data: Any) -> bool:
    """Whether msgpack ``data`` holds a string (or a map key) that is not valid UTF-8."""
    stack = [data]
    while stack:
        item = stack.pop()
        view = memoryview(item)
        if not len(view):
            continue
        marker = view[0]
        try:
            if marker in _STR_MARKERS:
                msgspec.msgpack.decode(item, type=str)
            elif marker in _ARRAY_MARKERS:
                stack.extend(_raw_array.decode(item))
            elif marker in _MAP_MARKERS:
                stack.extend(_raw_map.decode(item).values())
        except msgspec.ValidationError:
            continue  # e.g. a map with keys that are not strings
        except (msgspec.DecodeError, UnicodeDecodeError):
            # The string itself, or one of the map's keys; an array is malformed itself.
            return marker in _STR_MARKERS or marker in _MAP_MARKERS
    return False


# ---------------------------------------------------------------------------------------------
# 3. Records: schema -> record classes, and their codec
# ---------------------------------------------------------------------------------------------
#
# A schema maps a record type name to its fields, field name -> type string. Type strings:
# int, float, str, bool, bytes, datetime, list[T], dict[str, T], T | None, and other record
# type names (nesting). Record classes are msgspec Structs, tagged with their type name and
# encoded as arrays, so one typed ``Decoder`` validates a whole batch of mixed types.

_SCALARS: dict[str, Any] = {
    "int": int,
    "float": float,
    "str": str,
    "bool": bool,
    "bytes": bytes,
    "datetime": datetime.datetime,
}
_TOKEN = re.compile(r"\s*(?:([A-Za-z_][A-Za-z0-9_]*)|(\[|\]|,|\|))")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _tokenize(text: str) -> list[str]:
    tokens, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise SchemaError(f"cannot read type {text!r} at {text[pos:]!r}")
        tokens.append(m.group(1) or m.group(2))
        pos = m.end()
    return tokens


def parse_type(text: str, records: Mapping[str, Any]) -> Any:
    """The Python type a type string stands for (``records``: record name -> class)."""
    tokens = _tokenize(text)
    pos = 0

    def expect(tok: str) -> None:
        nonlocal pos
        if pos >= len(tokens) or tokens[pos] != tok:
            found = tokens[pos] if pos < len(tokens) else "the end"
            raise SchemaError(f"in type {text!r}: expected {tok!r}, found {found!r}")
        pos += 1

    def union() -> Any:
        nonlocal pos
        parts = [atom()]
        while pos < len(tokens) and tokens[pos] == "|":
            pos += 1
            parts.append(atom())
        if len(parts) == 1:
            return parts[0]
        non_none = [p for p in parts if p is not type(None)]
        if len(parts) != 2 or len(non_none) != 1:
            raise SchemaError(f"in type {text!r}: only 'T | None' unions are supported")
        return Optional[non_none[0]]  # noqa: UP045 - a runtime type, not an annotation

    def atom() -> Any:
        nonlocal pos
        if pos >= len(tokens) or not _IDENT.match(tokens[pos]):
            raise SchemaError(f"in type {text!r}: expected a type name")
        name = tokens[pos]
        pos += 1
        if name == "None":
            return type(None)
        if name == "list":
            expect("[")
            item = union()
            expect("]")
            return list[item]  # type: ignore[valid-type]
        if name == "dict":
            expect("[")
            key = union()
            if key is not str:
                raise SchemaError(f"in type {text!r}: dictionary keys must be str")
            expect(",")
            value = union()
            expect("]")
            return dict[str, value]  # type: ignore[valid-type]
        if name in _SCALARS:
            return _SCALARS[name]
        if name in records:
            return records[name]
        raise SchemaError(f"unknown type {name!r} in {text!r}")

    result = union()
    if pos != len(tokens):
        raise SchemaError(f"in type {text!r}: unexpected {tokens[pos]!r}")
    return result


def _references(text: str) -> set[str]:
    names = set(_tokenize(text)) - {"[", "]", ",", "|", "list", "dict", "None"}
    return names - set(_SCALARS)


def build_record_types(
    schema: Mapping[str, Mapping[str, str]], *, module: str = "mzconnector.udrs"
) -> dict[str, type[msgspec.Struct]]:
    """Record classes for ``schema`` (type name -> field name -> type string), in its order.

    Fields typed ``T | None`` default to None; all others are required. Records are built with
    keyword arguments, compare by value, and are validated whenever they are decoded.
    Raises ``SchemaError`` naming the type and field for anything that cannot be built.
    """
    for name, fields in schema.items():
        reserved = name in _SCALARS or name in ("list", "dict", "None")
        if not _IDENT.match(name) or keyword.iskeyword(name) or reserved:
            raise SchemaError(f"{name!r} cannot be a record type name")
        if name.startswith("_"):  # e.g. "__pickled__", the tag of Pickled
            raise SchemaError(f"{name!r} cannot be a record type name (it starts with '_')")
        for field in fields:
            if not _IDENT.match(field) or keyword.iskeyword(field) or field.startswith("_"):
                raise SchemaError(f"{name}.{field}: not a valid field name")
    # Build nested types first; a cycle cannot be expressed as a tree of records.
    order: list[str] = []
    visiting: list[str] = []  # the path being followed: "Type.field" steps
    names: list[str] = []

    def visit(name: str) -> None:
        if name in order:
            return
        if name in names:
            start = names.index(name)
            cycle = " -> ".join([*visiting[start:], name])
            raise SchemaError(f"record types refer to each other in a cycle: {cycle}")
        names.append(name)
        for field, text in schema[name].items():
            for ref in _references(text):
                if ref not in schema:
                    raise SchemaError(f"{name}.{field}: unknown type {ref!r} in {text!r}")
                visiting.append(f"{name}.{field}")
                visit(ref)
                visiting.pop()
        names.pop()
        order.append(name)

    for name in schema:
        visit(name)
    classes: dict[str, type[msgspec.Struct]] = {}
    for name in order:
        fields = []
        for field, text in schema[name].items():
            try:
                kind = parse_type(text, classes)
            except SchemaError as exc:
                raise SchemaError(f"{name}.{field}: {exc}") from None
            is_optional = typing.get_origin(kind) is Union and type(None) in typing.get_args(kind)
            fields.append((field, kind, None) if is_optional else (field, kind))
        cls = msgspec.defstruct(
            name,
            fields,
            tag=name,
            array_like=True,
            kw_only=True,
            forbid_unknown_fields=True,
            module=module,
            # Records never reference themselves; skipping GC tracking makes decoding
            # millions of them markedly cheaper.
            gc=False,
        )
        cls.__doc__ = f"Record type {name}: " + ", ".join(
            f"{f}: {t}" for f, t in schema[name].items()
        )
        cls._repr_html_ = _record_html  # type: ignore[attr-defined]
        classes[name] = cls
    return {name: classes[name] for name in schema}


#: What encoding a value that msgpack cannot hold raises (an int out of range, a lone surrogate,
#: a datetime out of range in UTC, an object of another type, a cycle).
_ENCODE_ERRORS = (TypeError, ValueError, OverflowError, RecursionError, msgspec.EncodeError)


def naive_datetime(value: Any) -> str | None:
    """Where a plain value (a key-value map's) holds a datetime without a timezone (``""``
    for the value itself, ``[2]``, ``['at']``), or None. msgpack has no naive datetime: it
    would be stored as a string and read back as one."""
    if isinstance(value, datetime.datetime):
        return "" if value.utcoffset() is None else None
    if isinstance(value, (list, tuple)):
        parts: Iterable[tuple[str, Any]] = ((f"[{i}]", item) for i, item in enumerate(value))
    elif isinstance(value, dict):
        parts = ((f"[{key!r}]", item) for key, item in value.items())
    else:
        return None
    for step, part in parts:
        path = naive_datetime(part)
        if path is not None:
            return step + path
    return None


_NAIVE_DATETIME = (
    "a datetime without a timezone would come back as a string; give it one "
    "(tzinfo=datetime.timezone.utc)"
)


def _encode_problem(value: Any) -> tuple[str, str]:
    """Where and why ``value`` (one that fails to encode) cannot be encoded: the path of the
    innermost part that fails (``.balance``, ``.address.zip``, ``.tags[2]``) and the problem,
    in our words (msgspec's change between its releases)."""
    parts: Iterable[tuple[str, Any]] = ()
    if isinstance(value, msgspec.Struct):
        parts = ((f".{f}", getattr(value, f)) for f in value.__struct_fields__)
    elif isinstance(value, (list, tuple, set, frozenset)):
        parts = ((f"[{i}]", item) for i, item in enumerate(value))
    elif isinstance(value, dict):
        parts = ((f"[{key!r}]", part) for key, item in value.items() for part in (key, item))
    for step, part in parts:
        try:
            _encoder.encode(part)
        except RecursionError:
            return step, "nested too deeply (or it contains itself)"
        except _ENCODE_ERRORS:
            path, problem = _encode_problem(part)
            return step + path, problem
    if isinstance(value, int):
        return "", "int out of range (-2**63 to 2**64-1)"
    if isinstance(value, str):
        return "", "str that is not valid Unicode (a lone surrogate)"
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return "", f"{type(value).__name__} out of range (in UTC: years 1 to 9999)"
    return "", f"a value of type {type(value).__name__}"


class RecordCodec:
    """Encodes and decodes batches of records for one schema."""

    def __init__(self, schema: Mapping[str, Mapping[str, str]]) -> None:
        self.schema = {name: dict(fields) for name, fields in schema.items()}
        self.types = build_record_types(self.schema)
        self.by_class: dict[type, str] = {cls: name for name, cls in self.types.items()}

    def decoder(self, names: Iterable[str], *, pickled: bool = False) -> msgspec.msgpack.Decoder:
        """A decoder of a batch (a list) of records of the named types; ``"bytes"`` admits
        raw bytes, ``pickled`` admits ``Pickled`` objects."""
        kinds: list[Any] = [bytes if n == "bytes" else self.types[n] for n in names]
        if pickled:
            kinds.append(Pickled)
        if not kinds:
            raise ValueError("a record decoder needs at least one type")
        return msgspec.msgpack.Decoder(list[Union[tuple(kinds)]])  # type: ignore[misc]

    def explain(
        self, raw: msgspec.Raw | bytes, accepted: Iterable[str]
    ) -> tuple[str, str | None, str]:
        """Why one encoded record is not acceptable: (type name, field or None, problem).

        msgspec finds what does not decode; the words are ours (msgspec's change between its
        releases). Each field is decoded on its own with its declared type, and a bad field is
        followed down nested records, lists and dicts, so the field is named as a path
        (``location.lat``, ``tags[2]``) whatever is wrong with it.
        """
        accepted = set(accepted)
        try:
            value = _record_parts.decode(raw)
        except msgspec.ValidationError:
            return ("?", None, f"not a record: {_describe_raw(raw)}")
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            return ("?", None, f"malformed record: {decode_problem(raw, exc)}")
        if isinstance(value, bytes):
            return ("bytes", None, "bytes are not accepted by this connector")
        name = _tag(value)
        if name is None:
            return ("?", None, "not a record: it does not start with its type name")
        if name not in self.types:
            return (name, None, f"unknown record type {name!r}")
        if name not in accepted:
            return (name, None, f"records of type {name!r} are not accepted by this connector")
        field, problem = _record_problem(value, self.types[name])
        return (name, field or None, problem)

    def check(self, value: Any, name: str) -> tuple[Any, bytes]:
        """A record of type ``name`` made from ``value`` (such a record, or a dict of its
        fields, converted as msgspec's lax mode does: ``3.0`` fits an int, an ISO string a
        datetime), checked against its declared types, and its encoding. Raises
        ``FieldMismatch`` naming the field and the problem, in our words."""
        cls = self.types[name]
        if isinstance(value, Mapping):
            record = self._from_dict(value, name)
        elif type(value) is cls:
            record = value
        else:
            raise FieldMismatch(
                name, None, f"expected a {name} record or a dict, got {type(value).__name__}"
            )
        try:
            encoded = _encoder.encode(record)
        except _ENCODE_ERRORS:
            path, problem = _encode_problem(record)
            problem = f"cannot be encoded: {problem}"
            raise FieldMismatch(name, path.lstrip(".") or None, problem) from None
        try:
            msgspec.msgpack.decode(encoded, type=cls)
        except (msgspec.DecodeError, UnicodeDecodeError):
            _, field, problem = self.explain(encoded, [name])
            raise FieldMismatch(name, field, problem) from None
        return record, encoded

    def _from_dict(self, data: Mapping[str, Any], name: str) -> Any:
        cls = self.types[name]
        fields = {f.name: f for f in msgspec.structs.fields(cls)}
        for key in data:
            if key not in fields:
                raise FieldMismatch(name, str(key), f"not a field of {name} ({', '.join(fields)})")
        for field_name, field in fields.items():
            if field_name not in data:
                if field.required:
                    raise FieldMismatch(name, field_name, "missing")
                continue
            value = data[field_name]
            try:
                msgspec.convert(_array_form(value, field.type), field.type, strict=False)
            except msgspec.ValidationError:
                problem = f"expected {type_name(field.type)}, got {_describe(value)}"
                raise FieldMismatch(name, field_name, problem) from None
        return msgspec.convert(_array_form(data, cls), cls, strict=False)


def _array_form(value: Any, kind: Any) -> Any:
    """A value with its records written as dicts of fields, in the form record types convert
    from (they are array-like: ``[type name, field, ...]``)."""
    if typing.get_origin(kind) is Union:
        kind = next((a for a in typing.get_args(kind) if a is not type(None)), kind)
    if isinstance(value, Mapping) and isinstance(kind, type) and issubclass(kind, msgspec.Struct):
        fields = msgspec.structs.fields(kind)
        tag = kind.__struct_config__.tag or kind.__name__
        return [tag, *(_array_form(value.get(f.name, f.default), f.type) for f in fields)]
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is list and isinstance(value, list):
        return [_array_form(item, args[0]) for item in value]
    if origin is dict and isinstance(value, Mapping):
        return {k: _array_form(item, args[1]) for k, item in value.items()}
    return value


class FieldMismatch(ValueError):
    """A value that does not fit a record type: the ``type``, the ``field`` (a path, or None)
    and the ``problem``, in our words."""

    def __init__(self, type_name: str, field: str | None, problem: str) -> None:
        self.type = type_name
        self.field = field
        self.problem = problem
        super().__init__(f"{type_name}.{field}: {problem}" if field else f"{type_name}: {problem}")


_record_parts = msgspec.msgpack.Decoder(Union[bytes, list[msgspec.Raw]])


def _tag(parts: list[msgspec.Raw]) -> str | None:
    """The type name an encoded record starts with, if it starts with one."""
    try:
        return msgspec.msgpack.decode(parts[0], type=str) if parts else None
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None


def _record_problem(parts: list[msgspec.Raw], cls: type[msgspec.Struct]) -> tuple[str, str]:
    """(field path, problem) of an encoded record of ``cls``, split into its tag and fields."""
    values = parts[1:]
    fields = msgspec.structs.fields(cls)
    for i, field in enumerate(fields):
        if i >= len(values):
            if field.required:
                return (field.name, "missing")
            continue
        found = _value_problem(values[i], field.type)
        if found is not None:
            return (field.name + found[0], found[1])
    if len(values) > len(fields):
        return ("", f"{len(values)} fields given, {len(fields)} declared")
    return ("", "does not match its declared type")


def _value_problem(raw: msgspec.Raw, kind: Any) -> tuple[str, str] | None:
    """None if ``raw`` decodes as ``kind``; else (path below it, problem)."""
    problem = None
    try:
        msgspec.msgpack.decode(raw, type=kind)
        return None
    except msgspec.ValidationError:
        pass
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        problem = decode_problem(raw, exc)
    declared = type_name(kind)
    args = typing.get_args(kind)
    if typing.get_origin(kind) is Union:  # T | None: the value is not None, so it is a T
        kind = next(a for a in args if a is not type(None))
        args = typing.get_args(kind)
    origin = typing.get_origin(kind)
    try:
        if isinstance(kind, type) and issubclass(kind, msgspec.Struct):
            parts = _record_parts.decode(raw)
            if isinstance(parts, list) and _tag(parts) == kind.__name__:
                path, problem = _record_problem(parts, kind)
                return ("." + path if path else "", problem)
        elif origin is list:
            for i, item in enumerate(_raw_array.decode(raw)):
                found = _value_problem(item, args[0])
                if found is not None:
                    return (f"[{i}]{found[0]}", found[1])
        elif origin is dict:
            for key, item in _raw_map.decode(raw).items():
                found = _value_problem(item, args[1])
                if found is not None:
                    return (f"[{key!r}]{found[0]}", found[1])
    except (msgspec.DecodeError, UnicodeDecodeError):
        pass  # not the container it should be, or a bad key: said below
    if problem is None:
        problem = f"expected {declared}, got {_describe_raw(raw)}"
    return ("", problem)


def type_name(kind: Any) -> str:
    """A record field's type as the schema writes it: ``list[int]``, ``Location | None``."""
    if kind is type(None):
        return "None"
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin is Union:
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args)}]"
    return getattr(kind, "__name__", str(kind))


def _describe_raw(data: Any) -> str:
    """Encoded msgpack, briefly, for an error message."""
    try:
        return _describe(msgspec.msgpack.decode(data))
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        return f"malformed data ({decode_problem(data, exc)})"


def _describe(value: Any) -> str:
    """A decoded msgpack value, briefly, for an error message."""
    if value is None:
        return "None"
    if isinstance(value, (bool, int, float)):
        return f"{type(value).__name__} {value!r}"
    if isinstance(value, str):
        return f"str {value[:40]!r}" + ("..." if len(value) > 40 else "")
    if isinstance(value, (bytes, bytearray)):
        return f"bytes ({len(value)} bytes)"
    if isinstance(value, list):
        return f"an array of {len(value)} item(s)"
    if isinstance(value, dict):
        return f"a map of {len(value)} key(s)"
    return type(value).__name__


#: Bytes a table cell shows of a longer bytes value.
_CELL_BYTES = 16


def _cell_text(value: Any) -> str:
    """A value in a table (a record's, or the MIM values) as a person reads it: text without
    quotes, a date as ISO text, bytes short; anything else as its ``repr``."""
    if isinstance(value, str):
        return value
    if isinstance(value, (datetime.date, datetime.time)):  # a datetime is a date
        return str(value)  # ISO: 2026-11-30 12:00:00+00:00
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value[:_CELL_BYTES])
        if len(value) <= _CELL_BYTES:
            return repr(data)
        return f"{data!r}... ({len(value)} bytes)"
    return repr(value)


def _record_html(self: msgspec.Struct) -> str:
    from html import escape

    cells = "".join(
        f"<tr><th style='text-align:left'>{escape(f)}</th><td style='text-align:left'>"
        f"{escape(_cell_text(getattr(self, f)))}</td></tr>"
        for f in self.__struct_fields__
    )
    return f"<table><caption>{escape(type(self).__name__)}</caption>{cells}</table>"


# -- Column batches ---------------------------------------------------------------------------
#
# A ``Columns`` message carries rows of one record type a column at a time, so that neither
# side makes a Python object per row to move them: numbers, bools and datetimes travel as
# little-endian buffers, strings as offsets into UTF-8 data (Arrow's layout, which pandas'
# Arrow-backed strings already have), anything else (bytes, lists, dicts, nested records, or a
# column of Python objects) as a msgpack array of values. This was chosen by measurement over
# Arrow IPC and over msgpack arrays of values for every column (benchmarks/wire_formats.py;
# benchmarks/README.md, "The wire format of column batches"): as fast as Arrow IPC to encode
# (faster from Python str), slower to decode only by the type check Arrow IPC does not do,
# about 7x faster than msgpack values; and a receiver without pyarrow, or without numpy,
# still reads it (more slowly).
#
# A receiver checks a batch against the declared type (``ColumnBatch.decode``) and makes
# records of it (``records``, with the standard library alone) or a pandas DataFrame
# (``dataframe``, section 7) when it is used. numpy and pyarrow speed up both when they are
# installed; they are imported only then (``_lib``).

#: The kinds that may carry a field of each declared scalar type ("values" carries any type).
_KINDS_OF: dict[Any, tuple[str, ...]] = {
    int: ("int",),
    float: ("float",),
    bool: ("bool",),
    str: ("str",),
    datetime.datetime: ("datetime", "datetime-utc"),
}
#: Microseconds from 1970 to the first and to the last datetime Python has (years 1 to 9999).
_MIN_US = -62135596800_000000
_MAX_US = 253402300799_999999
_EPOCH = datetime.datetime(1970, 1, 1)
_LITTLE_ENDIAN = sys.byteorder == "little"
#: Optional packages, imported on first use (None when missing); tests replace them with None
#: to check what a receiver without them does.
_LIBS: dict[str, Any] = {}


def _lib(name: str) -> Any:
    """``numpy`` or ``pyarrow`` if installed, else None; imported once, when first needed."""
    try:
        return _LIBS[name]
    except KeyError:
        pass
    try:
        module = __import__(name)
    except ImportError:
        module = None
    _LIBS[name] = module
    return module


def _field_base(kind: Any) -> tuple[Any, bool]:
    """A field's type without ``| None``, and whether it had it."""
    if typing.get_origin(kind) is Union and type(None) in typing.get_args(kind):
        return next(a for a in typing.get_args(kind) if a is not type(None)), True
    return kind, False


def _numbers(data: Any, code: str) -> list[Any]:
    """A little-endian buffer of ``code`` values (``"q"``, ``"d"``, ``"i"``) as a list."""
    if _LITTLE_ENDIAN:
        return memoryview(data).cast("B").cast(code).tolist()
    values = array.array(code, bytes(data))
    values.byteswap()
    return values.tolist()


_values_decoders: dict[Any, msgspec.msgpack.Decoder] = {}


def _values_decoder(kind: Any) -> msgspec.msgpack.Decoder:
    """A decoder of a "values" column of a field of type ``kind``."""
    decoder = _values_decoders.get(kind)
    if decoder is None:
        decoder = _values_decoders[kind] = msgspec.msgpack.Decoder(list[kind])  # type: ignore[valid-type]
    return decoder


def _array_header(count: int) -> bytes:
    """The msgpack header of an array of ``count`` items."""
    if count < 16:
        return bytes([0x90 | count])
    if count < 1 << 16:
        return b"\xdc" + count.to_bytes(2, "big")
    return b"\xdd" + count.to_bytes(4, "big")


_builders: weakref.WeakKeyDictionary[type, Callable[..., list[Any]]] = weakref.WeakKeyDictionary()


def _builder(cls: type) -> Callable[..., list[Any]]:
    """``build(cls, column, ...)``: records of ``cls`` from one list per field, in declared
    order. It is a comprehension compiled for the type's own field names, because record
    types take keyword arguments only and every generic way costs about twice as much (here:
    ``msgspec.convert`` of tuples 250 ns a record, this 125 ns). Only the field names enter
    the source, and they are identifiers (checked when the type was built, and here)."""
    build = _builders.get(cls)
    if build is not None:
        return build
    names = list(cls.__struct_fields__)  # type: ignore[attr-defined]
    if not all(_IDENT.match(n) and not keyword.iskeyword(n) for n in names):
        raise SchemaError(f"{cls.__name__}: field names must be identifiers")
    columns = [f"c{i}" for i in range(len(names))]
    values = [f"v{i}" for i in range(len(names))]
    keywords = ", ".join(f"{name}={value}" for name, value in zip(names, values))
    targets = ", ".join(values) + ("," if len(values) == 1 else "")
    source = (
        f"def build(cls, {', '.join(columns)}):\n"
        f"    return [cls({keywords}) for {targets} in zip({', '.join(columns)})]\n"
        if names
        else "def build(cls, rows):\n    return [cls() for _ in range(rows)]\n"
    )
    namespace: dict[str, Any] = {}
    exec(compile(source, f"<records of {cls.__name__}>", "exec"), namespace)
    build = _builders[cls] = namespace["build"]
    return build


class ColumnBatch:
    """Rows of one record type (``record_type``), a column at a time: what a ``Columns``
    message carries, made from a message (``decode``, which checks it against the declared
    type) or from a DataFrame (``FrameColumns.batch``). ``len()`` is its number of rows;
    ``records()`` makes records of it, ``dataframe()`` a pandas DataFrame, ``frames()`` the
    ``Columns`` frames that carry it."""

    __slots__ = ("_values", "columns", "record_type", "rows")

    def __init__(self, record_type: type, rows: int, columns: Mapping[str, Column]) -> None:
        self.record_type = record_type
        self.rows = rows
        self.columns = dict(columns)
        self._values: dict[str, list[Any]] = {}  # "values" columns decoded when checked

    def __len__(self) -> int:
        return self.rows

    def __iter__(self) -> Iterator[Any]:
        """Its records (made now): what code written for lists of records sees."""
        return iter(self.records())

    def __getitem__(self, rows: slice) -> ColumnBatch:
        """``batch[start:stop]``: those rows, as a batch of their own."""
        start, stop, step = rows.indices(self.rows)
        if step != 1:
            raise ValueError("a column batch is sliced in steps of 1")
        return self.slice(start, max(start, stop))

    def __repr__(self) -> str:
        return f"<ColumnBatch of {self.rows} {self.record_type.__name__} rows>"

    @property
    def type_name(self) -> str:
        return self.record_type.__name__

    # -- receiving --------------------------------------------------------------------------
    @classmethod
    def decode(
        cls,
        message: Columns,
        types: Mapping[str, type],
        accepted: Iterable[str] | None = None,
    ) -> tuple[ColumnBatch, list[tuple[int, str, str]]]:
        """The batch a ``Columns`` message carries, checked against its declared type (and
        ``accepted`` type names, if given), and its bad rows: (row, field, problem) for each,
        in row order. Raises ``FieldMismatch`` (type, field, problem) when no row of it can be
        taken: an unknown or unaccepted type, a column that is not a field or that travels as
        a kind its field cannot have, a missing required field, malformed buffers."""
        name = message.record
        record_type = types.get(name)
        if record_type is None:
            raise FieldMismatch(name, None, f"unknown record type {name!r}")
        if accepted is not None and name not in accepted:
            raise FieldMismatch(
                name, None, f"records of type {name!r} are not accepted by this connector"
            )
        fields = {f.name: f for f in msgspec.structs.fields(record_type)}
        columns = {c.name: c for c in message.columns}
        for column in columns:
            if column not in fields:
                raise FieldMismatch(name, column, f"not a field of {name} ({', '.join(fields)})")
        batch = cls(record_type, message.rows, columns)
        bad: dict[int, tuple[str, str]] = {}
        for field in fields.values():
            column = columns.get(field.name)
            if column is None:
                if field.required:
                    raise FieldMismatch(name, field.name, "missing")
                continue
            for row, path, problem in batch._problems(column, field):
                if row not in bad:
                    bad[row] = (field.name + path, problem)
        return batch, [(row, *bad[row]) for row in sorted(bad)]

    def _problems(self, column: Column, field: Any) -> list[tuple[int, str, str]]:
        """The bad rows of one column: (row, path below the field, problem). Raises
        ``FieldMismatch`` for a column no row of which can be taken."""
        base, optional = _field_base(field.type)
        kind = column.kind
        declared = type_name(field.type)

        def malformed(problem: str) -> FieldMismatch:
            return FieldMismatch(self.type_name, field.name, f"malformed column: {problem}")

        if kind != "values" and kind not in _KINDS_OF.get(base, ()):
            raise FieldMismatch(
                self.type_name,
                field.name,
                f"a column of kind {kind!r} cannot hold a field of type {declared}",
            )
        problems: list[tuple[int, str, str]] = []
        valid = bytes(column.valid)
        if valid.translate(None, b"\x00\x01"):
            raise malformed("validity bytes other than 0 and 1")
        if valid and not optional and b"\x00" in valid:
            got = f"expected {declared}, got None"
            problems += [(row, "", got) for row, ok in enumerate(valid) if not ok]
        if kind == "bool":
            if bytes(column.data).translate(None, b"\x00\x01"):
                raise malformed("bool bytes other than 0 and 1")
        elif kind in ("datetime", "datetime-utc"):
            problems += self._datetime_problems(column, valid)
        elif kind == "str":
            problems += [(row, "", p) for row, p in self._string_problems(column, malformed)]
        elif kind == "values":
            problems += self._value_problems(column, field.type)
        return problems

    def _datetime_problems(self, column: Column, valid: bytes) -> list[tuple[int, str, str]]:
        np = _lib("numpy")
        if np is not None:
            values = np.frombuffer(column.data, "<i8")
            out = (values < _MIN_US) | (values > _MAX_US)
            if valid:
                out &= np.frombuffer(valid, np.bool_)
            rows = np.flatnonzero(out).tolist()
        else:
            values = _numbers(column.data, "q")
            rows = [
                row
                for row, v in enumerate(values)
                if not _MIN_US <= v <= _MAX_US and (not valid or valid[row])
            ]
        return [(row, "", "datetime out of range (years 1 to 9999)") for row in rows]

    def _string_problems(
        self, column: Column, malformed: Callable[[str], FieldMismatch]
    ) -> list[tuple[int, str]]:
        """Rows of a string column that are not valid UTF-8. pyarrow checks the whole
        column at C speed; without it, offsets are checked with numpy (or in Python) and
        the data is decoded whole, row by row only when it is not ASCII."""
        rows, data = self.rows, column.data
        pa = _lib("pyarrow")
        if pa is not None:
            strings = pa.StringArray.from_buffers(
                rows, pa.py_buffer(column.offsets), pa.py_buffer(data)
            )
            try:
                strings.validate(full=True)
                return []
            except pa.ArrowInvalid:
                pass  # find the bad rows below, in our words
        np = _lib("numpy")
        if np is not None:
            if (np.diff(np.frombuffer(column.offsets, "<i4")) < 0).any():
                raise malformed("decreasing string offsets")
        else:
            offsets = _numbers(column.offsets, "i")
            if offsets != sorted(offsets):
                raise malformed("decreasing string offsets")
        raw = bytes(data)
        if raw.isascii():
            return []
        bad = []
        offsets = _numbers(column.offsets, "i")
        for row, (start, end) in enumerate(itertools.pairwise(offsets)):
            try:
                raw[start:end].decode("utf-8")
            except UnicodeDecodeError:
                bad.append((row, "a string is not valid UTF-8"))
        return bad

    def _value_problems(self, column: Column, kind: Any) -> list[tuple[int, str, str]]:
        try:
            self._values[column.name] = _values_decoder(kind).decode(column.data)
            return []
        except (msgspec.DecodeError, UnicodeDecodeError):
            pass
        bad = []
        for row, item in enumerate(_raw_array.decode(column.data)):
            found = _value_problem(item, kind)
            if found is not None:
                bad.append((row, *found))
        return bad

    # -- using ------------------------------------------------------------------------------
    def records(self, skip: Iterable[int] = ()) -> list[Any]:
        """Records of the batch, in row order, leaving out the rows in ``skip`` (bad rows:
        their values are not read strictly)."""
        skip = set(skip)
        fields = msgspec.structs.fields(self.record_type)
        build = _builder(self.record_type)
        if not fields:
            return build(self.record_type, self.rows - len(skip))
        lists = [self.values(f.name, lenient=bool(skip)) for f in fields]
        if skip:
            keep = [row for row in range(self.rows) if row not in skip]
            lists = [[values[row] for row in keep] for values in lists]
        return build(self.record_type, *lists)

    def values(self, name: str, *, lenient: bool = False) -> list[Any]:
        """The values of field ``name``, a list with None where a value is None."""
        known = self._values.get(name)
        if known is not None:  # decoded when checked, or the Python objects it was made of
            return known if type(known) is list else known.tolist()
        column = self.columns.get(name)
        rows = self.rows
        if column is None:
            return [None] * rows
        kind, data = column.kind, column.data
        values: list[Any]
        if kind == "int":
            values = _numbers(data, "q")
        elif kind == "float":
            values = _numbers(data, "d")
        elif kind == "bool":
            values = list(map(bool, memoryview(data).cast("B")))
        elif kind in ("datetime", "datetime-utc"):
            values = _datetimes(data, kind == "datetime-utc", column.valid)
        elif kind == "str":
            values = _strings(column.offsets, data, rows, lenient)
        else:
            values = self._decode_values(column, lenient)
        if column.valid:
            values = [v if ok else None for v, ok in zip(values, bytes(column.valid))]
        return values

    def _decode_values(self, column: Column, lenient: bool) -> list[Any]:
        field = next(f for f in msgspec.structs.fields(self.record_type) if f.name == column.name)
        decoder = _values_decoder(field.type)
        if not lenient:
            return decoder.decode(column.data)
        item = msgspec.msgpack.Decoder(field.type)
        values = []
        for raw in _raw_array.decode(column.data):
            try:
                values.append(item.decode(raw))
            except (msgspec.DecodeError, UnicodeDecodeError):
                values.append(None)  # a bad row: left out by the caller
        return values

    def dataframe(self) -> Any:
        """A pandas DataFrame of the batch (see ``batches_dataframe``)."""
        return batches_dataframe([self], self.record_type)

    # -- sending ----------------------------------------------------------------------------
    def frames(self, max_frame_size: int) -> list[tuple[bytearray, int]]:
        """``Columns`` frames that carry the batch, each with its number of rows, split so
        that no frame exceeds ``max_frame_size``; ``LocalProtocolError`` for a single row
        too large."""
        message = Columns(self.type_name, self.rows, list(self.columns.values()))
        frame = encode_frame(message)
        if len(frame) - 4 <= max_frame_size:
            return [(frame, self.rows)]
        if self.rows <= 1:
            raise LocalProtocolError(
                f"a {self.type_name} row of {len(frame) - 4} bytes does not fit in a frame "
                f"(the maximum frame size is {max_frame_size} bytes)"
            )
        half = self.rows // 2
        return self.slice(0, half).frames(max_frame_size) + self.slice(half, self.rows).frames(
            max_frame_size
        )

    def slice(self, start: int, stop: int) -> ColumnBatch:
        """Rows ``start`` to ``stop`` (not included), as a batch of their own."""
        columns = {}
        for name, column in self.columns.items():
            kind = column.kind
            offsets = memoryview(b"")
            width = _FIXED_KINDS.get(kind)
            if width is not None:
                data: Any = column.data[start * width : stop * width]
            elif kind == "str":
                window = _numbers(column.offsets, "i")[start : stop + 1]
                base = window[0]
                rebased = array.array("i", [o - base for o in window])
                if not _LITTLE_ENDIAN:
                    rebased.byteswap()
                offsets = memoryview(rebased).cast("B")
                data = column.data[base : window[-1]]
            else:
                items = _raw_array.decode(column.data)[start:stop]
                data = memoryview(_encoder.encode(items))
            valid = column.valid[start:stop] if column.valid else memoryview(b"")
            columns[name] = Column(name, kind, data, offsets, valid)
        return ColumnBatch(self.record_type, stop - start, columns)


def _datetimes(data: Any, utc: bool, valid: Any) -> list[Any]:
    """A datetime column's values (microseconds since 1970, UTC) as datetimes."""
    np = _lib("numpy")
    if np is not None:
        values = np.frombuffer(data, "<i8")
        if len(valid):  # a None row may hold any number: read it as 0
            values = np.where(np.frombuffer(valid, np.bool_), values, 0)
        out = values.astype("datetime64[us]").astype(object).tolist()
    else:
        delta = datetime.timedelta
        out = [_EPOCH + delta(microseconds=v) for v in _numbers(data, "q")]
    if utc:
        zone = datetime.timezone.utc
        out = [v.replace(tzinfo=zone) for v in out]
    return out


def _strings(offsets: Any, data: Any, rows: int, lenient: bool) -> list[str]:
    """A string column's values (offsets into UTF-8 data) as str; ``lenient``: a row that
    is not UTF-8 is read with replacement characters (it is a bad row, left out)."""
    pa = _lib("pyarrow")
    if pa is not None and not lenient:
        strings = pa.StringArray.from_buffers(rows, pa.py_buffer(offsets), pa.py_buffer(data))
        return strings.to_pylist()
    starts = _numbers(offsets, "i")
    raw = bytes(data)
    if raw.isascii():
        text = raw.decode("ascii")
        return [text[a:b] for a, b in itertools.pairwise(starts)]
    errors = "replace" if lenient else "strict"
    return [raw[a:b].decode("utf-8", errors) for a, b in itertools.pairwise(starts)]


# ---------------------------------------------------------------------------------------------
# 4. API modules
# ---------------------------------------------------------------------------------------------

#: Names the connector provides to every API module, bound to the connection it came with.
API_PROVIDED = ("connection", "submit", "submit_many", "flush", "receive", "udrs", "mim")


def api_exports(source: str, name: str = "the API module") -> list[str]:
    """What an API module exposes, read from its source, by one rule that the server (at
    start-up, to find clashes) and the client (at connect) both apply:

    - with ``__all__`` (a literal list of strings), exactly those names, each of which the
      module must bind at top level (by ``def``, ``class``, assignment or import);
    - without it, every public name the module binds at top level by ``def``, ``class`` or
      assignment (``alias = imported_function`` counts; ``import x``/``from x import y`` do
      not), except the names the connector provides.

    Raises ``MZConnectorError`` naming the module for an ``__all__`` that breaks the rule.
    """
    tree = ast.parse(source)
    declared = None
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else []
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
            try:
                declared = list(ast.literal_eval(node.value))  # type: ignore[union-attr]
            except (ValueError, TypeError):
                raise MZConnectorError(f"{name}: __all__ must be a literal list of names") from None
            if not all(isinstance(n, str) for n in declared):
                raise MZConnectorError(f"{name}: __all__ must list names (strings)")
    if declared is None:
        return [
            n
            for n in _bound(tree, imports=False)
            if not n.startswith("_") and n not in API_PROVIDED
        ]
    bound = set(_bound(tree, imports=True))
    missing = [n for n in declared if n not in bound]
    if missing:
        raise MZConnectorError(f"{name}: __all__ lists {missing}, which the module does not define")
    return declared


def _bound(tree: ast.Module, *, imports: bool) -> list[str]:
    """The names a module's top-level statements bind, in order, without duplicates."""
    names: dict[str, None] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = None
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                names.update((n.id, None) for n in ast.walk(target) if isinstance(n, ast.Name))
        elif imports and isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update(((a.asname or a.name).split(".")[0], None) for a in node.names)
    return list(names)


class Namespace:
    """Attribute access to a fixed set of names, with tab completion."""

    def __init__(self, title: str, members: Mapping[str, Any]) -> None:
        self._title = title
        self._members = dict(members)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["_members"][name]
        except KeyError:
            raise AttributeError(
                f"{self.__dict__.get('_title', 'namespace')} has no {name!r}; "
                f"it has: {', '.join(self.__dict__.get('_members', ())) or 'nothing'}"
            ) from None

    def __getitem__(self, name: str) -> Any:
        return self._members[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._members)

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, name: object) -> bool:
        return name in self._members

    def __dir__(self) -> list[str]:
        return sorted(self._members)

    def __repr__(self) -> str:
        return f"<{self._title}: {', '.join(self._members)}>"


def _load_api_namespace(
    modules: list[ApiModule], provided: Mapping[str, Any]
) -> tuple[Namespace, dict[str, types.ModuleType]]:
    """Run server-shipped API modules, each in a fresh module with the ``provided`` names.
    A module that cannot run here (a missing package, an error at import) is an
    ``ApiModuleError`` naming it and the cause."""
    members: dict[str, Any] = {}
    loaded: dict[str, types.ModuleType] = {}
    for spec in modules:
        module = types.ModuleType(spec.name, None)
        filename = f"<mzconnector api {spec.name}>"
        module.__file__ = filename
        vars(module).update(provided)
        # Register the source so tracebacks, inspect and help() can show it.
        lines = spec.source.splitlines(keepends=True)
        linecache.cache[filename] = (len(spec.source), None, lines, filename)
        try:
            exec(compile(spec.source, filename, "exec"), vars(module))
            exported = api_exports(spec.source, f"API module {spec.name!r}")
        except Exception as exc:
            if isinstance(exc, ModuleNotFoundError) and exc.name:
                problem = f"needs {exc.name!r}, which is not installed here"
            elif isinstance(exc, MZConnectorError):
                raise ApiModuleError(spec.name, str(exc)) from exc
            else:
                problem = f"cannot run here: {type(exc).__name__}: {exc}"
            raise ApiModuleError(spec.name, f"API module {spec.name!r} {problem}") from exc
        for name in exported:
            members[name] = getattr(module, name)
        loaded[spec.name] = module
    return Namespace("API", members), loaded


# ---------------------------------------------------------------------------------------------
# 5. Transports, and what both clients share: the connect step and the ledger
# ---------------------------------------------------------------------------------------------


class _Transport:
    """A byte stream that one thread may read while another writes."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._selectors: dict[socket.socket | None, selectors.BaseSelector] = {}
        self._poll = None
        if hasattr(select, "poll"):  # not on Windows
            self._poll = select.poll()
            self._poll.register(sock, select.POLLIN)

    def send(self, data: bytes | bytearray) -> None:
        self.sock.sendall(data)

    def recv(self) -> bytes:
        """Some bytes; ``b""`` at end of stream."""
        return self.sock.recv(1 << 18)

    def pending(self) -> bool:
        """Whether bytes are buffered above the socket (so ``recv`` will not block)."""
        return False

    def wait_readable(self, timeout: float | None, wake: socket.socket | None = None) -> Any:
        """Wait until ``recv`` has something: returns True, ``wake`` if that became
        readable first, or False on timeout."""
        if self.pending():
            return True
        if wake is None and self._poll is not None:  # the hot path: one cheap poll(2)
            return bool(self._poll.poll(None if timeout is None else max(0, timeout) * 1000))
        selector = self._selectors.get(wake)
        if selector is None:
            selector = self._selectors[wake] = selectors.DefaultSelector()
            selector.register(self.sock, selectors.EVENT_READ)
            if wake is not None:
                selector.register(wake, selectors.EVENT_READ)
        ready = selector.select(timeout)
        for key, _ in ready:
            if key.fileobj is wake:
                return wake
        return bool(ready)

    def shutdown(self) -> None:
        """End the stream both ways (a thread waiting in it wakes), without closing it: the
        file descriptor cannot be reused under a thread still polling it."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        self.shutdown()
        for selector in self._selectors.values():
            selector.close()
        self.sock.close()


class _TLSTransport(_Transport):
    """TLS over ``ssl.MemoryBIO``: the TLS state is touched only under a lock, so one thread
    can read while another writes (an ``SSLSocket`` does not allow that safely)."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, server_hostname: str) -> None:
        super().__init__(sock)
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._in, self._out, server_hostname=server_hostname)
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        while True:
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._pump_out()
                data = self.sock.recv(1 << 16)
                if not data:
                    raise ConnectionResetError(
                        "the server closed the connection during TLS"
                    ) from None
                self._in.write(data)
        self._pump_out()

    def _pump_out(self) -> None:
        data = self._out.read()
        if data:
            self.sock.sendall(data)

    def pending(self) -> bool:
        with self._lock:
            return bool(self._tls.pending() or self._in.pending)

    def send(self, data: bytes | bytearray) -> None:
        with self._send_lock:
            with self._lock:
                self._tls.write(data)
                out = self._out.read()
            self.sock.sendall(out)

    def recv(self) -> bytes:
        while True:
            with self._lock:
                try:
                    return self._tls.read(1 << 18)
                except ssl.SSLWantReadError:
                    pending = self._out.pending
                except ssl.SSLZeroReturnError:
                    return b""
            if pending:  # e.g. a key update: send it in order with what send() writes
                with self._send_lock, self._lock:
                    self.sock.sendall(self._out.read())
            data = self.sock.recv(1 << 18)
            with self._lock:
                if data:
                    self._in.write(data)
                else:
                    self._in.write_eof()


def _tls_context(
    tls: bool | ssl.SSLContext, cafile: str | None, certfile: str | None, keyfile: str | None
) -> ssl.SSLContext | None:
    """The TLS context of a connect, or None without TLS. TLS files that would be ignored are
    a ``ValueError``: a client that meant TLS must not silently connect in plain text."""
    files = [
        f"{n}=" for n, v in (("cafile", cafile), ("certfile", certfile), ("keyfile", keyfile)) if v
    ]
    if not tls:
        if files:
            raise ValueError(
                f"{', '.join(files)} given with tls=False: pass tls=True to connect over TLS"
            )
        return None
    if isinstance(tls, ssl.SSLContext):
        if files:
            raise ValueError(
                f"{', '.join(files)} given with tls=<an SSLContext>: load them into the context "
                "instead (load_verify_locations, load_cert_chain)"
            )
        return tls
    if keyfile and not certfile:
        raise ValueError("keyfile= given without certfile=: pass the client certificate too")
    try:
        context = ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as exc:
        raise ConnectError(f"cannot load the CA certificates {cafile!r}: {exc}") from exc
    if certfile:
        try:
            context.load_cert_chain(certfile, keyfile)
        except (OSError, ssl.SSLError) as exc:
            raise ConnectError(f"cannot load the client certificate {certfile!r}: {exc}") from exc
    return context


def _describe_tls_error(exc: ssl.SSLError, where: str) -> str:
    """A TLS failure, in words a notebook user can act on."""
    text = str(exc)
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = exc.verify_message or text
        if "mismatch" in detail or "hostname" in detail.lower():
            return (
                f"TLS handshake failed: the server's certificate is not valid for the host name "
                f"you connected to ({detail}); connect by a name it has, or pass "
                f"server_hostname= that name (a server reached by IP or through a tunnel)"
            )
        return f"TLS handshake failed: the server's certificate cannot be verified ({detail})"
    if "WRONG_VERSION_NUMBER" in text or "record layer failure" in text or "packet length" in text:
        return f"TLS handshake failed: the server at {where} does not seem to speak TLS ({exc})"
    if "CERTIFICATE_REQUIRED" in text:
        return f"TLS handshake failed: the server requires a client certificate ({exc})"
    if "UNKNOWN_CA" in text or "BAD_CERTIFICATE" in text or "HANDSHAKE_FAILURE" in text:
        return f"TLS handshake failed: the server does not accept the client certificate ({exc})"
    if isinstance(exc, ssl.SSLEOFError):
        return (
            f"TLS handshake failed: the server at {where} closed the connection "
            f"(does it require a client certificate?) ({exc})"
        )
    return f"TLS handshake failed: {exc}"


def _keepalive(sock: socket.socket, timeout: float) -> None:
    """Notice a server that vanished without closing (a cut network, a dead host): TCP
    keep-alive probes after ``timeout`` idle seconds make the connection fail, so no call
    waits forever on a peer that is gone."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    idle = max(1, int(timeout))
    for name, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", 1), ("TCP_KEEPCNT", 3)):
        option = getattr(socket, name, None)
        if option is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, option, value)
            except OSError:
                pass


def _handshake_hint(tls: bool, cert_given: bool) -> str:
    """What a server that drops a connection during the handshake most likely wants."""
    if not tls:
        return "(is it a TLS server? then connect with tls=True)"
    if cert_given:
        return "(TLS: does it accept this client certificate, signed by a CA it trusts?)"
    return "(TLS: does it require a client certificate? pass certfile=...)"


#: What each code of a ``Refuse`` raises ("rejected" is the workflow's own answer).
_REFUSALS: dict[str, type[ConnectionRefused]] = {
    "limit": ConnectionLimitReached,
    "protocol": HelloRefused,
    "shutdown": ServerShuttingDown,
    "auth": AuthenticationFailed,
}
#: Refusals a reconnecting client does not retry: the server will say the same again.
_FINAL_REFUSALS = (AuthenticationFailed, HelloRefused, ConnectionRejected)


class _Handshake:
    """Opening a connection, for both clients, without I/O: the bytes to send first, the
    server's answer read from the bytes that arrive, and every socket, TLS and timeout error of
    the attempt mapped, once, to a ``ConnectError`` (as trio's
    ``_translate_socket_errors_to_stream_errors`` and httpcore's ``map_exceptions`` do). Each
    client runs it over its own streams::

        with handshake.errors():
            ...open the stream (TCP, then TLS)...
            handshake.opened()
            ...send handshake.hello...
            while (welcome := handshake.receive(...some bytes...)) is None:
                pass

    What arrived after the ``Welcome`` stays in ``protocol``, for the connection to handle.
    """

    def __init__(
        self, host: str, port: int, *, timeout: float, hello: Hello, tls: bool, cert_given: bool
    ) -> None:
        self.where = _where(host, port)
        self.timeout = timeout
        self.protocol = Protocol(Role.CLIENT)
        self.hello = self.protocol.send(hello)  # (the dialer checked that it encodes)
        self._tls = tls
        self._hint = _handshake_hint(tls, cert_given)
        self._opened = False

    def opened(self) -> None:
        """The stream is open: from now on, a failure is the handshake's."""
        self._opened = True

    def receive(self, data: bytes) -> Welcome | None:
        """Feed what arrived (``b""`` at end of stream): the ``Welcome`` once it is complete,
        None while more is needed. Raises the ``ConnectError`` the server's answer means."""
        where = self.where
        self.protocol.receive_data(data)
        try:
            event = self.protocol.next_event()
        except RemoteProtocolError as exc:
            raise ConnectError(f"{where} is not an mzconnector server ({exc})") from exc
        if event is NEED_DATA:
            return None
        if isinstance(event, Welcome):
            if event.protocol != PROTOCOL_VERSION:
                raise ConnectError(
                    f"{where} speaks protocol {event.protocol}; "
                    f"this client speaks {PROTOCOL_VERSION}"
                )
            return event
        if isinstance(event, Refuse):
            if event.code == "rejected":
                raise _with_raw(ConnectionRejected(event.reason), event)
            refused = _REFUSALS.get(event.code, ConnectionRefused)
            raise _with_raw(refused(f"{where} refused the connection: {event.reason}"), event)
        if isinstance(event, Error):
            raise _with_raw(ConnectError(f"{where} reported an error: {event.message}"), event)
        # The protocol admits nothing else before a Welcome: the server closed.
        raise ConnectError(f"{where} closed the connection during the handshake {self._hint}")

    @contextlib.contextmanager
    def errors(self) -> Iterator[None]:
        """Socket, TLS and timeout errors of the attempt, as ``ConnectError``."""
        where, timeout = self.where, self.timeout
        try:
            yield
        except TimeoutError:
            if not self._opened:
                raise ConnectError(
                    f"cannot connect to {where}: no answer within {timeout} s"
                ) from None
            hint = "" if self._tls else " (is it a TLS server? try tls=True)"
            raise ConnectError(f"no answer from {where} within {timeout} s{hint}") from None
        except ssl.SSLError as exc:
            raise ConnectError(_describe_tls_error(exc, where)) from exc
        except OSError as exc:
            if not self._opened:
                raise ConnectError(
                    f"cannot connect to {where}: {exc.strerror or exc} (is the server running?)"
                ) from exc
            raise ConnectError(
                f"{where} dropped the connection during the handshake {self._hint}: {exc}"
            ) from exc


def _where(host: str, port: int) -> str:
    """An address as a person writes it (an IPv6 host in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _addresses(host: str | Iterable[str], port: int) -> list[tuple[str, int]]:
    """The servers ``connect`` is given: one host (on ``port``), ``"host-a:7777|host-b:7777"``,
    or a list of ``"host[:port]"`` (a host without a port is on ``port``)."""
    entries = host.split("|") if isinstance(host, str) else list(host)
    out = []
    for entry in entries:
        if not isinstance(entry, str):
            raise TypeError(f"a server is a 'host' or 'host:port' string, not {entry!r}")
        text = entry.strip()
        name, number = text, port
        if text.startswith("["):  # [v6]:port or [v6]
            close = text.find("]")
            name, rest = text[1:close], text[close + 1 :]
            if close < 0 or (rest and not rest.startswith(":")):
                raise ValueError(f"cannot read the server address {entry!r}")
            if rest:
                number = _port(rest[1:], entry)
        elif text.count(":") == 1:
            name, _, digits = text.partition(":")
            number = _port(digits, entry)
        if not name:
            raise ValueError(f"the server address {entry!r} names no host")
        out.append((name, number))
    if not out:
        raise ValueError("connect needs at least one server")
    return out


def _port(text: str, entry: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"the server address {entry!r} has no valid port (1 to 65535)")
    return int(text)


class _Dialer:
    """Where and how a client connects, and reconnects: the servers (tried in random order,
    so that clients spread over them), TLS, and the Hello, which is the same for every
    connection of a client so that a reconnection resumes its session. It holds the token:
    its repr never shows it."""

    def __init__(
        self,
        host: str | Iterable[str],
        port: int,
        *,
        timeout: float,
        name: str,
        metadata: Mapping[str, Any] | None,
        client_id: str,
        client: str,
        token: str | None,
        keepalive: float,
        keepalive_misses: int,
        tls: bool | ssl.SSLContext,
        cafile: str | None,
        certfile: str | None,
        keyfile: str | None,
        server_hostname: str | None,
    ) -> None:
        self.addresses = _addresses(host, port)
        self.context = _tls_context(tls, cafile, certfile, keyfile)
        if server_hostname is not None and self.context is None:
            raise ValueError("server_hostname= given with tls=False: it names the TLS server")
        self.server_hostname = server_hostname
        self.cert_given = bool(certfile)
        self.timeout = timeout
        if keepalive < 0 or keepalive_misses < 0:
            raise ValueError("keepalive and keepalive_misses are at least 0 (0: off)")
        #: Seconds between pings of an idle link, and pings unanswered before it is given
        #: up; 0 in either: no keepalive.
        self.keepalive = keepalive if keepalive and keepalive_misses else 0.0
        self.keepalive_misses = keepalive_misses
        if token is None:
            token = os.environ.get(TOKEN_VARIABLE, "")
        if not isinstance(token, str):
            raise TypeError("token= is a string")
        self._hello = Hello(
            PROTOCOL_VERSION,
            name=name,
            metadata=dict(metadata or {}),
            client=f"{client} (Python {sys.version.split()[0]})",
            client_id=client_id,
            token=token,
            session=secrets.token_hex(16),
            keepalive=self.keepalive,
        )
        try:
            _encoder.encode(self._hello)
        except _ENCODE_ERRORS:
            path, problem = _encode_problem(self._hello.metadata)
            raise ValueError(f"metadata{path} cannot be encoded: {problem}") from None

    def __repr__(self) -> str:
        return f"<mzconnector dialer for {', '.join(_where(*a) for a in self.addresses)}>"

    @property
    def session(self) -> str:
        return self._hello.session

    def order(self) -> list[tuple[str, int]]:
        """The servers, in the order to try them now."""
        return random.sample(self.addresses, len(self.addresses))

    def handshake(self, host: str, port: int) -> _Handshake:
        return _Handshake(
            host,
            port,
            timeout=self.timeout,
            hello=self._hello,
            tls=self.context is not None,
            cert_given=self.cert_given,
        )

    def tls_name(self, host: str) -> str:
        """The name the server's certificate must have."""
        return self.server_hostname or host

    def keepalive_state(self) -> Keepalive | None:
        """A fresh keepalive for a new link (None when off)."""
        if not self.keepalive:
            return None
        return Keepalive(self.keepalive, self.keepalive_misses, time.monotonic())

    @staticmethod
    def none_answered(failures: list[tuple[str, ConnectError]]) -> ConnectError:
        """The error when no server answered: the one server's own; for several, one that
        names each address and why (of their class when they all failed alike)."""
        if len(failures) == 1:
            return failures[0][1]
        kinds = {type(exc) for _, exc in failures}
        kind = kinds.pop() if len(kinds) == 1 else ConnectError
        if kind is ConnectionRejected or kind is ApiModuleError:
            kind = ConnectError
        why = "; ".join(f"{where}: {exc}" for where, exc in failures)
        error = kind(f"cannot connect to any of {len(failures)} servers: {why}")
        error.failures = failures  # type: ignore[attr-defined]
        return error


class ConnectionState(enum.Enum):
    """Where a connection is (``conn.state``); ``connect(..., on_state_change=callback)`` is
    told each change."""

    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    DISCONNECTING = "disconnecting"
    DISCONNECTED = "disconnected"


__all__ += ["ConnectionState", "SchemaChanged"]

_CONNECTING = ConnectionState.CONNECTING
_CONNECTED = ConnectionState.CONNECTED
_RECONNECTING = ConnectionState.RECONNECTING
_DISCONNECTING = ConnectionState.DISCONNECTING
_DISCONNECTED = ConnectionState.DISCONNECTED

#: The changes a connection's state may make; anything else is a bug of ours.
_STATE_CHANGES: dict[ConnectionState, frozenset[ConnectionState]] = {
    _CONNECTING: frozenset([_CONNECTED, _RECONNECTING, _DISCONNECTED]),
    _CONNECTED: frozenset([_RECONNECTING, _DISCONNECTING, _DISCONNECTED]),
    _RECONNECTING: frozenset([_CONNECTED, _DISCONNECTING, _DISCONNECTED]),
    _DISCONNECTING: frozenset([_DISCONNECTED]),
    _DISCONNECTED: frozenset([_RECONNECTING]),  # conn.reconnect() brings a lost one back
}


class _Lifecycle:
    """A connection's state, its changes in order (for ``on_state_change``, which each front
    end calls outside its locks), and the wait before each reconnection attempt: without I/O
    or locks, and with the random source and the first delay passed in, for the tests."""

    def __init__(
        self,
        *,
        attempts: int | None,
        max_delay: float,
        first_delay: float = 0.1,
        rng: random.Random | None = None,
    ) -> None:
        if attempts is not None and attempts < 1:
            raise ValueError("reconnect_attempts is at least 1 (None: no limit)")
        if max_delay < 0:
            raise ValueError("reconnect_max_delay is at least 0")
        self.state = _CONNECTING
        self.changes: collections.deque[ConnectionState] = collections.deque([_CONNECTING])
        self.attempts = attempts
        self.max_delay = max_delay
        self.first_delay = first_delay
        self._rng = rng or random.Random()

    def change(self, state: ConnectionState) -> bool:
        """Go to ``state`` (False if it is there already); the change is queued in ``changes``."""
        if state is self.state:
            return False
        if state not in _STATE_CHANGES[self.state]:
            raise RuntimeError(f"a connection cannot go from {self.state.name} to {state.name}")
        self.state = state
        self.changes.append(state)
        return True

    def delay(self, attempt: int) -> float:
        """Seconds to wait before reconnection attempt ``attempt`` (1, 2, ...): none before
        the first (the server may be back already); then doubling from ``first_delay``, at
        most ``max_delay``, each with jitter (a random point of its upper half), so that the
        clients of a restarted server do not all come back at the same instant."""
        if attempt <= 1:
            return 0.0
        ceiling = min(self.max_delay, self.first_delay * 2 ** min(attempt - 2, 64))
        return ceiling * (0.5 + 0.5 * self._rng.random())

    def exhausted(self, attempts_made: int) -> bool:
        return self.attempts is not None and attempts_made >= self.attempts


def _schema_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """What differs between two schemas (type name -> field -> type), in words."""

    def norm(kind: str) -> str:
        return "".join(str(kind).split())

    changes = [f"type {name} was removed" for name in old if name not in new]
    changes += [f"type {name} was added" for name in new if name not in old]
    for name, fields in old.items():
        if name not in new:
            continue
        now = new[name]
        found = [f"{name}.{f} was removed" for f in fields if f not in now]
        found += [
            f"{name}.{f} changed from {fields[f]} to {now[f]}"
            for f in fields
            if f in now and norm(fields[f]) != norm(now[f])
        ]
        found += [f"{name}.{f} was added ({now[f]})" for f in now if f not in fields]
        if not found and list(fields) != list(now):
            found.append(f"the fields of {name} were reordered")
        changes += found
    return changes


class UnloadableObject:
    """An object the workflow sent that cannot be unpickled here (often: its class was
    defined in a workflow file, which needs ``cloudpickle`` installed to load). ``load()``
    tries again, e.g. after ``pip install cloudpickle``."""

    def __init__(self, data: bytes, error: str) -> None:
        self.data = data
        self.error = error

    def load(self) -> Any:
        return pickle.loads(self.data)

    def __repr__(self) -> str:
        return f"<UnloadableObject ({len(self.data)} bytes): {self.error}>"


def _decode_items(decoder: msgspec.msgpack.Decoder, raw: msgspec.Raw) -> list[Any]:
    """The records of a ``Records`` message, with pickled objects loaded."""
    items = decoder.decode(raw)
    for i, item in enumerate(items):
        if type(item) is Pickled:
            try:
                items[i] = pickle.loads(item.data)
            except Exception as exc:
                items[i] = UnloadableObject(item.data, f"{type(exc).__name__}: {exc}")
    return items


class _Ledger:
    """What a client has sent, for acknowledgements and for ``unacknowledged``: the batches
    sent and not yet acknowledged, and the records it refused itself (too large for a frame),
    so that the server's record numbers map back to the order of ``submit``.

    Records sent are numbered in the client's session, from 1, across reconnections: each
    frame says the number of its first record (one integer per batch), the server's ``Ack``
    counts these numbers, and after a reconnection ``resume`` gives the frames to send again,
    with their numbers, so that the server takes each record once.

    The sender counts batches in (``frames``, one sender at a time) while whoever reads the
    socket takes them out (``ack``, ``in_submit_order``): the ledger has its own lock, so that
    a reader never waits for a sender (which may wait for a server that does not read).
    """

    def __init__(self, codec: RecordCodec, max_frame_size: int) -> None:
        self.codec = codec
        self.max_frame_size = max_frame_size
        self.sent = 0  # records sent to the server
        # (number of the last record, what ``unacknowledged`` shows, for a column batch the
        # DataFrame's rows to make its frame again from)
        self.unacked: collections.deque[tuple[int, list[Any], tuple[FrameColumns, int, int] | None]]
        self.unacked = collections.deque()
        self.refused_here: list[int] = []  # submit indices of records refused by the client
        self._lock = threading.Lock()

    def frames(self, records: list[Any]) -> tuple[list[bytearray], list[RecordError]]:
        """Frames for a batch, which is then counted as sent. Records that cannot be encoded,
        or are too large for a frame, are left out and returned as errors."""
        refused: list[int] = []
        errors: list[RecordError] = []
        first = self.sent + 1
        try:
            frames = encode_record_frames(records, self.max_frame_size, first)
        except (LocalProtocolError, *_ENCODE_ERRORS):
            records, refused, errors = self._sift(records)
            frames = encode_record_frames(records, self.max_frame_size, first) if records else []
        with self._lock:
            self.refused_here += refused
            if records:
                self.sent += len(records)
                self.unacked.append((self.sent, records, None))
        return frames, errors

    def columns(self, prepared: FrameColumns, start: int, stop: int) -> bytearray:
        """The ``Columns`` frame of rows ``start`` to ``stop`` of a prepared DataFrame, which
        are then counted as sent; until the server acknowledges them, ``unacknowledged`` shows
        them as a slice of the DataFrame."""
        frame = prepared.frame(start, stop, self.sent + 1)
        with self._lock:
            self.sent += stop - start
            self.unacked.append((self.sent, [prepared.part(start, stop)], (prepared, start, stop)))
        return frame

    def _sift(self, records: list[Any]) -> tuple[list[Any], list[int], list[RecordError]]:
        """The records that can go, and the submit indices and errors of those that cannot.
        Only for a batch that failed as a whole: it encodes each record on its own."""
        limit = self.max_frame_size - 64
        first = self.sent + len(self.refused_here)
        kept: list[Any] = []
        refused: list[int] = []
        errors: list[RecordError] = []
        for i, record in enumerate(records):
            field = None
            try:
                size = len(_encoder.encode(record))
            except RecursionError:  # too deep to look into
                problem = "cannot be encoded: nested too deeply (or it contains itself)"
            except _ENCODE_ERRORS:
                path, problem = _encode_problem(record)
                field, problem = path.lstrip("."), f"cannot be encoded: {problem}"
            else:
                if size <= limit:
                    kept.append(record)
                    continue
                problem = f"{size} bytes encoded; the server takes at most {limit} bytes a record"
            name = self.codec.by_class.get(type(record), type(record).__name__)
            refused.append(first + i)
            errors.append(RecordError(first + i, name, field or None, problem))
        return kept, refused, errors

    def ack(self, taken: int) -> None:
        with self._lock:
            while self.unacked and self.unacked[0][0] <= taken:
                self.unacked.popleft()

    def resume(self, resumed: int) -> list[bytearray]:
        """After reconnecting: forget what the server says it has taken of the session
        (``resumed``; -1 when it does not know the session), and the frames to send again for
        the rest, with their numbers (the server drops what it took before by number)."""
        if resumed >= 0:
            self.ack(resumed)
        with self._lock:
            batches = list(self.unacked)
        frames: list[bytearray] = []
        for end, records, columns in batches:
            if columns is None:
                first = end - len(records) + 1
                frames += encode_record_frames(records, self.max_frame_size, first)
            else:
                prepared, start, stop = columns
                frames.append(prepared.frame(start, stop, end - (stop - start) + 1))
        return frames

    def in_submit_order(self, errors: list[RecordError]) -> list[RecordError]:
        """The server numbers the records it received; renumber them in submit order."""
        with self._lock:
            refused_here = list(self.refused_here)
        if not refused_here:
            return errors
        out = []
        for error in errors:
            index = error.index
            for refused in refused_here:
                if refused <= index:
                    index += 1
            out.append(msgspec.structs.replace(error, index=index))
        return out

    def unacknowledged(self) -> list[Any]:
        with self._lock:
            return [r for _, batch, _ in self.unacked for r in batch]


# ---------------------------------------------------------------------------------------------
# 6. Connection: the blocking client
# ---------------------------------------------------------------------------------------------


class _Call:
    """A query in flight, as both clients keep it: the replies that arrived and are not yet
    handed out, whether the last has come, and the error it ended with."""

    __slots__ = ("done", "error", "id", "name", "replies")

    def __init__(self, call_id: int, name: str) -> None:
        self.id = call_id
        self.name = name
        self.replies: collections.deque[Any] = collections.deque()
        self.done = False
        self.error: MZConnectorError | None = None


class _SubState:
    """A subscription, as both clients keep it: the records that arrived and are not yet
    handed out (with their numbers), and what is owed to the server in acknowledgements."""

    #: In ``ack="auto"`` mode, acknowledge at least every this many records handed out.
    ACK_EVERY = 64

    def __init__(self, message: Subscribe) -> None:
        self.message = message
        self.id = message.id
        # Records and their numbers (None: from before a reconnection, not acknowledged).
        self.inbox: collections.deque[tuple[int | None, Any]] = collections.deque()
        self.dropped = 0
        self.closed: str | None = None
        self.unacked: collections.OrderedDict[int, Any] = collections.OrderedDict()
        self.acked = 0  # the last number acknowledged (ack="auto")
        self.confirmed = False  # the server has answered its Subscribe
        self.stopped = False  # stopped by the client (re-established stopped)
        self.stale: list[Any] = []  # handed out before a reconnection, not acknowledged

    def rebase(self) -> None:
        """The connection was re-established, and this subscription on it: the server numbers
        its records afresh. A durable subscription redelivers what was not acknowledged, so
        what waits here is dropped; another keeps what waits here, handed out without
        acknowledgement (the new server never sent it). Acknowledging a record handed out
        before is a no-op."""
        if self.message.durable:
            self.inbox.clear()
        else:
            self.inbox = collections.deque((None, record) for _, record in self.inbox)
        self.stale = [*self.stale, *self.unacked.values()][-self.message.max_pending :]
        self.unacked.clear()
        self.acked = 0

    def hand_out(self) -> tuple[Any, SubAck | None]:
        """The next record, and the acknowledgement to send for it now (if any)."""
        seq, record = self.inbox.popleft()
        if seq is None:
            return record, None
        ack = self.message.ack
        if ack == "client":
            self.unacked[seq] = record
        elif ack == "auto" and (not self.inbox or seq - self.acked >= self.ACK_EVERY):
            self.acked = seq
            return record, SubAck(self.id, seq, through=True)
        return record, None

    def ack(self, record: Any, through: bool) -> SubAck | None:
        """The acknowledgement of a record handed out (``through``: and all before it); None
        for one handed out before a reconnection (nothing to acknowledge)."""
        if self.message.ack != "client":
            raise SubscriptionError(
                f"this subscription acknowledges by itself (ack={self.message.ack!r}); "
                "subscribe with ack='client' to acknowledge records"
            )
        seq = next((s for s, held in self.unacked.items() if held is record), None)
        if seq is None:
            for i, held in enumerate(self.stale):
                if held is record:
                    del self.stale[i]
                    return None
            raise SubscriptionError("that record is not one this subscription is waiting for")
        if through:
            while self.unacked and next(iter(self.unacked)) <= seq:
                self.unacked.popitem(last=False)
        else:
            del self.unacked[seq]
        return SubAck(self.id, seq, through=through)


_NOTHING = object()  # what a key-value map holds under a key that is not there
_ERRORS_FIRST = object()  # what receive() finds when refusals must be raised before a record


#: What an awaited ``Answer`` becomes when the link it was awaited on is lost.
_ANSWER_LOST = Answer(0, error="the connection was lost")


def _describe_request(message: Subscribe | SubscriptionControl | KvRequest) -> str:
    """A request, as an error names it."""
    if isinstance(message, Subscribe):
        return f"subscribing to {message.route!r}"
    if isinstance(message, SubscriptionControl):
        return f"{message.op} of subscription #{message.id}"
    return f"{message.op} on key-value map {message.map!r}"


class _ClientBase:
    """What the blocking and the async connection share, without I/O or locks: the record
    types and API modules the server announced, what it accepts, the ledger of what was sent,
    what the server's messages change, and what a reconnection changes (``_resume_plan``).
    Each front end adds its I/O, its locking, and how it reconnects."""

    def __init__(
        self,
        protocol: Protocol,
        welcome: Welcome,
        *,
        timeout: float,
        dialer: _Dialer,
        auto_reconnect: bool,
        lifecycle: _Lifecycle,
        on_state_change: Callable[[Any, ConnectionState], Any] | None,
    ) -> None:
        self._protocol = protocol
        self.timeout = timeout
        self._dialer = dialer
        self._schema = welcome.schema
        self._codec = RecordCodec(welcome.schema)
        self._decoder = self._codec.decoder([*welcome.schema, "bytes"], pickled=True)
        self.udrs = Namespace("record types", self._codec.types)
        self._buf: list[Any] = []
        self._ledger = _Ledger(self._codec, welcome.max_frame_size)
        self._inbox: collections.deque[Any] = collections.deque()
        # Column batches wait in the inbox whole, made into records only when taken: how
        # many there are, and the rows they hold beyond one each (for max_buffered).
        self._chunks = 0
        self._chunk_rows = 0
        self._acked = 0
        self._errors: list[RecordError] = []
        self._omitted = 0  # refused records the server counted without describing
        self._refused: list[Refused] = []  # the messages that said so (for RecordRefused.raw)
        self._mim_replies: collections.deque[dict[str, Any]] = collections.deque()
        self._closed: str | None = None
        self._closed_raw: Message | None = None  # the server's message that closed it, if any
        self._final: ConnectionClosed | None = None  # what calls raise once closed, if special
        self._failure: BaseException | None = None  # what broke the connection, if ours
        self.dropped = 0
        self.api = Namespace("API", {})
        self.api_modules: dict[str, types.ModuleType] = {}
        # Conversations: queries, subscriptions and key-value requests, each with an id.
        self._ids = itertools.count(1)
        self._calls: dict[int, _Call] = {}
        self._subs: dict[int, _SubState] = {}
        self._answers: dict[int, Answer | None] = {}  # awaited: None until it arrives
        self._cancels: list[int] = []  # queries given up on, to tell the server
        # Staying connected: the state, and the link (a new one, with a new number, after each
        # reconnection). _down says why the link is down while a reconnection is under way.
        self._auto = auto_reconnect
        self._lifecycle = lifecycle
        self._on_state_change = on_state_change
        self._generation = 1
        self._down: str | None = None
        self._closing = False
        self._owed: collections.deque[Message] = collections.deque()  # pings and pongs to send
        self._ka = dialer.keepalive_state()
        # Subscriptions re-established on a new link: answers to swallow (an error closes it).
        self._resubscribing: collections.Counter[int] = collections.Counter()
        self._adopt(welcome)

    def _adopt(self, welcome: Welcome) -> None:
        """What a Welcome says besides the record types (which a reconnection keeps)."""
        self._protocol.max_frame_size = welcome.max_frame_size  # the server's limit binds both ways
        self._ledger.max_frame_size = welcome.max_frame_size
        self.connection_id = welcome.connection_id
        self.workflow = welcome.workflow
        self.accepted = tuple(welcome.accepted)
        self._accepted_classes = frozenset(
            [bytes, bytearray, memoryview] if "bytes" in welcome.accepted else []
        ) | {self._codec.types[n] for n in welcome.accepted if n != "bytes"}
        self._query_types = {
            name: (self._codec.types[q.request], self._codec.types[q.reply])
            for name, q in welcome.queries.items()
        }
        self.queries = Namespace(
            "queries", {name: self._query_function(name) for name in self._query_types}
        )
        #: Routes this client can subscribe to, and internal routes it can tap.
        self.routes = tuple(welcome.routes)
        self.taps = tuple(welcome.taps)

    def __repr__(self) -> str:
        state = f"closed: {self._closed}" if self._closed else self._lifecycle.state.value
        return (
            f"<mzconnector.{type(self).__name__} #{self.connection_id} to workflow "
            f"{self.workflow!r} ({state})>"
        )

    @property
    def closed(self) -> bool:
        return self._closed is not None

    @property
    def state(self) -> ConnectionState:
        """Where the connection is: a ``ConnectionState``."""
        return self._lifecycle.state

    def _load_api(self, modules: list[ApiModule]) -> None:
        provided = {
            "connection": self,
            "submit": self.submit,  # type: ignore[attr-defined]
            "submit_many": self.submit_many,  # type: ignore[attr-defined]
            "flush": self.flush,  # type: ignore[attr-defined]
            "receive": self.receive,  # type: ignore[attr-defined]
            "udrs": self.udrs,
            "mim": self.mim,  # type: ignore[attr-defined]
        }
        self.api, self.api_modules = _load_api_namespace(modules, provided)

    def _not_accepted(self, record: Any) -> NotAccepted:
        name = self._codec.by_class.get(type(record), type(record).__name__)
        accepted = ", ".join(self.accepted) or "nothing"
        hint = ""
        if isinstance(record, msgspec.Struct) and type(record) not in self._codec.by_class:
            hint = " (build records with conn.udrs.<Type>(...))"
        return NotAccepted(
            f"the connector does not accept {name!r}; it accepts: {accepted}{hint}. "
            "Nothing was sent."
        )

    # -- column batches: what both clients share, without I/O ---------------------------------
    def _frame_type(self, type_name: str | type) -> type:
        """The record class ``submit_frame`` sends rows as; ``NotAccepted`` (nothing is
        sent) for a type the connector does not accept."""
        if isinstance(type_name, str):
            cls = self._codec.types.get(type_name)
        else:
            cls = type_name if type_name in self._codec.by_class else None
        if cls is None or cls not in self._accepted_classes:
            accepted = ", ".join(self.accepted) or "nothing"
            name = type_name if isinstance(type_name, str) else type_name.__name__
            raise NotAccepted(
                f"the connector does not accept {name!r}; it accepts: {accepted}. Nothing was sent."
            )
        return cls

    def _frame_plan(self, df: Any, type_name: str | type) -> tuple[FrameColumns, list[Any]]:
        """A DataFrame checked and converted for ``submit_frame``, and its batches: every
        error (a type not accepted, a column or a value that does not fit, a row too large
        for a frame) is raised here, before anything is sent."""
        prepared = frame_columns(df, self._frame_type(type_name))
        return prepared, prepared.plan(self._ledger.max_frame_size)

    def _received_columns(self, event: Columns) -> ColumnBatch:
        """A column batch from the server, checked against its declared type: one that does
        not match it is a protocol error (the server checks what it sends)."""
        try:
            batch, bad = ColumnBatch.decode(event, self._codec.types)
        except FieldMismatch as exc:
            raise RemoteProtocolError(f"a batch of columns that does not match: {exc}") from None
        if bad:
            row, field, problem = bad[0]
            raise RemoteProtocolError(
                f"a batch of columns that does not match: row {row}, "
                f"{event.record}.{field}: {problem}"
            )
        return batch

    def _add_columns(self, batch: ColumnBatch) -> None:
        """A column batch joins the inbox whole. The caller holds whatever guards it."""
        self._inbox.append(batch)
        self._chunks += 1
        self._chunk_rows += batch.rows - 1

    def _expand(self, batch: ColumnBatch) -> Any:
        """The first record of a column batch just taken from the head of the inbox; the
        others take its place there, as records."""
        records = batch.records()
        self._chunks -= 1
        self._chunk_rows -= batch.rows - 1
        self._inbox.extendleft(reversed(records[1:]))
        return records[0]

    def _take_records(self, max_records: int | None) -> list[Any]:
        """Records from the head of the inbox (at most ``max_records``), column batches made
        into records."""
        inbox = self._inbox
        if not self._chunks:
            if max_records is None or max_records >= len(inbox):
                out = list(inbox)
                inbox.clear()
                return out
            return [inbox.popleft() for _ in range(max_records)]
        out = []
        while inbox and (max_records is None or len(out) < max_records):
            item = inbox.popleft()
            out.append(self._expand(item) if type(item) is ColumnBatch else item)
        return out

    def _take_frame(self, max_records: int | None) -> list[ColumnBatch | list[Any]]:
        """Rows from the head of the inbox for a DataFrame (at most ``max_records``): column
        batches as they are (the last one split if needed), records in runs; it stops before
        anything that is not a record (bytes, other objects). ``TypeError`` if that is first."""
        inbox = self._inbox
        limit = len(inbox) + self._chunk_rows if max_records is None else max_records
        segments: list[ColumnBatch | list[Any]] = []
        taken = 0
        while inbox and taken < limit:
            item = inbox[0]
            if type(item) is ColumnBatch:
                room = limit - taken
                if item.rows > room:
                    segments.append(item.slice(0, room))
                    inbox[0] = item.slice(room, item.rows)
                    self._chunk_rows -= room
                    break
                inbox.popleft()
                self._chunks -= 1
                self._chunk_rows -= item.rows - 1
                segments.append(item)
                taken += item.rows
            elif type(item) in self._codec.by_class:
                inbox.popleft()
                last = segments[-1] if segments else None
                if type(last) is list and type(last[0]) is type(item):
                    last.append(item)
                else:
                    segments.append([item])
                taken += 1
            else:
                break
        if not segments and inbox:
            raise TypeError(
                f"the next item received is a {type(inbox[0]).__name__}, not a record: "
                "take it with receive()"
            )
        return segments

    def _refusal(self) -> RecordRefused:
        """The records refused since the last call, as the error to raise (then forgotten).
        The caller holds whatever guards them."""
        error = RecordRefused(self._errors, self._omitted)
        error.raw = self._refused[0] if len(self._refused) == 1 else list(self._refused)
        self._errors, self._omitted, self._refused = [], 0, []
        return error

    def _apply(self, event: Any) -> bool:
        """Apply what the server said (anything but records); True when the link is over.
        The caller holds whatever guards the state."""
        if isinstance(event, Ack):
            self._ledger.ack(event.taken)
            if event.taken > self._acked:
                self._acked = event.taken
        elif isinstance(event, Refused):
            self._errors.extend(self._ledger.in_submit_order(event.errors))
            self._omitted += event.omitted
            self._refused.append(event)
        elif isinstance(event, Mim):
            self._mim_replies.append(event.values)
        elif isinstance(event, QueryReply):
            call = self._calls.get(event.id)
            if call is not None:  # else: given up on (cancelled)
                call.replies.extend(_decode_items(self._decoder, event.replies))
                call.done = event.final
        elif isinstance(event, QueryFailed):
            call = self._calls.get(event.id)
            if call is not None:
                error = QueryError(event.code, event.template, event.parameters)
                call.error = _with_raw(error, event)
                call.done = True
        elif isinstance(event, SubRecords):
            state = self._subs.get(event.id)
            if state is not None:
                items = _decode_items(self._decoder, event.items)
                state.inbox.extend(zip(itertools.count(event.first), items))
                state.dropped += event.dropped
        elif isinstance(event, Answer):
            if self._resubscribing[event.id]:  # a subscription re-established after reconnecting
                self._resubscribing[event.id] -= 1
                state = self._subs.get(event.id)
                if event.error and state is not None:
                    del self._subs[event.id]
                    state.closed = (
                        f"it could not be re-established after reconnecting: {event.error}"
                    )
            elif event.id in self._answers:
                self._answers[event.id] = event
        elif isinstance(event, Ping):
            self._owed.append(Pong(event.id))
        elif isinstance(event, Pong):
            pass  # anything that arrives tells the keepalive the link is alive
        elif isinstance(event, Notice):
            self.dropped += event.dropped
            warnings.warn(f"mzconnector: {event.message}", RuntimeWarning, stacklevel=1)
        elif isinstance(event, Bye):
            reason = f"the server closed the connection: {event.reason or 'bye'}"
            self._link_lost(reason, raw=event)
            return True
        elif isinstance(event, Error):
            self._mark_closed(f"the server reported an error: {event.message}", raw=event)
            return True
        elif isinstance(event, Closed):
            self._link_lost("the server closed the connection")
            return True
        return False

    # -- conversations: what both clients share, without I/O --------------------------------
    def _query_function(self, name: str) -> Callable[..., Any]:
        """``conn.queries.<name>(request, timeout=None)``: ``conn.query(name, ...)``, with a
        docstring that shows the request and reply types (``help()``)."""
        request, reply = self._query_types[name]

        def ask(request: Any, *, timeout: float | None = None) -> Any:
            return self.query(name, request, timeout=timeout)  # type: ignore[attr-defined]

        ask.__name__ = ask.__qualname__ = name

        def fields(cls: type) -> str:
            described = (f"{f.name}: {type_name(f.type)}" for f in msgspec.structs.fields(cls))
            return ", ".join(described)

        ask.__doc__ = (
            f"Query {name!r}: asks with a {request.__name__} ({fields(request)}) and is "
            f"answered with {reply.__name__} records ({fields(reply)}). Returns an iterator "
            f"over the replies as they arrive, as conn.query({name!r}, request) does; the "
            "request may also be a dict of its fields."
        )
        ask.request = request  # type: ignore[attr-defined]
        ask.reply = reply  # type: ignore[attr-defined]
        return ask

    def _start_query(self, name: str, request: Any) -> tuple[Query, _Call]:
        """The message that asks a query, checked here first: an unknown name or a request
        that does not fit its type is a ``QueryError`` before anything is sent. The call is
        registered (``_calls``) as it is sent, on the link it is sent on."""
        types_ = self._query_types.get(name)
        if types_ is None:
            known = ", ".join(self._query_types) or "none"
            raise QueryError("unknown-query", "no query {0} (queries: {1})", [name, known])
        try:
            _, encoded = self._codec.check(request, types_[0].__name__)
        except FieldMismatch as exc:
            where = f"{exc.type}.{exc.field}" if exc.field else exc.type
            raise QueryError(
                "bad-request", "the request does not match {0}: {1}", [where, exc.problem]
            ) from None
        call = _Call(next(self._ids), name)
        return Query(call.id, name, msgspec.Raw(encoded)), call

    def _start_subscription(
        self,
        route: str,
        matcher: Mapping[str, Any] | None,
        ack: str,
        max_pending: int,
        durable: str | None,
        kind: str,
        key: str | None,
        tap: bool,
    ) -> tuple[Subscribe, _SubState]:
        known = self.taps if tap else self.routes
        if route not in known:
            what = "tapped (tap_routes)" if tap else "subscribed to (the input routes)"
            raise SubscriptionError(
                f"route {route!r} cannot be {what}; these can: {', '.join(known) or 'none'}"
            )
        if matcher is not None and not isinstance(matcher, Mapping):
            raise SubscriptionError(f"a matcher is a dict of field -> value, not {matcher!r}")
        message = Subscribe(
            next(self._ids),
            route,
            dict(matcher or {}),
            ack=ack,
            max_pending=max_pending,
            durable=durable or "",
            kind=kind,
            key=key or "",
            tap=tap,
        )
        return message, _SubState(message)

    def _subscribed(self, state: _SubState, answer: Answer) -> None:
        if answer.error:
            self._subs.pop(state.id, None)
            raise _with_raw(SubscriptionError(answer.error), answer)
        state.confirmed = True

    def _abandon(self, call: _Call) -> None:
        """A query's replies were dropped unread: cancel it with the next message sent."""
        if self._calls.pop(call.id, None) is not None and not call.done:
            self._cancels.append(call.id)

    def _take_answer(self, request: Subscribe | SubscriptionControl | KvRequest) -> Answer:
        answer = self._answers.pop(request.id)
        assert answer is not None
        if answer is _ANSWER_LOST:
            raise ConnectionLost(
                f"{_describe_request(request)} was in flight when the connection was lost; it "
                "was not sent again (it may or may not have been done)"
            )
        return answer

    def _kv_request(self, name: str, op: str, key: Any = None, value: Any = None) -> KvRequest:
        if op in ("get", "set", "remove") and type(key) not in (str, int):
            raise KvError(f"a key is a string or an integer, not a {type(key).__name__}")
        kind = self._codec.by_class.get(type(value), "")
        try:
            encoded_key = _encoder.encode(key)
            encoded = _encoder.encode(value)
        except _ENCODE_ERRORS:
            path, problem = _encode_problem(value)
            raise KvError(f"cannot store this value{path}: {problem}") from None
        naive = None if kind else naive_datetime(value)
        if naive is not None:
            raise KvError(f"cannot store this value{naive}: {_NAIVE_DATETIME}")
        return KvRequest(
            next(self._ids), name, op, msgspec.Raw(encoded_key), kind, msgspec.Raw(encoded)
        )

    def _kv_result(self, request: KvRequest, answer: Answer) -> Any:
        """What a key-value request found (``_NOTHING`` for a key that is not there)."""
        if answer.error:
            raise _with_raw(KvError(f"map {request.map!r}: {answer.error}"), answer)
        op = request.op
        if op == "get":
            return self._kv_value(answer.kind, answer.value) if answer.found else _NOTHING
        if op == "items":
            pairs = msgspec.msgpack.decode(answer.value, type=list[tuple[Any, str, msgspec.Raw]])
            return [(key, self._kv_value(kind, value)) for key, kind, value in pairs]
        if op == "len":
            return msgspec.msgpack.decode(answer.value, type=int)
        return answer.found

    def _kv_value(self, kind: str, value: msgspec.Raw) -> Any:
        cls = self._codec.types.get(kind) if kind else None
        return msgspec.msgpack.decode(value, type=cls) if cls else msgspec.msgpack.decode(value)

    # -- staying connected: what a reconnection changes, without I/O --------------------------
    def _resume_plan(self, welcome: Welcome) -> tuple[list[bytearray], list[Message]]:
        """The new link is up (its Welcome checked): adopt it, and what to send on it first.
        What the server had not acknowledged is resent, with its numbers (frames); queries and
        requests in flight on the old link end with ``ConnectionLost``; subscriptions are made
        again (messages). The caller holds whatever guards the state."""
        self._adopt(welcome)
        self._generation += 1
        frames = self._ledger.resume(welcome.resumed)
        self._acked = max(self._acked, welcome.resumed)
        for call in self._calls.values():
            if not call.done:
                call.error = ConnectionLost(
                    f"query {call.name!r} was in flight when the connection was lost; it was "
                    "not asked again (it may or may not have been answered)"
                )
                call.done = True
        pending = {i for i, answer in self._answers.items() if answer is None}
        for request_id in pending:
            self._answers[request_id] = _ANSWER_LOST
        messages: list[Message] = []
        self._resubscribing.clear()
        for sub_id, state in list(self._subs.items()):
            if not state.confirmed:  # its own Subscribe was in flight: that call fails
                del self._subs[sub_id]
                continue
            state.rebase()
            messages.append(state.message)
            self._resubscribing[sub_id] += 1
            if state.stopped:
                messages.append(SubscriptionControl(sub_id, "stop"))
                self._resubscribing[sub_id] += 1
        self._cancels.clear()  # the server forgot the old link's queries
        self._owed.clear()
        self._ka = self._dialer.keepalive_state()
        return frames, messages

    def _still_reconnecting(self, waited: float | None) -> Timeout:
        within = "" if waited is None else f" within {waited} s"
        return Timeout(
            f"not reconnected{within}: still reconnecting (the link was lost: {self._down})"
        )

    def _link_lost(self, reason: str, *, lost: bool = False, raw: Message | None = None) -> None:
        """The link broke: reconnect (``auto_reconnect``), else the connection is over."""
        raise NotImplementedError

    def _mark_closed(
        self, reason: str, *, raw: Message | None = None, final: ConnectionClosed | None = None
    ) -> None:
        if self._closed is None:
            self._closed = reason
            self._closed_raw = raw
            self._final = final

    def _fail(self, where: str, exc: BaseException) -> None:
        """``where`` failed (a bug, or Ctrl-C midway through handling what arrived): the
        connection cannot go on. The next call raises ``ConnectionClosed`` saying so, caused by
        ``exc``: a thread of ours never dies silently."""
        if self._failure is None:
            self._failure = exc
        self._mark_closed(f"{where} failed: {exc!r}")

    def _give_up(self, reason: str) -> Timeout:
        """The server did not answer in time. The link is taken for lost: with
        ``auto_reconnect`` the call that waited raises ``Timeout`` and the connection
        reconnects (resending what was not acknowledged); without, the connection is over
        (``ConnectionLost``)."""
        if self._auto and not self._closing and self._closed is None:
            if self._down is not None:
                return Timeout(f"{reason}: the connection is reconnecting ({self._down})")
            self._link_lost(reason, lost=True)
            if self._closed is None:
                return Timeout(f"{reason}; reconnecting (what it did not acknowledge is resent)")
        self._mark_closed(reason, final=ConnectionLost(reason))
        return ConnectionLost(reason, self._unacknowledged())  # type: ignore[attr-defined]

    def _closed_error(self, unacknowledged: list[Any] | None = None) -> ConnectionClosed:
        """What a call on the closed connection raises."""
        if unacknowledged is None:
            unacknowledged = self._unacknowledged()  # type: ignore[attr-defined]
        final = self._final
        if final is not None:
            final.unacknowledged = unacknowledged
            return final.with_traceback(None)
        error = ConnectionClosed(self._closed or "closed", unacknowledged)
        error.raw = self._closed_raw
        error.__cause__ = self._failure
        return error

    def _handle(self, data: bytes | None = None) -> None:
        """Feed what was read (None: handle only what is buffered, e.g. what arrived with the
        Welcome) and handle every complete event. A broken protocol, or records that do not
        decode as their declared types, end the connection; a frame cut short by the end of
        the stream is a lost link."""
        protocol = self._protocol
        try:
            if data is not None:
                protocol.receive_data(data)
            for event in protocol.events():
                if self._on_event(event):  # type: ignore[attr-defined]
                    return
        except ProtocolError as exc:
            if protocol.ended and isinstance(exc, RemoteProtocolError):
                self._link_lost(f"the connection was lost: {exc}")
            else:
                self._mark_closed(f"protocol error: {exc}")
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # (bad UTF-8: the latter)
            self._mark_closed(f"protocol error: records that do not decode: {exc}")


class MimValues(dict):  # type: ignore[type-arg]
    """MIM values, name -> value: a dict that shows as a table in Jupyter."""

    def _repr_html_(self) -> str:
        from html import escape

        rows = "".join(
            f"<tr><th style='text-align:left'>{escape(str(k))}</th>"
            f"<td style='text-align:left'>{escape(_cell_text(v))}</td></tr>"
            for k, v in self.items()
        )
        return f"<table><thead><tr><th>MIM</th><th>value</th></tr></thead>{rows}</table>"


class _Reader(enum.Enum):
    """Who reads the socket of a blocking connection now (nobody: None)."""

    CALLER = "a caller"
    BACKGROUND = "the background reader"


class _ReadTurn:
    """Whose turn it is to read the socket of a blocking connection: a caller that waits for
    the server (``flush``, ``receive``, ``mim``, ``close``), or the background reader.

    Whoever waits for the server reads the socket itself: handing what arrives from one thread
    to another costs a cross-core wake-up per round trip (measured here: 70-80 us, most of a
    loopback round trip). The background reader reads only while no caller waits, so that
    records arriving while the notebook is idle are buffered; and it leaves the socket alone
    for ``idle`` seconds after a caller last read, so that a loop of calls keeps it to itself.
    A caller that finds the background reader in the socket wakes it with a byte on a
    socketpair (the reader waits on ``wake`` beside the socket) and waits for its turn.

    A caller calls ``enter``, then ``acquire`` (until it returns True) and ``release`` around
    each read, then ``leave``; the background reader ``acquire_background`` and
    ``release_background`` around each read. While the link is down (reconnecting), ``pause``
    keeps the background reader out (callers wait for the link instead) until ``resume``.
    Every method but ``dispose`` is called holding ``cond``, on which callers wait for their
    turn (and the connection's callers for their answer).
    """

    def __init__(
        self,
        *,
        idle: float = _IDLE,
        clock: Callable[[], float] = time.monotonic,
        condition: Callable[[Any], threading.Condition] = threading.Condition,
    ) -> None:
        lock = threading.RLock()
        self.cond = condition(lock)
        # The background reader waits apart: a caller never wakes it (that would cost every
        # call a context switch); it looks again after at most ``idle`` seconds.
        self._background = condition(lock)
        self.reader: _Reader | None = None
        self._idle = idle
        self._clock = clock
        self._waiting = 0  # callers between enter() and leave()
        self._last_read = -float("inf")  # when a caller last released the socket
        self._woken = False  # a wake byte is on its way to the background reader
        self._closed = False
        self._paused = False
        self.wake, self._wake_w = socket.socketpair()

    # -- callers ----------------------------------------------------------------------------
    def enter(self) -> None:
        """A caller waits for the server: the background reader must not read until it leaves."""
        self._waiting += 1

    def acquire(self) -> bool:
        """The socket, for this caller, if nobody reads it (True). Else False, and the
        background reader, if it is the one reading, is asked to let go: wait on ``cond``
        and try again."""
        if self.reader is None:
            self.reader = _Reader.CALLER
            return True
        if self.reader is _Reader.BACKGROUND:
            if not self._woken:
                self._woken = True
                self._wake_w.send(b"\0")
            self.cond.notify_all()  # in case it waits for room in the inbox
        return False

    def release(self) -> None:
        """This caller has read."""
        self.reader = None
        self._last_read = self._clock()
        self.cond.notify_all()

    def leave(self) -> None:
        """This caller no longer waits."""
        self._waiting -= 1

    # -- the background reader --------------------------------------------------------------
    def acquire_background(self) -> bool:
        """Wait until the background reader may read (nobody reads, no caller waits, none
        read within ``idle`` s) and give it the socket: True. False once closed."""
        while not self._closed:
            if self._paused:
                self._background.wait()
                continue
            delay = self._idle
            if self.reader is None and not self._waiting:
                delay = self._last_read + self._idle - self._clock()
                if delay <= 0:
                    self.reader = _Reader.BACKGROUND
                    return True
            self._background.wait(delay)
        return False

    def release_background(self) -> None:
        """The background reader has read, or was woken to let go."""
        if self._woken:
            self.wake.recv(64)
            self._woken = False
        self.reader = None
        self.cond.notify_all()

    def background_alone(self) -> bool:
        """Whether the background reader reads while no caller waits (then it may stop and
        wait for room in the inbox: nobody needs what it would read)."""
        return self.reader is _Reader.BACKGROUND and not self._waiting

    # -- a link down --------------------------------------------------------------------------
    def pause(self) -> None:
        """The link is down: the background reader lets go of the socket (it is woken if it
        waits in it) and reads no more until ``resume``."""
        self._paused = True
        if self.reader is _Reader.BACKGROUND and not self._woken:
            self._woken = True
            self._wake_w.send(b"\0")
        self.cond.notify_all()

    def resume(self) -> None:
        """A new link is up: the background reader may read it."""
        self._paused = False
        self._background.notify_all()

    def reopen(self) -> None:
        """After ``close``, for a connection brought back (``reconnect``): a background
        reader may run again (paused, until ``resume``)."""
        self._closed = False
        self._paused = True
        self.wake.setblocking(False)
        try:
            while self.wake.recv(64):  # the wake bytes ``close`` left
                pass
        except (BlockingIOError, OSError):
            pass
        self.wake.setblocking(True)
        self._woken = False

    # -- the end ----------------------------------------------------------------------------
    def close(self) -> None:
        """No more reading: the background reader ends (it is woken if it waits)."""
        if not self._closed:
            self._closed = True
            try:
                self._wake_w.send(b"\0")
            except OSError:
                pass
        self.cond.notify_all()
        self._background.notify_all()

    def dispose(self) -> None:
        """Close the socketpair, once no thread uses it."""
        self.wake.close()
        self._wake_w.close()


def _release_sockets(link: list[Any], turn: _ReadTurn) -> None:
    link[0].close()
    turn.dispose()


class Connection(_ClientBase):
    """A connection to a connector server. Make one with ``connect()``; use it in a ``with``.

    Records you ``submit`` are buffered and sent in batches (when ``batch_size`` records
    are waiting, after ``linger`` seconds, or at once on ``flush``/``receive``/``mim``).
    Records the workflow sends back are read in the background and buffered (at most
    ``max_buffered``; beyond that the server holds them back) until you ``receive`` them.

    With ``auto_reconnect``, a thread of the connection reconnects when the link breaks
    (``state`` is ``RECONNECTING`` meanwhile): calls wait for it, bounded by their timeout;
    records not acknowledged are resent (each taken once by a server that remembers the
    session); subscriptions are made again; queries in flight end with ``ConnectionLost``.
    """

    def __init__(
        self,
        transport: _Transport,
        protocol: Protocol,
        welcome: Welcome,
        *,
        dialer: _Dialer,
        timeout: float,
        batch_size: int,
        linger: float,
        max_buffered: int,
        auto_reconnect: bool,
        lifecycle: _Lifecycle,
        on_state_change: Callable[[Connection, ConnectionState], Any] | None,
    ) -> None:
        super().__init__(
            protocol,
            welcome,
            timeout=timeout,
            dialer=dialer,
            auto_reconnect=auto_reconnect,
            lifecycle=lifecycle,
            on_state_change=on_state_change,
        )
        self._transport = transport
        self._batch_size = batch_size
        self._linger = linger
        self._max_buffered = max_buffered
        # The send side (_buf) is guarded by _send_lock, the receive side by _cond, the ledger
        # by its own lock. Where two are needed, _send_lock is taken first; the ledger's last.
        # The link (_transport, _protocol) changes only holding both, with no reader in it.
        self._send_lock = threading.Lock()
        self._buf_bytes = 0
        self._first_at = 0.0  # when the oldest buffered record was submitted
        self._linger_armed = threading.Event()
        self._turn = _ReadTurn()
        self._cond = self._turn.cond
        self._reconnector: threading.Thread | None = None
        self._stop_reconnecting = threading.Event()  # ends a reconnection's wait (close)
        self._notifier: threading.Thread | None = None
        # A connection dropped without close() (a notebook cell re-run, a lost server never
        # closed) still gives its sockets back when it is collected, without a ResourceWarning.
        # (The link's transport is in a list: a reconnection replaces it.)
        self._link = [transport]
        self._finalizer = weakref.finalize(self, _release_sockets, self._link, self._turn)
        try:
            self._load_api(welcome.api)
            self._handle()  # what arrived with the Welcome
        except BaseException:
            self._finalizer()
            raise
        self._start_threads()
        with self._cond:
            if self._closed is None and self._down is None:
                self._change(_CONNECTED)

    def _adopt(self, welcome: Welcome) -> None:
        super()._adopt(welcome)
        self._batch_bytes = min(1 << 20, welcome.max_frame_size // 4)

    def _start_threads(self) -> None:
        self._reader = threading.Thread(
            target=self._read_loop, name="mzconnector-reader", daemon=True
        )
        self._flusher = threading.Thread(
            target=self._linger_loop, name="mzconnector-linger", daemon=True
        )
        self._reader.start()
        self._flusher.start()

    # -- context manager and state ----------------------------------------------------------
    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check(self) -> None:
        """Raise what the server told us since the last call."""
        if self._errors:
            with self._cond:
                error = self._refusal()
            raise error
        if self._closed is not None:
            raise self._closed_error()

    def _unacknowledged(self) -> list[Any]:
        with self._send_lock:
            return self._ledger.unacknowledged() + self._buf

    def _change(self, state: ConnectionState) -> None:
        """Go to ``state`` (holding ``_cond``). ``on_state_change`` is called by a thread of
        its own, in order, never holding a lock of ours: the callback may call the
        connection (even close it) without waiting for itself."""
        if not self._lifecycle.change(state):
            return
        if self._on_state_change is None:
            self._lifecycle.changes.clear()
        elif self._notifier is None:
            self._notifier = threading.Thread(
                target=self._notify_loop, name="mzconnector-state", daemon=True
            )
            self._notifier.start()

    def _notify_loop(self) -> None:
        changes = self._lifecycle.changes
        callback = self._on_state_change
        assert callback is not None
        while True:
            with self._cond:
                if not changes:
                    self._notifier = None
                    return
                state = changes.popleft()
            try:
                callback(self, state)
            except Exception:
                print(f"mzconnector: on_state_change({state}) raised:", file=sys.stderr)
                traceback.print_exc()

    # -- submitting -------------------------------------------------------------------------
    def submit(self, record: Any) -> None:
        """Queue one record (or bytes) for the connector; it is sent in a batch shortly.
        Raises ``NotAccepted`` (nothing is sent) for a type the connector does not accept.
        While reconnecting it buffers, and waits for the link (at most the connect
        ``timeout``) once a batch is full."""
        if type(record) not in self._accepted_classes:
            raise self._not_accepted(record)
        if self._errors or self._closed is not None:
            self._check()
        with self._send_lock:
            buf = self._buf
            buf.append(record)
            if type(record) is not bytes or not self._add_bytes(len(record)):
                if len(buf) >= self._batch_size:
                    self._send_buffer()
                elif len(buf) == 1:
                    self._first_at = time.monotonic()
                    if not self._linger_armed.is_set():
                        self._linger_armed.set()
        if self._down is not None:
            self._hold()

    def submit_many(self, records: Iterable[Any], *, progress: bool = False) -> int:
        """Queue many records; returns how many. ``progress=True`` shows a tqdm bar."""
        accepted = self._accepted_classes
        count = 0
        bar = _progress_bar(records) if progress else None
        try:
            for chunk in _chunks(records, self._batch_size):
                for record in chunk:
                    if type(record) not in accepted:
                        raise self._not_accepted(record)
                self._check()
                with self._send_lock:
                    for record in chunk:
                        self._buf.append(record)
                        is_big_bytes = type(record) is bytes and self._add_bytes(len(record))
                        if not is_big_bytes and len(self._buf) >= self._batch_size:
                            self._send_buffer()
                    if self._buf and not self._linger_armed.is_set():
                        self._first_at = time.monotonic()
                        self._linger_armed.set()
                if self._down is not None:
                    self._hold()
                count += len(chunk)
                if bar is not None:
                    bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()
        return count

    def submit_frame(self, df: Any, type_name: str | type) -> int:
        """Send the rows of a pandas DataFrame as records of ``type_name`` (or a record class
        such as ``conn.udrs.Subscriber``) without making a record per row: each column is
        checked and converted in bulk, and the rows travel as column batches (at most
        ``MAX_BATCH_RECORDS`` rows and about 2 MiB each). Columns are matched to fields as
        ``from_dataframe`` matches them. Returns the number of rows.

        Everything is checked before anything is sent: ``NotAccepted`` for a type the
        connector does not accept, ``ValueError`` naming the column and the first row that
        does not fit (a wrong dtype, None in a field that is not optional, a row too large for
        a frame). Records submitted before go first. ``flush`` acknowledges the rows as it
        does records; until then ``unacknowledged`` holds the DataFrame's unacknowledged rows,
        a slice of it per batch; a row the server refuses is a ``RecordRefused`` naming its
        index among everything submitted on the connection. While reconnecting, each batch
        waits for the link (at most the connect ``timeout``); batches not acknowledged are
        resent, and taken once."""
        prepared, plan = self._frame_plan(df, type_name)
        self._check()
        for start, stop in plan:
            while True:
                with self._send_lock:
                    if self._down is None and self._send_buffer():
                        frame = self._ledger.columns(prepared, start, stop)
                        self._protocol.send_columns([frame])
                        try:
                            self._transport.send(frame)
                        except OSError as exc:
                            # In the ledger: resent after reconnecting, or unacknowledged.
                            self._lost_while_sending(exc)
                        break
                self._await_link(time.monotonic() + self.timeout, self.timeout)
        return prepared.rows

    def _hold(self) -> None:
        """The link is down: a full batch waits for it (at most the connect ``timeout``)."""
        if len(self._buf) >= self._batch_size or self._buf_bytes >= self._batch_bytes:
            self._await_link(time.monotonic() + self.timeout, self.timeout)

    def _add_bytes(self, size: int) -> bool:
        """Account for a bytes payload; sends the buffer when it is large. Holds _send_lock."""
        self._buf_bytes += size
        if self._buf_bytes >= self._batch_bytes:
            self._send_buffer()
            return True
        return False

    def _send_buffer(self) -> bool:
        """Send what ``submit`` buffered (holds _send_lock); False, keeping it, while the
        link is down."""
        if not self._buf:
            return True
        if self._down is not None:
            return False
        frames, errors = self._ledger.frames(self._buf)
        self._protocol.send_records(frames)
        self._buf = []
        self._buf_bytes = 0
        if errors:
            with self._cond:
                self._errors.extend(errors)
        try:
            for frame in frames:
                self._transport.send(frame)
            if self._owed:
                self._send_owed_locked()
        except OSError as exc:
            # The batch is in the ledger: resent after reconnecting, or reported unacknowledged.
            self._lost_while_sending(exc)
        return True

    def _lost_while_sending(self, exc: OSError) -> None:
        """A send failed (holds _send_lock): the link is lost. Without ``auto_reconnect`` the
        connection is over, and this raises ``ConnectionClosed``."""
        self._link_lost(f"lost the connection while sending: {exc}")
        if self._closed is not None:
            error = ConnectionClosed(self._closed, self._unacknowledged_locked())
            raise error from exc

    def _unacknowledged_locked(self) -> list[Any]:
        return self._ledger.unacknowledged() + self._buf

    def _send_message(
        self,
        message: Message,
        deadline: float | None = None,
        *,
        waited: float | None = None,
        needs_link: bool = True,
        before: Callable[[], None] | None = None,
    ) -> int:
        """Send what is buffered, then ``message``, on the link; returns the number of the
        link it went on. While the link is down, wait for it (until ``deadline``; ``Timeout``
        saying it is reconnecting after ``waited`` s), or drop the message when it means
        nothing on a new link (``needs_link=False``: 0). ``before`` runs just before the send,
        holding the send lock (what registers the message's conversation)."""
        while True:
            with self._send_lock:
                if self._closed is not None:
                    raise self._closed_error(self._unacknowledged_locked())
                if self._down is None:
                    self._send_buffer()
                if self._down is None:
                    if before is not None:
                        with self._cond:
                            before()
                    link = self._generation
                    try:
                        while self._cancels:
                            cancel = CancelQuery(self._cancels.pop())
                            self._transport.send(self._protocol.send(cancel))
                        if self._owed:
                            self._send_owed_locked()
                        self._transport.send(self._protocol.send(message))
                    except OSError as exc:
                        self._lost_while_sending(exc)
                    return link
                if not needs_link:
                    return 0
            self._await_link(deadline, waited)

    def _send_owed_locked(self) -> None:
        """The pings and pongs owed to the server (holds _send_lock)."""
        owed = self._owed
        while owed:
            self._transport.send(self._protocol.send(owed.popleft()))

    def _send_owed(self) -> None:
        """The reader owes the server a ping or a pong: send it unless a sender holds the
        send lock (a reader never waits for it; that sender sends it with its next frames)."""
        if not self._send_lock.acquire(blocking=False):
            return
        try:
            if self._down is None and self._closed is None:
                self._send_owed_locked()
        except OSError as exc:
            self._link_lost(f"lost the connection while sending: {exc}")
        finally:
            self._send_lock.release()

    def _await_link(self, deadline: float | None, waited: float | None) -> None:
        """Wait while reconnecting (outside the send lock), at most until ``deadline``;
        raises the closed connection's error, or ``Timeout``."""
        with self._cond:
            while self._down is not None and self._closed is None:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                self._cond.wait(remaining)
            down, closed = self._down, self._closed
        if closed is not None:
            raise self._closed_error()
        if down is not None:
            raise self._still_reconnecting(waited)

    def _linger_loop(self) -> None:
        """Send a partly filled batch ``linger`` seconds after its first record. The thread
        sleeps on an event while nothing is buffered, and otherwise wakes once per
        ``linger``: never once per record. While the link is down it waits for the link."""
        armed = self._linger_armed
        try:
            while self._closed is None:
                armed.wait()
                while self._closed is None:
                    delay = self._first_at + self._linger - time.monotonic()
                    if delay > 0:
                        # (Woken early when the connection is closed: set by _mark_closed.)
                        self._stop_reconnecting.wait(delay)
                    with self._send_lock:
                        if self._closed is not None:
                            return
                        if not self._buf:
                            armed.clear()
                            break
                        held = False
                        if time.monotonic() >= self._first_at + self._linger:
                            held = not self._send_buffer()
                    if held:
                        with self._cond:
                            while self._down is not None and self._closed is None:
                                self._cond.wait()
        except ConnectionClosed:
            return
        except Exception as exc:
            self._fail("the linger thread", exc)

    def flush(self, timeout: float | None = None) -> None:
        """Send everything submitted and return once the server has taken all of it (handed
        each record to its route). Raises ``RecordRefused`` if it refused any, and
        ``ConnectionLost`` (the connection is given up) when the server does not answer
        within ``timeout`` seconds (None: the connect ``timeout``); with ``auto_reconnect``,
        a ``Timeout`` instead, and the connection reconnects and resends."""
        self._check()
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        with self._send_lock:
            target = self._ledger.sent + len(self._buf)
        # (If the link breaks after this, the reconnection sends a Flush of its own.)
        self._send_message(Flush(), deadline, waited=limit)
        self._wait(
            lambda: self._acked >= target or bool(self._errors),
            max(0.0, deadline - time.monotonic()),
            lambda: self._give_up(f"flush: no answer from the server within {limit} s"),
            waited=limit,
        )
        self._check()

    # -- receiving --------------------------------------------------------------------------
    def receive(self, timeout: float | None = None) -> Any:
        """The next record the workflow sent to this client. Sends buffered submits first.
        Waits at most ``timeout`` seconds (forever if None), then raises ``Timeout``; the
        connection stays usable. Raises ``RecordRefused`` first if records were refused."""
        if self._errors:
            self._check()
        if self._buf:
            with self._send_lock:
                self._send_buffer()
        record = self._wait(
            lambda: bool(self._inbox or self._errors),
            timeout,
            lambda: Timeout(f"receive: no record within {timeout} s"),
            take=self._take_one,
        )
        if record is _ERRORS_FIRST:
            self._check()
        return record

    def _take_one(self) -> Any:
        """The first record of the inbox (``_ERRORS_FIRST`` when refusals are to be raised
        first). Holds ``_cond``."""
        if self._errors:
            return _ERRORS_FIRST
        record = self._inbox.popleft()
        if type(record) is ColumnBatch:
            record = self._expand(record)
        if len(self._inbox) + self._chunk_rows + 1 >= self._max_buffered:
            self._cond.notify_all()  # the background reader may wait for room
        return record

    def _arrived(self, timeout: float | None) -> bool:
        """Send what is buffered; then, if nothing has arrived, wait up to ``timeout`` for
        the first record: False if none came. Raises ``RecordRefused`` first if records were
        refused."""
        if self._errors:
            self._check()
        if self._buf:
            with self._send_lock:
                self._send_buffer()
        if not self._inbox:
            try:
                self._wait(lambda: bool(self._inbox or self._errors), timeout, Timeout)
            except Timeout:
                return False
            if self._errors:
                self._check()
        return True

    def receive_many(
        self, max_records: int | None = None, timeout: float | None = 0.0
    ) -> list[Any]:
        """Every record already received (at most ``max_records``); if there is none, waits
        up to ``timeout`` for the first. Returns an empty list on timeout. Raises
        ``RecordRefused`` first if records were refused."""
        if not self._arrived(timeout):
            return []
        with self._cond:
            out = self._take_records(max_records)
            self._cond.notify_all()
        return out

    def receive_frame(self, max_records: int | None = None, timeout: float | None = 0.0) -> Any:
        """What has arrived, as a pandas DataFrame (at most ``max_records`` rows); if nothing
        has, waits up to ``timeout`` s for the first and returns an empty DataFrame on
        timeout. Built a column at a time: column batches the workflow sends
        (``ctx.route_frame``) without a Python object per row, records a field at a time.
        Its columns have the dtypes of the declared types (see ``batches_dataframe``);
        records of several types give a ``_type`` column, as ``to_dataframe`` does. It takes
        records up to the first item that is not one (bytes, other objects), which stays for
        ``receive``; ``TypeError`` if that item is first. Raises ``RecordRefused`` first if
        records were refused."""
        pd = _import_pandas()
        if not self._arrived(timeout):
            return pd.DataFrame()
        with self._cond:
            segments = self._take_frame(max_records)
            self._cond.notify_all()
        return _segments_frame(segments)

    def records(self, timeout: float | None = None) -> Iterator[Any]:
        """Iterate over records as they arrive; ends when none arrives within ``timeout``
        (never, if None) or when the connection closes."""
        while True:
            try:
                yield self.receive(timeout)
            except (Timeout, ConnectionClosed):
                return

    def mim(self, timeout: float | None = None) -> MimValues:
        """The workflow's MIM values now: built-in counters and assigned values. Raises
        ``ConnectionLost`` when the server does not answer within ``timeout`` seconds (None:
        the connect ``timeout``); with ``auto_reconnect``, ``Timeout`` (and it reconnects)."""
        self._check()
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while True:
            link = self._send_message(GetMim(), deadline, waited=limit)
            self._wait(
                lambda link=link: bool(self._mim_replies) or self._generation != link,
                max(0.0, deadline - time.monotonic()),
                lambda: self._give_up(f"mim: no answer from the server within {limit} s"),
                waited=limit,
            )
            if self._mim_replies or self._errors or self._closed is not None:
                break
            # The link was lost before the answer came: ask the new one.
        if not self._mim_replies:  # closed, with refusals to report first
            self._check()
        with self._cond:
            return MimValues(self._mim_replies.popleft())

    # -- conversations ----------------------------------------------------------------------
    def query(self, name: str, request: Any, *, timeout: float | None = None) -> Iterator[Any]:
        """Ask query ``name`` (see ``conn.queries``) with ``request`` (a record of its request
        type, or a dict of its fields); returns an iterator over the replies as they arrive.
        ``timeout`` (seconds, None: no limit) bounds the whole query. Leaving the iteration
        early, a timeout or Ctrl-C cancels the query on the server. Raises ``QueryError``:
        at once for an unknown query or a request that does not fit its type (nothing is
        sent), or when the workflow answers with an error; ``ConnectionLost`` when the link
        breaks while it is in flight (it is not asked again)."""
        message, call = self._start_query(name, request)
        self._check()
        deadline = None if timeout is None else time.monotonic() + timeout
        self._send_message(
            message, deadline, waited=timeout, before=lambda: self._calls.update({call.id: call})
        )
        replies = self._replies(call, deadline, timeout)
        weakref.finalize(replies, self._abandon, call)
        return replies

    def query_one(self, name: str, request: Any, *, timeout: float | None = None) -> Any:
        """Ask query ``name`` and return its one reply; ``QueryError`` if it gives none or
        more than one."""
        replies = list(self.query(name, request, timeout=timeout))
        if len(replies) != 1:
            raise QueryError("not-one", "query {0} gave {1} replies, not one", [name, len(replies)])
        return replies[0]

    def _replies(self, call: _Call, deadline: float | None, timeout: float | None) -> Iterator[Any]:
        try:
            while True:
                if call.replies:
                    yield call.replies.popleft()
                    continue
                if call.done:
                    break
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                self._wait(
                    lambda: bool(call.replies) or call.done,
                    remaining,
                    lambda: Timeout(f"query {call.name!r}: no answer within {timeout} s"),
                )
            if call.error is not None:
                raise call.error
        finally:
            if self._calls.pop(call.id, None) is not None and not call.done:
                with contextlib.suppress(ConnectionClosed):
                    self._send_message(CancelQuery(call.id), needs_link=False)

    def subscribe(
        self,
        route: str,
        matcher: Mapping[str, Any] | None = None,
        *,
        ack: str = "auto",
        max_pending: int = 1000,
        durable: str | None = None,
        type: str = "standard",  # the contract's name, though it shadows a builtin
        key: str | None = None,
        tap: bool = False,
        timeout: float | None = None,
    ) -> Subscription:
        """A ``Subscription`` to ``route`` (one of ``conn.routes``, or with ``tap=True`` one
        of ``conn.taps``): the records the workflow sends on it that match ``matcher`` (a
        dict of field -> value; see the README). Raises ``SubscriptionError`` naming what the
        server refused. It is made again on every reconnection."""
        message, state = self._start_subscription(
            route, matcher, ack, max_pending, durable, type, key, tap
        )

        def register() -> None:  # before the answer: its records may follow at once
            self._subs[state.id] = state

        self._subscribed(state, self._request(message, timeout, register))
        return Subscription(self, state)

    def kv(self, name: str) -> KvMap:
        """The shared key-value map ``name`` (the one processors use as ``ctx.kv(name)``)."""
        return KvMap(self, name)

    def _request(
        self,
        message: Subscribe | SubscriptionControl | KvRequest,
        timeout: float | None,
        register: Callable[[], None] | None = None,
    ) -> Answer:
        """Send a request and wait for its ``Answer`` (at most ``timeout`` s, None: the
        connect ``timeout``; then the link is taken for lost). ``ConnectionLost`` if the
        link breaks while it is in flight."""
        self._check()
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit

        def before() -> None:
            self._answers[message.id] = None
            if register is not None:
                register()

        self._send_message(message, deadline, waited=limit, before=before)
        try:
            self._wait(
                lambda: self._answers.get(message.id) is not None,
                max(0.0, deadline - time.monotonic()),
                lambda: self._give_up(f"no answer from the server within {limit} s"),
                waited=limit,
            )
        except BaseException:
            with self._cond:
                self._answers.pop(message.id, None)
            raise
        with self._cond:
            return self._take_answer(message)

    # -- reading (see _ReadTurn) ------------------------------------------------------------
    def _wait(
        self,
        ready: Callable[[], bool],
        timeout: float | None,
        expired: Callable[[], MZConnectorError],
        *,
        waited: float | None = None,
        take: Callable[[], Any] | None = None,
    ) -> Any:
        """Until ``ready()``: read the socket, or wait while another thread reads it (or
        while the connection reconnects), and handle what arrives; then return ``take()``
        (called under the same hold of ``_cond`` as the last ``ready()``). Raises
        ``ConnectionClosed`` once the connection is gone, and what ``expired()`` returns after
        ``timeout`` seconds (None: no limit); while reconnecting then, a ``Timeout`` saying
        so (after ``waited`` s: the call's whole timeout).

        This is a round trip's path: ``_cond`` is held throughout except while reading (and
        sending what subscriptions owe), so a reply that arrives in one read costs three
        holds of it (here before, here after, and the reader's hand-over of the records)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        cond, turn = self._cond, self._turn
        cond.acquire()
        turn.enter()
        try:
            while True:
                if ready() or (self._closed is not None and self._errors):
                    return None if take is None else take()
                remaining = None if deadline is None else deadline - time.monotonic()
                if self._closed is not None or (remaining is not None and remaining <= 0):
                    break
                if self._down is None and turn.acquire():
                    cond.release()
                    try:
                        self._read_once(remaining)
                    finally:
                        cond.acquire()
                        turn.release()
                    if self._owed:  # (the send lock is never taken under _cond)
                        cond.release()
                        try:
                            self._send_owed()
                        finally:
                            cond.acquire()
                else:
                    cond.wait(remaining)
            down = self._down
        finally:
            turn.leave()
            cond.release()
        # (the ledger is not read under _cond)
        if self._closed is not None:
            raise self._closed_error()
        if down is not None:
            raise self._still_reconnecting(waited if waited is not None else timeout)
        raise expired()

    def _read_once(self, timeout: float | None, wake: socket.socket | None = None) -> None:
        """Read what arrives within ``timeout`` (or until ``wake`` is readable) and handle it;
        ping an idle link when its keepalive says so. Only the thread whose turn it is calls
        this."""
        ka = self._ka
        wait = timeout
        if ka is not None:
            until = ka.deadline - time.monotonic()
            if wait is None or until < wait:
                wait = max(0.0, until)
        transport = self._transport
        try:
            # A Ctrl-C while waiting here leaves the connection intact: nothing was read.
            data = transport.recv() if transport.wait_readable(wait, wake) is True else None
        except OSError as exc:
            self._link_lost(f"connection lost: {exc}")
            return
        if data is not None:
            if ka is not None:
                ka.heard()
            try:
                self._handle(data)
            except BaseException as exc:  # what was read is lost: callers must not wait forever
                self._fail("handling what the server sent", exc)
                raise
        if ka is not None and time.monotonic() >= ka.deadline:
            ping = ka.tick(time.monotonic())
            if ka.dead:
                self._link_lost(
                    f"no answer from the server to {ka.misses} pings, {ka.interval} s apart",
                    lost=True,
                )
            elif ping is not None:
                self._owed.append(ping)
        if self._owed:
            self._send_owed()

    def _read_loop(self) -> None:
        """The background reader: reads while no caller waits for the server."""
        cond, turn = self._cond, self._turn
        try:
            while True:
                with cond:
                    if not turn.acquire_background():
                        return
                try:
                    self._read_once(None, turn.wake)
                finally:
                    with cond:
                        turn.release_background()
        except Exception as exc:
            self._fail("the background reader", exc)

    def _on_event(self, event: Any) -> bool:
        """Handle one event; True when the link is over. Whoever reads calls this; it takes
        only ``_cond``, never the send lock: a reader never waits behind a long send."""
        cond = self._cond
        batch = None
        if type(event) is Columns:
            batch = self._received_columns(event)
            if not batch.rows:
                return False
        elif not isinstance(event, Records):
            with cond:
                over = self._apply(event)
                cond.notify_all()
            return over
        else:
            items = _decode_items(self._decoder, event.items)
        with cond:
            # The background reader stops at the bound (the server then holds records
            # back); a call that waits for the server reads on regardless.
            while (
                len(self._inbox) + self._chunk_rows >= self._max_buffered
                and self._closed is None
                and self._down is None
                and self._turn.background_alone()
            ):
                cond.wait()
            if batch is None:
                self._inbox.extend(items)
            else:
                self._add_columns(batch)
            cond.notify_all()
        return False

    def _mark_closed(
        self, reason: str, *, raw: Message | None = None, final: ConnectionClosed | None = None
    ) -> None:
        with self._cond:
            if self._closed is None:
                self._closed = reason
                self._closed_raw = raw
                self._final = final
                self._down = None
                if self._lifecycle.state is not _DISCONNECTING:
                    self._change(_DISCONNECTED)
            self._turn.close()
            self._cond.notify_all()
        self._stop_reconnecting.set()
        self._linger_armed.set()  # wake the linger thread so it ends

    # -- staying connected ------------------------------------------------------------------
    def _link_lost(self, reason: str, *, lost: bool = False, raw: Message | None = None) -> None:
        """The link broke (any thread may find out). Without ``auto_reconnect`` (or while
        closing) the connection is over; with it, the link is shut (waking whoever waits in
        it) and the reconnecting thread starts."""
        with self._cond:
            if self._closed is not None or self._down is not None:
                return
            if not self._auto or self._closing:
                final = ConnectionLost(reason) if lost else None
                self._mark_closed(reason, raw=raw, final=final)
                return
            self._down = reason
            self._turn.pause()
            self._change(_RECONNECTING)
            self._cond.notify_all()
            if self._reconnector is None:
                self._start_reconnector(one_pass=False)
            transport = self._transport
        transport.shutdown()

    def _start_reconnector(self, *, one_pass: bool) -> None:
        """(Holding ``_cond``.)"""
        self._stop_reconnecting.clear()
        self._reconnector = threading.Thread(
            target=self._reconnect_loop,
            args=(one_pass,),
            name="mzconnector-reconnect",
            daemon=True,
        )
        self._reconnector.start()

    def _reconnect_loop(self, one_pass: bool) -> None:
        """The reconnecting thread: attempts with backoff (``one_pass``: each server once,
        for ``reconnect()`` without ``auto_reconnect``) until a new link is up and resumed,
        the attempts run out, or the connection is closed."""
        lifecycle = self._lifecycle
        attempt = 0
        try:
            while True:
                attempt += 1
                delay = 0.0 if one_pass else lifecycle.delay(attempt)
                if delay and self._stop_reconnecting.wait(delay):
                    return
                with self._cond:
                    if self._closed is not None or self._closing:
                        return
                try:
                    transport, protocol, welcome = _dial(self._dialer)
                except ConnectError as exc:
                    if one_pass or isinstance(exc, _FINAL_REFUSALS) or lifecycle.exhausted(attempt):
                        self._reconnect_failed(exc, attempt)
                        return
                    continue
                try:
                    self._relink(transport, protocol, welcome)
                except (SchemaChanged, ApiModuleError, LocalProtocolError) as exc:
                    transport.close()
                    self._reconnect_failed(exc, attempt)
                    return
                except BaseException:
                    transport.close()
                    raise
                with self._cond:
                    if self._down is None or self._closed is not None:
                        return  # up (or closed): done; a new break starts again
                attempt = 0  # it broke again while resuming: start over
        except Exception as exc:
            self._fail("the reconnecting thread", exc)
        finally:
            with self._cond:
                if self._reconnector is threading.current_thread():
                    self._reconnector = None

    def _reconnect_failed(self, exc: MZConnectorError, attempts: int) -> None:
        """No new link: the connection is over; the next call raises why."""
        if isinstance(exc, SchemaChanged):
            final: ConnectionClosed = exc
            reason = str(exc)
        else:
            tries = f" after {attempts} attempt{'s' if attempts > 1 else ''}"
            reason = f"could not reconnect{tries}: {exc}"
            final = ConnectionClosed(reason)
            final.__cause__ = exc
        self._mark_closed(reason, final=final)

    def _relink(self, transport: _Transport, protocol: Protocol, welcome: Welcome) -> None:
        """Resume on a new link (the reconnecting thread): check the record types, reload the
        API modules, install the link once nobody reads the old one, then, before any other
        sender may send, make the subscriptions again and resend what was not acknowledged
        (and a ``Flush``, for whoever waits for acknowledgements)."""
        changes = _schema_changes(self._schema, welcome.schema)
        if changes:
            raise SchemaChanged(changes)
        protocol.max_frame_size = welcome.max_frame_size
        self._load_api(welcome.api)
        with self._send_lock:
            with self._cond:
                while self._turn.reader is not None:  # whoever read the old link lets go
                    self._cond.wait()
                if self._closed is not None:
                    transport.close()
                    return
                old, self._transport, self._protocol = self._transport, transport, protocol
                self._link[0] = transport
                frames, messages = self._resume_plan(welcome)
            old.close()
            self._handle()  # what arrived with the Welcome, before anyone reads more
            with self._cond:
                if self._closed is not None or self._down is None:
                    return
                self._down = None
                self._turn.resume()
                self._change(_CONNECTED)
                self._cond.notify_all()
            # Connected: readers read the new link while this thread, holding the send lock,
            # sends what must go first.
            try:
                for message in messages:
                    transport.send(protocol.send(message))
                protocol.send_records(frames)
                for frame in frames:
                    transport.send(frame)
                transport.send(protocol.send(Flush()))
            except OSError as exc:
                self._link_lost(f"lost the connection while resending: {exc}")

    def reconnect(self, timeout: float | None = None) -> None:
        """Drop the link (if there is one) and connect again now, as ``auto_reconnect``
        does when a link breaks; also brings back a connection that was lost. Without
        ``auto_reconnect`` it tries each server once. Returns once connected; raises what
        ended the attempts, or ``Timeout`` after ``timeout`` s (None: the connect
        ``timeout``) while it still tries."""
        limit = self.timeout if timeout is None else timeout
        if self._closing or self._failure is not None:
            raise self._closed_error()
        if self._closed is not None:  # its threads are ending: wait for them, then new ones
            self._reader.join(self.timeout)
            self._flusher.join(self.timeout)
        shut = None
        with self._cond:
            if self._closing or self._failure is not None:
                pass
            elif self._closed is not None:  # a lost connection, brought back
                self._closed = self._closed_raw = self._final = None
                self._turn.reopen()
                self._linger_armed.clear()
                self._start_threads()
                self._down = "reconnecting on demand"
                self._change(_RECONNECTING)
            elif self._down is None:
                self._down = "reconnecting on demand"
                self._turn.pause()
                self._change(_RECONNECTING)
                shut = self._transport
            if self._down is not None and self._reconnector is None:
                self._start_reconnector(one_pass=not self._auto)
            self._cond.notify_all()
        if shut is not None:
            shut.shutdown()
        self._await_link(time.monotonic() + limit, limit)

    # -- closing ----------------------------------------------------------------------------
    def close(self, timeout: float | None = None) -> None:
        """Send what is buffered, say goodbye and close; waits at most ``timeout`` seconds
        (None: the connect ``timeout``) for the server to close its side. Safe to call
        twice. While reconnecting, it stops the reconnection (nothing is sent)."""
        with self._cond:
            self._closing = True
            if self._closed is None:
                self._change(_DISCONNECTING)
        self._stop_reconnecting.set()
        if self._closed is None:
            limit = self.timeout if timeout is None else timeout
            try:
                if self._send_message(Bye("client closed"), needs_link=False):
                    # Read until the server closes: closing with unread data would reset the
                    # connection, and the server could lose the last records it was sent.
                    self._wait(
                        lambda: self._closed is not None,
                        limit,
                        lambda: self._give_up(f"close: no answer from the server within {limit} s"),
                    )
            except (ConnectionClosed, Timeout):
                pass
            with self._cond:
                self._closed = "closed by the client"
                self._closed_raw = self._final = None
        self._mark_closed("closed by the client")
        with self._cond:
            self._change(_DISCONNECTED)
        reconnector = self._reconnector
        if reconnector is not None and reconnector is not threading.current_thread():
            reconnector.join(self.timeout)
        self._reader.join(self.timeout)
        self._finalizer()


class _SubscriptionBase:
    """What both clients' subscriptions share: the request they were made with, and their
    state (``dropped``, ``closed``)."""

    _conn: Any

    def __init__(self, conn: Any, state: _SubState) -> None:
        self._conn = conn
        self._state = state
        message = state.message
        self.route = message.route
        self.matcher = dict(message.matcher)
        self.ack_mode = message.ack
        self.durable = message.durable or None
        self.tap = message.tap

    def __repr__(self) -> str:
        what = "tap" if self.tap else "subscription"
        state = f"closed: {self._state.closed}" if self._state.closed else "open"
        name = type(self).__name__
        return f"<mzconnector.{name} {what} on {self.route!r} {self.matcher} ({state})>"

    @property
    def dropped(self) -> int:
        return self._state.dropped

    @property
    def closed(self) -> bool:
        return self._state.closed is not None


class Subscription(_SubscriptionBase):
    """A subscription (``conn.subscribe``): iterate it (``for record in sub``), or
    ``sub.receive(timeout=None)``. ``stop()`` pauses delivery and ``start()`` resumes it;
    ``close()`` ends it, and any iteration of it. With ``ack="client"``, acknowledge records
    with ``ack(record)`` or ``ack_all(record)``: the server sends at most ``max_pending``
    unacknowledged records. ``dropped`` counts records it missed because it fell behind."""

    _conn: Connection

    def receive(self, timeout: float | None = None) -> Any:
        """The next record; waits at most ``timeout`` seconds (forever if None), then raises
        ``Timeout``. Raises ``SubscriptionError`` once the subscription is closed."""
        conn, state = self._conn, self._state
        if not state.inbox:
            if state.closed is None:
                conn._wait(
                    lambda: bool(state.inbox) or state.closed is not None,
                    timeout,
                    lambda: Timeout(
                        f"subscription on {self.route!r}: no record within {timeout} s"
                    ),
                )
            if not state.inbox:
                raise SubscriptionError(f"the subscription is closed: {state.closed}")
        with conn._cond:
            record, ack = state.hand_out()
        if ack is not None:
            conn._send_message(ack, needs_link=False)
        return record

    def __iter__(self) -> Iterator[Any]:
        """The records as they arrive, until the subscription or the connection closes."""
        while True:
            try:
                yield self.receive()
            except (SubscriptionError, ConnectionClosed):
                return

    def ack(self, record: Any) -> None:
        """Acknowledge one record (``ack="client"``)."""
        self._send_ack(record, through=False)

    def ack_all(self, record: Any) -> None:
        """Acknowledge ``record`` and every record handed out before it (``ack="client"``)."""
        self._send_ack(record, through=True)

    def _send_ack(self, record: Any, through: bool) -> None:
        with self._conn._cond:
            ack = self._state.ack(record, through)
        if ack is not None:  # (None: handed out before a reconnection)
            self._conn._send_message(ack, needs_link=False)

    def stop(self, timeout: float | None = None) -> None:
        """Pause delivery (matching records wait on the server; see the README)."""
        self._control("stop", timeout)

    def start(self, timeout: float | None = None) -> None:
        """Resume delivery."""
        self._control("start", timeout)

    def close(self, timeout: float | None = None) -> None:
        """End the subscription (and any iteration of it). Safe to call twice."""
        with self._conn._cond:
            was_open = self._state.closed is None
            # Closed before the server is told: a thread that iterates it and reads the socket
            # meanwhile reads the server's answer, and then sees it closed.
            self._state.closed = self._state.closed or "closed by the client"
        if was_open and not self._conn.closed:
            self._control("close", timeout)
        self._conn._subs.pop(self._state.id, None)
        with self._conn._cond:
            self._state.inbox.clear()
            self._conn._cond.notify_all()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _control(self, op: str, timeout: float | None) -> None:
        if self._state.closed is not None and op != "close":
            raise SubscriptionError(f"the subscription is closed: {self._state.closed}")
        # A control message carries the subscription's id; its answer comes back under it.
        request = SubscriptionControl(self._state.id, op)
        answer = self._conn._request(request, timeout)
        if answer.error:
            raise _with_raw(SubscriptionError(answer.error), answer)
        self._state.stopped = op == "stop"


class KvMap:
    """A shared key-value map (``conn.kv(name)``): ``get``, ``set``, ``remove``, ``items``,
    ``keys``, and the dict forms (``m[key]``, ``m[key] = v``, ``del m[key]``, ``key in m``,
    ``len(m)``; a missing key is a ``KeyError``). Keys are strings or integers; values are
    declared records or plain values (None, bools, numbers, strings, bytes, lists, dicts,
    datetimes with a timezone). Every call asks the server: what another connection or a
    processor changed is seen at the next call."""

    def __init__(self, conn: Connection, name: str) -> None:
        self._conn = conn
        self.name = name

    def __repr__(self) -> str:
        return f"<mzconnector.KvMap {self.name!r}>"

    def _do(self, op: str, key: Any = None, value: Any = None) -> Any:
        request = self._conn._kv_request(self.name, op, key, value)
        return self._conn._kv_result(request, self._conn._request(request, None))

    def get(self, key: str | int, default: Any = None) -> Any:
        value = self._do("get", key)
        return default if value is _NOTHING else value

    def set(self, key: str | int, value: Any) -> None:
        self._do("set", key, value)

    def remove(self, key: str | int) -> bool:
        """Remove ``key``; whether it was there."""
        return bool(self._do("remove", key))

    def items(self) -> list[tuple[Any, Any]]:
        return list(self._do("items"))

    def keys(self) -> list[Any]:
        return [key for key, _ in self.items()]

    def __getitem__(self, key: str | int) -> Any:
        value = self._do("get", key)
        if value is _NOTHING:
            raise KeyError(key)
        return value

    def __setitem__(self, key: str | int, value: Any) -> None:
        self.set(key, value)

    def __delitem__(self, key: str | int) -> None:
        if not self.remove(key):
            raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        return self._do("get", key) is not _NOTHING

    def __iter__(self) -> Iterator[Any]:
        return iter(self.keys())

    def __len__(self) -> int:
        return int(self._do("len"))


def _progress_bar(records: Iterable[Any]) -> Any:
    """A tqdm bar for ``submit_many(progress=True)`` (tqdm is imported only then)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        raise ImportError("the progress bars of mzconnector need tqdm (pip install tqdm)") from None
    return tqdm(total=len(records) if hasattr(records, "__len__") else None, unit="rec")


def _chunks(iterable: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(iterable)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _dial(dialer: _Dialer) -> tuple[_Transport, Protocol, Welcome]:
    """The one connect path of the blocking client: the servers in random order until one
    answers; the error when none does names each and why."""
    failures = []
    for host, port in dialer.order():
        try:
            return _dial_one(dialer, host, port)
        except ConnectError as exc:
            failures.append((_where(host, port), exc))
    raise dialer.none_answered(failures)


def _dial_one(dialer: _Dialer, host: str, port: int) -> tuple[_Transport, Protocol, Welcome]:
    handshake = dialer.handshake(host, port)
    timeout = dialer.timeout
    context = dialer.context
    deadline = time.monotonic() + timeout

    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        return left

    sock = None
    try:
        with handshake.errors():
            sock = socket.create_connection((host, port), timeout=timeout)
            handshake.opened()
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _keepalive(sock, timeout)
            sock.settimeout(remaining())
            if context is None:
                transport = _Transport(sock)
            else:
                transport = _TLSTransport(sock, context, dialer.tls_name(host))
            transport.send(handshake.hello)
            welcome = None
            while welcome is None:
                sock.settimeout(remaining())
                welcome = handshake.receive(transport.recv())
        sock.settimeout(timeout)
        return transport, handshake.protocol, welcome
    except BaseException:
        if sock is not None:
            sock.close()
        raise


def connect(
    host: str | Iterable[str] = "127.0.0.1",
    port: int = DEFAULT_PORT,
    *,
    timeout: float = 10.0,
    name: str = "",
    metadata: Mapping[str, Any] | None = None,
    client_id: str = "",
    token: str | None = None,
    tls: bool | ssl.SSLContext = False,
    cafile: str | None = None,
    certfile: str | None = None,
    keyfile: str | None = None,
    server_hostname: str | None = None,
    batch_size: int = 8192,
    linger: float = 0.005,
    max_buffered: int = 1_000_000,
    auto_reconnect: bool = False,
    reconnect_attempts: int | None = None,
    reconnect_max_delay: float = 30.0,
    keepalive: float = 15.0,
    keepalive_misses: int = 3,
    on_state_change: Callable[[Connection, ConnectionState], Any] | None = None,
) -> Connection:
    """Connect to a connector server and return the open ``Connection``.

    ``host`` is one server, or several (``["host-a:7777", "host-b:7777"]``, or one string
    ``"host-a:7777|host-b:7777"``; ``port`` is for those without one): they are tried in
    random order until one answers. ``timeout`` bounds each attempt (connect, TLS, handshake),
    and is the default for ``flush`` and ``mim``. ``name`` and ``metadata`` are shown to the
    workflow; ``client_id`` names this client across connections (its durable subscriptions
    wait for it while it is away). ``token`` authenticates (None: the environment variable
    ``MZCONNECTOR_AUTH_TOKEN``, if set). ``tls=True`` (or an ``SSLContext``) connects over
    TLS, verifying the server against ``cafile`` (or the system's trust store) and the name
    ``server_hostname`` (or the host); ``certfile``/``keyfile`` present a client certificate.

    Staying connected: ``auto_reconnect=True`` reconnects when the link breaks (backoff with
    jitter up to ``reconnect_max_delay`` s, at most ``reconnect_attempts`` attempts; None:
    no limit); ``keepalive`` (s; 0: off) pings an idle link and gives it up after
    ``keepalive_misses`` unanswered pings; ``on_state_change(conn, state)`` is told each
    change of ``conn.state``.
    """
    dialer = _Dialer(
        host,
        port,
        timeout=timeout,
        name=name,
        metadata=metadata,
        client_id=client_id,
        client=f"mzconnector {__version__}",
        token=token,
        keepalive=keepalive,
        keepalive_misses=keepalive_misses,
        tls=tls,
        cafile=cafile,
        certfile=certfile,
        keyfile=keyfile,
        server_hostname=server_hostname,
    )
    lifecycle = _Lifecycle(attempts=reconnect_attempts, max_delay=reconnect_max_delay)
    transport, protocol, welcome = _dial(dialer)
    try:
        return Connection(
            transport,
            protocol,
            welcome,
            dialer=dialer,
            timeout=timeout,
            batch_size=batch_size,
            linger=linger,
            max_buffered=max_buffered,
            auto_reconnect=auto_reconnect,
            lifecycle=lifecycle,
            on_state_change=on_state_change,
        )
    except BaseException:
        transport.close()
        raise


# ---------------------------------------------------------------------------------------------
# 7. pandas helpers
# ---------------------------------------------------------------------------------------------
#
# Received records to a DataFrame and back. pandas is imported only when a helper is called:
# the client file keeps needing only msgspec.

__all__ += ["from_dataframe", "to_dataframe"]

_TYPE_COLUMN = "_type"  # field names never start with "_", so this cannot clash with one


def _import_pandas() -> Any:
    try:
        import pandas
    except ImportError:
        raise ImportError(
            "the DataFrame helpers of mzconnector need pandas (pip install pandas)"
        ) from None
    return pandas


def to_dataframe(records: Iterable[Any]) -> Any:
    """A pandas DataFrame of ``records`` (e.g. what ``receive_many`` returned): one row per
    record, one column per field, with the dtypes pandas infers from the values.

    Records of one type give that type's fields as columns, in declared order. Records of
    several types give a ``_type`` column (the type name) and then the fields of every type; a
    field a record does not have is None. Nested records, lists and dicts stay Python objects in
    their cells. Raises ``TypeError`` for anything that is not a record (e.g. bytes).
    ``Connection.receive_frame`` builds its DataFrame from the declared types instead.
    """
    pd = _import_pandas()
    records = records if isinstance(records, list) else list(records)
    kinds: dict[type, None] = {}
    for i, record in enumerate(records):
        kind = type(record)
        if kind not in kinds:
            if not isinstance(record, msgspec.Struct):
                raise TypeError(
                    f"to_dataframe takes records; item {i} is a {kind.__name__} "
                    "(leave out bytes and other objects first)"
                )
            kinds[kind] = None
    if len(kinds) <= 1:
        fields = next(iter(kinds)).__struct_fields__ if kinds else ()
        # A column at a time, the loop in C: twice as fast as a comprehension of getattr.
        data = {f: list(map(operator.attrgetter(f), records)) for f in fields}
        return pd.DataFrame(data, columns=list(fields))
    fields = list(dict.fromkeys(f for kind in kinds for f in kind.__struct_fields__))
    data = {_TYPE_COLUMN: [type(r).__name__ for r in records]}
    data.update({f: [getattr(r, f, None) for r in records] for f in fields})
    return pd.DataFrame(data, columns=[_TYPE_COLUMN, *fields])


def from_dataframe(df: Any, record_type: type[Any]) -> list[Any]:
    """Records of ``record_type`` (e.g. ``conn.udrs.Subscriber``), one per row of ``df``: the
    inverse of ``to_dataframe``, ready for ``submit_many`` (``Connection.submit_frame`` sends a
    DataFrame without making the records).

    Columns are matched to fields by name; every required field needs a column, and a column
    that is not a field is an error (select the ones you need: ``df[["a", "b"]]``). Missing
    values (None, NaN, NaT) become None, pandas and numpy scalars become Python values, and
    values are converted as msgspec's lax mode does (``3.0`` fits an ``int`` field, an ISO
    string a ``datetime`` one). Raises ``ValueError`` naming the row and column of the first
    value that does not fit. Columns of numbers, bools, datetimes and strings are checked and
    converted a column at a time; columns of Python objects a value at a time.
    """
    return frame_columns(df, record_type).records()


#: Bytes of a column batch ``submit_frame`` and ``ctx.route_frame`` send at most (and at most
#: ``MAX_BATCH_RECORDS`` rows): large enough that the cost of a batch is spread over many
#: rows, small enough that batches queued on routes and in outboxes stay a few MiB.
FRAME_BATCH_BYTES = 1 << 21
#: What a ``Columns`` frame holds beside its columns' buffers, at most.
_COLUMNS_OVERHEAD = 64


class _FrameColumn:
    """One field's column of a DataFrame, converted: ``values`` (a little-endian numpy
    array) for the fixed-width kinds; ``offsets`` (int64, absolute, rows + 1) and ``data``
    (uint8) for "str"; ``cells`` (each row's msgpack) for "values"; ``valid`` (uint8, or None
    when no value is None); ``pylist``, the values as Python objects (a list, or a numpy
    array of objects) when the column held them or the conversion made them anyway, so that
    records are made without converting back."""

    __slots__ = ("cells", "data", "kind", "name", "offsets", "pylist", "valid", "values")

    def __init__(self, name: str, kind: str, **parts: Any) -> None:
        self.name = name
        self.kind = kind
        self.values = parts.get("values")
        self.offsets = parts.get("offsets")
        self.data = parts.get("data")
        self.cells: list[bytes] | None = parts.get("cells")
        self.valid = parts.get("valid")
        self.pylist: list[Any] | None = parts.get("pylist")


class FrameColumns:
    """A DataFrame's rows as records of ``record_type``, checked and converted a column at
    a time (``frame_columns``), ready to travel as column batches: ``plan`` splits the rows
    into batches that fit in frames, ``batch`` makes one, ``part`` is its rows of the frame."""

    def __init__(self, record_type: type, df: Any, columns: list[_FrameColumn]) -> None:
        self.record_type = record_type
        self.df = df
        self.rows = len(df)
        self.columns = columns

    def __len__(self) -> int:
        return self.rows

    def plan(
        self, max_frame_size: int, batch_bytes: int = FRAME_BATCH_BYTES
    ) -> list[tuple[int, int]]:
        """The batches, as (start, stop) rows: each at most ``MAX_BATCH_RECORDS`` rows and
        ``batch_bytes`` (a row larger than that goes alone), and every frame within
        ``max_frame_size``. Raises ``ValueError`` naming a row too large for a frame."""
        if not self.rows:
            return []
        np = _lib("numpy")
        overhead = _COLUMNS_OVERHEAD + len(self.record_type.__name__)
        sizes = np.zeros(self.rows, dtype=np.int64)
        for column in self.columns:
            overhead += len(column.name) + 32
            if column.valid is not None:
                sizes += 1
            width = _FIXED_KINDS.get(column.kind)
            if width is not None:
                sizes += width
            elif column.kind == "str":
                sizes += np.diff(column.offsets) + 4
            else:
                assert column.cells is not None
                sizes += np.fromiter(map(len, column.cells), np.int64, self.rows)
        limit = max_frame_size - overhead
        too_large = np.flatnonzero(sizes > limit)
        if too_large.size:
            row = int(too_large[0])
            raise ValueError(
                f"row {self._label(row)!r}: {int(sizes[row])} bytes encoded, more than a frame "
                f"holds ({max_frame_size} bytes)"
            )
        ends = np.cumsum(sizes)
        budget = max(1, min(batch_bytes, max_frame_size) - overhead)
        plan = []
        start = 0
        while start < self.rows:
            before = int(ends[start - 1]) if start else 0
            stop = int(np.searchsorted(ends, before + budget, side="right"))
            stop = min(max(stop, start + 1), start + MAX_BATCH_RECORDS, self.rows)
            plan.append((start, stop))
            start = stop
        return plan

    def batch(self, start: int, stop: int) -> ColumnBatch:
        """Rows ``start`` to ``stop`` (not included) as a column batch."""
        columns: dict[str, Column] = {}
        known: dict[str, list[Any]] = {}
        for column in self.columns:
            offsets: Any = memoryview(b"")
            if column.kind in _FIXED_KINDS:
                data: Any = memoryview(column.values[start:stop]).cast("B")
            elif column.kind == "str":
                window = column.offsets[start : stop + 1]
                offsets = memoryview((window - window[0]).astype("<i4")).cast("B")
                data = memoryview(column.data[window[0] : window[-1]])
            else:
                assert column.cells is not None
                cells = column.cells[start:stop]
                data = memoryview(_array_header(len(cells)) + b"".join(cells))
            valid: Any = memoryview(b"")
            if column.valid is not None:
                piece = column.valid[start:stop]
                if not piece.all():
                    valid = memoryview(piece).cast("B")
            columns[column.name] = Column(column.name, column.kind, data, offsets, valid)
            if column.pylist is not None:
                known[column.name] = column.pylist[start:stop]
        batch = ColumnBatch(self.record_type, stop - start, columns)
        batch._values.update(known)
        return batch

    def frame(self, start: int, stop: int, first: int = 0) -> bytearray:
        """The ``Columns`` frame of rows ``start`` to ``stop`` (a batch of ``plan``), its first
        row numbered ``first`` in the client's session (0: not numbered)."""
        batch = self.batch(start, stop)
        columns = list(batch.columns.values())
        return encode_frame(Columns(batch.type_name, batch.rows, columns, first))

    def part(self, start: int, stop: int) -> Any:
        """Rows ``start`` to ``stop`` of the DataFrame (what ``unacknowledged`` shows)."""
        return self.df.iloc[start:stop]

    def records(self) -> list[Any]:
        """Records of every row."""
        return self.batch(0, self.rows).records() if self.rows else []

    def _label(self, row: int) -> Any:
        return _python_value(self.df.index[row], _import_pandas())


def frame_columns(df: Any, record_type: type[Any]) -> FrameColumns:
    """``df``'s rows as records of ``record_type``, checked and converted a column at a time
    (see ``from_dataframe`` for how columns are matched and values converted). Raises
    ``ValueError`` naming the column and the first row (its index label) that does not fit."""
    pd = _import_pandas()
    if not (isinstance(record_type, type) and issubclass(record_type, msgspec.Struct)):
        raise TypeError(
            f"from_dataframe needs a record type such as conn.udrs.<Type>, not {record_type!r}"
        )
    name = record_type.__name__
    fields = msgspec.structs.fields(record_type)
    names = [f.name for f in fields]
    columns = list(df.columns)
    repeated = sorted({str(c) for c in columns if columns.count(c) > 1})
    if repeated:
        raise ValueError(f"column(s) {', '.join(map(repr, repeated))} appear more than once")
    if _TYPE_COLUMN in columns:
        others = sorted({str(t) for t in df[_TYPE_COLUMN].tolist()} - {name})
        if others:
            raise ValueError(
                f"the {_TYPE_COLUMN} column names other types than {name}: {', '.join(others)} "
                f"(select the rows first: df[df.{_TYPE_COLUMN} == {name!r}])"
            )
    unknown = [c for c in columns if c not in names and c != _TYPE_COLUMN]
    if unknown:
        raise ValueError(
            f"column(s) {', '.join(map(repr, unknown))} are not fields of {name} "
            f"(its fields: {', '.join(names)}); select the columns you need first"
        )
    missing = [f.name for f in fields if f.required and f.name not in columns]
    if missing:
        raise ValueError(f"{name} needs a column for each of: {', '.join(missing)}")
    prepared = [_frame_column(df[f.name], f, df.index, pd) for f in fields if f.name in columns]
    return FrameColumns(record_type, df, prepared)


def _frame_column(series: Any, field: Any, index: Any, pd: Any) -> _FrameColumn:
    """One column converted for field ``field``: in bulk where its dtype holds the field's
    type, else a value at a time (``_object_column``)."""
    np = _lib("numpy")
    base, _ = _field_base(field.type)
    name = field.name
    dtype = series.dtype
    kind = getattr(dtype, "kind", "O")
    numpy_dtype = isinstance(dtype, np.dtype)
    types = pd.api.types

    def fail(row: int, problem: str) -> ValueError:
        label = _python_value(index[row], pd)
        return ValueError(f"row {label!r}, column {name!r}: {problem}")

    def mask_of() -> Any:
        missing = series.isna().to_numpy(dtype=bool)
        return missing if missing.any() else None

    def fixed(kind: str, values: Any, missing: Any) -> _FrameColumn:
        if missing is not None and not _field_base(field.type)[1]:
            raise fail(
                int(np.flatnonzero(missing)[0]), f"expected {type_name(field.type)}, got None"
            )
        valid = None if missing is None else (~missing).view(np.uint8)
        return _FrameColumn(name, kind, values=np.ascontiguousarray(values), valid=valid)

    try:
        if base is int and types.is_integer_dtype(dtype) and not types.is_bool_dtype(dtype):
            if numpy_dtype:
                values, missing = series.to_numpy(), None
                if kind == "u":
                    big = np.flatnonzero(values > 2**63 - 1)
                    if big.size:
                        row = int(big[0])
                        raise fail(row, f"{values[row]} is out of range for a column of int")
            else:  # pandas' nullable Int64, or Arrow-backed ints
                values, missing = series.to_numpy(dtype=np.int64, na_value=0), mask_of()
            return fixed("int", values.astype("<i8"), missing)
        if base is int and types.is_float_dtype(dtype):
            values = series.to_numpy(dtype=np.float64, na_value=np.nan)
            missing = np.isnan(values)
            bad = ~missing & ((values != np.trunc(values)) | (np.abs(values) >= 2.0**63))
            if bad.any():
                row = int(np.flatnonzero(bad)[0])
                raise fail(row, f"expected int, got {_describe(float(values[row]))}")
            values = np.where(missing, 0, values).astype("<i8")
            return fixed("int", values, missing if missing.any() else None)
        if base is float and (
            types.is_float_dtype(dtype)
            or (types.is_integer_dtype(dtype) and not types.is_bool_dtype(dtype))
        ):
            values = series.to_numpy(dtype=np.float64, na_value=np.nan)
            missing = np.isnan(values)
            return fixed("float", values.astype("<f8"), missing if missing.any() else None)
        if base is bool and types.is_bool_dtype(dtype) and kind != "O":
            missing = None if numpy_dtype else mask_of()
            values = series.to_numpy(dtype=bool, na_value=False).view(np.uint8)
            return fixed("bool", values, missing)
        if base is datetime.datetime and types.is_datetime64_any_dtype(dtype):
            utc = getattr(dtype, "tz", None) is not None
            if utc:
                series = series.dt.tz_convert("UTC").dt.tz_localize(None)
            missing = mask_of()
            values = series.to_numpy(dtype="datetime64[us]").view("<i8")
            if missing is not None:
                values = np.where(missing, 0, values)
            out = (values < _MIN_US) | (values > _MAX_US)
            if out.any():
                row = int(np.flatnonzero(out)[0])
                raise fail(row, "datetime out of range (years 1 to 9999)")
            return fixed("datetime-utc" if utc else "datetime", values, missing)
        if base is str:
            strings = _string_column(series, field, pd, np, fixed)
            if strings is not None:
                return strings
    except (TypeError, OverflowError):
        pass  # a dtype that does not convert in bulk after all: a value at a time
    return _object_column(series, field, fail, pd, np)


def _string_column(series: Any, field: Any, pd: Any, np: Any, fixed: Any) -> _FrameColumn | None:
    """A string column as offsets and UTF-8 data, from pyarrow: at no cost for pandas'
    Arrow-backed strings, in one C call for a column of Python str. None when it must be
    converted a value at a time (no pyarrow, or values that are not all str)."""
    pa = _lib("pyarrow")
    if pa is None:
        return None
    dtype = series.dtype
    pylist = None
    arrow_type = getattr(dtype, "pyarrow_dtype", None)  # pd.ArrowDtype
    if (isinstance(dtype, pd.StringDtype) and dtype.storage != "python") or (
        arrow_type is not None
        and (pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type))
    ):
        strings = pa.array(series)
    elif _is_object(dtype):
        objects = series.to_numpy(dtype=object)
        try:
            # pyarrow infers the type from every value in one C pass: string when all are
            # str (or None/NaN), binary when there are bytes, an error for other objects.
            # (pandas' infer_dtype first would scan them once more: 45 ms a million.)
            strings = pa.array(objects, from_pandas=True)
        except (pa.ArrowException, UnicodeError):
            return None  # e.g. a lone surrogate or an int: said in our words, a value at a time
        if pa.types.is_null(strings.type):  # empty, or None/NaN only
            strings = strings.cast(pa.large_string())
        elif not pa.types.is_string(strings.type):
            return None
        pylist = objects if strings.null_count == 0 else None  # the str, for records
    else:
        return None
    if isinstance(strings, pa.ChunkedArray):
        strings = (
            (strings.chunk(0) if strings.num_chunks == 1 else strings.combine_chunks())
            if strings.num_chunks
            else pa.array([], pa.large_string())
        )
    if not (pa.types.is_string(strings.type) or pa.types.is_large_string(strings.type)):
        strings = strings.cast(pa.large_string())
    rows = len(strings)
    buffers = strings.buffers()
    width = np.int64 if pa.types.is_large_string(strings.type) else np.int32
    offsets = np.frombuffer(buffers[1], width)[strings.offset : strings.offset + rows + 1]
    data = np.frombuffer(buffers[2], np.uint8) if buffers[2] is not None else np.empty(0, np.uint8)
    missing = None
    if strings.null_count:
        missing = strings.is_null().to_numpy(zero_copy_only=False)
    column = fixed("str", np.empty(0), missing)
    column.values = None
    column.offsets = offsets.astype(np.int64)
    column.data = data
    column.pylist = pylist
    return column


def _object_column(series: Any, field: Any, fail: Any, pd: Any, np: Any) -> _FrameColumn:
    """A column converted a value at a time, as msgspec's lax mode does, and sent as msgpack
    values: for Python objects (lists, dicts, records, bytes), and for a dtype that does not
    hold the field's type (where the first value that does not fit is named)."""
    kind = field.type
    values = series.to_numpy(dtype=object).tolist()
    missing = series.isna().to_numpy(dtype=bool)
    for row in np.flatnonzero(missing).tolist():
        values[row] = None
    values = [_python_value(v, pd) for v in values]
    try:
        converted = msgspec.convert(_array_form(values, list[kind]), list[kind], strict=False)  # type: ignore[valid-type]
    except msgspec.ValidationError:
        for row, value in enumerate(values):
            try:
                msgspec.convert(_array_form(value, kind), kind, strict=False)
            except msgspec.ValidationError:
                raise fail(row, f"expected {type_name(kind)}, got {_describe(value)}") from None
        raise  # (not reached: some value did not fit)
    try:
        cells = list(map(_encoder.encode, converted))
    except _ENCODE_ERRORS:
        for row, value in enumerate(converted):
            try:
                _encoder.encode(value)
            except _ENCODE_ERRORS:
                path, problem = _encode_problem(value)
                where = f" (at {path.lstrip('.')})" if path else ""
                raise fail(row, f"cannot be encoded{where}: {problem}") from None
        raise
    return _FrameColumn(field.name, "values", cells=cells, pylist=converted)


def batches_dataframe(segments: Iterable[ColumnBatch | list[Any]], record_type: type) -> Any:
    """One pandas DataFrame of ``segments``, in order: column batches and lists of records,
    all of ``record_type``. A column per field, its dtype from the field's declared type:
    int64, float64, bool, datetime64[us] (UTC when the values are aware), pandas' default
    string dtype (Arrow-backed in pandas 3; made without a Python object per row when pyarrow
    is installed), Python objects for the rest. None is NaN in a float column and NaT in a
    datetime one; an int or bool column with None is pandas' nullable Int64 or boolean."""
    pd = _import_pandas()
    segments = list(segments)
    rows = sum(len(s) for s in segments)
    fields = msgspec.structs.fields(record_type)
    data = {f.name: _pandas_column(segments, f, rows, pd) for f in fields}
    # Every column is a copy made here already: the DataFrame need not copy it again.
    return pd.DataFrame(
        data, columns=[f.name for f in fields], index=pd.RangeIndex(rows), copy=False
    )


def _pandas_column(segments: list[Any], field: Any, rows: int, pd: Any) -> Any:
    np = _lib("numpy")
    pa = _lib("pyarrow")
    base, _ = _field_base(field.type)
    name = field.name
    if base in (int, float, bool, datetime.datetime):
        pieces = [_fixed_piece(segment, name, base, np) for segment in segments]
        kinds = {p[0] for p in pieces if p is not None and p[0] is not None}
        if all(p is not None for p in pieces) and len(kinds) <= 1:
            kind = kinds.pop() if kinds else _KINDS_OF[base][0]
            return _typed_column(pieces, kind, rows, pd, np)  # type: ignore[arg-type]
    elif base is str and pa is not None:
        arrays = []
        for segment in segments:
            column = segment.columns.get(name) if type(segment) is ColumnBatch else None
            if column is not None and column.kind == "str":
                valid = None
                if column.valid:
                    bits = np.packbits(np.frombuffer(column.valid, np.uint8), bitorder="little")
                    valid = pa.py_buffer(bits)
                arrays.append(
                    pa.StringArray.from_buffers(
                        len(segment), pa.py_buffer(column.offsets), pa.py_buffer(column.data), valid
                    )
                )
            else:
                arrays.append(pa.array(_segment_values(segment, name), pa.string()))
        return pa.chunked_array(arrays, pa.string()).to_pandas()
    values: list[Any] = []
    for segment in segments:
        values += _segment_values(segment, name)
    dtype = _default_string_dtype(pd) if base is str else object
    return pd.Series(values, dtype=dtype, index=pd.RangeIndex(rows))


def _segments_frame(segments: list[ColumnBatch | list[Any]]) -> Any:
    """The DataFrame ``receive_frame`` returns for what it took from the inbox."""
    pd = _import_pandas()
    if not segments:
        return pd.DataFrame()
    kinds = {s.record_type if type(s) is ColumnBatch else type(s[0]) for s in segments}
    if len(kinds) == 1:
        return batches_dataframe(segments, kinds.pop())
    records: list[Any] = []
    for segment in segments:
        records += segment.records() if type(segment) is ColumnBatch else segment
    return to_dataframe(records)


def _segment_values(segment: ColumnBatch | list[Any], name: str) -> list[Any]:
    if type(segment) is ColumnBatch:
        return segment.values(name)
    return list(map(operator.attrgetter(name), segment))


def _is_object(dtype: Any) -> bool:
    """Whether a dtype is numpy's object dtype (pandas' own dtypes say kind "O" too)."""
    np = _lib("numpy")
    return isinstance(dtype, np.dtype) and dtype.kind == "O"


def _default_string_dtype(pd: Any) -> Any:
    """The dtype pandas gives a column of str ("str" in pandas 3, object before)."""
    return pd.Series(["a"]).dtype


def _fixed_piece(
    segment: ColumnBatch | list[Any], name: str, base: Any, np: Any
) -> tuple[str | None, Any, Any] | None:
    """(kind, values, mask) of a segment's column for a fixed-width kind; None when its
    values do not fit one (an int beyond 64 bits; naive and aware datetimes mixed)."""
    if type(segment) is ColumnBatch:
        column = segment.columns.get(name)
        if column is not None and column.kind in _FIXED_KINDS:
            dtype = {"float": "<f8", "bool": np.uint8}.get(column.kind, "<i8")
            values = np.frombuffer(column.data, dtype)
            mask = None
            if column.valid:
                mask = np.frombuffer(column.valid, np.uint8) == 0
            return column.kind, values, mask
    values = _segment_values(segment, name)
    mask = np.fromiter((v is None for v in values), bool, len(values))
    if mask.all():
        return None, np.zeros(len(values), np.int64), mask
    present = [v for v in values if v is not None]
    kind = _KINDS_OF[base][0]
    if base is datetime.datetime:
        aware = {v.tzinfo is not None for v in present}
        if len(aware) > 1:
            return None
        if aware.pop():
            kind = "datetime-utc"
            zone = datetime.timezone.utc
            values = [v if v is None else v.astimezone(zone).replace(tzinfo=None) for v in values]
        filled = [_EPOCH if v is None else v for v in values]
        return kind, np.array(filled, dtype="datetime64[us]").view("<i8"), mask
    filled = [0 if v is None else v for v in values] if mask.any() else values
    dtype = {int: np.int64, float: np.float64, bool: np.uint8}[base]
    try:
        return kind, np.array(filled, dtype=dtype), mask if mask.any() else None
    except OverflowError:
        return None


def _typed_column(pieces: list[Any], kind: str, rows: int, pd: Any, np: Any) -> Any:
    """A pandas column of fixed-width pieces (kind, values, mask), always a copy of them
    (so a processor or a notebook may write to it)."""
    values = np.concatenate([p[1] for p in pieces]) if pieces else np.zeros(0, np.int64)
    if len(pieces) == 1:
        values = values.copy()
    masks = [p[2] for p in pieces]
    mask = None
    if any(m is not None and m.any() for m in masks):
        mask = np.concatenate(
            [np.zeros(len(p[1]), bool) if m is None else m for p, m in zip(pieces, masks)]
        )
    index = pd.RangeIndex(rows)
    if kind == "int":
        values = values.astype(np.int64, copy=False)
        if mask is not None:
            return pd.Series(pd.arrays.IntegerArray(values, mask), index=index)
        return pd.Series(values, index=index)
    if kind == "float":
        values = values.astype(np.float64, copy=False)
        if mask is not None:
            values[mask] = np.nan
        return pd.Series(values, index=index)
    if kind == "bool":
        values = values.astype(bool)
        if mask is not None:
            return pd.Series(pd.arrays.BooleanArray(values, mask), index=index)
        return pd.Series(values, index=index)
    values = values.astype(np.int64, copy=False)
    if mask is not None:
        values[mask] = np.iinfo(np.int64).min  # NaT
    series = pd.Series(values.view("datetime64[us]"), index=index)
    return series.dt.tz_localize("UTC") if kind == "datetime-utc" else series


def _python_value(value: Any, pd: Any) -> Any:
    """A cell as a plain Python value (None for a missing one)."""
    if value is None or isinstance(value, (str, bytes, bool, int, list, dict, msgspec.Struct)):
        return value
    if isinstance(value, float):
        return None if value != value else value
    if value is pd.NaT or value is pd.NA:
        return None
    if isinstance(value, pd.Timestamp):
        return value.to_pydatetime()
    if isinstance(value, pd.Timedelta):
        return value.to_pytimedelta()
    item = getattr(value, "item", None)  # a numpy scalar
    if callable(item):
        value = item()
        if isinstance(value, float) and value != value:
            return None
    return value


# ---------------------------------------------------------------------------------------------
# 8. Async connection
# ---------------------------------------------------------------------------------------------
#
# ``await connect_async(...)`` returns an ``AsyncConnection``: the same core (``Protocol``,
# ``RecordCodec``, ``encode_record_frames``) behind an async front end. It starts no
# background task. A coroutine that waits for something (an ack, a record, MIM values) reads
# and handles what arrives, one reader at a time; every send reads at the same time, so a
# workflow that answers each record cannot stall a long push. With anyio installed it runs on
# anyio (asyncio and trio); without it, on asyncio streams. anyio is imported only here, and
# only when it is installed.

__all__ += ["AsyncConnection", "AsyncKvMap", "AsyncSubscription", "connect_async"]


def _import_anyio() -> Any:
    """anyio, or None when it is not installed (then only asyncio is supported)."""
    try:
        import anyio
    except ImportError:
        return None
    return anyio


class _AsyncioStream:
    """A byte stream over asyncio streams. Raises ``OSError`` (incl. ``ssl.SSLError``)."""

    def __init__(self, reader: Any, writer: Any) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(
        cls, host: str, port: int, context: ssl.SSLContext | None, tls_name: str
    ) -> _AsyncioStream:
        import asyncio

        tls: dict[str, Any] = {}
        if context is not None:
            tls = {"ssl": context, "server_hostname": tls_name}
        return cls(*await asyncio.open_connection(host, port, **tls))

    @staticmethod
    async def sleep(seconds: float) -> None:
        import asyncio

        await asyncio.sleep(seconds)

    @staticmethod
    def lock() -> Any:
        import asyncio

        return asyncio.Lock()

    @staticmethod
    async def with_timeout(timeout: float, function: Callable[[], Any]) -> Any:
        """``await function()``; ``TimeoutError`` if it takes more than ``timeout`` s."""
        import asyncio

        try:
            return await asyncio.wait_for(function(), timeout)
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            raise TimeoutError from None

    async def send_all(self, data: bytes | bytearray) -> None:
        self._writer.write(data)
        await self._writer.drain()

    async def send_reading(self, data: bytes | bytearray, read: Callable[[], Any]) -> None:
        """Send ``data`` while ``await read()`` runs; ``read`` is cancelled when it is sent."""
        import asyncio

        reader = asyncio.ensure_future(read())
        try:
            await self.send_all(data)
        finally:
            reader.cancel()
            await asyncio.wait([reader])
        if not reader.cancelled() and reader.exception() is not None:
            raise reader.exception()  # type: ignore[misc]

    async def receive(self) -> bytes:
        """Some bytes; ``b""`` at end of stream."""
        return await self._reader.read(1 << 18)

    async def aclose(self) -> None:
        self._writer.transport.abort()  # at once, even when cancelled; nothing is left to say
        try:
            await self._writer.wait_closed()
        except (OSError, RuntimeError):
            pass


class _AnyioStream:
    """A byte stream over anyio (asyncio or trio). Raises ``OSError`` (incl. ``ssl.SSLError``)."""

    def __init__(self, stream: Any) -> None:
        import anyio

        self._anyio = anyio
        self._stream = stream
        self._errors = (anyio.BrokenResourceError, anyio.ClosedResourceError)

    @classmethod
    async def open(
        cls, host: str, port: int, context: ssl.SSLContext | None, tls_name: str
    ) -> _AnyioStream:
        import anyio

        try:
            stream = await anyio.connect_tcp(
                host,
                port,
                tls=context is not None,
                ssl_context=context,
                tls_hostname=tls_name if context is not None else None,
                # The server may close without a TLS close_notify: that is an end of stream.
                tls_standard_compatible=False,
            )
        except (anyio.BrokenResourceError, anyio.EndOfStream) as exc:
            raise ConnectionResetError(
                "the server closed the connection during the TLS handshake"
            ) from exc
        return cls(stream)

    @staticmethod
    def lock() -> Any:
        import anyio

        return anyio.Lock()

    @staticmethod
    async def sleep(seconds: float) -> None:
        import anyio

        await anyio.sleep(seconds)

    @staticmethod
    async def with_timeout(timeout: float, function: Callable[[], Any]) -> Any:
        """``await function()``; ``TimeoutError`` if it takes more than ``timeout`` s."""
        import anyio

        with anyio.fail_after(timeout):
            return await function()

    async def send_all(self, data: bytes | bytearray) -> None:
        try:
            await self._stream.send(data)
        except self._errors as exc:
            raise ConnectionResetError(f"the connection is closed ({exc!r})") from exc

    async def send_reading(self, data: bytes | bytearray, read: Callable[[], Any]) -> None:
        """Send ``data`` while ``await read()`` runs; ``read`` is cancelled when it is sent."""
        failed: OSError | None = None
        async with self._anyio.create_task_group() as group:
            group.start_soon(read)
            try:
                await self.send_all(data)
            except OSError as exc:  # raised after the group, so that it is never grouped
                failed = exc
            group.cancel_scope.cancel()
        if failed is not None:
            raise failed

    async def receive(self) -> bytes:
        """Some bytes; ``b""`` at end of stream."""
        try:
            return bytes(await self._stream.receive(1 << 18))
        except self._anyio.EndOfStream:
            return b""
        except self._errors as exc:
            raise ConnectionResetError(f"the connection is lost ({exc!r})") from exc

    async def aclose(self) -> None:
        await self._anyio.aclose_forcefully(self._stream)


def _async_stream_kind() -> type[_AsyncioStream] | type[_AnyioStream]:
    """anyio's streams when anyio is installed (asyncio and trio), else asyncio's own."""
    if _import_anyio() is not None:
        return _AnyioStream
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        raise MZConnectorError(
            "connect_async runs on asyncio; for other event loops (trio) install anyio"
        ) from None
    return _AsyncioStream


async def _dial_async(
    dialer: _Dialer, kind: type[_AsyncioStream] | type[_AnyioStream]
) -> tuple[_AsyncioStream | _AnyioStream, Protocol, Welcome]:
    """The one connect path of the async client: the servers in random order until one
    answers; the error when none does names each and why."""
    failures = []
    for host, port in dialer.order():
        try:
            return await _dial_one_async(dialer, kind, host, port)
        except ConnectError as exc:
            failures.append((_where(host, port), exc))
    raise dialer.none_answered(failures)


async def _dial_one_async(
    dialer: _Dialer, kind: type[_AsyncioStream] | type[_AnyioStream], host: str, port: int
) -> tuple[_AsyncioStream | _AnyioStream, Protocol, Welcome]:
    handshake = dialer.handshake(host, port)
    stream: _AsyncioStream | _AnyioStream | None = None

    async def open_and_greet() -> Welcome:
        nonlocal stream
        stream = await kind.open(host, port, dialer.context, dialer.tls_name(host))
        handshake.opened()
        await stream.send_all(handshake.hello)
        while (welcome := handshake.receive(await stream.receive())) is None:
            pass
        return welcome

    try:
        with handshake.errors():
            welcome = await kind.with_timeout(dialer.timeout, open_and_greet)
        assert stream is not None
        return stream, handshake.protocol, welcome
    except BaseException:
        if stream is not None:
            await stream.aclose()
        raise


async def connect_async(
    host: str | Iterable[str] = "127.0.0.1",
    port: int = DEFAULT_PORT,
    *,
    timeout: float = 10.0,
    name: str = "",
    metadata: Mapping[str, Any] | None = None,
    client_id: str = "",
    token: str | None = None,
    tls: bool | ssl.SSLContext = False,
    cafile: str | None = None,
    certfile: str | None = None,
    keyfile: str | None = None,
    server_hostname: str | None = None,
    batch_size: int = 8192,
    max_buffered: int = 1_000_000,
    auto_reconnect: bool = False,
    reconnect_attempts: int | None = None,
    reconnect_max_delay: float = 30.0,
    keepalive: float = 15.0,
    keepalive_misses: int = 3,
    on_state_change: Callable[[AsyncConnection, ConnectionState], Any] | None = None,
) -> AsyncConnection:
    """Connect to a connector server from async code and return the open ``AsyncConnection``::

        async with await mzconnector.connect_async("127.0.0.1", 7777) as conn:
            conn.submit(conn.udrs.Subscriber(msisdn="46700000001", balance=10))
            await conn.flush()
            print(await conn.receive(), await conn.mim())

    Works under asyncio (anyio optional) and, with anyio installed, under trio. The arguments
    are those of ``connect()``, but for ``linger``: the async client runs no task in the
    background, so its ``submit`` only buffers until the next awaited call (see
    ``AsyncConnection``). ``timeout`` bounds each connect attempt, and is the default
    timeout of ``flush``, ``mim`` and ``aclose``.
    """
    dialer = _Dialer(
        host,
        port,
        timeout=timeout,
        name=name,
        metadata=metadata,
        client_id=client_id,
        client=f"mzconnector {__version__} async",
        token=token,
        keepalive=keepalive,
        keepalive_misses=keepalive_misses,
        tls=tls,
        cafile=cafile,
        certfile=certfile,
        keyfile=keyfile,
        server_hostname=server_hostname,
    )
    lifecycle = _Lifecycle(attempts=reconnect_attempts, max_delay=reconnect_max_delay)
    kind = _async_stream_kind()
    stream, protocol, welcome = await _dial_async(dialer, kind)
    try:
        conn = AsyncConnection(
            stream,
            protocol,
            welcome,
            dialer=dialer,
            timeout=timeout,
            batch_size=batch_size,
            max_buffered=max_buffered,
            auto_reconnect=auto_reconnect,
            lifecycle=lifecycle,
            on_state_change=on_state_change,
        )
    except BaseException:
        await stream.aclose()
        raise
    conn._notify()
    return conn


class AsyncConnection(_ClientBase):
    """An async connection to a connector server. Make one with ``await connect_async()``; use
    it in an ``async with`` (or ``await conn.aclose()``).

    The surface of ``Connection``, with ``await`` wherever it may wait, and the same arguments
    where they mean the same: ``receive(timeout=)`` raises ``Timeout`` and the connection stays
    usable; ``flush(timeout=)`` and ``mim(timeout=)`` raise ``ConnectionLost`` (None: the
    connect ``timeout``). Where it differs, and why:

    - Nothing runs in the background (no task outlives the call that awaits it): records the
      workflow sends are read while a call is awaited, so read results after a push
      (``receive``, ``receive_many``, ``records``, ``async for``). A server drops what a client
      leaves unread for its ``delivery_timeout`` (5 s by default).
    - So ``submit`` only buffers, and there is no ``linger``: the buffer is sent by the next
      awaited call (``submit_many``, ``flush``, ``receive``, ``receive_many``, ``mim``,
      ``aclose``). ``receive_many(timeout=None)`` waits for the first record by default,
      where the blocking client returns what its background reader buffered (``timeout=0``).
    - ``max_buffered`` bounds the records read while a send is under way; a call that waits
      for the server reads on regardless.
    - Staying connected happens in awaited calls too: a broken link is noticed, and the
      keepalive pings, while a call is awaited; with ``auto_reconnect`` the next call that
      needs the link reconnects (one task at a time; the others wait for it, bounded by their
      timeout), and ``state`` is ``RECONNECTING`` until then. ``on_state_change`` is called
      by the task that made the change, outside the connection's locks.

    API modules (``conn.api``) get the coroutine functions as ``receive``, ``flush``, ``mim``
    and ``submit_many``: a function that returns what they return is awaited
    (``await conn.api.round_trip(...)``).
    """

    def __init__(
        self,
        stream: _AsyncioStream | _AnyioStream,
        protocol: Protocol,
        welcome: Welcome,
        *,
        dialer: _Dialer,
        timeout: float,
        batch_size: int,
        max_buffered: int,
        auto_reconnect: bool,
        lifecycle: _Lifecycle,
        on_state_change: Callable[[AsyncConnection, ConnectionState], Any] | None,
    ) -> None:
        super().__init__(
            protocol,
            welcome,
            timeout=timeout,
            dialer=dialer,
            auto_reconnect=auto_reconnect,
            lifecycle=lifecycle,
            on_state_change=on_state_change,
        )
        self._stream = stream
        self._kind = type(stream)
        self._stream_open = True
        self._batch_size = max(1, batch_size)
        self._max_buffered = max_buffered
        # Lock order: _relink_lock, then _send_lock, then _read_lock (a send reads meanwhile).
        self._send_lock = stream.lock()
        self._read_lock = stream.lock()
        self._relink_lock = stream.lock()
        self._attempt = 0  # reconnection attempts since the link was lost
        self._one_pass = not auto_reconnect  # reconnect(): each server once
        self._notifying = False
        self._load_api(welcome.api)
        self._handle()
        if self._closed is None and self._down is None:
            self._change(_CONNECTED)

    # -- context manager, iteration and state -----------------------------------------------
    async def __aenter__(self) -> AsyncConnection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __aiter__(self) -> AsyncConnection:
        return self

    async def __anext__(self) -> Any:
        """``async for record in conn``: records as they arrive, until the connection closes."""
        try:
            return await self.receive()
        except ConnectionClosed:
            raise StopAsyncIteration from None

    def _check(self) -> None:
        """Raise what the server told us since the last call."""
        self._notify()
        if self._errors:
            raise self._refusal()
        if self._closed is not None:
            raise self._closed_error()

    def _unacknowledged(self) -> list[Any]:
        return self._ledger.unacknowledged() + self._buf

    def _change(self, state: ConnectionState) -> None:
        """Go to ``state``; ``_notify`` tells ``on_state_change`` (outside the locks)."""
        if self._lifecycle.change(state) and self._on_state_change is None:
            self._lifecycle.changes.clear()

    def _notify(self) -> None:
        """Call ``on_state_change`` for each change not yet told, in order. Called where the
        task holds none of the connection's locks; a callback that changes the state again
        (closing the connection, say) is told of that after it returns."""
        callback = self._on_state_change
        changes = self._lifecycle.changes
        if callback is None or self._notifying:
            return
        self._notifying = True
        try:
            while changes:
                state = changes.popleft()
                try:
                    callback(self, state)
                except Exception:
                    print(f"mzconnector: on_state_change({state}) raised:", file=sys.stderr)
                    traceback.print_exc()
        finally:
            self._notifying = False

    # -- submitting -------------------------------------------------------------------------
    def submit(self, record: Any) -> None:
        """Buffer one record (or bytes); it is sent by the next awaited call. Raises
        ``NotAccepted`` (nothing is buffered) for a type the connector does not accept."""
        if type(record) not in self._accepted_classes:
            raise self._not_accepted(record)
        if self._errors or self._closed is not None:
            self._check()
        self._buf.append(record)

    async def submit_many(self, records: Iterable[Any], *, progress: bool = False) -> int:
        """Send many records, a batch at a time; returns how many. ``progress=True`` shows a
        tqdm bar (``tqdm.auto``). While reconnecting it waits for the link (at most the
        connect ``timeout`` per batch)."""
        bar = _progress_bar(records) if progress else None
        count = 0
        try:
            for chunk in _chunks(records, self._batch_size):
                for record in chunk:
                    if type(record) not in self._accepted_classes:
                        raise self._not_accepted(record)
                self._check()
                self._buf.extend(chunk)
                await self._within(
                    self.timeout, self._send, lambda: self._still_reconnecting(self.timeout)
                )
                count += len(chunk)
                if bar is not None:
                    bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()
        return count

    async def submit_frame(self, df: Any, type_name: str | type) -> int:
        """Send the rows of a pandas DataFrame as records of ``type_name``, a column batch at
        a time; returns the number of rows. As ``Connection.submit_frame``: everything is
        checked before anything is sent, records submitted before go first, and ``flush``
        acknowledges the rows; while reconnecting, each batch waits for the link (at most the
        connect ``timeout``) and batches not acknowledged are resent."""
        prepared, plan = self._frame_plan(df, type_name)
        self._check()
        for start, stop in plan:
            await self._within(
                self.timeout,
                lambda: self._send_columns(prepared, start, stop),  # noqa: B023 (awaited here)
                lambda: self._still_reconnecting(self.timeout),
            )
        return prepared.rows

    async def _send_columns(self, prepared: FrameColumns, start: int, stop: int) -> None:
        """Send one column batch after what was submitted before it, on a live link."""
        while True:
            await self._send()
            if self._down is not None:
                await self._ensure_link()
                continue
            async with self._send_lock:
                if self._down is not None or self._buf:
                    continue
                frame = self._ledger.columns(prepared, start, stop)
                self._protocol.send_columns([frame])
                # (A batch sent on a link that breaks is in the ledger: resent.)
                await self._send_data(frame)
                return

    async def flush(self, timeout: float | None = None) -> None:
        """Send everything submitted and return once the server has taken all of it. Raises
        ``RecordRefused`` if it refused any, and ``ConnectionLost`` (the connection is given
        up) when the server does not take it within ``timeout`` seconds (None: the connect
        ``timeout``); with ``auto_reconnect``, a ``Timeout`` instead, and the connection
        reconnects and resends with the next call."""
        self._check()
        limit = self.timeout if timeout is None else timeout

        async def flushed() -> None:
            target = self._ledger.sent + len(self._buf)
            # (If the link breaks after this, the reconnection sends a Flush of its own.)
            await self._send(Flush())
            await self._until(lambda: self._acked >= target or bool(self._errors))

        await self._within(
            limit,
            flushed,
            lambda: self._give_up(f"flush: no answer from the server within {limit} s"),
        )
        self._check()

    async def _send(
        self,
        message: Message | None = None,
        *,
        needs_link: bool = True,
        before: Callable[[], None] | None = None,
    ) -> int:
        """Send the buffered records (a batch at a time), then ``message``; returns the number
        of the link they went on. While the link is down, reconnect first (or, with
        ``needs_link=False``, send nothing: 0). ``before`` runs just before ``message`` is
        sent (what registers its conversation)."""
        while True:
            if message is None and not self._buf and not self._cancels and not self._owed:
                return self._generation
            if self._closed is not None:
                raise self._closed_error()
            if self._down is not None:
                if not needs_link:
                    return 0
                await self._ensure_link()
                continue
            async with self._send_lock:
                if self._down is not None or self._closed is not None:
                    continue
                link = self._generation
                while self._buf and self._down is None:
                    chunk = self._buf[: self._batch_size]
                    frames, errors = self._ledger.frames(chunk)
                    del self._buf[: len(chunk)]
                    self._errors.extend(errors)
                    if not frames:
                        continue
                    self._protocol.send_records(frames)
                    # (A batch sent on a link that breaks is in the ledger: resent.)
                    await self._send_data(frames[0] if len(frames) == 1 else b"".join(frames))
                while self._cancels and self._down is None:
                    await self._send_data(self._protocol.send(CancelQuery(self._cancels.pop())))
                if message is not None and self._down is None:
                    if before is not None:
                        before()
                    await self._send_data(self._protocol.send(message))
                while self._owed and self._down is None:
                    await self._send_data(self._protocol.send(self._owed.popleft()), read=False)
            self._notify()
            return link

    async def _send_data(self, data: bytes | bytearray, *, read: bool = True) -> None:
        """Send on the link (reading meanwhile, unless ``read=False``). A link that breaks is
        lost (with ``auto_reconnect`` this returns; without, raises ``ConnectionClosed``)."""
        if self._closed is not None:
            raise self._closed_error()
        if self._down is not None:
            return
        sent = False
        try:
            if read:
                await self._stream.send_reading(data, self._read_while_sending)
            else:
                await self._stream.send_all(data)
            sent = True
        except OSError as exc:
            sent = True
            self._link_lost(f"lost the connection while sending: {exc}")
            if self._closed is not None:
                raise ConnectionClosed(self._closed, self._unacknowledged()) from exc
        finally:
            if not sent and self._closed is None:  # cancelled: a frame may be cut short
                reason = "a send was cancelled midway"
                if self._auto and not self._closing:
                    self._link_lost(reason)
                else:
                    self._mark_closed(f"{reason}; the connection cannot be used")

    async def _read_while_sending(self) -> None:
        """What arrives while a send is under way (so that a workflow that answers every
        record cannot stall a long push), up to ``max_buffered`` records."""
        async with self._read_lock:
            while (
                self._closed is None
                and self._down is None
                and len(self._inbox) + self._chunk_rows < self._max_buffered
            ):
                await self._pump()

    # -- receiving --------------------------------------------------------------------------
    async def receive(self, timeout: float | None = None) -> Any:
        """The next record the workflow sent to this client (sends buffered submits first).
        Waits at most ``timeout`` seconds (forever if None), then raises ``Timeout``; the
        connection stays usable. Raises ``RecordRefused`` first if records were refused.
        Records received before a link broke stay buffered."""
        if self._errors:
            self._check()
        if not self._inbox:
            await self._within(
                timeout,
                lambda: self._arrival(),
                lambda: Timeout(f"receive: no record within {timeout} s"),
            )
            if self._errors:
                self._check()
        record = self._inbox.popleft()
        if type(record) is ColumnBatch:
            record = self._expand(record)
        return record

    async def _arrival(self) -> None:
        await self._send()
        await self._until(lambda: bool(self._inbox or self._errors))

    async def receive_many(
        self, max_records: int | None = None, timeout: float | None = None
    ) -> list[Any]:
        """Every record received so far (at most ``max_records``); if there is none, waits up
        to ``timeout`` seconds (forever if None) for the first. Returns an empty list on
        timeout. Raises ``RecordRefused`` first if records were refused."""
        if self._errors:
            self._check()
        if not self._inbox:
            try:
                await self._within(timeout, self._arrival, Timeout)
            except Timeout:
                return []
            if self._errors:
                self._check()
        elif self._down is None:
            await self._send()
        return self._take_records(max_records)

    async def receive_frame(
        self, max_records: int | None = None, timeout: float | None = 0.0
    ) -> Any:
        """What has arrived, as a pandas DataFrame (at most ``max_records`` rows); if nothing
        has, waits up to ``timeout`` s (None: forever) for the first, and returns an empty
        DataFrame on timeout. As ``Connection.receive_frame``; read results after a push (see
        the class)."""
        pd = _import_pandas()
        if self._errors:
            self._check()
        if self._down is None:
            await self._send()  # outside the timeout: a send is never cut short by it
        if not self._inbox:
            try:
                await self._within(
                    timeout,
                    lambda: self._until(lambda: bool(self._inbox or self._errors)),
                    Timeout,
                )
            except Timeout:
                return pd.DataFrame()
            if self._errors:
                self._check()
        return _segments_frame(self._take_frame(max_records))

    async def records(self, timeout: float | None = None) -> AsyncIterator[Any]:
        """Records as they arrive; ends when none arrives within ``timeout`` (never, if None)
        or when the connection closes."""
        while True:
            try:
                record = await self.receive(timeout)
            except (Timeout, ConnectionClosed):
                return
            yield record

    async def mim(self, timeout: float | None = None) -> MimValues:
        """The workflow's MIM values now: built-in counters and assigned values. Raises
        ``ConnectionLost`` when the server does not answer within ``timeout`` seconds (None:
        the connect ``timeout``); with ``auto_reconnect``, ``Timeout``."""
        self._check()
        limit = self.timeout if timeout is None else timeout

        async def answered() -> None:
            while True:
                link = await self._send(GetMim())
                await self._until(
                    lambda link=link: bool(self._mim_replies) or self._generation != link
                )
                if self._mim_replies or self._errors or self._closed is not None:
                    return
                # The link was lost before the answer came: ask the new one.

        await self._within(
            limit,
            answered,
            lambda: self._give_up(f"mim: no answer from the server within {limit} s"),
        )
        if not self._mim_replies:  # closed, with refusals to report first
            self._check()
        return MimValues(self._mim_replies.popleft())

    async def _until(self, ready: Callable[[], bool]) -> None:
        """Read and handle what arrives, one reader at a time, until ``ready()``; reconnect
        first while the link is down. Raises ``ConnectionClosed`` once the connection is
        gone."""
        while not ready():
            self._notify()
            if self._closed is not None:
                if self._errors:  # raised first, by the caller
                    return
                raise self._closed_error()
            if self._down is not None:
                await self._ensure_link()
                continue
            async with self._read_lock:
                if not ready() and self._closed is None and self._down is None:
                    await self._pump()
        self._notify()

    async def _within(
        self,
        timeout: float | None,
        function: Callable[[], Awaitable[Any]],
        expired: Callable[[], MZConnectorError],
    ) -> None:
        """``await function()``; after ``timeout`` seconds (None: no limit) it is cancelled,
        by the event loop's own timeout, and ``expired()`` is raised."""
        try:
            if timeout is None:
                await function()
                return
            try:
                await self._stream.with_timeout(timeout, function)
            except TimeoutError as exc:
                if isinstance(exc, MZConnectorError):  # ours (a Timeout is a TimeoutError)
                    raise
                raise expired() from None
        finally:
            self._notify()

    async def _pump(self) -> None:
        """Read once (until the keepalive's next deadline, if on) and handle what arrived;
        ping an idle link when the keepalive says so. The caller holds ``_read_lock``."""
        stream, ka = self._stream, self._ka
        data: bytes | None = None
        try:
            if ka is None:
                data = await stream.receive()
            else:
                wait = ka.deadline - time.monotonic()
                if wait > 0:
                    try:
                        data = await self._kind.with_timeout(wait, stream.receive)
                    except TimeoutError:
                        data = None
        except OSError as exc:
            if stream is self._stream:
                self._link_lost(f"connection lost: {exc}")
            return
        if stream is not self._stream or self._closed is not None:
            return
        if data is not None:
            if ka is not None:
                ka.heard()
            self._handle(data)
        if ka is not None and ka is self._ka and time.monotonic() >= ka.deadline:
            ping = ka.tick(time.monotonic())
            if ka.dead:
                self._link_lost(
                    f"no answer from the server to {ka.misses} pings, {ka.interval} s apart",
                    lost=True,
                )
            elif ping is not None:
                self._owed.append(ping)
        if self._owed and self._down is None and not self._send_lock.locked():
            # (A sender holding the send lock sends them with its next frames.)
            async with self._send_lock:
                while self._owed and self._down is None and self._closed is None:
                    await self._send_data(self._protocol.send(self._owed.popleft()), read=False)

    def _on_event(self, event: Any) -> bool:
        """Handle one event; True when the link is over."""
        if isinstance(event, Records):
            self._inbox.extend(_decode_items(self._decoder, event.items))
            return False
        if type(event) is Columns:
            batch = self._received_columns(event)
            if batch.rows:
                self._add_columns(batch)
            return False
        return self._apply(event)

    def _mark_closed(
        self, reason: str, *, raw: Message | None = None, final: ConnectionClosed | None = None
    ) -> None:
        if self._closed is None:
            super()._mark_closed(reason, raw=raw, final=final)
            self._down = None
            if self._lifecycle.state is not _DISCONNECTING:
                self._change(_DISCONNECTED)

    # -- staying connected ------------------------------------------------------------------
    def _link_lost(self, reason: str, *, lost: bool = False, raw: Message | None = None) -> None:
        """The link broke. Without ``auto_reconnect`` (or while closing) the connection is
        over; with it, the next call that needs the link reconnects."""
        if self._closed is not None or self._down is not None:
            return
        if not self._auto or self._closing:
            self._mark_closed(reason, raw=raw, final=ConnectionLost(reason) if lost else None)
            return
        self._down = reason
        self._attempt = 0
        self._one_pass = False
        self._change(_RECONNECTING)

    async def _ensure_link(self) -> None:
        """While the link is down: reconnect (one task at a time; the others wait for it).
        Raises the closed connection's error when it cannot."""
        while self._down is not None and self._closed is None:
            async with self._relink_lock:
                if self._down is not None and self._closed is None:
                    await self._reconnect()
            self._notify()
        if self._closed is not None:
            raise self._closed_error()

    async def _drop_stream(self) -> None:
        """Close the current stream (once): whoever waits in it wakes."""
        if self._stream_open:
            self._stream_open = False
            await self._stream.aclose()

    async def _reconnect(self) -> None:
        """Attempts with backoff until a new link is up and resumed, the attempts run out,
        or the connection is closed. The caller holds ``_relink_lock``; a cancelled wait
        (the caller's timeout) leaves the count of attempts for the next call."""
        lifecycle = self._lifecycle
        await self._drop_stream()
        while self._down is not None and self._closed is None:
            self._attempt += 1
            delay = 0.0 if self._one_pass else lifecycle.delay(self._attempt)
            if delay:
                await self._kind.sleep(delay)
            try:
                stream, protocol, welcome = await _dial_async(self._dialer, self._kind)
            except ConnectError as exc:
                if (
                    self._one_pass
                    or isinstance(exc, _FINAL_REFUSALS)
                    or lifecycle.exhausted(self._attempt)
                ):
                    self._reconnect_failed(exc, self._attempt)
                    return
                continue
            try:
                await self._relink(stream, protocol, welcome)
            except (SchemaChanged, ApiModuleError, LocalProtocolError) as exc:
                await stream.aclose()
                self._reconnect_failed(exc, self._attempt)
                return
            except BaseException:
                if stream is not self._stream:
                    await stream.aclose()
                raise

    def _reconnect_failed(self, exc: MZConnectorError, attempts: int) -> None:
        """No new link: the connection is over; the next call raises why."""
        if isinstance(exc, SchemaChanged):
            final: ConnectionClosed = exc
            reason = str(exc)
        else:
            tries = f" after {attempts} attempt{'s' if attempts > 1 else ''}"
            reason = f"could not reconnect{tries}: {exc}"
            final = ConnectionClosed(reason)
            final.__cause__ = exc
        self._mark_closed(reason, final=final)

    async def _relink(
        self, stream: _AsyncioStream | _AnyioStream, protocol: Protocol, welcome: Welcome
    ) -> None:
        """Resume on a new link: check the record types, reload the API modules, install the
        link, then, before any other sender may send, make the subscriptions again and resend
        what was not acknowledged (and a ``Flush``, for whoever waits for acknowledgements)."""
        changes = _schema_changes(self._schema, welcome.schema)
        if changes:
            raise SchemaChanged(changes)
        protocol.max_frame_size = welcome.max_frame_size
        self._load_api(welcome.api)
        async with self._send_lock:
            async with self._read_lock:
                if self._closed is not None:
                    await stream.aclose()
                    return
                self._stream, self._protocol, self._stream_open = stream, protocol, True
                frames, messages = self._resume_plan(welcome)
                self._down = None
                self._attempt = 0
                self._one_pass = not self._auto
                self._handle()  # what arrived with the Welcome
                if self._closed is None and self._down is None:
                    self._change(_CONNECTED)
            for message in messages:
                await self._send_data(protocol.send(message))
            if frames:
                protocol.send_records(frames)
                await self._send_data(b"".join(frames))
            await self._send_data(protocol.send(Flush()))

    async def reconnect(self, timeout: float | None = None) -> None:
        """Drop the link (if there is one) and connect again now, as ``auto_reconnect``
        does when a link breaks; also brings back a connection that was lost. Without
        ``auto_reconnect`` it tries each server once. Returns once connected; raises what
        ended the attempts, or ``Timeout`` after ``timeout`` s (None: the connect
        ``timeout``) while it still tries."""
        limit = self.timeout if timeout is None else timeout
        if self._closing or self._failure is not None:
            raise self._closed_error()
        if self._closed is not None:  # a lost connection, brought back
            self._closed = self._closed_raw = self._final = None
            self._down = "reconnecting on demand"
            self._change(_RECONNECTING)
        elif self._down is None:
            self._down = "reconnecting on demand"
            self._change(_RECONNECTING)
        self._attempt = 0
        self._one_pass = not self._auto
        await self._within(limit, self._ensure_link, lambda: self._still_reconnecting(limit))

    # -- conversations ----------------------------------------------------------------------
    def query(self, name: str, request: Any, *, timeout: float | None = None) -> AsyncIterator[Any]:
        """Ask query ``name`` with ``request``: ``async for reply in conn.query(...)``. As
        ``Connection.query``: a ``QueryError`` at once for an unknown query or a request that
        does not fit; ``timeout`` bounds the whole query; leaving early cancels it;
        ``ConnectionLost`` when the link breaks while it is in flight."""
        message, call = self._start_query(name, request)
        self._check()
        return self._replies(message, call, timeout)

    async def query_one(self, name: str, request: Any, *, timeout: float | None = None) -> Any:
        """Ask query ``name`` and return its one reply; ``QueryError`` if it gives none or
        more than one."""
        replies = [reply async for reply in self.query(name, request, timeout=timeout)]
        if len(replies) != 1:
            raise QueryError("not-one", "query {0} gave {1} replies, not one", [name, len(replies)])
        return replies[0]

    async def _replies(
        self, message: Query, call: _Call, timeout: float | None
    ) -> AsyncIterator[Any]:
        deadline = None if timeout is None else time.monotonic() + timeout
        expired = lambda: Timeout(f"query {call.name!r}: no answer within {timeout} s")  # noqa: E731
        try:
            await self._within(
                timeout,
                lambda: self._send(message, before=lambda: self._calls.update({call.id: call})),
                expired,
            )
            while True:
                if call.replies:
                    yield call.replies.popleft()
                    continue
                if call.done:
                    break
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                await self._within(
                    remaining,
                    lambda: self._until(lambda: bool(call.replies) or call.done),
                    expired,
                )
            if call.error is not None:
                raise call.error
        finally:
            if self._calls.pop(call.id, None) is not None and not call.done:
                self._cancels.append(call.id)
                # Told now if this task may still await; else with the next message sent.
                with contextlib.suppress(Exception):
                    await self._send(needs_link=False)

    async def subscribe(
        self,
        route: str,
        matcher: Mapping[str, Any] | None = None,
        *,
        ack: str = "auto",
        max_pending: int = 1000,
        durable: str | None = None,
        type: str = "standard",  # the contract's name, though it shadows a builtin
        key: str | None = None,
        tap: bool = False,
        timeout: float | None = None,
    ) -> AsyncSubscription:
        """``await conn.subscribe(...)``: an ``AsyncSubscription``; see
        ``Connection.subscribe``. It is made again on every reconnection."""
        message, state = self._start_subscription(
            route, matcher, ack, max_pending, durable, type, key, tap
        )

        def register() -> None:  # before the answer: its records may follow at once
            self._subs[state.id] = state

        self._subscribed(state, await self._request(message, timeout, register))
        return AsyncSubscription(self, state)

    def kv(self, name: str) -> AsyncKvMap:
        """The shared key-value map ``name``, with awaited methods (``AsyncKvMap``)."""
        return AsyncKvMap(self, name)

    async def _request(
        self,
        message: Subscribe | SubscriptionControl | KvRequest,
        timeout: float | None,
        register: Callable[[], None] | None = None,
    ) -> Answer:
        """Send a request and wait for its ``Answer`` (at most ``timeout`` s, None: the
        connect ``timeout``; then the link is taken for lost). ``ConnectionLost`` if the
        link breaks while it is in flight."""
        self._check()
        limit = self.timeout if timeout is None else timeout

        def before() -> None:
            self._answers[message.id] = None
            if register is not None:
                register()

        async def answered() -> None:
            await self._send(message, before=before)
            await self._until(lambda: self._answers.get(message.id) is not None)

        try:
            await self._within(
                limit,
                answered,
                lambda: self._give_up(f"no answer from the server within {limit} s"),
            )
        except BaseException:
            self._answers.pop(message.id, None)
            raise
        return self._take_answer(message)

    # -- closing ----------------------------------------------------------------------------
    async def aclose(self, timeout: float | None = None) -> None:
        """Send what is buffered, say goodbye and close; waits at most ``timeout`` seconds
        (None: the connect ``timeout``) for the server to close its side. Closes even when
        cancelled. Safe to call twice. While reconnecting, it stops (nothing is sent)."""
        self._closing = True
        if self._closed is None:
            self._change(_DISCONNECTING)
        try:
            if self._closed is None and self._down is None:
                limit = self.timeout if timeout is None else timeout

                async def goodbye() -> None:
                    if await self._send(Bye("client closed"), needs_link=False):
                        await self._until(lambda: self._closed is not None)

                try:
                    await self._within(
                        limit,
                        goodbye,
                        lambda: self._give_up(f"close: no answer from the server within {limit} s"),
                    )
                except ConnectionClosed:
                    pass
        finally:
            if self._closed is None or self._lifecycle.state is _DISCONNECTING:
                self._closed = None
                self._mark_closed("closed by the client")
                self._closed_raw = self._final = None
            if self._lifecycle.state is not _DISCONNECTED:
                self._change(_DISCONNECTED)
            self._stream_open = True  # (whatever happened, close the stream now)
            await self._drop_stream()
            self._notify()


class AsyncSubscription(_SubscriptionBase):
    """A subscription of the async client (``await conn.subscribe(...)``): ``async for record
    in sub``, ``await sub.receive(timeout=None)``, and ``await`` for ``stop``, ``start``,
    ``close``, ``ack`` and ``ack_all``; otherwise as ``Subscription``."""

    _conn: AsyncConnection

    async def receive(self, timeout: float | None = None) -> Any:
        """The next record; ``Timeout`` after ``timeout`` seconds (forever if None);
        ``SubscriptionError`` once the subscription is closed."""
        conn, state = self._conn, self._state
        if not state.inbox and state.closed is None:
            await conn._within(
                timeout,
                lambda: conn._until(lambda: bool(state.inbox) or state.closed is not None),
                lambda: Timeout(f"subscription on {self.route!r}: no record within {timeout} s"),
            )
        if not state.inbox:
            raise SubscriptionError(f"the subscription is closed: {state.closed}")
        record, ack = state.hand_out()
        if ack is not None:
            await conn._send(ack, needs_link=False)
        return record

    def __aiter__(self) -> AsyncSubscription:
        return self

    async def __anext__(self) -> Any:
        try:
            return await self.receive()
        except (SubscriptionError, ConnectionClosed):
            raise StopAsyncIteration from None

    async def ack(self, record: Any) -> None:
        await self._send_ack(record, through=False)

    async def ack_all(self, record: Any) -> None:
        await self._send_ack(record, through=True)

    async def _send_ack(self, record: Any, through: bool) -> None:
        ack = self._state.ack(record, through)
        if ack is not None:  # (None: handed out before a reconnection)
            await self._conn._send(ack, needs_link=False)

    async def stop(self, timeout: float | None = None) -> None:
        await self._control("stop", timeout)

    async def start(self, timeout: float | None = None) -> None:
        await self._control("start", timeout)

    async def close(self, timeout: float | None = None) -> None:
        """End the subscription (and any iteration of it). Safe to call twice."""
        if self._state.closed is None and not self._conn.closed:
            await self._control("close", timeout)
        self._state.closed = self._state.closed or "closed by the client"
        self._conn._subs.pop(self._state.id, None)
        self._state.inbox.clear()

    async def __aenter__(self) -> AsyncSubscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _control(self, op: str, timeout: float | None) -> None:
        if self._state.closed is not None:
            raise SubscriptionError(f"the subscription is closed: {self._state.closed}")
        # A control message carries the subscription's id; its answer comes back under it.
        request = SubscriptionControl(self._state.id, op)
        answer = await self._conn._request(request, timeout)
        if answer.error:
            raise _with_raw(SubscriptionError(answer.error), answer)
        self._state.stopped = op == "stop"


class AsyncKvMap:
    """A shared key-value map of the async client (``conn.kv(name)``): the methods of
    ``KvMap``, awaited (``await m.get(key)``, ``await m.set(key, value)``, ``remove``,
    ``items``, ``keys``, ``contains``, ``length``). The dict forms (``m[key]``) cannot await:
    they are the blocking map's."""

    def __init__(self, conn: AsyncConnection, name: str) -> None:
        self._conn = conn
        self.name = name

    def __repr__(self) -> str:
        return f"<mzconnector.AsyncKvMap {self.name!r}>"

    async def _do(self, op: str, key: Any = None, value: Any = None) -> Any:
        request = self._conn._kv_request(self.name, op, key, value)
        return self._conn._kv_result(request, await self._conn._request(request, None))

    async def get(self, key: str | int, default: Any = None) -> Any:
        value = await self._do("get", key)
        return default if value is _NOTHING else value

    async def set(self, key: str | int, value: Any) -> None:
        await self._do("set", key, value)

    async def remove(self, key: str | int) -> bool:
        return bool(await self._do("remove", key))

    async def items(self) -> list[tuple[Any, Any]]:
        return list(await self._do("items"))

    async def keys(self) -> list[Any]:
        return [key for key, _ in await self.items()]

    async def contains(self, key: str | int) -> bool:
        return await self._do("get", key) is not _NOTHING

    async def length(self) -> int:
        return int(await self._do("len"))


# ---------------------------------------------------------------------------------------------
# 9. Command line: mzconnector COMMAND (also python mzconnector.py COMMAND), record and replay
# ---------------------------------------------------------------------------------------------
#
# Commands: mim, types, api, submit TYPE, tail ROUTE, query NAME JSON, smoke, record ROUTE FILE,
# replay FILE; tail and record subscribe to ROUTE (--match: a matcher) or tap it, for as long
# as they run; query prints each reply as it arrives. With --json every output is one JSON
# document per line, keys sorted, records as objects with a "_type" field, datetimes in ISO
# 8601, bytes in base64; the same shape is the recording format (JSON lines), so what
# `tail --json` prints, `submit` and `replay` take.
# Exit status (EXIT_*): one code per class of failure; the error goes to stderr in one line
# (JSON with --json), with any token taken out.

__all__ += ["ReplayReport", "main", "record", "replay"]

EXIT_OK = 0
EXIT_FAILED = 1  # anything else: the connection closed midway, a file cannot be written, ...
EXIT_USAGE = 2  # bad arguments or input (an unknown type or query, JSON, a matcher)
EXIT_CONNECT = 3  # cannot connect (no server there, TLS, handshake, an API module)
EXIT_REFUSED = 4  # refused: the connection (limit, workflow, authentication) or records
EXIT_PROTOCOL = 5  # protocol error: not an mzconnector server, or one that broke the protocol
EXIT_TIMEOUT = 6  # no answer within --timeout (connected; while connecting it is EXIT_CONNECT)
EXIT_INTERRUPTED = 130  # Ctrl-C (tail and record end normally on it: 0)

#: The environment variable a token is read from when --token-env names none.
TOKEN_ENV = TOKEN_VARIABLE
#: The first line of a JSON lines recording says what it is.
_RECORDING = "mzconnector recording"


class _UsageError(MZConnectorError):
    """Bad arguments or input: exit status ``EXIT_USAGE``."""


class ReplayReport(msgspec.Struct, kw_only=True):
    """What ``replay`` did: records ``sent`` (taken or refused by the server), the server's
    ``refused`` (``RecordError``, index = position among the replayed records) and how many
    more it counted without describing (``omitted``), records of a type the connector does not
    accept (``not_accepted``, not sent) and recorded objects that are not records
    (``skipped``)."""

    sent: int = 0
    refused: list[RecordError] = []
    omitted: int = 0
    not_accepted: int = 0
    skipped: int = 0


# -- JSON: records and values as plain, deterministic data ------------------------------------


def _plain(value: Any) -> Any:
    """A value as JSON data: records as objects with ``_type``, datetimes in ISO 8601, bytes
    in base64, non-finite floats as strings; anything else as ``{"_type": "object", ...}``."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        finite = value == value and abs(value) != float("inf")  # JSON has no NaN, no inf
        return value if finite else str(value)
    if isinstance(value, msgspec.Struct):
        out = {"_type": type(value).__name__}
        out.update((f, _plain(getattr(value, f))) for f in value.__struct_fields__)
        return out
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _b64(bytes(value))
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return {"_type": "object", "class": _qualname(value), "repr": repr(value)[:1000]}


def _record_json(record: Any) -> Any:
    """One received item as a JSON object with ``_type``: a record, ``bytes`` (``data`` in
    base64), or ``object`` (another Python object the workflow sent: its class, its
    ``repr``, and its ``value`` when it is plain data)."""
    if isinstance(record, (bytes, bytearray, memoryview)):
        return {"_type": "bytes", "data": _b64(bytes(record))}
    if isinstance(record, msgspec.Struct):
        return _plain(record)
    out = {"_type": "object", "class": _qualname(record), "repr": repr(record)[:1000]}
    if record is None or isinstance(record, (bool, int, float, str, list, tuple, dict)):
        out["value"] = _plain(record)
    return out


def _qualname(value: Any) -> str:
    kind = type(value)
    return f"{kind.__module__}.{kind.__qualname__}"


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode("ascii")


def _dumps(document: Any) -> str:
    """One deterministic JSON line: keys sorted, compact, UTF-8."""
    import json

    return json.dumps(_plain(document), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _from_json(value: Any, kind: Any, codec: RecordCodec, where: str) -> Any:
    """JSON data back into a value of ``kind`` (a field's declared type): nested records from
    objects with ``_type``, datetimes from ISO 8601, bytes from base64. Raises ``ValueError``
    naming ``where``."""
    if isinstance(kind, type) and issubclass(kind, msgspec.Struct):
        return _record_from_json(value, codec, where, expected=kind)
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is Union:  # T | None
        if value is None:
            return None
        kind = next(a for a in args if a is not type(None))
        return _from_json(value, kind, codec, where)
    if origin is list and isinstance(value, list):
        return [_from_json(v, args[0], codec, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict and isinstance(value, dict):
        return {k: _from_json(v, args[1], codec, f"{where}[{k!r}]") for k, v in value.items()}
    try:
        return msgspec.convert(value, kind, strict=False)
    except msgspec.ValidationError:
        raise ValueError(f"{where}: expected {type_name(kind)}, got {_describe(value)}") from None


def _record_from_json(data: Any, codec: RecordCodec, where: str, *, expected: Any = None) -> Any:
    """A record (or bytes) from its JSON object. ``expected``: the record class it must be."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected an object with the record's fields")
    fields = dict(data)
    name = fields.pop("_type", None)
    if expected is not None:
        wanted = "bytes" if expected is bytes else expected.__name__
        if name is not None and name != wanted:
            raise ValueError(f"{where}: a {name} where a {wanted} is expected")
        name = wanted
    if name == "bytes":
        return _from_json(fields.get("data"), bytes, codec, f"{where}.data")
    cls = codec.types.get(name) if isinstance(name, str) else None
    if cls is None:
        known = ", ".join([*codec.types, "bytes"])
        raise ValueError(f"{where}: unknown record type {name!r} (this workflow has: {known})")
    declared = {f.name: f for f in msgspec.structs.fields(cls)}
    unknown = [f for f in fields if f not in declared]
    if unknown:
        raise ValueError(f"{where}: {name} has no field {unknown[0]!r}")
    values = {}
    for field, info in declared.items():
        if field in fields:
            values[field] = _from_json(fields[field], info.type, codec, f"{where}.{field}")
        elif info.required:
            raise ValueError(f"{where}: {name}.{field} is missing")
    return cls(**values)


# -- record and replay ------------------------------------------------------------------------


def record(
    conn: Connection,
    route: str | Subscription,
    path: str,
    *,
    matcher: Mapping[str, Any] | None = None,
    max_records: int | None = None,
    seconds: float | None = None,
    format: str | None = None,
) -> int:
    """Write the records that arrive on ``route`` to ``path``, each with its arrival time,
    until ``max_records`` have arrived or ``seconds`` have passed (None: until interrupted,
    e.g. by interrupting the notebook's kernel; what arrived so far is in the file). Returns
    how many.

    ``route``: one of ``conn.routes`` (subscribed to, with ``matcher``, for the recording),
    one of ``conn.taps`` (tapped), or a ``Subscription`` made before (it stays open). A server
    that offers no routes (one without subscriptions) gives what it sends this client.
    ``format``: ``"jsonl"`` (JSON lines, the default) or ``"parquet"`` (the default for a path
    ending in ``.parquet``; needs pyarrow).
    """
    kind = _recording_format(path, format)
    with _incoming(conn, route, matcher) as receive:
        header = {
            "_recording": _RECORDING,
            "version": 1,
            "workflow": conn.workflow,
            "route": route if isinstance(route, str) else route.route,
            "schema": conn._codec.schema,
            "started": datetime.datetime.now(datetime.timezone.utc),
        }
        return _record_to(receive, path, kind, header, max_records, seconds)


def _record_to(
    receive: Callable[[float | None], Any],
    path: str,
    kind: str,
    header: dict[str, Any],
    max_records: int | None,
    seconds: float | None,
) -> int:
    writer = _ParquetWriter(path, header) if kind == "parquet" else _JsonlWriter(path, header)
    count = 0
    with writer:
        for item in _arrivals(receive, max_records, seconds):
            writer.write(datetime.datetime.now(datetime.timezone.utc), _record_json(item))
            count += 1
    return count


def _arrivals(
    receive: Callable[[float | None], Any], count: int | None, seconds: float | None
) -> Iterator[Any]:
    """What ``receive(timeout)`` gives, until ``count`` items, ``seconds`` s, or a timeout."""
    deadline = None if seconds is None else time.monotonic() + seconds
    for _ in itertools.repeat(None) if count is None else range(count):
        wait = None if deadline is None else deadline - time.monotonic()
        if wait is not None and wait <= 0:
            return
        try:
            yield receive(wait)
        except Timeout:
            return


def _recording_format(path: str, format: str | None) -> str:
    kind = format or ("parquet" if str(path).endswith(".parquet") else "jsonl")
    if kind not in ("jsonl", "parquet"):
        raise ValueError(f"format={kind!r}: use 'jsonl' or 'parquet'")
    return kind


class _JsonlWriter:
    """A recording as JSON lines: a header line, then ``{"at": ..., "record": {...}}`` lines."""

    def __init__(self, path: str, header: dict[str, Any]) -> None:
        self._file = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed by __exit__
        self._file.write(_dumps(header) + "\n")

    def write(self, at: datetime.datetime, record: Any) -> None:
        self._file.write(_dumps({"at": at, "record": record}) + "\n")
        self._file.flush()  # a recording interrupted keeps every record that arrived

    def __enter__(self) -> _JsonlWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()


def _import_pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise ImportError("Parquet recordings need pyarrow (pip install pyarrow)") from None
    return pyarrow


class _ParquetWriter:
    """A recording as Parquet: columns ``at`` (timestamp, UTC), ``type`` and ``record`` (the
    record's JSON object as text); the header is the file's ``mzconnector`` metadata."""

    ROWS = 4096  # rows per row group written while recording

    def __init__(self, path: str, header: dict[str, Any]) -> None:
        pa = self._pa = _import_pyarrow()
        self._schema = pa.schema(
            [("at", pa.timestamp("us", tz="UTC")), ("type", pa.string()), ("record", pa.string())],
            metadata={b"mzconnector": _dumps(header).encode()},
        )
        self._writer = pa.parquet.ParquetWriter(path, self._schema)
        self._rows: list[tuple[datetime.datetime, str, str]] = []

    def write(self, at: datetime.datetime, record: Any) -> None:
        self._rows.append((at, record["_type"], _dumps(record)))
        if len(self._rows) >= self.ROWS:
            self._flush()

    def _flush(self) -> None:
        if self._rows:
            columns = [list(c) for c in zip(*self._rows)]
            self._writer.write_table(self._pa.table(columns, schema=self._schema))
            self._rows = []

    def __enter__(self) -> _ParquetWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._flush()
        finally:
            self._writer.close()


def _read_recording(path: str) -> tuple[dict[str, Any], Iterator[tuple[float, Any]]]:
    """A recording's header, and its (arrival time in Unix seconds, record JSON) pairs."""
    import json

    if _recording_format(path, None) == "parquet":
        pa = _import_pyarrow()
        parquet = pa.parquet.ParquetFile(path)
        meta = (parquet.schema_arrow.metadata or {}).get(b"mzconnector")
        header = json.loads(meta) if meta else {}

        def parquet_rows() -> Iterator[tuple[float, Any]]:
            for chunk in parquet.iter_batches(columns=["at", "record"]):
                for at, text in zip(chunk.column(0).to_pylist(), chunk.column(1).to_pylist()):
                    yield at.timestamp(), json.loads(text)

        return header, parquet_rows()

    file = open(path, encoding="utf-8")  # noqa: SIM115 - closed by the generator
    first = file.readline()
    try:
        header = json.loads(first)
        if not isinstance(header, dict) or header.get("_recording") != _RECORDING:
            raise ValueError
    except ValueError:
        file.close()
        raise ValueError(f"{path}: line 1: not an mzconnector recording") from None

    def jsonl_rows() -> Iterator[tuple[float, Any]]:
        with file:
            for number, line in enumerate(file, 2):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                    at = datetime.datetime.fromisoformat(entry["at"].replace("Z", "+00:00"))
                    yield at.timestamp(), entry["record"]
                except (ValueError, KeyError, TypeError, AttributeError):
                    raise ValueError(f"{path}: line {number}: not a recorded record") from None

    return header, jsonl_rows()


def replay(
    conn: Connection, path: str, *, pace: str | float = "fast", progress: bool = False
) -> ReplayReport:
    """Push a recording (``record``) back into a workflow through ``conn``, and report what the
    server refused. ``pace``: ``"fast"`` (as fast as possible), ``"original"`` (the recorded
    gaps between arrivals), or a number: that many times faster than the original (``10``).
    Returns once the server has taken every record (``flush``)."""
    if pace == "fast":
        speed = None
    elif pace == "original":
        speed = 1.0
    elif isinstance(pace, (int, float)) and not isinstance(pace, bool) and pace > 0:
        speed = float(pace)
    else:
        raise ValueError(f"pace={pace!r}: use 'fast', 'original' or a speed-up factor above 0")
    _, rows = _read_recording(path)
    report = ReplayReport()
    start = conn._ledger.sent + len(conn._ledger.refused_here) + len(conn._buf)
    bar = _progress_bar(()) if progress else None

    def refused(error: RecordRefused) -> None:
        report.refused.extend(
            msgspec.structs.replace(e, index=e.index - start) for e in error.errors
        )
        report.omitted += error.omitted

    known = (*conn._codec.types, "bytes")
    first_at: float | None = None
    began = time.monotonic()
    try:
        for number, (at, data) in enumerate(rows):
            if isinstance(data, dict) and data.get("_type") == "object":
                report.skipped += 1
                continue
            try:
                item = _record_from_json(data, conn._codec, f"{path}: record {number}")
            except ValueError:
                if isinstance(data, dict) and data.get("_type") not in known:
                    report.not_accepted += 1  # a type this workflow does not have
                    continue
                raise
            if type(item) not in conn._accepted_classes:
                report.not_accepted += 1
                continue
            if speed is not None:
                first_at = at if first_at is None else first_at
                delay = (at - first_at) / speed - (time.monotonic() - began)
                if delay > 0:
                    time.sleep(delay)
            while True:
                try:
                    conn.submit(item)
                    break
                except RecordRefused as error:  # raised before this record was queued
                    refused(error)
            report.sent += 1
            if bar is not None:
                bar.update(1)
        while True:
            try:
                conn.flush()
                break
            except RecordRefused as error:
                refused(error)
    finally:
        if bar is not None:
            bar.close()
    return report


# -- the commands -----------------------------------------------------------------------------


def _default_value(kind: Any, codec: RecordCodec) -> Any:
    """A plain value of a declared field type, for the smoke test's record."""
    if isinstance(kind, type) and issubclass(kind, msgspec.Struct):
        return _default_record(kind, codec)
    if typing.get_origin(kind) is Union:
        return None
    if typing.get_origin(kind) in (list, dict):
        return typing.get_origin(kind)()
    if kind is datetime.datetime:
        return datetime.datetime.now(datetime.timezone.utc)
    return {int: 0, float: 0.0, str: "smoke", bool: False, bytes: b"smoke"}.get(kind)


def _default_record(cls: Any, codec: RecordCodec) -> Any:
    return cls(**{f.name: _default_value(f.type, codec) for f in msgspec.structs.fields(cls)})


class _Output:
    """Where a command's results go: stdout, as text or as JSON lines."""

    def __init__(self, as_json: bool) -> None:
        self.json = as_json

    def emit(self, document: Any, text: str) -> None:
        print(_dumps(document) if self.json else text, flush=True)


def _cmd_mim(conn: Connection, args: Any, out: _Output) -> int:
    values = conn.mim()
    width = max((len(k) for k in values), default=0)
    text = "\n".join(f"{k:<{width}}  {_cell_text(v)}" for k, v in values.items())
    out.emit(dict(values), text)
    return EXIT_OK


def _cmd_types(conn: Connection, args: Any, out: _Output) -> int:
    schema = conn._codec.schema
    names = sorted([*schema, *(["bytes"] if "bytes" in conn.accepted else [])])
    for name in names:
        fields = schema.get(name, {})
        accepted = name in conn.accepted
        text = (
            name
            if name == "bytes"
            else f"{name}({', '.join(f'{f}: {t}' for f, t in fields.items())})"
        )
        out.emit(
            {"type": name, "fields": fields, "accepted": accepted},
            text + ("  accepted" if accepted else ""),
        )
    return EXIT_OK


def _cmd_api(conn: Connection, args: Any, out: _Output) -> int:
    import inspect

    owners = {id(v): m for m, module in conn.api_modules.items() for v in vars(module).values()}
    for name in sorted(conn.api):
        member = conn.api[name]
        try:
            signature = str(inspect.signature(member))
        except (TypeError, ValueError):
            signature = ""
        doc = (inspect.getdoc(member) or "").split("\n", 1)[0] if callable(member) else ""
        module = owners.get(id(member), "")
        out.emit(
            {"name": name, "module": module, "signature": signature, "doc": doc},
            f"{name}{signature}  [{module}]" + (f"  {doc}" if doc else ""),
        )
    return EXIT_OK


def _cmd_submit(conn: Connection, args: Any, out: _Output) -> int:
    import json

    kind: Any = bytes if args.type == "bytes" else conn._codec.types.get(args.type)
    if kind is None or args.type not in conn.accepted:
        accepted = ", ".join(conn.accepted) or "nothing"
        raise _UsageError(f"the connector does not accept {args.type!r}; it accepts: {accepted}")
    source = sys.stdin if args.file in (None, "-") else open(args.file, encoding="utf-8")  # noqa: SIM115
    submitted = 0
    refused: list[RecordError] = []
    omitted = 0
    try:
        for number, line in enumerate(source, 1):
            if not line.strip():
                continue
            where = f"{args.file or '<stdin>'}: line {number}"
            try:
                data = json.loads(line)
                if kind is bytes and isinstance(data, str):
                    data = {"data": data}
                item = _record_from_json(data, conn._codec, where, expected=kind)
            except ValueError as exc:
                text = str(exc) if str(exc).startswith(where) else f"{where}: not JSON ({exc})"
                raise _UsageError(text) from None
            while True:
                try:
                    conn.submit(item)
                    break
                except RecordRefused as error:
                    refused.extend(error.errors)
                    omitted += error.omitted
            submitted += 1
        while True:
            try:
                conn.flush()
                break
            except RecordRefused as error:
                refused.extend(error.errors)
                omitted += error.omitted
    finally:
        if source is not sys.stdin:
            source.close()
    count = len(refused) + omitted
    out.emit(
        {"submitted": submitted, "refused": count, "errors": [_plain(e) for e in refused]},
        f"submitted {submitted} record(s) of {args.type}; the server refused {count}",
    )
    if count:
        raise RecordRefused(refused, omitted)
    return EXIT_OK


@contextlib.contextmanager
def _incoming(
    conn: Connection, route: str | Subscription, matcher: Mapping[str, Any] | None = None
) -> Iterator[Callable[[float | None], Any]]:
    """How ``tail`` and ``record`` take what arrives: ``receive(timeout)``. A route of
    ``conn.routes`` is subscribed to (with ``matcher``), one of ``conn.taps`` tapped, for as
    long as this lasts; a ``Subscription`` given is used as it is. A server that offers no
    routes at all (one without subscriptions): what it sends this client."""
    if isinstance(route, Subscription):
        if matcher:
            raise ValueError("a matcher goes to conn.subscribe(), not with a Subscription")
        yield route.receive
        return
    if not conn.routes and not conn.taps:
        if matcher:
            raise _UsageError("this server offers no subscriptions: no matcher possible")
        yield conn.receive
        return
    if route not in conn.routes and route not in conn.taps:
        offered = ", ".join([*conn.routes, *(f"{t} (tap)" for t in conn.taps)])
        raise _UsageError(f"the server offers no route {route!r} (it offers: {offered})")
    sub = conn.subscribe(route, matcher, tap=route not in conn.routes)
    try:
        yield sub.receive
    finally:
        with contextlib.suppress(MZConnectorError):
            sub.close()


def _matcher(args: Any) -> dict[str, Any] | None:
    import json

    if args.match is None:
        return None
    try:
        matcher = json.loads(args.match)
    except json.JSONDecodeError as exc:
        raise _UsageError(f"--match: not JSON: {exc}") from None
    if not isinstance(matcher, dict):
        raise _UsageError("--match: expected a JSON object of field -> value")
    return matcher


def _cmd_tail(conn: Connection, args: Any, out: _Output) -> int:
    with _incoming(conn, args.route, _matcher(args)) as receive:
        try:
            for item in _arrivals(receive, args.count, args.seconds):
                out.emit(_record_json(item), repr(item))
        except KeyboardInterrupt:  # the usual way to end a tail
            pass
    return EXIT_OK


def _cmd_query(conn: Connection, args: Any, out: _Output) -> int:
    import json

    kinds = conn._query_types.get(args.query)
    if kinds is None:
        known = ", ".join(conn._query_types) or "none"
        raise _UsageError(f"no query {args.query!r} (this server offers: {known})")
    try:
        data = json.loads(args.payload)
        request = _record_from_json(data, conn._codec, "request", expected=kinds[0])
    except json.JSONDecodeError as exc:
        raise _UsageError(f"the request is not JSON: {exc}") from None
    except ValueError as exc:
        raise _UsageError(str(exc)) from None
    limit = args.seconds if args.seconds is not None else args.timeout
    replies = conn.query(args.query, request, timeout=limit)
    try:
        for reply in replies:  # each as it arrives
            out.emit(_record_json(reply), repr(reply))
    except QueryError as exc:
        if exc.code in ("unknown-query", "bad-request"):
            raise _UsageError(str(exc)) from None
        raise
    finally:
        replies.close()  # on Ctrl-C or an error: the server cancels the query
    return EXIT_OK


def _cmd_smoke(conn: Connection, args: Any, out: _Output) -> int:
    report: dict[str, Any] = {"connected": True, "workflow": conn.workflow}
    kinds = [n for n in conn.accepted if n != "bytes"]
    if args.type is not None:
        if args.type not in conn.accepted:
            raise _UsageError(f"the connector does not accept {args.type!r}")
        kinds = [args.type]
    if kinds and kinds[0] != "bytes":
        item: Any = _default_record(conn.udrs[kinds[0]], conn._codec)
    elif "bytes" in conn.accepted:
        item = b"smoke"
    else:
        item = None
    report["pushed"] = None if item is None else _record_json(item)
    report["answer"] = None
    if item is not None:
        conn.submit(item)
        conn.flush()
        try:
            report["answer"] = _record_json(conn.receive(timeout=args.answer_timeout))
        except Timeout:
            pass
    report["mim"] = dict(conn.mim())
    answer = "no answer" if report["answer"] is None else "an answer"
    pushed = "nothing" if item is None else f"one {report['pushed']['_type']}"
    out.emit(
        report,
        f"smoke: connected to {conn.workflow!r}, pushed {pushed}, {answer} within "
        f"{args.answer_timeout} s, read {len(report['mim'])} MIM values: ok",
    )
    return EXIT_OK


def _cmd_record(conn: Connection, args: Any, out: _Output) -> int:
    count = 0
    try:
        count = record(
            conn,
            args.route,
            args.path,
            matcher=_matcher(args),
            max_records=args.count,
            seconds=args.seconds,
            format=args.format,
        )
    except KeyboardInterrupt:  # the usual way to end a recording
        pass
    out.emit({"recorded": count, "file": args.path}, f"recorded {count} record(s) to {args.path}")
    return EXIT_OK


def _cmd_replay(conn: Connection, args: Any, out: _Output) -> int:
    pace: str | float = "original" if args.pace == "original" else "fast"
    if args.speed is not None:
        pace = args.speed
    try:
        report = replay(conn, args.path, pace=pace)
    except (OSError, ValueError) as exc:
        raise _UsageError(str(exc)) from None
    refused = len(report.refused) + report.omitted
    out.emit(
        {
            "sent": report.sent,
            "refused": refused,
            "errors": [_plain(e) for e in report.refused],
            "not_accepted": report.not_accepted,
            "skipped": report.skipped,
        },
        f"replayed {report.sent} record(s) from {args.path}; the server refused {refused}; "
        f"{report.not_accepted} of types it does not accept and {report.skipped} other "
        "object(s) were not sent",
    )
    if refused:
        raise RecordRefused(report.refused, report.omitted)
    return EXIT_OK


_COMMANDS: dict[str, Callable[[Connection, Any, _Output], int]] = {
    "mim": _cmd_mim,
    "types": _cmd_types,
    "api": _cmd_api,
    "submit": _cmd_submit,
    "tail": _cmd_tail,
    "query": _cmd_query,
    "smoke": _cmd_smoke,
    "record": _cmd_record,
    "replay": _cmd_replay,
}


# -- arguments, connecting, errors ------------------------------------------------------------


class _ArgumentParser:
    """argparse, with its errors raised (to be said in one line, as JSON with --json)."""

    @staticmethod
    def make(**kwargs: Any) -> Any:
        import argparse

        class Parser(argparse.ArgumentParser):
            def error(self, message: str) -> typing.NoReturn:
                raise _UsageError(message)

        return Parser(**kwargs)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        import argparse

        raise argparse.ArgumentTypeError(f"expected a number above 0, got {text!r}")
    return value


def _server(text: str) -> tuple[str, int]:
    import argparse

    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _parser() -> Any:
    import argparse

    suppress = argparse.SUPPRESS
    common = _ArgumentParser.make(add_help=False)
    group = common.add_argument_group("connection and output")
    group.add_argument("--host", default=suppress, help="server address (127.0.0.1)")
    group.add_argument("--port", type=int, default=suppress, help=f"port ({DEFAULT_PORT})")
    group.add_argument(
        "--server",
        type=_server,
        action="append",
        default=suppress,
        metavar="HOST:PORT",
        help="server to connect to, instead of --host/--port (one today; more: failover, "
        "once the client has it)",
    )
    group.add_argument(
        "--timeout", type=_positive, default=suppress, help="seconds for each answer (10)"
    )
    group.add_argument("--name", default=suppress, help="the name the workflow sees")
    group.add_argument("--tls", action="store_true", default=suppress, help="connect over TLS")
    group.add_argument("--cafile", default=suppress, help="CA to verify the server (with --tls)")
    group.add_argument("--certfile", default=suppress, help="client certificate (with --tls)")
    group.add_argument("--keyfile", default=suppress, help="its key, if apart (with --tls)")
    group.add_argument(
        "--server-hostname", default=suppress, help="the name to verify the certificate against"
    )
    group.add_argument(
        "--token-env",
        default=suppress,
        metavar="NAME",
        help=f"read the token from this environment variable (default: {TOKEN_ENV})",
    )
    group.add_argument(
        "--json",
        action="store_true",
        default=suppress,
        help="one JSON document per line (keys sorted), errors as JSON on stderr",
    )
    parser = _ArgumentParser.make(
        prog="mzconnector",
        description="Talk to a running mzconnector workflow server from a shell.",
        parents=[common],
        epilog="Exit status: 0 ok, 1 failed, 2 bad arguments or input, 3 cannot connect, "
        "4 refused (connection, authentication or records), 5 protocol error, 6 timeout, "
        "130 interrupted.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, text: str) -> Any:
        return commands.add_parser(name, help=text, description=text, parents=[common])

    command("mim", "print the MIM values")
    command("types", "print the record types, and which the connector accepts")
    command("api", "print the functions of the server's API modules")
    sub = command("submit", "submit records read as JSON lines (stdin or --file)")
    sub.add_argument("type", metavar="TYPE", help='a record type, or "bytes" (base64)')
    sub.add_argument("--file", help="read the records from this file (- = stdin)")
    sub = command("tail", "print records as they arrive on a route")
    sub.add_argument("route", metavar="ROUTE", help="a route the server offers, or a tap")
    sub.add_argument("--match", metavar="JSON", help='only records matching {"field": value}')
    sub.add_argument("--count", type=int, help="stop after this many records")
    sub.add_argument("--seconds", type=_positive, help="stop after this many seconds")
    sub = command("query", "ask the workflow a query; print each reply as it arrives")
    sub.add_argument("query", metavar="NAME")
    sub.add_argument("payload", metavar="JSON", help="the request: an object of its fields")
    sub.add_argument(
        "--seconds", type=_positive, help="the whole query at most (default: --timeout)"
    )
    sub = command("smoke", "connect, push one record, receive an answer, read MIM, close")
    sub.add_argument("--type", help="the record type to push (default: the first accepted)")
    sub.add_argument(
        "--answer-timeout", type=_positive, default=2.0, help="seconds to wait for an answer (2)"
    )
    sub = command("record", "write records as they arrive to a file, with arrival times")
    sub.add_argument("route", metavar="ROUTE", help="a route the server offers, or a tap")
    sub.add_argument("--match", metavar="JSON", help='only records matching {"field": value}')
    sub.add_argument("path", metavar="FILE", help="JSON lines, or Parquet for *.parquet")
    sub.add_argument("--format", choices=["jsonl", "parquet"], help="default: by the file name")
    sub.add_argument("--count", type=int, help="stop after this many records")
    sub.add_argument("--seconds", type=_positive, help="stop after this many seconds")
    sub = command("replay", "push a recording back into the workflow")
    sub.add_argument("path", metavar="FILE")
    sub.add_argument(
        "--pace", choices=["fast", "original"], default="fast", help="fast (default) or original"
    )
    sub.add_argument("--speed", type=_positive, help="the original pace this many times faster")
    return parser


_DEFAULTS = {
    "host": "127.0.0.1",
    "port": DEFAULT_PORT,
    "server": [],
    "timeout": 10.0,
    "name": "mzconnector-cli",
    "tls": False,
    "cafile": None,
    "certfile": None,
    "keyfile": None,
    "server_hostname": None,
    "token_env": None,
    "json": False,
}


def _token(args: Any) -> str | None:
    """The token to present: from ``--token-env NAME``, else from ``TOKEN_ENV`` if set."""
    import os

    if args.token_env is not None:
        token = os.environ.get(args.token_env)
        if not token:
            raise _UsageError(f"--token-env {args.token_env}: the variable is not set")
        return token
    return os.environ.get(TOKEN_ENV) or None


def _open(args: Any, token: str | None) -> Connection:
    """``connect()`` with what the options say: several ``--server`` are tried as
    ``connect()`` tries a list."""
    servers = args.server or [(args.host, args.port)]
    where: Any = [f"{h}:{p}" for h, p in servers] if len(servers) > 1 else servers[0][0]
    try:
        return connect(
            where,
            servers[0][1],
            timeout=args.timeout,
            name=args.name,
            token=token,
            tls=args.tls,
            cafile=args.cafile,
            certfile=args.certfile,
            keyfile=args.keyfile,
            server_hostname=args.server_hostname,
        )
    except ValueError as exc:  # TLS files without --tls, and the like
        raise _UsageError(str(exc)) from None


def _exit_status(exc: BaseException) -> int:
    if isinstance(exc, (_UsageError, NotAccepted, SubscriptionError)):
        return EXIT_USAGE
    if isinstance(exc, (ConnectionRefused, ConnectionRejected, RecordRefused)):
        return EXIT_REFUSED
    if isinstance(exc, Timeout):
        return EXIT_TIMEOUT
    # A broken protocol ends a connection as a ConnectionClosed saying so (_handle), and a
    # handshake with something else than our server as a ConnectError caused by it.
    if (
        isinstance(exc, ProtocolError)
        or isinstance(exc.__cause__, ProtocolError)
        or (isinstance(exc, ConnectionClosed) and str(exc).startswith("protocol error"))
    ):
        return EXIT_PROTOCOL
    if isinstance(exc, ConnectError):
        return EXIT_CONNECT
    return EXIT_FAILED


def _say_error(exc: BaseException, status: int, as_json: bool, secrets: list[str]) -> None:
    message = " ".join(str(exc).split()) or type(exc).__name__
    for secret in secrets:
        message = message.replace(secret, "***")
    if as_json:
        kind = type(exc).__name__.lstrip("_")
        line = _dumps({"error": message, "exit": status, "kind": kind})
    else:
        line = f"mzconnector: {message}"
    print(line, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """The command line: ``mzconnector [options] COMMAND ...`` (``--help`` lists them).
    Returns the exit status."""
    arguments = sys.argv[1:] if argv is None else list(argv)
    as_json = "--json" in arguments
    secrets: list[str] = []
    try:
        args = _parser().parse_args(arguments)
        for key, value in _DEFAULTS.items():
            if not hasattr(args, key):
                setattr(args, key, value)
        as_json = args.json
        token = _token(args)
        if token:
            secrets.append(token)
        with _open(args, token) as conn:
            return _COMMANDS[args.command](conn, args, _Output(as_json))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except (MZConnectorError, OSError, ImportError) as exc:
        status = _exit_status(exc)
        _say_error(exc, status, as_json, secrets)
        return status


if __name__ == "__main__":
    sys.exit(main())
