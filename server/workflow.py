"""The workflow: processors, each a task that takes batches from its inbox and calls
``function(record, ctx)`` for every record.

What a processor routes onward (``ctx.route``) is collected during the batch and handed on as
batches when the batch is done, so the hot path costs one call per record and one ``await``
per batch and route; a processor that routes much (8,192 records, or about 1 MiB of bytes or
other objects) hands it on at once, after the record it is processing, so that memory stays
bounded whatever it fans out. A processor that raises loses nothing silently: the error and
the record are logged and counted (MIM ``Processor Errors``), and the workflow goes on.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Collection
from typing import Any

import trio

from mzconnector import Namespace

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
    ``ctx.set_unhealthy(reason)`` / ``ctx.set_healthy()``: readiness (``/readyz``).
    """

    __slots__ = (
        "_bytes",
        "_control",
        "_full",
        "_health",
        "_kv",
        "_light",
        "_out",
        "_query",
        "_routed",
        "_routes",
        "_target",
        "connection",
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
    ) -> None:
        self._control = control
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

    def route(
        self, route: str, record: Any, *, connection: ConnectionInfo | int | None = None
    ) -> None:
        """Send ``record`` on ``route`` (after the current record at the latest, the current
        batch at the earliest). ``connection`` (an id or a ``ConnectionInfo``) names the one
        client it is for, with per-connection routing; without it, a record goes to the client
        the record being processed was routed for, if one was named."""
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
        self, route: str, records: list[Any], *, connection: ConnectionInfo | int | None = None
    ) -> None:
        """Send several records on ``route``."""
        for record in records:
            self.route(route, record, connection=connection)

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

    def _take_output(self) -> dict[tuple[str, int | None], list[Any]]:
        out, self._out = self._out, {}
        self._routed = self._bytes = 0
        self._full = False
        return out


def _id(connection: ConnectionInfo | ConnectionRequest | ConnectionEnded | int) -> int:
    return connection if isinstance(connection, int) else connection.id


class ProcessorStats:
    """What one processor did: plain counters, bumped once per batch (busy time is measured
    with ``trio.current_time()`` around a batch, never per record)."""

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
        function = self.processor.function
        ctx.route_name = batch.route
        ctx.connection = batch.origin
        ctx._target = batch.connection
        started = trio.current_time()
        if batch.query is not None:
            await self._answer(batch)
        elif self.processor.is_async:
            for record in batch.records:
                try:
                    await function(record, ctx)
                except Exception as exc:
                    self._failed(batch, record, exc)
                if ctx._full:
                    await self._hand_on(batch)
        else:
            for record in batch.records:
                try:
                    function(record, ctx)
                except Exception as exc:
                    self._failed(batch, record, exc)
                if ctx._full:
                    await self._hand_on(batch)
        stats = self.stats
        stats.records += len(batch.records)
        stats.batches += 1
        stats.busy += trio.current_time() - started
        await self._hand_on(batch)

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
        for (route, connection), records in self.ctx._take_output().items():
            await self.routes.send(route, records, batch.origin, connection, name)

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
