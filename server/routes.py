"""Routes: named, bounded paths that carry batches of records between the connector and the
processors of a workflow.

A route has exactly one consumer (a processor's runner, or the connector). What travels
is a ``Batch``: a list of records, the connection they came from, and (for per-connection
routing) the connection they are for. ``InFlight`` counts batches queued for processors and not
yet processed, so that a graceful stop can wait until the workflow has finished what it took.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, NamedTuple

import trio

from mzconnector import ColumnBatch

from .connections import ConnectionInfo


class Batch(NamedTuple):
    route: str
    records: list[Any] | ColumnBatch  # a ColumnBatch: rows of one type, a column at a time
    origin: ConnectionInfo | None  # the connection the records came from
    connection: int | None = None  # with per-connection routing: the connection they are for
    source: str | None = None  # the processor that routed them (None: the connector)
    query: Any = None  # the QueryCall whose request this is (a batch of that one record)


Target = Callable[[Batch], Awaitable[None]]


class UnknownRoute(LookupError):
    pass


class RouteStats:
    """What went through one route: plain counters, bumped once per batch."""

    __slots__ = ("batches", "queued", "records")

    def __init__(self) -> None:
        self.records = 0
        self.batches = 0
        self.queued = 0  # batches in its processor's inbox, not yet processed


class InFlight:
    """How many batches are in processors' inboxes or being processed."""

    def __init__(self) -> None:
        self._count = 0
        self._idle = trio.Event()
        self._idle.set()

    def add(self) -> None:
        if self._count == 0:
            self._idle = trio.Event()
        self._count += 1

    def done(self) -> None:
        self._count -= 1
        if self._count == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        while self._count:
            await self._idle.wait()


class RouteTable:
    """Route name -> the consumer's ``Target``."""

    def __init__(self) -> None:
        self._targets: dict[str, Target] = {}
        self.processes: dict[str, Target] = {}
        self.in_flight = InFlight()
        self.stats: dict[str, RouteStats] = {}
        #: Route -> what taps it (objects with ``offer(records)``, which never block): each
        #: batch on the route is offered to them before its consumer takes it.
        self.taps: dict[str, list[Any]] = {}

    def __contains__(self, route: object) -> bool:
        return route in self._targets

    @property
    def names(self) -> list[str]:
        return sorted(self._targets)

    def bind(self, route: str, target: Target, *, process: Target | None = None) -> None:
        """``target`` takes the route's batches; ``process``, if given, is the same consumer
        returning only once a batch is processed (an engine that acknowledges batches after
        processing calls it)."""
        if route in self._targets:
            raise ValueError(f"route {route!r} already has a consumer")
        self._targets[route] = target
        self.stats[route] = RouteStats()
        self.processes[route] = process or target

    def count(self, route: str, records: list[Any]) -> None:
        """One batch of ``records`` sent on ``route``, in its statistics."""
        stats = self.stats.get(route)
        if stats is None:
            stats = self.stats[route] = RouteStats()
        stats.records += len(records)
        stats.batches += 1

    def add_tap(self, route: str, tap: Any) -> None:
        """From now on, offer each batch on ``route`` to ``tap`` too."""
        self.taps.setdefault(route, []).append(tap)

    async def tap_ready(self, route: str) -> None:
        """Returns once a tap added on ``route`` sees every batch sent from now on."""

    def remove_tap(self, route: str, tap: Any) -> None:
        taps = self.taps.get(route, [])
        if tap in taps:
            taps.remove(tap)
        if not taps:
            self.taps.pop(route, None)

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
        """Hand a batch to the route's consumer; waits while the consumer is full. ``raw``,
        if given, is the records already encoded (an engine that sends them on may reuse
        it)."""
        try:
            target = self._targets[route]
        except KeyError:
            raise UnknownRoute(route) from None
        self.count(route, records)
        if self.taps:
            for tap in self.taps.get(route, ()):
                tap.offer(records)
        await target(Batch(route, records, origin, connection, source, query))


class OutputRoutes:
    """Where the connector sends what a client submits: accepted record class (or ``bytes``)
    -> route. Each connection starts with the configured ones and may be given its own."""

    __slots__ = ("by_type", "single")

    def __init__(self, by_type: Mapping[type, str]) -> None:
        self.by_type = dict(by_type)
        distinct = set(self.by_type.values())
        #: The one route every accepted type leaves on, if there is only one.
        self.single = distinct.pop() if len(distinct) == 1 else None

    def replace(self, kind: type, route: str) -> OutputRoutes:
        return OutputRoutes({**self.by_type, kind: route})

    def split(self, records: list[Any]) -> dict[str, list[Any]]:
        """``records`` grouped by the route each leaves on, in order."""
        groups: dict[str, list[Any]] = {}
        by_type = self.by_type
        for record in records:
            route = by_type[type(record)]
            group = groups.get(route)
            if group is None:
                groups[route] = [record]
            else:
                group.append(record)
        return groups
