"""The NATS JetStream engine: routes as subjects of one durable stream per workflow, processors
as consumers shared by any number of worker processes, maps and MIM totals in key-value
buckets.

Subjects of the stream ``S`` (retention: interest; when it is full, publishing waits):

- ``S.r.<route>``: a route a processor consumes, through the durable pull consumer
  ``p_<route>`` that every worker running that processor shares (a work queue). A worker
  acknowledges a batch only once the processor has run on it and what it routed onward is
  stored; a worker that dies leaves the batch to another after ``ack_wait``. Publishes carry
  message ids derived from the batch they came from, so a batch processed again after a crash
  stores its output once (JetStream's duplicate window).
- ``S.c.<instance>.<route>`` and ``S.c.all.<route>``: records for the connector server
  ``<instance>`` (one connection, or per-connection routing), and for every connector (a
  broadcast); each connector reads them through a consumer of its own, ``c_<instance>``.
- ``S.c.<instance>._reply``: what workers tell a connector: query replies, decisions on
  connection requests, output routes of connections.

A batch travels as one message: its items are msgpack (declared records, bytes, plain values;
objects that are not records are pickled only on their way to a connector, which never
unpickles them), and the origin connection, target connection, source processor and query
travel in headers. Query cancels go over plain NATS (``_S.cancel``). Maps live in the bucket
``S_kv``, and every process puts its MIM values in ``S_mim`` each second, where connectors
total them.

nats-py speaks asyncio; the server speaks trio: an asyncio loop in a thread of its own does the
NATS work (``bridge.py``), crossed once per batch.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import datetime
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Union

import cloudpickle
import msgspec
import nats
import nats.errors
import nats.js.errors
import trio
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StreamConfig,
)

from mzconnector import (
    ColumnBatch,
    Columns,
    FieldMismatch,
    LocalProtocolError,
    Message,
    Pickled,
    QueryFailed,
    QueryReply,
    recast_columns,
)

from .bridge import AsyncioBridge
from .config import Config
from .connections import ConnectionControl, ConnectionEnded, ConnectionInfo, ConnectionRequest
from .errors import ServerError
from .kv import KvBackend
from .mim import BUILTIN_MIMS, MimTable
from .queries import QueryCall
from .routes import Batch, RouteTable, UnknownRoute

log = logging.getLogger("mzserver.nats")

_encoder = msgspec.msgpack.Encoder()
#: Messages a worker fetches at a time, per route.
FETCH = 4
#: Seconds between two puts of a process's MIM values (and a connector's refresh of totals).
MIM_EVERY = 1.0
#: A process whose MIM values are older than this is taken for gone (its counters, and its
#: clients, no longer count).
MIM_STALE = 5.0
#: Backoff between publishes that NATS refuses (full, or unreachable), seconds.
RETRY_FIRST, RETRY_MOST = 0.05, 1.0


class EngineError(ServerError):
    """The NATS engine cannot run (NATS unreachable at start, a stream it cannot use)."""


# -- what travels --------------------------------------------------------------------------------


class Plain(msgspec.Struct, tag="__plain__", array_like=True):
    """A plain value routed between processors (a dict, a list, a number...)."""

    value: Any


class Control(msgspec.Struct, tag="__control__", array_like=True):
    """A ``ConnectionRequest`` or ``ConnectionEnded`` on its way to the workflow."""

    kind: str
    connection: ConnectionInfo
    reason: str = ""


class Forward(msgspec.Struct, tag=True, array_like=True):
    """To a connector: a query's reply (an encoded ``QueryReply``/``QueryFailed``)."""

    connection: int
    message: msgspec.Raw


class Decision(msgspec.Struct, tag=True, array_like=True):
    """To a connector: the workflow's answer to a connection request."""

    connection: int
    accept: bool
    reason: str = ""


class OutputRoute(msgspec.Struct, tag=True, array_like=True):
    """To a connector: ``ctx.set_output_route`` for one of its connections."""

    connection: int
    type_name: str
    route: str | None


_Reply = Union[Forward, Decision, OutputRoute]
_replies = msgspec.msgpack.Decoder(_Reply)
_messages = msgspec.msgpack.Decoder(Union[QueryReply, QueryFailed])
_connection = msgspec.msgpack.Decoder(ConnectionInfo)
_columns = msgspec.msgpack.Decoder(Columns)
_PLAIN = (dict, list, str, int, float, bool, type(None), datetime.datetime)

#: While a worker processes a message: (its stream sequence, a counter of what it publishes),
#: so that what it routes onward gets the same message ids if it is processed again.
_processing: contextvars.ContextVar[tuple[int, itertools.count[int]] | None] = (
    contextvars.ContextVar("mz_processing", default=None)
)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# -- routes on NATS -------------------------------------------------------------------------------


class NatsRouteTable(RouteTable):
    """Routes as subjects: ``send`` publishes and returns once JetStream stored the batch;
    ``bind`` records which routes this process consumes (``NatsEngine.run`` consumes them)."""

    def __init__(self, engine: NatsEngine) -> None:
        super().__init__()
        self._engine = engine
        self._known = set(engine.config.routes)
        self._input = set(engine.config.connector.input_routes)

    def __contains__(self, route: object) -> bool:
        return route in self._known

    @property
    def names(self) -> list[str]:
        return sorted(self._known)

    def add_tap(self, route: str, tap: Any) -> None:
        first = route not in self.taps
        super().add_tap(route, tap)
        if first:
            self._engine.start_tap(route)

    async def tap_ready(self, route: str) -> None:
        # The tap's consumer takes what is published after it exists: wait for it, so that a
        # client told "subscribed" misses nothing sent after.
        ready = self._engine.tap_ready.get(route)
        if ready is not None:
            await ready.wait()

    def remove_tap(self, route: str, tap: Any) -> None:
        super().remove_tap(route, tap)
        if route not in self.taps:
            self._engine.stop_tap(route)

    async def send(
        self,
        route: str,
        records: list[Any] | ColumnBatch,
        origin: ConnectionInfo | None = None,
        connection: int | None = None,
        source: str | None = None,
        query: Any = None,
        raw: Any = None,
    ) -> None:
        if route not in self._known:
            raise UnknownRoute(route)
        self.count(route, records)
        engine = self._engine
        to_connector = route in self._input
        if to_connector:
            target = connection
            if target is None and engine.per_connection and origin is not None:
                target = origin.id
            server = origin.server if (target is not None and origin is not None) else "all"
            subject = f"{engine.stream}.c.{server}.{route}"
        else:
            subject = f"{engine.stream}.r.{route}"
        headers: dict[str, str] = {}
        if origin is not None:
            headers["Mz-Origin"] = _b64(_encoder.encode(origin))
        if to_connector and target is not None:
            headers["Mz-Connection"] = str(target)
        elif connection is not None:
            headers["Mz-Connection"] = str(connection)
        if source:
            headers["Mz-Source"] = source
        if query is not None:
            headers["Mz-Query"] = f"{query.id}:{query.name}"
            engine.expect_replies(query)
        if type(records) is ColumnBatch:  # it stays a column batch: a Columns message
            payloads = engine.encode_columns(route, records)
            headers["Mz-Columns"] = "1"
        else:
            payloads, wrapped = engine.encode(route, records, raw, to_connector, source)
            if wrapped:
                headers["Mz-Wrapped"] = "1"  # plain values or connection events: unwrap them
        self.in_flight.add()
        try:
            for payload in payloads:
                await engine.publish(subject, payload, headers)
        finally:
            self.in_flight.done()


# -- key-value maps on NATS -------------------------------------------------------------------


class NatsKv(KvBackend):
    """The maps in the bucket ``<stream>_kv``: a key is ``m.<map, hex>.<key, base64url>``."""

    def __init__(self, engine: NatsEngine) -> None:
        super().__init__(engine.config.codec)
        self._engine = engine

    @staticmethod
    def _name(name: str, key: bytes | None = None) -> str:
        prefix = f"m.{name.encode().hex()}"
        if key is None:
            return prefix
        return f"{prefix}.{base64.urlsafe_b64encode(key).decode().rstrip('=') or '_'}"

    @staticmethod
    def _unname(name: str) -> bytes:
        token = name.rsplit(".", 1)[1]
        return b"" if token == "_" else base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))

    def _blocking(self, function: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        return self._engine.bridge.run_blocking(function, *args, timeout=self._engine.timeout)

    # A processor's ctx.kv is synchronous: each operation is a round trip to NATS that holds
    # the server's loop meanwhile (the README says: keep them off the per-record path).
    def get_raw(self, name: str, key: bytes) -> tuple[str, bytes] | None:
        return self._blocking(self._get, name, key)

    def set_raw(self, name: str, key: bytes, kind: str, value: bytes) -> None:
        self._blocking(self._set, name, key, kind, value)

    def remove_raw(self, name: str, key: bytes) -> bool:
        return bool(self._blocking(self._remove, name, key))

    def items_raw(self, name: str) -> list[tuple[bytes, str, bytes]]:
        return list(self._blocking(self._items, name))

    async def aget_raw(self, name: str, key: bytes) -> tuple[str, bytes] | None:
        return await self._engine.bridge.run(self._get, name, key)

    async def aset_raw(self, name: str, key: bytes, kind: str, value: bytes) -> None:
        await self._engine.bridge.run(self._set, name, key, kind, value)

    async def aremove_raw(self, name: str, key: bytes) -> bool:
        return bool(await self._engine.bridge.run(self._remove, name, key))

    async def aitems_raw(self, name: str) -> list[tuple[bytes, str, bytes]]:
        return list(await self._engine.bridge.run(self._items, name))

    # -- on the asyncio loop ----------------------------------------------------------------
    async def _get(self, name: str, key: bytes) -> tuple[str, bytes] | None:
        try:
            entry = await self._engine.kv_bucket.get(self._name(name, key))
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None
        if not entry.value:
            return None
        kind, value = msgspec.msgpack.decode(entry.value, type=tuple[str, bytes])
        return kind, value

    async def _set(self, name: str, key: bytes, kind: str, value: bytes) -> None:
        await self._engine.kv_bucket.put(self._name(name, key), _encoder.encode((kind, value)))

    async def _remove(self, name: str, key: bytes) -> bool:
        if await self._get(name, key) is None:
            return False
        await self._engine.kv_bucket.delete(self._name(name, key))
        return True

    async def _items(self, name: str) -> list[tuple[bytes, str, bytes]]:
        bucket = self._engine.kv_bucket
        prefix = f"{self._name(name)}."
        try:
            keys = await bucket.keys()  # (a filter is ignored by NATS servers before 2.10)
        except nats.js.errors.NoKeysError:
            return []
        out = []
        for stored in keys:
            if not stored.startswith(prefix):
                continue
            found = await self._get(name, self._unname(stored))
            if found is not None:
                out.append((self._unname(stored), *found))
        return out


# -- queries answered in another process ----------------------------------------------------------


class RemoteQueryCall(QueryCall):
    """A query asked on a connector elsewhere, answered here: its replies are checked here
    and travel to that connector in order, over NATS."""

    def __init__(self, engine: NatsEngine, server: str, call_id: int, **kwargs: Any) -> None:
        super().__init__(call_id, **kwargs)
        self._engine = engine
        self._server = server
        self._outgoing: trio.MemorySendChannel[bytes] | None = None

    def _send(self, message: Message) -> None:
        if self._outgoing is None:
            send, receive = trio.open_memory_channel[bytes](float("inf"))
            self._outgoing = send
            self._engine.spawn(self._forward, receive)
        payload = _encoder.encode(
            Forward(self.connection.id, msgspec.Raw(_encoder.encode(message)))
        )
        self._outgoing.send_nowait(payload)
        if self.done:
            self._outgoing.close()

    async def _forward(self, receive: trio.MemoryReceiveChannel[bytes]) -> None:
        subject = f"{self._engine.stream}.c.{self._server}._reply"
        async with receive:
            async for payload in receive:
                await self._engine.publish(subject, payload, {})


# -- the engine -----------------------------------------------------------------------------------


class NatsEngine:
    kind = "nats"

    def __init__(self, config: Config, mim: MimTable, role: str, bridge: AsyncioBridge) -> None:
        self.config = config
        self.role = role
        self.bridge = bridge
        self.mim = mim
        engine = config.engine
        self.urls = [engine.url] if isinstance(engine.url, str) else list(engine.url)
        self.stream = engine.stream
        self.instance = uuid.uuid4().hex[:12]
        self.timeout = max(engine.connect_timeout, 5.0)
        self.per_connection = config.connector.per_connection_routing
        self.routes = NatsRouteTable(self)
        self.kv: KvBackend = NatsKv(self)
        self._ids = itertools.count()
        self._nursery: trio.Nursery | None = None
        self._replies_for: dict[tuple[int, int], QueryCall] = {}  # (connection, id) -> call
        self._remote_calls: dict[tuple[str, int, int], RemoteQueryCall] = {}
        self._taps: dict[str, trio.CancelScope] = {}
        self.tap_ready: dict[str, trio.Event] = {}  # per tapped route: its consumer exists
        self._consuming = trio.CancelScope()
        self._totals: dict[str, dict[str, Any]] = {}  # instance -> its last MIM values
        self._connected = True
        self._ready_changed = trio.Event()
        self._trio_token: trio.lowlevel.TrioToken | None = None
        self._closing = False
        self.max_payload = 1 << 20
        self._record_types = frozenset(config.codec.types.values())
        kinds = tuple(config.codec.types.values())
        self._to_processor = msgspec.msgpack.Decoder(list[Union[(*kinds, bytes, Plain, Control)]])  # type: ignore[misc]
        # To a connector: pickled objects pass through to clients, never unpickled here.
        self._to_connector = msgspec.msgpack.Decoder(
            list[Union[(*kinds, bytes, Plain, Control, Pickled)]]  # type: ignore[misc]
        )

    # -- opening --------------------------------------------------------------------------
    async def open(self) -> None:
        self._trio_token = trio.lowlevel.current_trio_token()
        await self.bridge.run(self._open)

    async def _open(self) -> None:
        async def disconnected() -> None:
            self._connected = False
            self._wake_ready_waiters()
            if not self._closing:
                log.warning("lost the connection to NATS: records wait until it is back")

        async def reconnected() -> None:
            self._connected = True
            self._wake_ready_waiters()
            log.warning("connected to NATS again")

        async def error(exc: Exception) -> None:
            log.debug("NATS: %s", exc)

        try:
            connecting = nats.connect(
                servers=self.urls,
                connect_timeout=self.config.engine.connect_timeout,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.25,
                allow_reconnect=True,
                disconnected_cb=disconnected,
                reconnected_cb=reconnected,
                error_cb=error,
            )
            # Once connected it reconnects forever; the first time it must answer in time.
            self.nc = await asyncio.wait_for(connecting, self.config.engine.connect_timeout)
        except Exception as exc:
            raise EngineError(
                f"cannot reach NATS at {', '.join(self.urls)}: {type(exc).__name__}: {exc}"
            ) from None
        self.max_payload = self.nc.max_payload
        self.js = self.nc.jetstream(timeout=self.timeout)
        engine = self.config.engine
        stream = StreamConfig(
            name=self.stream,
            subjects=[f"{self.stream}.>"],
            retention=RetentionPolicy.INTEREST,
            discard=DiscardPolicy.NEW,
            max_bytes=engine.max_bytes,
            duplicate_window=120.0,
        )
        try:
            try:
                await self.js.add_stream(stream)
            except nats.js.errors.BadRequestError:  # it exists, made otherwise: take ours
                await self.js.update_stream(stream)
            # Every route a processor consumes has its consumer before anything is sent on
            # it: with interest retention, a message nobody is interested in is dropped.
            for route in sorted(self._processor_routes()):
                await self._consumer(
                    ConsumerConfig(
                        durable_name=f"p_{route}",
                        filter_subject=f"{self.stream}.r.{route}",
                        ack_policy=AckPolicy.EXPLICIT,
                        ack_wait=engine.ack_wait,
                        max_ack_pending=self.config.connector.route_buffer * FETCH,
                    )
                )
            self.kv_bucket = await self._bucket(f"{self.stream}_kv")
            self.mim_bucket = await self._bucket(f"{self.stream}_mim")
        except nats.errors.Error as exc:
            await self.nc.close()
            raise EngineError(f"NATS at {', '.join(self.urls)} cannot be used: {exc}") from None

    def _processor_routes(self) -> set[str]:
        return {route for p in self.config.processors for route in p.routes}

    async def _consumer(self, config: ConsumerConfig) -> None:
        try:
            await self.js.add_consumer(self.stream, config)
        except nats.js.errors.BadRequestError:
            await self.js.delete_consumer(self.stream, config.durable_name)
            await self.js.add_consumer(self.stream, config)

    async def _bucket(self, name: str) -> Any:
        try:
            return await self.js.key_value(name)
        except nats.js.errors.BucketNotFoundError:
            return await self.js.create_key_value(bucket=name, history=1)

    async def close(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(self.timeout):
            await self.bridge.run(self._close)

    async def _close(self) -> None:
        self._closing = True
        with contextlib.suppress(Exception):
            await self._put_mim()
        # Closed, not drained: all that was processed is acknowledged, and a message fetched
        # and not processed goes to another worker after ack_wait.
        with contextlib.suppress(Exception):
            await self.nc.close()

    # -- state ----------------------------------------------------------------------------
    @property
    def ready(self) -> tuple[bool, str]:
        if not self._connected:
            return False, f"NATS at {', '.join(self.urls)} is unreachable"
        return True, ""

    async def wait_ready_changed(self) -> None:
        await self._ready_changed.wait()

    def _wake_ready_waiters(self) -> None:
        """From the asyncio thread: wake what waits in ``wait_ready_changed``."""

        def wake() -> None:
            self._ready_changed.set()
            self._ready_changed = trio.Event()

        if self._trio_token is not None:
            with contextlib.suppress(trio.RunFinishedError):
                self._trio_token.run_sync_soon(wake)

    def spawn(self, function: Callable[..., Awaitable[None]], *args: Any) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(function, *args)

    # -- publishing -----------------------------------------------------------------------
    def encode(
        self, route: str, records: list[Any], raw: Any, to_connector: bool, source: str | None
    ) -> tuple[list[bytes], bool]:
        """The payloads of a batch: its items encoded, split to NATS's maximum payload; and
        whether any item is wrapped (a plain value, a connection event)."""
        if raw is not None and len(raw) <= self.max_payload - 1024:
            return [bytes(raw)], False
        items = []
        wrapped = False
        record_types = self._record_types
        for record in records:
            kind = type(record)
            if kind in record_types or kind is bytes:
                items.append(record)
            elif isinstance(record, ConnectionRequest):
                items.append(Control("request", record.connection))
                wrapped = True
            elif isinstance(record, ConnectionEnded):
                items.append(Control("ended", record.connection, record.reason))
                wrapped = True
            elif kind in _PLAIN and _encodable(record):
                items.append(Plain(record))
                wrapped = True
            elif to_connector:
                try:
                    items.append(Pickled(cloudpickle.dumps(record)))
                except Exception as exc:
                    self._count_error(source, route, f"cannot be pickled: {exc}", record)
            else:
                self._count_error(
                    source,
                    route,
                    "between processors, the nats engine carries declared records, bytes and "
                    f"plain values (dicts, lists, numbers, strings), not a {kind.__name__}",
                    record,
                )
        return self._split(items), wrapped

    def encode_columns(self, route: str, batch: ColumnBatch) -> list[bytes]:
        """The payloads of a column batch: ``Columns`` messages (without the frame's length
        prefix), split to NATS's maximum payload."""
        try:
            frames = batch.frames(self.max_payload - 1024)
        except LocalProtocolError as exc:
            log.error("%d row(s) on route %r are undeliverable: %s", len(batch), route, exc)
            self.mim.counters.undeliverable += len(batch)
            return []
        return [bytes(memoryview(frame)[4:]) for frame, _ in frames]

    def _split(self, items: list[Any]) -> list[bytes]:
        data = _encoder.encode(items)
        if len(data) <= self.max_payload - 1024 or len(items) <= 1:
            if len(data) > self.max_payload - 1024:
                log.error(
                    "an item of %d bytes does not fit in a NATS message (max_payload %d); "
                    "counted as undeliverable",
                    len(data),
                    self.max_payload,
                )
                self.mim.counters.undeliverable += 1
                return []
            return [data]
        half = len(items) // 2
        return self._split(items[:half]) + self._split(items[half:])

    def _count_error(self, source: str | None, route: str, problem: str, record: Any) -> None:
        self.mim.counters.processor_errors += 1
        log.error(
            "processor %r routed a record to route %r that %s; it is left out and counted as "
            "a processor error: %.200r",
            source or "?",
            route,
            problem,
            record,
        )

    def _message_id(self) -> str:
        processing = _processing.get()
        if processing is not None:
            sequence, counter = processing
            return f"{sequence}.{next(counter)}"
        return f"{self.instance}.{next(self._ids)}"

    async def publish(self, subject: str, payload: bytes, headers: dict[str, str]) -> None:
        """Publish and return once JetStream has stored it. While NATS refuses (the stream is
        full, or NATS is unreachable) it retries, and the caller waits: backpressure, never a
        drop. The message id stays the same, so a retry that was in fact stored is stored
        once."""
        headers = {**headers, "Nats-Msg-Id": self._message_id()}
        delay = RETRY_FIRST
        warned = False
        while True:
            try:
                await self.bridge.run(self.js.publish, subject, payload, None, None, headers)
                if warned:
                    log.warning("NATS takes records again")
                return
            except (nats.errors.Error, nats.js.errors.Error, OSError) as exc:
                if not warned:
                    log.warning("NATS does not take records (%s): retrying", exc or type(exc))
                    warned = True
            await trio.sleep(delay)
            delay = min(delay * 2, RETRY_MOST)

    # -- queries --------------------------------------------------------------------------
    def expect_replies(self, call: QueryCall) -> None:
        """A query asked here goes to a worker: its replies come back to this connector."""
        key = (call.connection.id, call.id)
        self._replies_for[key] = call
        previous = call.on_done

        def done(finished: QueryCall) -> None:
            self._replies_for.pop(key, None)
            previous(finished)

        call.on_done = done
        call.on_cancel = lambda: self.spawn(self._cancel_remote, call)

    async def _cancel_remote(self, call: QueryCall) -> None:
        payload = _encoder.encode((self.instance, call.connection.id, call.id))
        with contextlib.suppress(Exception):
            await self.bridge.run(self.nc.publish, f"_{self.stream}.cancel", payload)

    def _on_cancel(self, payload: bytes) -> None:
        server, connection, call_id = msgspec.msgpack.decode(payload, type=tuple[str, int, int])
        call = self._remote_calls.get((server, connection, call_id))
        if call is not None:
            call.cancel()

    # -- consuming ------------------------------------------------------------------------
    async def run(
        self,
        control: ConnectionControl | None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._control = control
            token = trio.lowlevel.current_trio_token()

            async def subscribe_cancels() -> None:
                async def on(msg: Any) -> None:
                    with contextlib.suppress(trio.RunFinishedError):
                        token.run_sync_soon(self._on_cancel, msg.data)

                await self.nc.subscribe(f"_{self.stream}.cancel", cb=on)

            await self.bridge.run(subscribe_cancels)
            await nursery.start(self._consume_routes)
            if control is not None:
                await self.bridge.run(
                    self._consumer,
                    ConsumerConfig(
                        durable_name=f"c_{self.instance}",
                        filter_subjects=[
                            f"{self.stream}.c.{self.instance}.>",
                            f"{self.stream}.c.all.>",
                        ],
                        deliver_policy=DeliverPolicy.NEW,
                        ack_policy=AckPolicy.EXPLICIT,
                        inactive_threshold=3600.0,
                    ),
                )
                nursery.start_soon(self._consume_connector)
                nursery.start_soon(self._refresh_totals)
            nursery.start_soon(self._publish_mim)
            task_status.started()

    async def _consume_routes(self, *, task_status: trio.TaskStatus[None]) -> None:
        """The routes of this process's processors, until ``stop_consuming``."""
        mine = self._processor_routes()
        async with trio.open_nursery() as consumers:
            self._consumers = consumers
            for route, process in self.routes.processes.items():
                if route in mine:
                    consumers.start_soon(self._consume_route, route, process)
            task_status.started()

    async def stop_consuming(self) -> None:
        """Fetch no more; what was fetched is processed and acknowledged first."""
        consumers = getattr(self, "_consumers", None)
        if consumers is not None:
            consumers.cancel_scope.cancel()
        await self.routes.in_flight.wait_idle()

    async def _fetch(self, subscription: Any) -> list[Any]:
        try:
            return await self.bridge.run(subscription.fetch, FETCH, 1.0)
        except (nats.errors.TimeoutError, nats.js.errors.FetchTimeoutError, TimeoutError):
            return []
        except (nats.errors.Error, nats.js.errors.Error, OSError) as exc:
            log.debug("fetch failed (%s): trying again", exc)
            await trio.sleep(RETRY_MOST)
            return []

    async def _subscription(self, durable: str) -> Any:
        while True:
            try:
                return await self.bridge.run(self.js.pull_subscribe_bind, durable, self.stream)
            except (nats.errors.Error, nats.js.errors.Error, OSError) as exc:
                log.warning("cannot read consumer %s (%s): trying again", durable, exc)
                await trio.sleep(RETRY_MOST)

    async def _consume_route(self, route: str, process: Callable[[Batch], Awaitable[None]]) -> None:
        """Feed a processor its route's batches; acknowledge each once it is processed and
        what it routed onward is stored."""
        subscription = await self._subscription(f"p_{route}")
        while True:
            with trio.CancelScope(shield=True):  # a batch fetched is finished, even at a stop
                for msg in await self._fetch(subscription):
                    batch = self._batch(route, msg, self._to_processor)
                    if batch is None:
                        await self.bridge.run(msg.term)
                        continue
                    self.routes.in_flight.add()
                    token = _processing.set((msg.metadata.sequence.stream, itertools.count()))
                    try:
                        await process(batch)
                    finally:
                        _processing.reset(token)
                        self.routes.in_flight.done()
                    await self._ack(msg)
            await trio.lowlevel.checkpoint()

    async def _ack(self, msg: Any) -> None:
        # After the processing and the onward publishes it waited for; one way (no round
        # trip): an acknowledgement lost with the connection means one more delivery, whose
        # onward records JetStream then stores once (their message ids are the same).
        try:
            await self.bridge.run(msg.ack)
        except (nats.errors.Error, nats.js.errors.Error, OSError) as exc:
            # Not acknowledged: after ack_wait it is delivered again (its onward records are
            # then stored once, by their message ids).
            log.warning("could not acknowledge a batch (%s): it will come again", exc)

    def _batch(self, route: str, msg: Any, decoder: msgspec.msgpack.Decoder) -> Batch | None:
        headers = msg.headers or {}
        try:
            if "Mz-Columns" in headers:
                items = self._columns(route, msg.data)
                if items is None:
                    return None
            else:
                items = decoder.decode(msg.data)
            origin = (
                _connection.decode(base64.b64decode(headers["Mz-Origin"]))
                if "Mz-Origin" in headers
                else None
            )
        except (msgspec.DecodeError, ValueError) as exc:
            log.error("a message on route %r cannot be read (%s); dropped", route, exc)
            return None
        records = [_unwrap(item) for item in items] if "Mz-Wrapped" in headers else items
        connection = int(headers["Mz-Connection"]) if "Mz-Connection" in headers else None
        query = None
        if "Mz-Query" in headers and origin is not None:
            call_id, _, name = headers["Mz-Query"].partition(":")
            query = self._remote_call(origin, int(call_id), name)
        return Batch(route, records, origin, connection, headers.get("Mz-Source"), query)

    def _columns(self, route: str, data: bytes) -> ColumnBatch | None:
        """A column batch from a ``Columns`` message, checked against its declared type (it
        was checked when it entered the workflow: a batch that fails now is dropped)."""
        message = _columns.decode(data)
        recast_columns(message)  # (for older msgspec: see there)
        try:
            batch, bad = ColumnBatch.decode(message, self.config.codec.types)
        except FieldMismatch as exc:
            bad = [(0, exc.field or "", exc.problem)]
        if bad:
            row, field, problem = bad[0]
            log.error(
                "a column batch on route %r does not fit its type (row %d, %s: %s); dropped",
                route,
                row,
                field,
                problem,
            )
            self.mim.counters.undeliverable += message.rows
            return None
        return batch

    def _remote_call(self, origin: ConnectionInfo, call_id: int, name: str) -> RemoteQueryCall:
        key = (origin.server, origin.id, call_id)
        call = RemoteQueryCall(
            self,
            origin.server,
            call_id,
            spec=self.config.queries[name],
            connection=origin,
            outbox=None,  # type: ignore[arg-type]
            codec=self.config.codec,
            max_frame_size=self.config.connector.max_frame_size,
            spawn=self.spawn,
            on_done=lambda done: self._remote_calls.pop(key, None),
        )
        self._remote_calls[key] = call
        return call

    async def _consume_connector(self) -> None:
        """What workers route to this connector's clients, and what they tell it."""
        subscription = await self._subscription(f"c_{self.instance}")
        prefix = len(f"{self.stream}.c.")
        while True:
            for msg in await self._fetch(subscription):
                route = msg.subject[prefix:].split(".", 1)[1]
                if route == "_reply":
                    self._on_reply(msg.data)
                else:
                    batch = self._batch(route, msg, self._to_connector)
                    if batch is not None:
                        await self.routes.processes[route](batch)
                await self._ack(msg)

    def _on_reply(self, data: bytes) -> None:
        try:
            reply = _replies.decode(data)
        except msgspec.DecodeError as exc:
            log.error("a reply from a worker cannot be read (%s); dropped", exc)
            return
        control = self._control
        assert control is not None
        try:
            if isinstance(reply, Forward):
                message = _messages.decode(reply.message)
                call = self._replies_for.get((reply.connection, message.id))
                if call is not None:
                    call.forward(message)
            elif isinstance(reply, Decision):
                control.decide(reply.connection, reply.accept, reply.reason)
            else:
                control.set_output_route(reply.connection, reply.type_name, reply.route)
        except (LookupError, ValueError) as exc:
            log.warning("%s (from a worker): %s", type(reply).__name__, exc)

    # -- taps -----------------------------------------------------------------------------
    def start_tap(self, route: str) -> None:
        scope = trio.CancelScope()
        self._taps[route] = scope
        self.tap_ready[route] = ready = trio.Event()
        self.spawn(self._tap, route, scope, ready)

    def stop_tap(self, route: str) -> None:
        ready = self.tap_ready.pop(route, None)
        if ready is not None:
            ready.set()  # nobody waits for a tap that is gone
        scope = self._taps.pop(route, None)
        if scope is not None:
            scope.cancel()

    async def _tap(self, route: str, scope: trio.CancelScope, ready: trio.Event) -> None:
        """Copies of what flows on a route between processors, for the taps on it."""
        name = f"t_{self.instance}_{route}"
        with scope:
            try:
                await self._create_tap(name, route)
            finally:
                ready.set()  # made, or failed (logged): a subscriber waits no longer
            subscription = await self._subscription(name)
            try:
                while True:
                    for msg in await self._fetch(subscription):
                        batch = self._batch(route, msg, self._to_processor)
                        if batch is not None:
                            for tap in self.routes.taps.get(route, ()):
                                tap.offer(batch.records)
            finally:
                with trio.CancelScope(shield=True), contextlib.suppress(Exception):
                    await self.bridge.run(self.js.delete_consumer, self.stream, name)

    async def _create_tap(self, name: str, route: str) -> None:
        await self.bridge.run(
            self._consumer,
            ConsumerConfig(
                durable_name=name,
                filter_subject=f"{self.stream}.r.{route}",
                deliver_policy=DeliverPolicy.NEW,
                ack_policy=AckPolicy.NONE,
                inactive_threshold=60.0,
            ),
        )

    # -- connection control from a worker -------------------------------------------------
    def remote_control(self) -> ConnectionControl:
        return _RemoteControl(self)

    async def tell(self, server: str, reply: Any) -> None:
        await self.publish(f"{self.stream}.c.{server}._reply", _encoder.encode(reply), {})

    # -- MIM values -----------------------------------------------------------------------
    def _mim_entry(self) -> bytes:
        counters = {name: getattr(self.mim.counters, name) for name in self.mim.counters.__slots__}
        assigned = self.mim.assigned
        return _encoder.encode(
            {
                "role": self.role,
                "time": time.time(),
                "started": self.mim.started_at,
                "counters": counters,
                "assigned": {n: [assigned.times.get(n, 0.0), v] for n, v in assigned.items()},
                "connections": list(
                    self._control.connections_info() if getattr(self, "_control", None) else []
                ),
            }
        )

    async def _put_mim(self) -> None:
        await self.mim_bucket.put(f"p.{self.instance}", self._mim_entry())

    async def _publish_mim(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                await self.bridge.run(self._put_mim)
            await trio.sleep(MIM_EVERY)

    async def _read_totals(self) -> dict[str, dict[str, Any]]:
        try:
            keys = await self.mim_bucket.keys()
        except nats.js.errors.NoKeysError:
            return {}
        out = {}
        for key in keys:
            with contextlib.suppress(nats.js.errors.KeyNotFoundError):
                entry = await self.mim_bucket.get(key)
                if entry.value:
                    out[key] = msgspec.msgpack.decode(entry.value)
        return out

    async def _refresh_totals(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                self._totals = await self.bridge.run(self._read_totals)
            await trio.sleep(MIM_EVERY)

    def mim_snapshot(self) -> dict[str, Any]:
        """The workflow's totals: every process's counters summed (this one's as they are
        now), assigned values last write wins, clients counted on connectors alive."""
        entries = dict(self._totals)
        entries[f"p.{self.instance}"] = msgspec.msgpack.decode(self._mim_entry())
        now = time.time()
        counters: dict[str, int] = {}
        assigned: dict[str, tuple[float, Any]] = {}
        started = self.mim.started_at
        for entry in entries.values():
            if now - entry["time"] > MIM_STALE:
                continue  # a process gone: the totals are those of the processes running
            for name, value in entry["counters"].items():
                counters[name] = counters.get(name, 0) + value
            for name, (when, value) in entry["assigned"].items():
                if value is not None and when >= assigned.get(name, (-1.0, None))[0]:
                    assigned[name] = (when, value)
        values = self.mim.snapshot()
        local = dict(zip(BUILTIN_MIMS, _COUNTER_OF, strict=True))
        for name, counter in local.items():
            if counter is not None:
                values[name] = counters.get(counter, 0)
        values["Started"] = min(
            [started, *(e["started"] for e in entries.values() if "started" in e)]
        )
        for name, (_, value) in assigned.items():
            if name in values:
                values[name] = value
        return values

    def connections_info(self) -> list[ConnectionInfo]:
        now = time.time()
        out = []
        for entry in self._totals.values():
            if now - entry["time"] <= MIM_STALE:
                out.extend(msgspec.convert(c, ConnectionInfo) for c in entry["connections"])
        return out


#: For each built-in MIM, the counter that totals it (None: not a counter).
_COUNTER_OF = (
    None,  # Workflow Name
    None,  # Started
    None,  # Uptime
    "connections_open",
    "connections_accepted",
    "connections_refused",
    "records_in",
    "bytes_in",
    "records_out",
    "bytes_out",
    "records_refused",
    "undeliverable",
    "unacknowledged",
    "processor_errors",
)


class _RemoteControl:
    """``ctx.accept``/``reject``/``set_output_route``/``connections`` in a worker: told to the
    connector server the connection is attached to, over NATS."""

    def __init__(self, engine: NatsEngine) -> None:
        self._engine = engine

    def decide(self, connection: ConnectionInfo | int, accept: bool, reason: str = "") -> None:
        if isinstance(connection, int):
            raise LookupError("name the connection request itself (ctx.accept(request))")
        reply = Decision(connection.id, accept, reason)
        self._engine.spawn(self._engine.tell, connection.server, reply)

    def set_output_route(
        self, connection: ConnectionInfo | int, type_name: str, route: str | None
    ) -> None:
        if isinstance(connection, int):
            raise LookupError(
                "with the nats engine, name the connection (ctx.connection), not its id: "
                "ids are per connector server"
            )
        reply = OutputRoute(connection.id, type_name, route)
        self._engine.spawn(self._engine.tell, connection.server, reply)

    def connections_info(self) -> list[ConnectionInfo]:
        return self._engine.connections_info()


def _unwrap(item: Any) -> Any:
    kind = type(item)
    if kind is Plain:
        return item.value
    if kind is Control:
        if item.kind == "request":
            return ConnectionRequest(item.connection)
        return ConnectionEnded(item.connection, item.reason)
    return item


def _encodable(value: Any) -> bool:
    try:
        _encoder.encode(value)
    except (TypeError, ValueError, OverflowError):
        return False
    return True


@contextlib.asynccontextmanager
async def open_nats_engine(config: Config, mim: MimTable, role: str) -> AsyncIterator[NatsEngine]:
    async with AsyncioBridge() as bridge:
        engine = NatsEngine(config, mim, role, bridge)
        await engine.open()
        try:
            yield engine
        finally:
            await engine.close()
