"""The workflow: processors, each a task that takes batches from its inbox and calls
``function(record, ctx)`` for every record.

What a processor routes onward (``ctx.route``) is collected during the batch and handed on as
batches when the batch is done, so the hot path costs one call per record and one ``await``
per batch and route. A processor that raises loses nothing silently: the error and the record
are logged and counted (MIM ``Processor Errors``), and the workflow goes on.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from .config import Config, Processor
from .connections import ConnectionControl, ConnectionEnded, ConnectionInfo, ConnectionRequest
from .errors import RouteError
from .mim import AssignedMims, MimTable
from .routes import Batch, RouteTable

log = logging.getLogger("mzserver.workflow")


class ProcessorContext:
    """What a processor gets with each record.

    ``ctx.route(route, record)`` sends a record onward; ``ctx.connection`` is the connection the
    record came from (None if it came from elsewhere); ``ctx.mim`` holds the assigned MIM values;
    ``ctx.route_name`` is the route the record arrived on; ``ctx.log`` is a logger.
    With connection control: ``ctx.accept(request)`` / ``ctx.reject(request, reason)``.
    With per-connection routing: ``ctx.set_output_route(connection, type_name, route)``.
    """

    __slots__ = (
        "_control",
        "_out",
        "_routes",
        "connection",
        "log",
        "mim",
        "processor",
        "route_name",
        "workflow",
    )

    def __init__(
        self,
        workflow: str,
        processor: str,
        routes: RouteTable,
        mim: AssignedMims,
        control: ConnectionControl,
    ) -> None:
        self._control = control
        self.workflow = workflow
        self.processor = processor
        self.mim = mim
        self.log = logging.getLogger(f"mzserver.processor.{processor}")
        self.route_name = ""
        self.connection: ConnectionInfo | None = None
        self._routes = routes
        self._out: dict[tuple[str, int | None], list[Any]] = {}

    def route(
        self, route: str, record: Any, *, connection: ConnectionInfo | int | None = None
    ) -> None:
        """Send ``record`` on ``route`` (after the current batch). ``connection`` (an id or a
        ``ConnectionInfo``) names the one client it is for, with per-connection routing."""
        key = (route, None if connection is None else _id(connection))
        out = self._out.get(key)
        if out is None:
            if route not in self._routes:
                raise RouteError(
                    f"no route {route!r} in workflow {self.workflow!r} "
                    f"(routes: {', '.join(self._routes.names)})"
                )
            out = self._out[key] = []
        out.append(record)

    def route_many(
        self, route: str, records: list[Any], *, connection: ConnectionInfo | int | None = None
    ) -> None:
        """Send several records on ``route``."""
        for record in records:
            self.route(route, record, connection=connection)

    # -- connections ----------------------------------------------------------------------
    def accept(self, request: ConnectionRequest) -> None:
        """Let the client of a connection request in."""
        self._control.decide(request.id, True)

    def reject(self, request: ConnectionRequest, reason: str) -> None:
        """Turn the client of a connection request away; it sees ``reason``."""
        self._control.decide(request.id, False, reason)

    def set_output_route(
        self, connection: ConnectionInfo | int, type_name: str, route: str | None
    ) -> None:
        """From its next records on, send one connection's records of ``type_name`` on
        ``route`` instead of the configured output route (``None`` restores it)."""
        self._control.set_output_route(_id(connection), type_name, route)

    @property
    def connections(self) -> list[ConnectionInfo]:
        """The open connections."""
        return self._control.connections_info()

    def _take_output(self) -> dict[tuple[str, int | None], list[Any]]:
        out, self._out = self._out, {}
        return out


def _id(connection: ConnectionInfo | ConnectionRequest | ConnectionEnded | int) -> int:
    return connection if isinstance(connection, int) else connection.id


class Workflow:
    """The processors of a workflow, bound to their routes."""

    def __init__(
        self, config: Config, routes: RouteTable, mim: MimTable, control: ConnectionControl
    ) -> None:
        self.control = control
        self.config = config
        self.routes = routes
        self.mim = mim
        self._inboxes: list[tuple[Processor, trio.MemoryReceiveChannel[Batch]]] = []
        for processor in config.processors:
            send, receive = trio.open_memory_channel[Batch](config.connector.route_buffer)
            for route in processor.routes:
                routes.bind_inbox(route, send)
            self._inboxes.append((processor, receive))

    async def run(self) -> None:
        """Run every processor until cancelled."""
        async with trio.open_nursery() as nursery:
            for processor, inbox in self._inboxes:
                nursery.start_soon(
                    self._run_processor, processor, inbox, name=f"processor {processor.name}"
                )

    async def _run_processor(
        self, processor: Processor, inbox: trio.MemoryReceiveChannel[Batch]
    ) -> None:
        ctx = ProcessorContext(
            self.config.workflow, processor.name, self.routes, self.mim.assigned, self.control
        )
        function, is_async = processor.function, processor.is_async
        counters = self.mim.counters
        async for batch in inbox:
            try:
                ctx.route_name = batch.route
                ctx.connection = batch.origin
                for record in batch.records:
                    try:
                        if is_async:
                            await function(record, ctx)
                        else:
                            function(record, ctx)
                    except Exception as exc:
                        counters.processor_errors += 1
                        log.error(
                            "processor %r failed on a record from route %r: %s: %s; record: %.300r",
                            processor.name,
                            batch.route,
                            type(exc).__name__,
                            exc,
                            record,
                            exc_info=exc,
                        )
                for (route, connection), records in ctx._take_output().items():
                    await self.routes.send(route, records, batch.origin, connection)
            finally:
                self.routes.in_flight.done()
            # A long run of full batches must not starve the connections.
            await trio.lowlevel.checkpoint()
