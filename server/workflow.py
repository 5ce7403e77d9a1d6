"""The workflow: processors, each a task that takes batches from its inbox and calls
``function(record, ctx)`` for every record, or a batch processor's ``function(records, ctx)``
once per batch (with a list, or with a pandas DataFrame for ``batch = "frame"``).

What a processor routes onward (``ctx.route``) is collected during the batch and handed on as
batches when the batch is done, so the hot path costs one call per record and one ``await``
per batch and route; a processor that routes much (8,192 records, or about 1 MiB of bytes or
other objects) hands it on at once, after the record it is processing, so that memory stays
bounded whatever it fans out; what a batch processor routes in one call is handed on in
pieces of at most as many records (``ctx.route_frame``: column batches of at most
``FRAME_BATCH_BYTES``). A processor that raises loses nothing silently: the error and the
record (for a batch processor: the batch) are logged and counted (MIM ``Processor Errors``),
and the workflow goes on.
"""

from __future__ import annotations

import itertools
import logging
import sys
import time
from collections.abc import Collection, Iterable, Iterator
from typing import Any

import trio

from mzconnector import (
    ColumnBatch,
    FrameColumns,
    Namespace,
    batches_dataframe,
    frame_columns,
)

from .config import Config, Processor
from .connections import ConnectionControl, ConnectionEnded, ConnectionInfo, ConnectionRequest
from .errors import RouteError
from .health import Health
from .kv import KvBackend, KvMap
from .mim import AssignedMims, MimTable
from .queries import QueryCall
from .routes import Batch, RouteTable

log = logging.getLogger("mzserver.workflow")

#: What a processor may route before it is handed on mid-batch: records, and bytes (of bytes
#: payloads, and the size of other objects as ``sys.getsizeof`` tells it).
HAND_ON_RECORDS = 8192
HAND_ON_BYTES = 1 << 20


class ProcessorContext:
    """What a processor gets with each record.

    ``ctx.route(route, record)`` sends a record onward; ``ctx.connection`` is the connection the
    record came from (None if it came from elsewhere); ``ctx.mim`` holds the assigned MIM values;
    ``ctx.route_name`` is the route the record arrived on; ``ctx.log`` is a logger;
    ``ctx.udrs.<Type>(...)`` builds records of the workflow's declared types.
    With connection control: ``ctx.accept(request)`` / ``ctx.reject(request, reason)``.
    With per-connection routing: ``ctx.set_output_route(connection, type_name, route)``.
    For a query's request: ``ctx.partial(reply)``, ``ctx.complete(reply)``, ``ctx.empty()``,
    ``ctx.error(code, template, parameters)``, ``ctx.cancelled`` and ``ctx.query``.
    ``ctx.kv(name)`` is a shared key-value map.
    For a batch processor: ``ctx.route_many(route, records)``, ``ctx.route_frame(route, df)``
    and ``ctx.frame_type`` (the record type of the DataFrame being processed).
    ``ctx.set_unhealthy(reason)`` / ``ctx.set_healthy()``: readiness (``/readyz``).
    """

    __slots__ = (
        "_bytes",
        "_control",
        "_framed",
        "_full",
        "_health",
        "_kv",
        "_light",
        "_max_frame_size",
        "_out",
        "_query",
        "_routed",
        "_routes",
        "_target",
        "connection",
        "frame_type",
        "log",
        "mim",
        "processor",
        "route_name",
        "udrs",
        "workflow",
    )

    def __init__(
        self,
        workflow: str,
        processor: str,
        routes: RouteTable,
        mim: AssignedMims,
        control: ConnectionControl,
        udrs: Namespace,
        kv: KvBackend,
        health: Health | None = None,
        max_frame_size: int = 1 << 24,
    ) -> None:
        self._control = control
        self._max_frame_size = max_frame_size
        self._kv = kv
        self._query: QueryCall | None = None
        self._health = health if health is not None else Health()
        # Records of declared types are weighed by count alone: light enough.
        self._light = frozenset(udrs[name] for name in udrs)
        self.udrs = udrs
        self.workflow = workflow
        self.processor = processor
        self.mim = mim
        self.log = logging.getLogger(f"mzserver.processor.{processor}")
        self.route_name = ""
        self.connection: ConnectionInfo | None = None
        self._target: int | None = None  # the client the records being processed are for
        self._routes = routes
        self._out: dict[tuple[str, int | None], list[Any]] = {}
        self._routed = 0
        self._bytes = 0
        self._full = False  # routed enough to be handed on before the batch ends
        self._framed: set[tuple[str, int | None]] = set()  # outputs that hold frames
        #: The record type of the DataFrame a ``batch = "frame"`` processor is called with.
        self.frame_type: str | None = None

    def route(
        self, route: str, record: Any, *, connection: ConnectionInfo | int | None = None
    ) -> None:
        """Send ``record`` on ``route`` (after the current record at the latest, the current
        batch at the earliest). ``connection`` (an id or a ``ConnectionInfo``) names the one
        client it is for, with per-connection routing; without it, a record goes to the client
        the record being processed was routed for, if one was named."""
        # (``_output``, inlined: this runs once per record routed)
        key = (route, self._target if connection is None else _id(connection))
        out = self._out.get(key)
        if out is None:
            if route not in self._routes:
                raise RouteError(
                    f"no route {route!r} in workflow {self.workflow!r} "
                    f"(routes: {', '.join(self._routes.names)})"
                )
            out = self._out[key] = []
        out.append(record)
        self._routed += 1
        kind = type(record)
        if kind not in self._light:
            self._bytes += len(record) if kind is bytes else sys.getsizeof(record)
        if self._routed >= HAND_ON_RECORDS or self._bytes >= HAND_ON_BYTES:
            self._full = True

    def route_many(
        self, route: str, records: Iterable[Any], *, connection: ConnectionInfo | int | None = None
    ) -> None:
        """Send several records on ``route``: as ``route`` each, in one step for records of
        declared types (what a batch processor routes on)."""
        records = records if isinstance(records, list) else list(records)
        if not records:
            return
        if not set(map(type, records)) <= self._light:
            for record in records:
                self.route(route, record, connection=connection)
            return
        self._output(route, connection).extend(records)
        self._routed += len(records)
        if self._routed >= HAND_ON_RECORDS:
            self._full = True

    def route_frame(
        self,
        route: str,
        df: Any,
        type_name: str | None = None,
        *,
        connection: ConnectionInfo | int | None = None,
    ) -> None:
        """Send the rows of a pandas DataFrame on ``route`` as records of ``type_name``
        (default: ``ctx.frame_type``, the type of the DataFrame being processed), without a
        record per row: checked and converted a column at a time (as ``submit_frame`` does
        in a notebook) and handed on as column batches. A batch processor on the route gets
        them as they are; a client receives them column-wise (``receive_frame``); others get
        records. Raises ``ValueError`` naming the column and row that does not fit."""
        name = type_name or self.frame_type
        if name is None:
            raise TypeError("route_frame needs the record type of the rows: (route, df, 'Type')")
        if name not in self.udrs:
            known = ", ".join(self.udrs) or "none"
            raise LookupError(f"no record type {name!r} in workflow {self.workflow!r} ({known})")
        prepared = frame_columns(df, self.udrs[name])
        plan = prepared.plan(self._max_frame_size)
        if not plan:
            return
        key = self._key(route, connection)
        self._output(route, connection).append(_RoutedFrame(prepared, plan))
        self._framed.add(key)
        self._routed += prepared.rows
        if self._routed >= HAND_ON_RECORDS:
            self._full = True

    def _key(self, route: str, connection: ConnectionInfo | int | None) -> tuple[str, int | None]:
        return (route, self._target if connection is None else _id(connection))

    def _output(self, route: str, connection: ConnectionInfo | int | None) -> list[Any]:
        """What is routed to ``route`` (for ``connection``) in this batch so far."""
        key = self._key(route, connection)
        out = self._out.get(key)
        if out is None:
            if route not in self._routes:
                raise RouteError(
                    f"no route {route!r} in workflow {self.workflow!r} "
                    f"(routes: {', '.join(self._routes.names)})"
                )
            out = self._out[key] = []
        return out

    # -- queries --------------------------------------------------------------------------
    @property
    def query(self) -> QueryCall | None:
        """The query whose request is being processed (``id``, ``name``, ``connection``), or
        None for a record that is not a query's request."""
        return self._query

    @property
    def cancelled(self) -> bool:
        """Whether the client gave up on the query being answered."""
        return self._query is not None and self._query.cancelled

    def partial(self, reply: Any) -> None:
        """Send a reply to the query now; more may follow. A dict is converted to the reply
        type; a reply that does not match it ends the query with an error (and raises)."""
        self._answering().partial(reply)

    def complete(self, reply: Any = None) -> None:
        """End the query, with a last reply (or none)."""
        self._answering().complete(reply)

    def empty(self) -> None:
        """End the query with no result."""
        self._answering().empty()

    def error(self, code: str, template: str, parameters: list[Any] | tuple[Any, ...] = ()) -> None:
        """End the query with an error: a short ``code``, a message ``template`` with
        ``{0}``-style placeholders, and its ``parameters``."""
        self._answering().error(code, template, parameters)

    def _answering(self) -> QueryCall:
        if self._query is None:
            raise RuntimeError(
                f"processor {self.processor!r} is not answering a query: this record is not a "
                "query's request"
            )
        return self._query

    # -- shared maps ----------------------------------------------------------------------
    def kv(self, name: str) -> KvMap:
        """The shared key-value map ``name`` (the one clients reach with ``conn.kv(name)``)."""
        return self._kv.map(name)

    # -- connections ----------------------------------------------------------------------
    def accept(self, request: ConnectionRequest) -> None:
        """Let the client of a connection request in."""
        self._control.decide(request.connection, True)

    def reject(self, request: ConnectionRequest, reason: str) -> None:
        """Turn the client of a connection request away; it sees ``reason``."""
        self._control.decide(request.connection, False, reason)

    def set_output_route(
        self, connection: ConnectionInfo | int, type_name: str, route: str | None
    ) -> None:
        """From its next records on, send one connection's records of ``type_name`` on
        ``route`` instead of the configured output route (``None`` restores it)."""
        if isinstance(connection, int) and self.connection and self.connection.id == connection:
            connection = self.connection  # it names its server too
        elif not isinstance(connection, (int, ConnectionInfo)):
            connection = connection.connection  # a request, or an ended connection
        self._control.set_output_route(connection, type_name, route)

    @property
    def connections(self) -> list[ConnectionInfo]:
        """The open connections."""
        return self._control.connections_info()

    # -- readiness --------------------------------------------------------------------------
    def set_unhealthy(self, reason: str) -> None:
        """Declare the workflow unhealthy: the server is not ready (``/readyz`` answers 503
        with ``reason``, the TCP probe port closes) until this processor calls
        ``set_healthy()``."""
        self._health.declare_unhealthy(self.processor, str(reason))

    def set_healthy(self) -> None:
        """Take back this processor's ``set_unhealthy``."""
        self._health.declare_healthy(self.processor)

    def _take_output(self) -> tuple[dict[tuple[str, int | None], list[Any]], set[Any]]:
        out, self._out = self._out, {}
        framed, self._framed = self._framed, set()
        self._routed = self._bytes = 0
        self._full = False
        return out, framed


class _RoutedFrame:
    """A DataFrame routed with ``route_frame``: converted, and planned into column batches
    (made one at a time when handed on)."""

    __slots__ = ("plan", "prepared")

    def __init__(self, prepared: FrameColumns, plan: list[tuple[int, int]]) -> None:
        self.prepared = prepared
        self.plan = plan


def _pieces(items: list[Any]) -> Iterator[list[Any] | ColumnBatch]:
    """What a processor routed to one route, as batches to hand on, in order: runs of
    records of at most ``HAND_ON_RECORDS``, and the column batches of routed frames."""
    run: list[Any] = []
    for item in items:
        if type(item) is _RoutedFrame:
            if run:
                yield from _runs(run)
                run = []
            for start, stop in item.plan:
                yield item.prepared.batch(start, stop)
        else:
            run.append(item)
    if run:
        yield from _runs(run)


def _runs(records: list[Any]) -> Iterator[list[Any]]:
    if len(records) <= HAND_ON_RECORDS:
        yield records
        return
    for start in range(0, len(records), HAND_ON_RECORDS):
        yield records[start : start + HAND_ON_RECORDS]


def _id(connection: ConnectionInfo | ConnectionRequest | ConnectionEnded | int) -> int:
    return connection if isinstance(connection, int) else connection.id


class ProcessorStats:
    """What one processor did: plain counters, bumped once per batch (busy time is measured
    with ``time.perf_counter()`` around a batch, never per record: trio's clock costs several
    times more to read)."""

    __slots__ = ("batches", "busy", "errors", "records")

    def __init__(self) -> None:
        self.records = 0
        self.batches = 0
        self.errors = 0  # records on which it raised
        self.busy = 0.0  # seconds spent on batches (including waits for room downstream)


class ProcessorRunner:
    """Runs one processor, one batch at a time, in arrival order.

    A batch that arrives while the processor is idle and nothing is queued is processed at
    once in the sender's task (no task switch: this is what keeps a round trip short); other
    batches wait in the bounded inbox for the processor's own task. A lock keeps the two
    paths from overlapping; the ``queued`` count keeps the order.
    """

    def __init__(
        self, processor: Processor, ctx: ProcessorContext, workflow: Workflow, buffer: int
    ) -> None:
        self.processor = processor
        self.ctx = ctx
        self.routes = workflow.routes
        self.counters = workflow.mim.counters
        self.stats = ProcessorStats()
        self._lock = trio.Lock()
        self._queued = 0
        self._send, self._inbox = trio.open_memory_channel[Batch](buffer)

    async def accept(self, batch: Batch) -> None:
        """The route's target: process now if idle, else queue (waiting while the inbox is
        full: backpressure to the sender). A query's request always goes to the processor's
        own task: its answer may take long, and the sender (a client's reader) must not wait
        for it."""
        if self._queued == 0 and batch.query is None:
            try:
                self._lock.acquire_nowait()
            except trio.WouldBlock:
                pass
            else:
                try:
                    await self._process(batch)
                finally:
                    self._lock.release()
                return
        in_flight = self.routes.in_flight
        route_stats = self.routes.stats[batch.route]
        self._queued += 1
        route_stats.queued += 1
        in_flight.add()
        try:
            await self._send.send(batch)
        except BaseException:
            self._queued -= 1
            route_stats.queued -= 1
            in_flight.done()
            raise

    async def process(self, batch: Batch) -> None:
        """Process a batch now, in turn with the others; return when it is done."""
        async with self._lock:
            await self._process(batch)

    async def run(self) -> None:
        """Process queued batches until cancelled."""
        async for batch in self._inbox:
            async with self._lock:
                self._queued -= 1
                self.routes.stats[batch.route].queued -= 1
                try:
                    await self._process(batch)
                finally:
                    self.routes.in_flight.done()

    async def _process(self, batch: Batch) -> None:
        ctx = self.ctx
        ctx.route_name = batch.route
        ctx.connection = batch.origin
        ctx._target = batch.connection
        started = time.perf_counter()
        if batch.query is not None:
            await self._answer(batch)
            return
        if self.processor.batch:
            await self._process_batch(batch)
        else:
            await self._process_records(batch)
        stats = self.stats
        stats.records += len(batch.records)
        stats.batches += 1
        stats.busy += time.perf_counter() - started
        await self._hand_on(batch)

    async def _process_records(self, batch: Batch) -> None:
        """An ordinary processor: one call per record (an error counts per record)."""
        ctx = self.ctx
        function = self.processor.function
        records = batch.records
        if type(records) is ColumnBatch:
            records = records.records()
        if self.processor.is_async:
            for record in records:
                try:
                    await function(record, ctx)
                except Exception as exc:
                    self._failed(batch, record, exc)
                if ctx._full:
                    await self._hand_on(batch)
        else:
            for record in records:
                try:
                    function(record, ctx)
                except Exception as exc:
                    self._failed(batch, record, exc)
                if ctx._full:
                    await self._hand_on(batch)

    async def _process_batch(self, batch: Batch) -> None:
        """A batch processor: one call with the batch (a list of records, or for
        ``batch = "frame"`` a DataFrame of each run of records of one type); an error counts
        once for the batch."""
        ctx = self.ctx
        function = self.processor.function
        if self.processor.batch == "frame":
            calls = self._frames(batch)
        else:
            records = batch.records
            calls = [(None, records.records() if type(records) is ColumnBatch else records)]
        try:
            for frame_type, argument in calls:
                ctx.frame_type = frame_type
                try:
                    if self.processor.is_async:
                        await function(argument, ctx)
                    else:
                        function(argument, ctx)
                except Exception as exc:
                    self._failed_batch(batch, argument, exc)
        finally:
            ctx.frame_type = None

    def _frames(self, batch: Batch) -> list[tuple[str, Any]]:
        """A frame processor's calls for a batch: (type name, DataFrame) for a column batch,
        and for each run of records of one type in a list. Anything that is not a record
        cannot be in a DataFrame: it is left out, logged and counted as an error."""
        items = batch.records
        if type(items) is ColumnBatch:
            return [(items.type_name, items.dataframe())]
        calls = []
        others = 0
        for kind, group in itertools.groupby(items, type):
            if kind in self.ctx._light:
                run = list(group)
                calls.append((kind.__name__, batches_dataframe([run], kind)))
            else:
                others += sum(1 for _ in group)
        if others:
            self.counters.processor_errors += 1
            self.stats.errors += 1
            log.error(
                "processor %r takes DataFrames of records: %d item(s) on route %r that are not "
                "records (bytes, other objects) were left out",
                self.processor.name,
                others,
                batch.route,
            )
        return calls

    async def _answer(self, batch: Batch) -> None:
        """A query's request: the processor answers it under the query's cancel scope; one
        that returns without answering ends it as empty, one that raises ends it with an
        error."""
        ctx = self.ctx
        call = batch.query
        if call.cancelled:  # the client gave up while the request waited in the inbox
            return
        [record] = batch.records
        ctx._query = call
        try:
            with call.scope:
                if self.processor.is_async:
                    await self.processor.function(record, ctx)
                else:
                    self.processor.function(record, ctx)
        except Exception as exc:
            self._failed(batch, record, exc)
            if not call.done:
                call.error("processor-error", "the processor failed: {0}", [repr(exc)])
        finally:
            ctx._query = None
        if not call.done:
            call.empty()
        await self._hand_on(batch)

    async def _hand_on(self, batch: Batch) -> None:
        """Send on what the processor routed so far."""
        name = self.processor.name
        out, framed = self.ctx._take_output()
        for key, records in out.items():
            route, connection = key
            if key in framed or len(records) > HAND_ON_RECORDS:
                for piece in _pieces(records):
                    await self.routes.send(route, piece, batch.origin, connection, name)
            else:
                await self.routes.send(route, records, batch.origin, connection, name)

    def _failed_batch(self, batch: Batch, argument: Any, exc: Exception) -> None:
        self.counters.processor_errors += 1
        self.stats.errors += 1
        if isinstance(argument, list):
            shown = f"{len(argument)} record(s), the first: {argument[:3]!r}"
        else:
            shown = f"a DataFrame of {len(argument)} row(s):\n{argument.head(5)!r}"
        log.error(
            "processor %r failed on a batch from route %r: %s: %s; the batch: %.1000s",
            self.processor.name,
            batch.route,
            type(exc).__name__,
            exc,
            shown,
            exc_info=exc,
        )

    def _failed(self, batch: Batch, record: Any, exc: Exception) -> None:
        self.counters.processor_errors += 1
        self.stats.errors += 1
        log.error(
            "processor %r failed on a record from route %r: %s: %s; record: %.300r",
            self.processor.name,
            batch.route,
            type(exc).__name__,
            exc,
            record,
            exc_info=exc,
        )


class Workflow:
    """The processors of a workflow, bound to their routes."""

    def __init__(
        self,
        config: Config,
        routes: RouteTable,
        mim: MimTable,
        control: ConnectionControl,
        kv: KvBackend,
        *,
        only: Collection[str] | None = None,
        health: Health | None = None,
    ) -> None:
        """``only``: the names of the processors this process runs (None: every one)."""
        self.config = config
        self.routes = routes
        self.mim = mim
        self.health = health if health is not None else Health()
        self.runners: list[ProcessorRunner] = []
        udrs = Namespace("record types", config.codec.types)
        for processor in config.processors:
            if only is not None and processor.name not in only:
                continue
            ctx = ProcessorContext(
                config.workflow,
                processor.name,
                routes,
                mim.assigned,
                control,
                udrs,
                kv,
                self.health,
                config.connector.max_frame_size,
            )
            runner = ProcessorRunner(processor, ctx, self, config.connector.route_buffer)
            for route in processor.routes:
                routes.bind(route, runner.accept, process=runner.process)
            self.runners.append(runner)

    async def run(self) -> None:
        """Run every processor's task until cancelled."""
        async with trio.open_nursery() as nursery:
            for runner in self.runners:
                nursery.start_soon(runner.run, name=f"processor {runner.processor.name}")
