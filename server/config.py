"""The workflow configuration: a TOML file (parsed with tomli) -> a frozen ``Config``.

The TOML tables mirror the tabs of the original agent: ``[connector]`` (General), ``[api]``
(API), ``[mim]`` (MIM), plus the workflow around it: ``[types.*]`` and ``[[processors]]``.
The shape of each table is declared once below as msgspec Structs, which reject unknown keys
and wrong types; the cross-checks (routes, types, entries) follow. Every error is a
``ConfigError`` naming the file, the key and the problem.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import re
import ssl
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any

import cloudpickle
import msgspec
import tomli

from mzconnector import (
    DEFAULT_MAX_FRAME_SIZE,
    PROTOCOL_VERSION,
    ApiModule,
    RecordCodec,
    SchemaError,
    Welcome,
    encode_frame,
    parse_type,
)

from .api_modules import exported_names, load_api_module
from .errors import ConfigError

Seconds = Annotated[float, msgspec.Meta(gt=0)]


class TlsTable(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """``[connector.tls]``"""

    enabled: bool = False
    certfile: str = ""
    keyfile: str = ""
    cafile: str = ""
    require_client_auth: bool = False


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
    route_buffer: Annotated[int, msgspec.Meta(ge=1)] = 16
    outbox_size: Annotated[int, msgspec.Meta(ge=1)] = 64
    delivery_timeout: Seconds = 5.0
    shutdown_timeout: Seconds = 10.0
    tls: TlsTable = TlsTable()


class WorkflowTable(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    name: str = "workflow"


class ApiTable(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    modules: list[str] = []


class ProcessorTable(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    name: str
    entry: str
    routes: list[str]


class ConfigFile(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    workflow: WorkflowTable = WorkflowTable()
    connector: ConnectorTable = ConnectorTable()
    api: ApiTable = ApiTable()
    mim: dict[str, str] = {}
    types: dict[str, dict[str, str]] = {}
    processors: list[ProcessorTable] = []


@dataclasses.dataclass(frozen=True)
class Processor:
    """A processor of the workflow: ``function(record, ctx)`` (sync or async) called with each
    record arriving on one of ``routes``."""

    name: str
    function: Callable[..., Any]
    routes: tuple[str, ...]

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.function)


@dataclasses.dataclass(frozen=True)
class Config:
    """A checked workflow configuration. Make one with ``load_config`` or ``Config.from_dict``."""

    source: str
    base_dir: Path
    workflow: str
    connector: ConnectorTable
    schema: dict[str, dict[str, str]]
    codec: RecordCodec
    mim: dict[str, Any]  # assigned MIM name -> Python type
    mim_declared: dict[str, str]  # assigned MIM name -> type as written
    api_modules: tuple[ApiModule, ...]
    processors: tuple[Processor, ...]
    ssl_context: ssl.SSLContext | None = None

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        *,
        base_dir: str | Path = ".",
        source: str = "<config>",
    ) -> Config:
        """A config from the TOML's structure as a dict (for embedding and tests). A processor's
        ``entry`` may also be a callable."""
        return _build(data, Path(base_dir).resolve(), source)

    def replace_connector(self, **changes: Any) -> Config:
        """A copy with some ``[connector]`` keys changed (e.g. ``port=0``)."""
        try:
            connector = msgspec.convert(
                {**msgspec.structs.asdict(self.connector), **changes}, ConnectorTable
            )
        except msgspec.ValidationError as exc:
            raise _config_error(self.source, exc, prefix="connector") from None
        return dataclasses.replace(self, connector=connector)

    @property
    def routes(self) -> dict[str, str]:
        """Every consumed route -> its consumer (a processor's name, or ``"connector"``)."""
        consumers = {route: "connector" for route in self.connector.input_routes}
        for processor in self.processors:
            for route in processor.routes:
                consumers[route] = processor.name
        return consumers


def load_config(path: str | Path) -> Config:
    """Read and check a workflow TOML file."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = tomli.load(f)
    except OSError as exc:
        raise ConfigError(str(path), "", f"cannot read the file: {exc.strerror or exc}") from None
    except tomli.TOMLDecodeError as exc:
        raise ConfigError(str(path), "", f"not valid TOML: {exc}") from None
    return _build(data, path.resolve().parent, str(path))


_PATH = re.compile(r" - at `\$(.*)`$")
_UNKNOWN = re.compile(r"Object contains unknown field `(.*)`")


def _config_error(source: str, exc: msgspec.ValidationError, prefix: str = "") -> ConfigError:
    message = str(exc)
    match = _PATH.search(message)
    key = (prefix + (match.group(1) if match else "")).lstrip(".")
    problem = _PATH.sub("", message)
    unknown = _UNKNOWN.match(problem)
    if unknown:
        key = f"{key}.{unknown.group(1)}".lstrip(".")
        problem = "unknown key"
    return ConfigError(source, key or "(top level)", problem)


def _check_names_tables(data: Mapping[str, Any], source: str) -> None:
    """Tables keyed by user names ([mim], [types.X], [connector.output_routes]): msgspec's
    error path leaves such names out, so check their values here and name the key."""
    connector = data.get("connector")
    tables: list[tuple[str, Any]] = [("mim", data.get("mim"))]
    if isinstance(connector, Mapping):
        tables.append(("connector.output_routes", connector.get("output_routes")))
    types = data.get("types")
    if isinstance(types, Mapping):
        for name, fields in types.items():
            if not isinstance(fields, Mapping):
                raise ConfigError(
                    source, f"types.{name}", f"Expected a table of fields, got {fields!r}"
                )
            tables.append((f"types.{name}", fields))
    for prefix, table in tables:
        if not isinstance(table, Mapping):
            continue
        for key, value in table.items():
            if not isinstance(value, str):
                kind = "int" if isinstance(value, int) else type(value).__name__
                raise ConfigError(
                    source, f"{prefix}.{key}", f"Expected `str`, got `{kind}` ({value!r})"
                )


def _build(data: Mapping[str, Any], base_dir: Path, source: str) -> Config:
    # Processor entries given as callables (embedding) bypass the string check.
    data = dict(data)
    given: dict[int, Callable[..., Any]] = {}
    if isinstance(data.get("processors"), list):
        processors = []
        for i, p in enumerate(data["processors"]):
            if isinstance(p, Mapping) and callable(p.get("entry")):
                given[i] = p["entry"]
                p = {**p, "entry": f"<callable {getattr(p['entry'], '__qualname__', '?')}>"}
            processors.append(p)
        data["processors"] = processors
    _check_names_tables(data, source)
    try:
        raw = msgspec.convert(data, ConfigFile)
    except msgspec.ValidationError as exc:
        raise _config_error(source, exc) from None

    try:
        codec = RecordCodec(raw.types)
    except SchemaError as exc:
        raise ConfigError(source, "types", str(exc)) from None

    mim: dict[str, Any] = {}
    for name, text in raw.mim.items():
        try:
            mim[name] = parse_type(text, {})
        except SchemaError as exc:
            raise ConfigError(source, f"mim.{name!r}", str(exc)) from None

    connector = raw.connector
    _check_connector(connector, raw, source)
    processors = tuple(
        Processor(
            name=p.name,
            function=given[i] if i in given else _load_entry(p.entry, base_dir, source, i),
            routes=tuple(p.routes),
        )
        for i, p in enumerate(raw.processors)
    )
    _check_routes(connector, processors, source)
    ssl_context = _ssl_context(connector.tls, base_dir, source)

    api_modules = tuple(
        load_api_module(ref, base_dir, source=source, key=f"api.modules[{i}]")
        for i, ref in enumerate(raw.api.modules)
    )
    _check_api_names(api_modules, source)
    _check_welcome_fits(raw, api_modules, source)

    return Config(
        source=source,
        base_dir=base_dir,
        workflow=raw.workflow.name,
        connector=connector,
        schema={name: dict(fields) for name, fields in raw.types.items()},
        codec=codec,
        mim=mim,
        mim_declared=dict(raw.mim),
        api_modules=api_modules,
        processors=processors,
        ssl_context=ssl_context,
    )


def _check_connector(connector: ConnectorTable, raw: ConfigFile, source: str) -> None:
    for name in connector.accepted_types:
        if name != "bytes" and name not in raw.types:
            known = ", ".join([*raw.types, "bytes"])
            raise ConfigError(
                source, "connector.accepted_types", f"unknown type {name!r} (declared: {known})"
            )
        if name not in connector.output_routes:
            raise ConfigError(
                source,
                "connector.output_routes",
                f'accepted type {name!r} has no output route (add {name} = "<route>")',
            )
    for name in connector.output_routes:
        if name not in connector.accepted_types:
            raise ConfigError(
                source, f"connector.output_routes.{name}", f"{name!r} is not in accepted_types"
            )


def _check_routes(
    connector: ConnectorTable, processors: tuple[Processor, ...], source: str
) -> None:
    consumer: dict[str, str] = {}
    for route in connector.input_routes:
        consumer[route] = "the connector (connector.input_routes)"
    names: set[str] = set()
    for i, processor in enumerate(processors):
        if processor.name in names:
            raise ConfigError(
                source, f"processors[{i}].name", f"two processors are named {processor.name!r}"
            )
        names.add(processor.name)
        if not processor.routes:
            raise ConfigError(
                source, f"processors[{i}].routes", "a processor must consume at least one route"
            )
        for route in processor.routes:
            if route in consumer:
                raise ConfigError(
                    source,
                    f"processors[{i}].routes",
                    f"route {route!r} is already consumed by {consumer[route]}; "
                    "each route has exactly one consumer",
                )
            consumer[route] = f"processor {processor.name!r}"
    if connector.connection_control:
        route = connector.connection_request_route
        key = "connector.connection_request_route"
        if not route:
            raise ConfigError(
                source, key, "connection_control = true needs a route for the requests"
            )
        if not consumer.get(route, "").startswith("processor"):
            raise ConfigError(source, key, f"no processor consumes route {route!r}")
    for type_name, route in connector.output_routes.items():
        if route not in consumer:
            raise ConfigError(
                source,
                f"connector.output_routes.{type_name}",
                f"nothing consumes route {route!r} (list it in a processor's routes or in "
                "connector.input_routes)",
            )


def _ssl_context(tls: TlsTable, base_dir: Path, source: str) -> ssl.SSLContext | None:
    """The server's TLS context; every file is checked now, not at the first connection."""
    if not tls.enabled:
        return None
    for key in ("certfile", "keyfile"):
        if not getattr(tls, key):
            raise ConfigError(source, f"connector.tls.{key}", "TLS is enabled but no file is given")
    if tls.require_client_auth and not tls.cafile:
        raise ConfigError(
            source,
            "connector.tls.cafile",
            "require_client_auth = true needs the CA that signs client certificates",
        )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    certfile, keyfile = (str(base_dir / tls.certfile), str(base_dir / tls.keyfile))
    for key, path in (("certfile", certfile), ("keyfile", keyfile)):
        try:
            Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(
                source, f"connector.tls.{key}", f"cannot read {path!r}: {exc.strerror or exc}"
            ) from None
    try:
        context.load_cert_chain(certfile, keyfile)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            source,
            "connector.tls",
            f"cannot load certificate {certfile!r} with key {keyfile!r}: {exc}",
        ) from None
    if tls.cafile:
        cafile = str(base_dir / tls.cafile)
        try:
            context.load_verify_locations(cafile)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                source, "connector.tls.cafile", f"cannot load {cafile!r}: {exc}"
            ) from None
    if tls.require_client_auth:
        context.verify_mode = ssl.CERT_REQUIRED
    elif tls.cafile:
        context.verify_mode = ssl.CERT_OPTIONAL  # take a certificate's subject when offered
    return context


def _check_welcome_fits(raw: ConfigFile, modules: tuple[ApiModule, ...], source: str) -> None:
    """Clients learn the schema and the API modules in one frame: it must fit."""
    welcome = Welcome(
        protocol=PROTOCOL_VERSION,
        connection_id=2**62,
        workflow=raw.workflow.name,
        schema={name: dict(fields) for name, fields in raw.types.items()},
        accepted=list(raw.connector.accepted_types),
        api=list(modules),
        max_frame_size=raw.connector.max_frame_size,
        server="mzserver",
    )
    size = len(encode_frame(welcome)) - 4 + 64
    if size > raw.connector.max_frame_size:
        raise ConfigError(
            source,
            "connector.max_frame_size",
            f"{raw.connector.max_frame_size} bytes is too small for the schema and API modules "
            f"clients receive at connect ({size} bytes)",
        )


def _check_api_names(modules: tuple[ApiModule, ...], source: str) -> None:
    owner: dict[str, str] = {}
    for i, module in enumerate(modules):
        for name in exported_names(module):
            if name in owner:
                raise ConfigError(
                    source,
                    f"api.modules[{i}]",
                    f"{name!r} is exported by both {owner[name]!r} and {module.name!r}",
                )
            owner[name] = module.name


def _load_entry(entry: str, base_dir: Path, source: str, index: int) -> Callable[..., Any]:
    """``path/to/file.py:function`` (relative to the TOML) or ``package.module:function``."""
    key = f"processors[{index}].entry"
    target, sep, attr = entry.rpartition(":")
    if not sep or not target or not attr:
        raise ConfigError(source, key, f"{entry!r} is not 'file.py:function' or 'module:function'")
    try:
        if target.endswith(".py") or "/" in target:
            path = (base_dir / target).resolve()
            if not path.is_file():
                raise ConfigError(source, key, f"processor file {str(path)!r} does not exist")
            module = _import_file(path)
        else:
            module = importlib.import_module(target)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(
            source, key, f"cannot import {target!r}: {type(exc).__name__}: {exc}"
        ) from None
    function = getattr(module, attr, None)
    if not callable(function):
        raise ConfigError(source, key, f"{target!r} has no function {attr!r}")
    return function


def _import_file(path: Path) -> Any:
    name = "mzworkflow_" + re.sub(r"\W", "_", str(path.with_suffix("")).lstrip("/"))
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    # Objects of classes defined in a workflow file reach clients that cannot import it.
    cloudpickle.register_pickle_by_value(module)
    return module
