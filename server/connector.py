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
    ColumnBatch,
    LocalProtocolError,
    Pickled,
    Records,
    batch_length,
    encode_record_frames,
)

from .config import Config
from .connections import ConnectionInfo
from .engines import Engine
from .errors import BindError
from .mim import MimTable
from .outbox import Waiting
from .routes import Batch, OutputRoutes
from .session import ServerConnection
from .sessions import SessionTable
from .subscriptions import SubscriptionHub

log = logging.getLogger("mzserver.connector")

#: What one outbox item holds at most (records, and bytes of bytes payloads), however large a
#: routed batch is: the outbox is bounded in items, so this bounds it in memory.
DELIVERY_RECORDS = 8192
DELIVERY_BYTES = 1 << 20
#: Room a frame needs beside the items of a batch.
FRAME_OVERHEAD = 64
_encoder = msgspec.msgpack.Encoder()
_records_frame = msgspec.msgpack.Decoder(Records)


class Connector:
    """The connector agent: listener, connections, and the consumer of the input routes."""

    def __init__(self, config: Config, engine: Engine, mim: MimTable) -> None:
        self.config = config
        self.engine = engine
        self.kv = engine.kv
        routes = engine.routes
        self.settings = settings = config.connector
        self.routes = routes
        self.mim = mim
        codec = config.codec
        accepted = settings.accepted_types
        self.accepted = tuple(accepted)
        kinds = [bytes if n == "bytes" else codec.types[n] for n in accepted]
        self.batch_decoder = msgspec.msgpack.Decoder(list[Union[tuple(kinds)]]) if kinds else None
        self.item_decoder = msgspec.msgpack.Decoder(Union[tuple(kinds)]) if kinds else None
        self.output_routes = OutputRoutes(
            {
                (bytes if name == "bytes" else codec.types[name]): route
                for name, route in settings.output_routes.items()
            }
        )
        self.query_decoders = {
            name: msgspec.msgpack.Decoder(spec.request) for name, spec in config.queries.items()
        }
        self.hub = SubscriptionHub(codec, mim.counters, limit=settings.durable_limit, routes=routes)
        self.record_types = frozenset(codec.types.values())
        self.wire_types = self.record_types | {bytes, Pickled}
        # What the workflow routes to clients is checked against its declared types before a
        # byte of it is sent: a client's typed decoder would fail on the whole batch.
        self._validator = codec.decoder([*codec.types, "bytes"]) if codec.types else None
        self.welcome = config.welcome
        if not settings.allow_multiple_connections:
            self.limit = 1
        else:
            self.limit = settings.max_connections or math.inf
        self.limiter = trio.CapacityLimiter(self.limit)
        memory = settings.session_memory
        #: Client sessions: how far each client's numbered records were taken.
        self.sessions = SessionTable(memory.seconds, memory.sessions, trio.current_time)
        self.connections: dict[int, ServerConnection] = {}  # open: records go to these
        self._sessions: dict[int, ServerConnection] = {}  # every live one, open or not yet
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
        for conn in list(self._sessions.values()):
            conn.stop_reading()

    async def wait_readers_stopped(self) -> None:
        for conn in list(self._sessions.values()):
            await conn.reader_done.wait()

    def abort(self) -> None:
        for conn in list(self._sessions.values()):
            conn.abort()

    # -- what sessions tell it --------------------------------------------------------------
    def opened(self, conn: ServerConnection) -> None:
        """A connection is open: records routed to clients go to it from now on."""
        self.connections[conn.id] = conn

    def closed(self, conn: ServerConnection) -> None:
        """A connection takes no more records."""
        self.connections.pop(conn.id, None)

    def limit_reason(self) -> str:
        if self.limit == 1 and not self.settings.allow_multiple_connections:
            return "this connector allows one connection at a time, and one is open"
        return f"the connection limit ({self.limit}) is reached"

    # -- what the workflow may do with connections (ConnectionControl) ------------------------
    def decide(self, connection: ConnectionInfo | int, accept: bool, reason: str = "") -> None:
        """Accept or reject a pending connection request."""
        connection_id = _id(connection)
        conn = self._sessions.get(connection_id)
        if conn is None:
            raise LookupError(f"no connection request {connection_id} is waiting for a decision")
        conn.decide(accept, reason)

    def set_output_route(
        self, connection: ConnectionInfo | int, type_name: str, route: str | None
    ) -> None:
        """Send one connection's records of ``type_name`` on ``route`` from its next records
        on (``None``: back to the configured route)."""
        connection_id = _id(connection)
        conn = self.connections.get(connection_id)
        if conn is None:
            raise LookupError(f"connection {connection_id} is not open")
        kind = bytes if type_name == "bytes" else self.config.codec.types.get(type_name)
        configured = self.output_routes.by_type
        if kind not in configured:
            raise ValueError(f"{type_name!r} is not an accepted type ({', '.join(self.accepted)})")
        if route is not None and route not in self.routes:
            raise LookupError(f"no route {route!r} (routes: {', '.join(self.routes.names)})")
        conn.set_output_route(kind, route if route is not None else configured[kind])

    def connections_info(self) -> list[ConnectionInfo]:
        return [c.info for c in self.connections.values() if c.info is not None]

    # -- delivering records from the workflow -------------------------------------------------
    async def deliver(self, batch: Batch) -> None:
        """Consumer of the input routes: send a batch to every client, or to the one it names.
        A connection that subscribes to the route gets its records through its subscriptions
        (and a durable subscription keeps them while its client is away). Each other client
        gets them as soon as its outbox has room; waiting for one that does not read never
        holds up the others beyond that client's own ``delivery_timeout``, and once it has
        timed out, records for it are counted undeliverable at once until it reads."""
        route = batch.route
        target = batch.connection
        records = batch.records
        columnar = type(records) is ColumnBatch  # clients get it a column at a time
        if target is None and self.settings.per_connection_routing and batch.origin is not None:
            target = batch.origin.id
        if target is None:
            subscribed = False
            if not columnar or self.hub.listens(route):  # subscriptions match records
                subscribed = self.hub.deliver(route, list(records) if columnar else records)
            targets = [c for c in self.connections.values() if not c.subscribes(route)]
        else:
            conn = self.connections.get(target)
            if conn is not None and conn.subscribes(route):
                conn.offer(route, list(records))
                return
            subscribed = False
            targets = [conn] if conn is not None else []
        if not targets:
            if not subscribed:
                self.mim.counters.undeliverable += len(batch.records)
                whom = f"connection {target} is gone" if target else "no client is connected"
                log.warning(
                    "%d record(s) on route %r are undeliverable: %s",
                    len(batch.records),
                    route,
                    whom,
                )
            return
        deliveries = self._column_frames(records, route) if columnar else self._record_frames(batch)
        for frames, count in deliveries:
            waiting: list[tuple[ServerConnection, Waiting]] = []
            for conn in targets:
                left = conn.outbox.put_records_nowait(frames, count, columns=columnar)
                if left is not None:
                    waiting.append((conn, left))
            if len(waiting) == 1:
                conn, left = waiting[0]
                await conn.outbox.put_records_when_room(left)
            elif waiting:
                async with trio.open_nursery() as nursery:
                    for conn, left in waiting:
                        nursery.start_soon(conn.outbox.put_records_when_room, left)

    def _record_frames(self, batch: Batch) -> Iterator[tuple[list[bytearray], int]]:
        """The ``Records`` frames of a routed batch, in outbox items of bounded size."""
        items, payload, pickles = self._wire_items(batch)
        for chunk in _delivery_chunks(items, payload):
            frames, kept = self._encode(chunk, batch, pickles)
            if kept:
                yield frames, len(kept)

    def _column_frames(self, batch: ColumnBatch, route: str) -> list[tuple[list[bytearray], int]]:
        """The ``Columns`` frames of a column batch, one outbox item each (a batch is at most
        ``FRAME_BATCH_BYTES`` when a processor routes a frame, a client's frame when one
        sends it). A row too large for a frame is undeliverable."""
        try:
            return [([frame], rows) for frame, rows in batch.frames(self.settings.max_frame_size)]
        except LocalProtocolError as exc:
            self.mim.counters.undeliverable += len(batch)
            log.error("%d row(s) on route %r are undeliverable: %s", len(batch), route, exc)
            return []

    def wire(self, records: list[Any], route: str) -> list[tuple[msgspec.Raw, list[Any]]]:
        """Records as they travel to a subscription: encoded lists of items, each fitting in a
        frame, with the items each holds (objects that are not records pickled); records that
        cannot travel are left out, logged and counted (as ``deliver`` does)."""
        batch = Batch(route, records, None)
        items, payload, pickles = self._wire_items(batch)
        out = []
        for chunk in _delivery_chunks(items, payload):
            frames, kept = self._encode(chunk, batch, pickles)
            start = 0
            for frame in frames:
                raw = _records_frame.decode(memoryview(frame)[4:]).items
                end = start + batch_length(raw)
                out.append((raw, kept[start:end]))
                start = end
        return out

    def _wire_items(self, batch: Batch) -> tuple[list[Any], int, bool]:
        """What can travel of a batch: records and bytes as they are, other objects pickled
        (counted undeliverable when they cannot be); the bytes of its bytes payloads; and
        whether it holds pickles."""
        records = batch.records
        kinds = set(map(type, records))
        if kinds <= self.record_types:  # the usual batch, looked at in one pass at C speed
            return records, 0, False
        wire_types = self.wire_types
        if kinds <= wire_types and Pickled not in kinds:
            return records, sum(len(r) for r in records if type(r) is bytes), False
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
                self.mim.counters.undeliverable += 1
                log.error(
                    "cannot send a %s to clients (%s); counted as undeliverable",
                    type(record).__name__,
                    exc,
                )
        return items, payload, True

    def _encode(
        self, chunk: list[Any], batch: Batch, pickles: bool
    ) -> tuple[list[bytearray], list[Any]]:
        """Frames of a chunk of items, checked: a record that does not match its declared type
        is the routing processor's error, and an item too large for any frame is undeliverable;
        either is left out, logged and counted. Returns the frames and the items they hold."""
        limit = self.settings.max_frame_size
        try:
            frames = encode_record_frames(chunk, limit)
        except LocalProtocolError:
            chunk = self._fitting(chunk, limit - FRAME_OVERHEAD, batch)
            frames = encode_record_frames(chunk, limit) if chunk else []
        if self._validator is not None and not self._valid(frames, chunk, pickles):
            chunk = self._matching(chunk, batch)
            frames = encode_record_frames(chunk, limit) if chunk else []
        return frames, chunk

    def _valid(self, frames: list[bytearray], chunk: list[Any], pickles: bool) -> bool:
        validator = self._validator
        assert validator is not None
        try:
            if pickles and any(type(item) is Pickled for item in chunk):  # (the validator
                # admits no pickles)
                records = [item for item in chunk if type(item) in self.record_types]
                validator.decode(_encoder.encode(records))
            else:
                for frame in frames:
                    validator.decode(_records_frame.decode(memoryview(frame)[4:]).items)
        except (msgspec.DecodeError, UnicodeDecodeError):
            return False
        return True

    def _matching(self, chunk: list[Any], batch: Batch) -> list[Any]:
        """The items of a chunk that match their declared types; each other one is logged and
        counted as an error of the processor that routed it."""
        validator = self._validator
        assert validator is not None
        codec = self.config.codec
        kept = []
        for item in chunk:
            if type(item) in self.record_types:
                encoded = _encoder.encode(item)
                try:
                    validator.decode(b"\x91" + encoded)  # a batch of this one record
                except (msgspec.DecodeError, UnicodeDecodeError):
                    name, field, problem = codec.explain(encoded, codec.types)
                    self.mim.counters.processor_errors += 1
                    log.error(
                        "processor %r routed a %s to route %r that does not match its declared "
                        "type (%s: %s); it is left out and counted as a processor error",
                        batch.source or "?",
                        name,
                        batch.route,
                        f"{name}.{field}" if field else name,
                        problem,
                    )
                    continue
            kept.append(item)
        return kept

    def _fitting(self, chunk: list[Any], limit: int, batch: Batch) -> list[Any]:
        """The items of a chunk that fit in a frame; each other one is logged and counted
        undeliverable."""
        kept = []
        for item in chunk:
            size = len(_encoder.encode(item))
            if size <= limit:
                kept.append(item)
                continue
            self.mim.counters.undeliverable += 1
            kind = "pickled object" if type(item) is Pickled else type(item).__name__
            log.error(
                "a %s of %d bytes on route %r does not fit in a frame (max_frame_size is %d "
                "bytes); counted as undeliverable",
                kind,
                size,
                batch.route,
                self.settings.max_frame_size,
            )
        return kept

    # -- connections --------------------------------------------------------------------------
    async def _handle(self, stream: trio.abc.Stream) -> None:
        conn = ServerConnection(self, stream, next(self._ids))
        self._sessions[conn.id] = conn
        try:
            await conn.run()
        except Exception as exc:
            if _only(exc, (trio.BrokenResourceError, trio.ClosedResourceError)):
                log.info("%s lost: %s", conn.name, _first_cause(exc))
            else:
                log.exception("%s failed", conn.name)
        finally:
            del self._sessions[conn.id]
            conn.reader_done.set()
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


def _id(connection: ConnectionInfo | int) -> int:
    return connection if isinstance(connection, int) else connection.id


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
