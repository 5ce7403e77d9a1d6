"""The connector: listens, admits clients, takes their records onto routes, and delivers what
the workflow routes back.

Each client is a ``ServerConnection`` (session.py), run here inside an error boundary:
whatever goes wrong with one is logged and closes that one; the server goes on.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import math
from collections.abc import Iterator
from typing import Any, Union

import cloudpickle
import msgspec
import trio

from mzconnector import (
    PROTOCOL_VERSION,
    Pickled,
    Welcome,
    encode_record_frames,
)

from .config import Config
from .connections import ConnectionInfo
from .errors import BindError
from .mim import MimTable
from .routes import Batch, RouteTable
from .session import ServerConnection

log = logging.getLogger("mzserver.connector")

#: What one outbox item holds at most (records, and bytes of bytes payloads), however large a
#: routed batch is: the outbox is bounded in items, so this bounds it in memory.
DELIVERY_RECORDS = 8192
DELIVERY_BYTES = 1 << 20


class Connector:
    """The connector agent: listener, connections, and the consumer of the input routes."""

    def __init__(self, config: Config, routes: RouteTable, mim: MimTable) -> None:
        self.config = config
        self.settings = settings = config.connector
        self.routes = routes
        self.mim = mim
        codec = config.codec
        accepted = settings.accepted_types
        self.accepted = tuple(accepted)
        kinds = [bytes if n == "bytes" else codec.types[n] for n in accepted]
        self.batch_decoder = msgspec.msgpack.Decoder(list[Union[tuple(kinds)]]) if kinds else None
        self.item_decoder = msgspec.msgpack.Decoder(Union[tuple(kinds)]) if kinds else None
        self.type_routes: dict[type, str] = {
            (bytes if name == "bytes" else codec.types[name]): route
            for name, route in settings.output_routes.items()
        }
        distinct = set(self.type_routes.values())
        self.single_route = distinct.pop() if len(distinct) == 1 else None
        self.wire_types = frozenset([*codec.types.values(), bytes])
        self.welcome = functools.partial(
            Welcome,
            protocol=PROTOCOL_VERSION,
            workflow=config.workflow,
            schema=config.schema,
            accepted=list(accepted),
            api=list(config.api_modules),
            max_frame_size=settings.max_frame_size,
            server="mzserver",
        )
        if not settings.allow_multiple_connections:
            self.limit = 1
        else:
            self.limit = settings.max_connections or math.inf
        self.limiter = trio.CapacityLimiter(self.limit)
        self.connections: dict[int, ServerConnection] = {}
        self._pending: dict[int, ServerConnection] = {}
        self._all: set[ServerConnection] = set()
        self._ids = itertools.count(1)
        self._accepting = trio.CancelScope()
        self.stop_requested = trio.Event()
        self.drained = trio.Event()
        self._closed = trio.Event()
        for route in settings.input_routes:
            routes.bind(route, self.deliver)

    # -- listening --------------------------------------------------------------------------
    async def open_listeners(self) -> list[trio.SocketListener]:
        host = self.settings.host or None
        port = self.settings.port
        try:
            return await trio.open_tcp_listeners(port, host=host)
        except OSError as exc:
            where = f"{self.settings.host or '*'}:{port}"
            hint = (
                " (is another server running? use --port 0 for any free port)"
                if exc.errno == errno.EADDRINUSE
                else ""
            )
            raise BindError(f"cannot listen on {where}: {exc.strerror or exc}{hint}") from exc

    async def serve(
        self,
        listeners: list[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept connections until ``stop_accepting``; return when every connection is closed."""
        wrapped: list[Any] = listeners
        context = self.config.ssl_context
        if context is not None:
            wrapped = [trio.SSLListener(lst, context, https_compatible=False) for lst in listeners]
        try:
            async with trio.open_nursery() as handlers:
                # Cancelling _accepting closes the listeners; connections live on in `handlers`.
                with self._accepting:
                    async with trio.open_nursery() as accept:
                        await accept.start(
                            functools.partial(
                                trio.serve_listeners,
                                self._handle,
                                wrapped,
                                handler_nursery=handlers,
                            )
                        )
                        task_status.started()
        finally:
            self._closed.set()

    async def wait_closed(self) -> None:
        """Wait until the listeners and every connection are closed."""
        await self._closed.wait()

    # -- stopping ---------------------------------------------------------------------------
    def stop_accepting(self) -> None:
        self.stop_requested.set()
        self._accepting.cancel()

    def stop_reading(self) -> None:
        for conn in list(self._all):
            conn.stop_reading()

    async def wait_readers_stopped(self) -> None:
        for conn in list(self._all):
            await conn.reader_done.wait()

    def abort(self) -> None:
        for conn in list(self._all):
            conn.abort()

    # -- what the workflow may do with connections (ConnectionControl) ------------------------
    def decide(self, connection_id: int, accept: bool, reason: str = "") -> None:
        """Accept or reject a pending connection request."""
        conn = self._pending.get(connection_id)
        if conn is None:
            raise LookupError(f"no connection request {connection_id} is waiting for a decision")
        conn.decision = (accept, reason)
        conn.decided.set()

    def set_output_route(self, connection_id: int, type_name: str, route: str | None) -> None:
        """Send one connection's records of ``type_name`` on ``route`` from its next records
        on (``None``: back to the configured route)."""
        conn = self.connections.get(connection_id)
        if conn is None:
            raise LookupError(f"connection {connection_id} is not open")
        kind = bytes if type_name == "bytes" else self.config.codec.types.get(type_name)
        if kind not in self.type_routes:
            raise ValueError(f"{type_name!r} is not an accepted type ({', '.join(self.accepted)})")
        if route is not None and route not in self.routes:
            raise LookupError(f"no route {route!r} (routes: {', '.join(self.routes.names)})")
        routes = dict(conn.type_routes)
        routes[kind] = route if route is not None else self.type_routes[kind]
        conn.type_routes = routes
        distinct = set(routes.values())
        conn.single_route = distinct.pop() if len(distinct) == 1 else None

    def connections_info(self) -> list[ConnectionInfo]:
        return [c.info for c in self.connections.values() if c.info is not None]

    # -- delivering records from the workflow -------------------------------------------------
    async def deliver(self, batch: Batch) -> None:
        """Consumer of the input routes: send a batch to every client, or to the one it names."""
        counters = self.mim.counters
        wire_types = self.wire_types
        items = []
        payload = 0  # bytes of bytes payloads, to bound outbox items
        for record in batch.records:
            kind = type(record)
            if kind in wire_types:
                items.append(record)
                if kind is bytes:
                    payload += len(record)
                continue
            try:
                items.append(Pickled(cloudpickle.dumps(record)))
            except Exception as exc:
                counters.undeliverable += 1
                log.error(
                    "cannot send a %s to clients (%s); counted as undeliverable",
                    type(record).__name__,
                    exc,
                )
        if not items:
            return
        target = batch.connection
        if target is None and self.settings.per_connection_routing and batch.origin is not None:
            target = batch.origin.id
        if target is None:
            targets = list(self.connections.values())
        else:
            conn = self.connections.get(target)
            targets = [conn] if conn is not None else []
        if not targets:
            counters.undeliverable += len(items)
            whom = "no client is connected" if target is None else f"connection {target} is gone"
            log.warning(
                "%d record(s) on route %r are undeliverable: %s", len(items), batch.route, whom
            )
            return
        for chunk in _delivery_chunks(items, payload):
            frames = encode_record_frames(chunk, self.settings.max_frame_size)
            for conn in targets:
                await conn.enqueue_records(frames, len(chunk))

    # -- connections --------------------------------------------------------------------------
    async def _handle(self, stream: trio.abc.Stream) -> None:
        conn = ServerConnection(self, stream, next(self._ids))
        self._all.add(conn)
        try:
            await conn.run()
        except Exception as exc:
            if _only(exc, (trio.BrokenResourceError, trio.ClosedResourceError)):
                log.info("connection %d (%s) lost: %s", conn.id, conn.peer, _first_cause(exc))
            else:
                log.exception("connection %d (%s) failed", conn.id, conn.peer)
        finally:
            self._all.discard(conn)
            conn.reader_done.set()
            conn.close_twin()
            await trio.aclose_forcefully(stream)


def _delivery_chunks(items: list[Any], payload: int) -> Iterator[list[Any]]:
    """Split a routed batch (with ``payload`` bytes of bytes records) into outbox items of
    bounded size."""
    if len(items) <= DELIVERY_RECORDS and payload < DELIVERY_BYTES:
        yield items
        return
    start = size = 0
    for i, item in enumerate(items):
        size += len(item) if type(item) is bytes else 0
        if i + 1 - start >= DELIVERY_RECORDS or size >= DELIVERY_BYTES:
            yield items[start : i + 1]
            start, size = i + 1, 0
    if start < len(items):
        yield items[start:]


def _only(exc: BaseException, kinds: tuple[type[BaseException], ...]) -> bool:
    """Whether an exception, or every exception in a group, is one of ``kinds``."""
    inner = getattr(exc, "exceptions", None)
    if inner is not None:
        return all(_only(e, kinds) for e in inner)
    return isinstance(exc, kinds)


def _first_cause(exc: BaseException) -> BaseException:
    while getattr(exc, "exceptions", None):
        exc = exc.exceptions[0]  # type: ignore[attr-defined]
    return exc.__cause__ or exc
