"""The workflow configuration: a TOML file (parsed with tomli) -> a frozen ``Config``.

The TOML tables mirror the tabs of the original agent: ``[connector]`` (General), ``[api]``
(API), ``[mim]`` (MIM), plus the workflow around it: ``[types.*]`` and ``[[processors]]``.
Their shape is declared once in ``tables.py`` and checked key by key; the cross-checks
(routes, types, entries, what clients are sent at connect) follow here. Every error is a
``ConfigError`` naming the file, the key and the problem.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import ssl
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import msgspec
import tomli

from mzconnector import (
    DEFAULT_MAX_FRAME_SIZE,
    PROTOCOL_VERSION,
    ApiModule,
    QueryInfo,
    RecordCodec,
    SchemaError,
    Welcome,
    api_exports,
    encode_frame,
    parse_type,
)

from .api_modules import load_api_module
from .auth import TOKEN_VARIABLE, Authenticator, Secret
from .errors import ConfigError
from .loader import load_entry
from .mim import BUILTIN_MIMS
from .tables import ConfigFile, ConnectorTable, EngineTable, HttpTable, TlsTable, convert_table


@dataclasses.dataclass(frozen=True)
class Processor:
    """A processor of the workflow: ``function(record, ctx)`` (sync or async) called with each
    record arriving on one of ``routes``; a batch processor (``batch`` True) is called with
    each batch, a list of records, and with ``batch = "frame"`` with a pandas DataFrame."""

    name: str
    function: Callable[..., Any]
    routes: tuple[str, ...]
    batch: bool | str = False

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.function)


@dataclasses.dataclass(frozen=True)
class QuerySpec:
    """A query clients ask by ``name``: its request travels on ``route`` to a processor, which
    answers with records of the ``reply`` type."""

    name: str
    route: str
    request: type
    reply: type


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
    queries: dict[str, QuerySpec] = dataclasses.field(default_factory=dict)
    kv_path: Path | None = None  # None: the key-value maps live in memory
    #: The tokens clients must present (None: no authentication); its repr shows no token.
    auth: Authenticator | None = None
    engine: EngineTable = dataclasses.field(default_factory=EngineTable)
    #: What the config was built from (the TOML's structure), for ``replace_connector``.
    data: Mapping[str, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)
    #: ``[http]``: the HTTP listener (health, readiness, metrics, status page), if a port is set.
    http: HttpTable = dataclasses.field(default_factory=HttpTable)

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
        """A copy with some ``[connector]`` keys changed (e.g. ``port=0``, or
        ``tls={"enabled": True, ...}``), checked as the TOML file is."""
        connector = self.data.get("connector", {})
        if not isinstance(connector, Mapping):
            connector = {}
        data = {**self.data, "connector": {**connector, **changes}}
        return _build(data, self.base_dir, self.source)

    def replace_http(self, **changes: Any) -> Config:
        """A copy with some ``[http]`` keys changed (e.g. ``port=0``), checked as the TOML
        file is."""
        http = self.data.get("http", {})
        if not isinstance(http, Mapping):
            http = {}
        return _build({**self.data, "http": {**http, **changes}}, self.base_dir, self.source)

    def welcome(self, connection_id: int, *, resumed: int = -1, keepalive: float = 0.0) -> Welcome:
        """What a client is told when its connection opens: with how far the server has taken
        the client's session (-1: it does not know it), and how often it pings the client."""
        connector = self.connector
        return Welcome(
            protocol=PROTOCOL_VERSION,
            connection_id=connection_id,
            workflow=self.workflow,
            schema=self.schema,
            accepted=list(connector.accepted_types),
            api=list(self.api_modules),
            max_frame_size=connector.max_frame_size,
            server="mzserver",
            queries={
                q.name: QueryInfo(q.request.__name__, q.reply.__name__)
                for q in self.queries.values()
            },
            routes=list(connector.input_routes),
            taps=list(connector.tap_routes),
            resumed=resumed,
            keepalive=keepalive,
        )

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
        where = f"line {exc.lineno}, column {exc.colno}"
        raise ConfigError(str(path), "", f"not valid TOML at {where}: {exc.msg}") from None
    return _build(data, path.resolve().parent, str(path))


def _build(data: Mapping[str, Any], base_dir: Path, source: str) -> Config:
    # Processor entries given as callables (embedding) bypass the string check.
    given: dict[int, Callable[..., Any]] = {}
    checked = dict(data)
    if isinstance(data.get("processors"), list):
        processors = []
        for i, p in enumerate(data["processors"]):
            if isinstance(p, Mapping) and callable(p.get("entry")):
                given[i] = p["entry"]
                p = {**p, "entry": f"<callable {getattr(p['entry'], '__qualname__', '?')}>"}
            processors.append(p)
        checked["processors"] = processors
    raw = convert_table(checked, ConfigFile, source)

    try:
        codec = RecordCodec(raw.types)
    except SchemaError as exc:
        raise ConfigError(source, "types", str(exc)) from None

    mim: dict[str, Any] = {}
    for name, text in raw.mim.items():
        if name in BUILTIN_MIMS:
            raise ConfigError(
                source, f"mim.{name!r}", "is the name of a built-in MIM; choose another name"
            )
        try:
            mim[name] = parse_type(text, {})
        except SchemaError as exc:
            raise ConfigError(source, f"mim.{name!r}", str(exc)) from None

    connector = raw.connector
    _check_connector(connector, raw, source)
    _check_ports(connector, raw.http, source)
    processors = tuple(
        Processor(
            name=p.name,
            function=given[i]
            if i in given
            else load_entry(p.entry, base_dir, source, f"processors[{i}].entry"),
            routes=tuple(p.routes),
            batch=p.batch,
        )
        for i, p in enumerate(raw.processors)
    )
    _check_routes(connector, processors, source)
    _check_batch_processors(connector, processors, raw, source)
    queries = _queries(raw, codec, processors, source)
    engine = _engine(raw, source)
    ssl_context = _ssl_context(connector.tls, base_dir, source)
    connector_data = data.get("connector")
    auth_given = isinstance(connector_data, Mapping) and "auth" in connector_data
    auth = _authenticator(connector, auth_given, source)

    api_modules = tuple(
        load_api_module(ref, base_dir, source=source, key=f"api.modules[{i}]")
        for i, ref in enumerate(raw.api.modules)
    )
    _check_api_names(api_modules, source)

    config = Config(
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
        queries=queries,
        kv_path=(base_dir / raw.kv.path) if raw.kv.path else None,
        auth=auth,
        engine=engine,
        data=data,
        http=raw.http,
    )
    _check_welcome_fits(config)
    return config


def _check_ports(connector: ConnectorTable, http: HttpTable, source: str) -> None:
    """The listeners of one server need distinct ports where their addresses overlap (the
    probe port is on the connector's host; 0, any free port, never clashes)."""
    taken = {connector.port: "connector.port"}
    if connector.tcp_probe_port:
        taken[connector.tcp_probe_port] = "connector.tcp_probe_port"
        if connector.tcp_probe_port == connector.port:
            raise ConfigError(
                source,
                "connector.tcp_probe_port",
                f"port {connector.port} is taken by connector.port",
            )
    shared = "" in (http.host, connector.host) or http.host == connector.host
    if http.port and shared and http.port in taken:
        raise ConfigError(source, "http.port", f"port {http.port} is taken by {taken[http.port]}")


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


def _check_batch_processors(
    connector: ConnectorTable, processors: tuple[Processor, ...], raw: ConfigFile, source: str
) -> None:
    """A batch processor answers no query (a query's request is one record, answered as it
    is processed); a frame processor takes records only (no bytes, no connection requests),
    and needs pandas on the server."""
    consumer = {route: (i, p) for i, p in enumerate(processors) for route in p.routes}
    for name, table in raw.queries.items():
        i, processor = consumer.get(table.route, (None, None))
        if processor is not None and processor.batch:
            raise ConfigError(
                source,
                f"queries.{name}.route",
                f"route {table.route!r} is consumed by batch processor {processor.name!r}; a "
                "query needs an ordinary processor",
            )
    frames = {route: (i, p) for route, (i, p) in consumer.items() if p.batch == "frame"}
    if not frames:
        return
    try:
        import pandas  # noqa: F401
    except ImportError:
        i = next(iter(frames.values()))[0]
        raise ConfigError(
            source,
            f"processors[{i}].batch",
            '"frame" needs pandas on the server (pip install pandas)',
        ) from None
    for route, (i, processor) in frames.items():
        if connector.connection_control and route == connector.connection_request_route:
            raise ConfigError(
                source,
                f"processors[{i}].batch",
                f"processor {processor.name!r} takes DataFrames of records; connection "
                f"requests arrive on route {route!r}",
            )
        if connector.output_routes.get("bytes") == route:
            raise ConfigError(
                source,
                f"processors[{i}].batch",
                f"processor {processor.name!r} takes DataFrames of records; bytes from clients "
                f"arrive on route {route!r}",
            )


def _consumed_by_processors(processors: tuple[Processor, ...]) -> set[str]:
    return {route for p in processors for route in p.routes}


def _queries(
    raw: ConfigFile, codec: RecordCodec, processors: tuple[Processor, ...], source: str
) -> dict[str, QuerySpec]:
    consumed = _consumed_by_processors(processors)
    for i, route in enumerate(raw.connector.tap_routes):
        if route not in consumed:
            raise ConfigError(
                source,
                f"connector.tap_routes[{i}]",
                f"no processor consumes route {route!r}: only routes between processors can be "
                "tapped (clients subscribe to the connector's input routes)",
            )
    queries = {}
    for name, table in raw.queries.items():
        for key in ("request", "reply"):
            type_name = getattr(table, key)
            if type_name not in codec.types:
                declared = ", ".join(codec.types) or "none"
                raise ConfigError(
                    source,
                    f"queries.{name}.{key}",
                    f"unknown record type {type_name!r} (declared: {declared})",
                )
        if table.route not in consumed:
            raise ConfigError(
                source, f"queries.{name}.route", f"no processor consumes route {table.route!r}"
            )
        queries[name] = QuerySpec(
            name, table.route, codec.types[table.request], codec.types[table.reply]
        )
    return queries


_SUBJECT_TOKEN = re.compile(r"[A-Za-z0-9_-]+\Z")


def _engine(raw: ConfigFile, source: str) -> EngineTable:
    engine = raw.engine
    if engine.kind not in ("local", "nats"):
        raise ConfigError(source, "engine.kind", f"expected 'local' or 'nats', got {engine.kind!r}")
    if engine.kind == "local":
        return engine
    urls = [engine.url] if isinstance(engine.url, str) else engine.url
    if not urls or not all(u.startswith(("nats://", "tls://")) for u in urls):
        raise ConfigError(source, "engine.url", f"expected nats:// URLs, got {engine.url!r}")
    stream = engine.stream or "mz_" + re.sub(r"[^A-Za-z0-9_-]", "_", raw.workflow.name)
    if not _SUBJECT_TOKEN.match(stream):
        raise ConfigError(source, "engine.stream", f"{stream!r}: letters, digits, '_' and '-' only")
    routes = {
        *raw.connector.input_routes,
        *raw.connector.output_routes.values(),
        *(r for p in raw.processors for r in p.routes),
    }
    for route in sorted(routes):
        if not _SUBJECT_TOKEN.match(route) or route.startswith("_"):
            raise ConfigError(
                source,
                "engine.kind",
                f"route {route!r}: with the nats engine a route is a NATS subject token "
                "(letters, digits, '_' and '-', not starting with '_')",
            )
    return msgspec.structs.replace(engine, stream=stream)


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


def _authenticator(connector: ConnectorTable, given: bool, source: str) -> Authenticator | None:
    """The tokens clients must present: ``[connector.auth]`` when the file has it, else the
    environment variable (if set), else none. No message here ever shows a token."""
    if not given:
        value = os.environ.get(TOKEN_VARIABLE, "")
        return Authenticator({"": Secret(value)}, TOKEN_VARIABLE) if value else None
    table = connector.auth
    tokens: dict[str, Secret] = {}
    if table.token is not None:
        if table.token.empty:
            raise ConfigError(source, "connector.auth.token", "is empty: it would let anyone in")
        tokens[""] = table.token
    owner: dict[bytes, str] = {}
    for name, secret in table.tokens.items():
        key = f"connector.auth.tokens.{name}"
        if not name:
            raise ConfigError(source, key, 'a user name cannot be "" (use token = ... instead)')
        if secret.empty:
            raise ConfigError(source, key, "is empty: it would let anyone in")
        if secret.digest in owner:
            raise ConfigError(source, key, f"is the same token as {owner[secret.digest]}'s")
        owner[secret.digest] = name
        tokens[name] = secret
    if tokens.get("") is not None and tokens[""].digest in owner:
        name = owner[tokens[""].digest]
        key = f"connector.auth.tokens.{name}"
        raise ConfigError(source, key, "is the same token as the shared one")
    if not tokens:
        raise ConfigError(
            source,
            "connector.auth",
            'no token: give token = "..." (one shared token) or [connector.auth.tokens] '
            '(name = "token" rows)',
        )
    return Authenticator(tokens, source)


def _check_welcome_fits(config: Config) -> None:
    """Clients learn the schema and the API modules in one frame: it must fit."""
    size = len(encode_frame(config.welcome(2**62))) - 4 + 64
    limit = config.connector.max_frame_size
    if size > limit:
        raise ConfigError(
            config.source,
            "connector.max_frame_size",
            f"{limit} bytes is too small for the schema and API modules "
            f"clients receive at connect ({size} bytes)",
        )
    # A client learns the frame size from the Welcome itself: until then it takes frames of
    # up to the protocol's default size, whatever max_frame_size says.
    if size > DEFAULT_MAX_FRAME_SIZE:
        raise ConfigError(
            config.source,
            "api.modules",
            f"the schema and API modules clients receive at connect take {size} bytes; a client "
            f"takes at most {DEFAULT_MAX_FRAME_SIZE} bytes before it has connected",
        )


def _check_api_names(modules: tuple[ApiModule, ...], source: str) -> None:
    owner: dict[str, str] = {}
    for i, module in enumerate(modules):
        for name in api_exports(module.source, module.name):
            if name in owner:
                raise ConfigError(
                    source,
                    f"api.modules[{i}]",
                    f"{name!r} is exported by both {owner[name]!r} and {module.name!r}",
                )
            owner[name] = module.name
