"""The shape of a workflow TOML file: its tables as msgspec Structs, and the check that turns
parsed TOML into them key by key.

Each key is checked on its own against its declared type, so that an error names the key and
says, in our words, what was expected and what was found (``connector.port: expected an
integer from 0 to 65535, got 70000``). msgspec does the converting; its own messages, which
change between its releases, never reach a user.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from typing import Annotated, Any, Literal, TypeVar, Union

import msgspec
import msgspec.inspect as mi

from mzconnector import DEFAULT_MAX_FRAME_SIZE

from .auth import Secret
from .errors import ConfigError

Seconds = Annotated[float, msgspec.Meta(gt=0)]
Count = Annotated[int, msgspec.Meta(ge=1)]
SecondsOrOff = Annotated[float, msgspec.Meta(ge=0)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]


class TlsTable(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """``[connector.tls]``"""

    enabled: bool = False
    certfile: str = ""
    keyfile: str = ""
    cafile: str = ""
    require_client_auth: bool = False


class AuthTable(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """``[connector.auth]``: one shared ``token``, and/or named ``tokens`` (name -> token). The
    tokens are ``Secret``s: a printed configuration never shows them."""

    token: Secret | None = None
    tokens: dict[str, Secret] = {}


class SessionMemoryTable(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """``[connector.session_memory]``: how long (after its last connection ended) and how many
    client sessions the server remembers, to take a resent record once."""

    seconds: SecondsOrOff = 600.0
    sessions: Annotated[int, msgspec.Meta(ge=0)] = 10000


class ConnectorTable(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """``[connector]``: the General tab, and the server's limits."""

    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 7777
    allow_multiple_connections: bool = True
    max_connections: Annotated[int, msgspec.Meta(ge=0, le=99999)] = 100
    accepted_types: list[str] = []
    input_routes: list[str] = []
    output_routes: dict[str, str] = {}
    # Connection control: each connect attempt becomes a ConnectionRequest on this route.
    connection_control: bool = False
    connection_request_route: str = ""
    connection_request_timeout: Seconds = 10.0
    # Records routed back go to the connection they came from (or name), not to everyone.
    per_connection_routing: bool = False
    # Limits: every buffer is bounded, every wait has a deadline.
    max_frame_size: Annotated[int, msgspec.Meta(ge=1024, le=1 << 30)] = DEFAULT_MAX_FRAME_SIZE
    max_nesting: Annotated[int, msgspec.Meta(ge=1, le=200)] = 32
    handshake_timeout: Seconds = 10.0
    route_buffer: Count = 16
    outbox_size: Count = 64
    delivery_timeout: Seconds = 5.0
    shutdown_timeout: Seconds = 10.0
    # A plain TCP port open while the server is ready (Kubernetes TCP probes); None: none.
    tcp_probe_port: Port | None = None
    # Conversations: internal routes clients may tap; records a subscription holds at most.
    tap_routes: list[str] = []
    durable_limit: Count = 100000
    # Staying connected: ping a client that asked for it (Hello.keepalive) after this many idle
    # seconds, and end its connection after this many pings unanswered (0 in either: off).
    keepalive: SecondsOrOff = 15.0
    keepalive_misses: Annotated[int, msgspec.Meta(ge=0)] = 3
    session_memory: SessionMemoryTable = SessionMemoryTable()
    tls: TlsTable = TlsTable()
    auth: AuthTable = AuthTable()


class HttpTable(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """``[http]``: /healthz, /readyz, /metrics and the status page. No port: no listener."""

    host: str = "127.0.0.1"
    port: Port | None = None
    # A Bearer token (or Basic password) for everything but /healthz and /readyz; "": none.
    token: str = ""


class WorkflowTable(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    name: str = "workflow"


class ApiTable(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    modules: list[str] = []


class ProcessorTable(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    name: str
    entry: str
    routes: list[str]
    # false: function(record, ctx) per record; true: function(records, ctx) per batch, with a
    # list; "frame": per batch, with a pandas DataFrame.
    batch: Union[bool, Literal["frame"]] = False


class QueryTable(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """``[queries.NAME]``: a query clients ask by name."""

    route: str
    request: str
    reply: str


class KvTable(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """``[kv]``: where the shared key-value maps live ("": in memory)."""

    path: str = ""


class EngineTable(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """``[engine]``: where routes run. ``local``: in this process; ``nats``: on NATS
    JetStream, so that connectors and workers may run in many processes."""

    kind: str = "local"
    url: str | list[str] = "nats://127.0.0.1:4222"
    stream: str = ""  # default: derived from [workflow] name
    ack_wait: Seconds = 30.0  # how long a worker may take a batch before it goes to another
    max_bytes: Annotated[int, msgspec.Meta(ge=1 << 20)] = 1 << 30  # the stream's limit
    connect_timeout: Seconds = 5.0


class ConfigFile(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    workflow: WorkflowTable = WorkflowTable()
    connector: ConnectorTable = ConnectorTable()
    http: HttpTable = HttpTable()
    api: ApiTable = ApiTable()
    mim: dict[str, str] = {}
    types: dict[str, dict[str, str]] = {}
    processors: list[ProcessorTable] = []
    queries: dict[str, QueryTable] = {}
    kv: KvTable = KvTable()
    engine: EngineTable = EngineTable()


S = TypeVar("S", bound=msgspec.Struct)


def convert_table(data: Any, kind: type[S], source: str, key: str = "") -> S:
    """``data`` (parsed TOML) as the table ``kind``; a ``ConfigError`` names the first key
    that does not fit."""
    if not isinstance(data, Mapping):
        raise ConfigError(source, key or "(top level)", f"expected a table, got {_found(data)}")
    fields = {f.encode_name: f for f in msgspec.structs.fields(kind)}
    for name in data:
        if name not in fields:
            known = ", ".join(fields)
            raise ConfigError(source, _join(key, name), f"unknown key (known keys: {known})")
    for name, field in fields.items():
        if field.required and name not in data:
            raise ConfigError(source, _join(key, name), "missing")
    values = {
        fields[name].name: _convert(value, fields[name].type, source, _join(key, name))
        for name, value in data.items()
    }
    return kind(**values)


def _convert(value: Any, kind: Any, source: str, key: str) -> Any:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Secret or args == (Secret, type(None)):
        if not isinstance(value, str):
            raise ConfigError(source, key, f"expected a string, got {_found_secret(value)}")
        return Secret(value)
    if isinstance(kind, type) and issubclass(kind, msgspec.Struct):
        return convert_table(value, kind, source, key)
    if origin is list and isinstance(value, list):
        return [_convert(v, args[0], source, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict and isinstance(value, Mapping):
        return {k: _convert(v, args[1], source, _join(key, k)) for k, v in value.items()}
    try:
        return msgspec.convert(value, kind)
    except msgspec.ValidationError:
        expected = _expected(mi.type_info(kind))
        raise ConfigError(source, key, f"expected {expected}, got {_found(value)}") from None


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def _expected(info: mi.Type) -> str:
    """A TOML type in words: ``an integer from 0 to 65535``, ``a list of strings``."""
    if isinstance(info, mi.UnionType):  # ``T | None``: TOML has no None, so a T
        kinds = [t for t in info.types if not isinstance(t, mi.NoneType)]
        return _expected(kinds[0]) if len(kinds) == 1 else "a value of another type"
    if isinstance(info, mi.IntType):
        low = info.ge if info.ge is not None else (info.gt + 1 if info.gt is not None else None)
        high = info.le if info.le is not None else (info.lt - 1 if info.lt is not None else None)
        if low is not None and high is not None:
            return f"an integer from {low} to {high}"
        if low is not None:
            return f"an integer of at least {low}"
        return "an integer" if high is None else f"an integer of at most {high}"
    if isinstance(info, mi.FloatType):
        if info.gt is not None:
            return f"a number greater than {info.gt:g}"
        return "a number" if info.ge is None else f"a number of at least {info.ge:g}"
    if isinstance(info, mi.BoolType):
        return "true or false"
    if isinstance(info, mi.StrType):
        return "a string"
    if isinstance(info, mi.ListType):
        return f"a list of {_plural(info.item_type)}"
    if isinstance(info, mi.LiteralType):
        return " or ".join(f'"{v}"' if isinstance(v, str) else repr(v) for v in info.values)
    if isinstance(info, mi.UnionType):
        return ", ".join(_expected(t) for t in info.types[:-1]) + f" or {_expected(info.types[-1])}"
    if isinstance(info, (mi.DictType, mi.StructType)):
        return "a table"
    if isinstance(info, mi.UnionType):
        return " or ".join(_expected(t) for t in info.types)
    return "a value of another type"


def _plural(info: mi.Type) -> str:
    return {mi.StrType: "strings", mi.IntType: "integers", mi.BoolType: "booleans"}.get(
        type(info), "values"
    )


def _found_secret(value: Any) -> str:
    """A value where a token belongs, described without showing it."""
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, bool):
        return "a boolean"
    return {int: "an integer", float: "a number"}.get(type(value), "a date or time")


def _found(value: Any) -> str:
    """A parsed TOML value, as the file would show it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list):
        return f"a list of {len(value)} item(s)"
    return repr(value)
