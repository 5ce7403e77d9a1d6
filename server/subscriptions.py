"""Subscriptions: a client chooses what it hears, and paces it.

A ``Subscription`` is on one of the connector's input routes (what the workflow sends back to
clients) or, as a tap, on an internal route listed in ``tap_routes``. Its matcher (data,
never code) picks the records it gets. Records wait in a queue of its own, bounded by
``durable_limit`` (past it the oldest are dropped and counted), and a task of its connection
moves them to the client while it is started and has fewer than ``max_pending`` records
unacknowledged. Nothing here ever waits for a client: the workflow hands records over and
goes on, so a subscription (a tap above all) never slows it.

A durable subscription (``durable="name"``) belongs to the client (``client_id``), not to a
connection: its ``Durable`` keeps collecting matching records while the client is away,
delivers them in order when it subscribes again, and takes back what was delivered and not
acknowledged. A ``shared`` durable spreads its records over every subscription attached to
it (a work queue; any client may attach); a ``last-value`` one keeps only the newest record
per value of its ``key`` field.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import msgspec
import trio

from mzconnector import RecordCodec, SubRecords

from .matcher import Matcher, MatcherError
from .mim import Counters

if TYPE_CHECKING:
    from .outbox import Outbox
    from .routes import RouteTable

log = logging.getLogger("mzserver.subscriptions")

ACK_MODES = ("auto", "client", "none")
KINDS = ("standard", "shared", "last-value")
#: Records one SubRecords frame carries at most.
CHUNK = 8192
#: The share of the server loop's time a tap's task may take (it sleeps the rest).
TAP_SHARE = 0.05
#: How records travel: encoded lists of items, each with the items it holds.
Wire = Callable[[list[Any], str], list[tuple[msgspec.Raw, list[Any]]]]


class SubscriptionError(ValueError):
    """A subscription that cannot be made, and why (sent to the client)."""


class Durable:
    """A durable subscription's records, kept for its client while it is away."""

    def __init__(
        self, name: str, owner: str, route: str, kind: str, key: str, limit: int, counters: Counters
    ) -> None:
        self.name = name
        self.owner = owner  # the client_id ("" for a shared durable: anyone may attach)
        self.route = route
        self.kind = kind
        self.key = key
        self.matcher: Matcher | None = None
        self._limit = limit
        self._counters = counters
        self._queue: collections.deque[Any] = collections.deque()
        self._latest: dict[Any, Any] = {}  # last-value: key value -> newest record
        self.attached: list[Subscription] = []
        self.dropped = 0
        self._untold = 0  # dropped and not yet told a client (with its next delivery)

    def __repr__(self) -> str:
        whose = f" of client {self.owner!r}" if self.owner else ""
        return f"durable {self.name!r}{whose}"

    def __len__(self) -> int:
        return len(self._latest) if self.kind == "last-value" else len(self._queue)

    def offer(self, records: list[Any]) -> None:
        assert self.matcher is not None
        matched = [r for r in records if self.matcher(r)]
        if not matched:
            return
        if self.kind == "last-value":
            for record in matched:
                value = getattr(record, self.key, None)
                self._latest.pop(value, None)  # the newest goes to the end
                self._latest[value] = record
            excess = len(self._latest) - self._limit
            for value in list(self._latest)[: max(0, excess)]:
                del self._latest[value]
        else:
            self._queue.extend(matched)
            excess = len(self._queue) - self._limit
            for _ in range(max(0, excess)):
                self._queue.popleft()
        if excess > 0:
            self.dropped += excess
            self._untold += excess
            self._counters.undeliverable += excess
            log.warning("%r holds %d records: dropped the %d oldest", self, self._limit, excess)
        for sub in self.attached:
            sub.wake()

    def take(self, limit: int) -> list[Any]:
        """The next records, at most ``limit``, for an attached subscription; a shared one
        takes its share of what is there, so that every attached client gets work."""
        if self.kind == "shared" and len(self.attached) > 1:
            limit = min(limit, max(1, -(-len(self._queue) // len(self.attached))))
        if self.kind == "last-value":
            keys = list(self._latest)[:limit]
            return [self._latest.pop(k) for k in keys]
        return [self._queue.popleft() for _ in range(min(limit, len(self._queue)))]

    def take_dropped(self) -> int:
        """How many it dropped since it last told a client (who is told now)."""
        dropped, self._untold = self._untold, 0
        return dropped

    def give_back(self, records: Iterable[Any]) -> None:
        """Records delivered and never acknowledged: first in line for the next delivery."""
        if self.kind == "last-value":
            returned = {getattr(r, self.key, None): r for r in records}
            # A newer record for the same key wins over one given back.
            self._latest = {**{k: v for k, v in returned.items() if k not in self._latest},
                            **self._latest}  # fmt: skip
        else:
            self._queue.extendleft(reversed(list(records)))
        for sub in self.attached:
            sub.wake()


class Subscription:
    """One subscription of one connection."""

    def __init__(
        self,
        sub_id: int,
        route: str,
        matcher: Matcher,
        *,
        ack: str,
        max_pending: int,
        tap: bool,
        durable: Durable | None,
        limit: int,
        outbox: Outbox,
        wire: Wire,
        counters: Counters,
        name: str,
    ) -> None:
        self.id = sub_id
        self.route = route
        self.matcher = matcher
        self.ack = ack
        self.max_pending = max_pending
        self.tap = tap
        self.durable = durable
        self._limit = limit
        self._outbox = outbox
        self._wire = wire
        self._counters = counters
        self._name = name
        self._queue: collections.deque[Any] = collections.deque()  # matched, waiting
        self._incoming: collections.deque[list[Any]] = collections.deque()  # a tap's, unexamined
        self._incoming_count = 0
        self._pending: collections.OrderedDict[int, Any] = collections.OrderedDict()
        self._seq = 0  # the number of the last record sent
        self.paused = False
        self.closed = False
        self._dropped = 0  # dropped and not yet told the client
        self._wakeup = trio.Event()
        self._idle = trio.Event()  # set while the task waits: nothing it can deliver now

    def __repr__(self) -> str:
        what = "tap" if self.tap else "subscription"
        return f"{what} {self.id} on route {self.route!r} of {self._name}"

    # -- records in -------------------------------------------------------------------------
    def offer(self, records: list[Any]) -> None:
        """Records of its route: the matching ones wait for the client. Never blocks."""
        if self.durable is not None:
            self.durable.offer(records)
            return
        if self.tap:
            # A tap takes the batch as it is, at a constant cost: its own task looks at it
            # later, within its share of the loop (see run), so watching never slows the
            # workflow much. What it does not get to is dropped unexamined.
            self._incoming.append(records)
            self._incoming_count += len(records)
            excess = self._incoming_count + len(self._queue) - self._limit
            if excess > 0:
                self._drop_incoming(excess)
            self.wake()
            return
        matcher = self.matcher
        matched = records if matcher.matches_all else [r for r in records if matcher(r)]
        if not matched:
            return
        queue = self._queue
        queue.extend(matched)
        excess = len(queue) - self._limit
        if excess > 0:
            for _ in range(excess):
                queue.popleft()
            self._dropped += excess
            self._counters.undeliverable += excess
            log.warning("%r fell behind by %d records: dropped the oldest", self, excess)
        self.wake()

    def _drop_incoming(self, count: int) -> None:
        """A tap fell behind: drop the oldest ``count`` records it has not looked at yet."""
        dropped = 0
        while dropped < count and self._incoming:
            batch = self._incoming[0]
            take = min(len(batch), count - dropped)
            if take == len(batch):
                self._incoming.popleft()
            else:
                self._incoming[0] = batch[take:]
            dropped += take
        self._incoming_count -= dropped
        self._dropped += dropped
        if self._dropped == dropped:  # the first of a run of drops: said once, not per batch
            log.warning("%r fell behind: dropping records it could not look at", self)

    def _examine(self) -> None:
        """A tap looks at what waits: the matching records join its queue."""
        matcher = self.matcher
        examined = 0
        while self._incoming and examined < CHUNK:
            batch = self._incoming.popleft()
            self._incoming_count -= len(batch)
            examined += len(batch)
            self._queue.extend(batch if matcher.matches_all else filter(matcher, batch))

    def wake(self) -> None:
        self._wakeup.set()

    # -- what the client says ---------------------------------------------------------------
    def acknowledge(self, seq: int, through: bool) -> None:
        pending = self._pending
        if through:
            while pending and next(iter(pending)) <= seq:
                pending.popitem(last=False)
        else:
            pending.pop(seq, None)
        self.wake()

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        self.wake()

    def close(self) -> None:
        """No more records; what was delivered and not acknowledged goes back to a durable,
        or is counted ``Unacknowledged Records``."""
        if self.closed:
            return
        self.closed = True
        self.wake()
        unacked = list(self._pending.values())
        self._pending.clear()
        if self.durable is not None:
            self.durable.attached.remove(self)
            self.durable.give_back([*unacked, *self._queue])
        elif unacked:
            self._counters.unacknowledged += len(unacked)
            log.warning("%r closed with %d unacknowledged record(s)", self, len(unacked))

    async def wait_idle(self) -> None:
        """Until it has delivered all it can now (a graceful stop waits for this)."""
        await self._idle.wait()

    # -- records out ------------------------------------------------------------------------
    def _room(self) -> int:
        if self.paused or self.closed:
            return 0
        if self.ack == "none":
            return CHUNK
        return min(CHUNK, self.max_pending - len(self._pending))

    def _next(self, room: int) -> list[Any]:
        if self.durable is not None:
            return self.durable.take(room)
        queue = self._queue
        return [queue.popleft() for _ in range(min(room, len(queue)))]

    async def run(self) -> None:
        """Move records to the client while it may take them (a task of its connection). A
        tap's task keeps to ``TAP_SHARE`` of the loop's time: after each round of work it
        sleeps for what keeps it there."""
        while not self.closed:
            started = time.perf_counter()
            if self._incoming:
                self._examine()
            room = self._room()
            records = self._next(room) if room > 0 else []
            if not records:
                if self._incoming:
                    await self._rest(started)
                    continue
                self._wakeup = trio.Event()
                self._idle.set()
                await self._wakeup.wait()
                self._idle = trio.Event()
                continue
            for items, kept in self._wire(records, self.route):
                first = self._seq + 1
                self._seq += len(kept)
                if self.ack != "none":
                    self._pending.update(zip(range(first, first + len(kept)), kept))
                dropped, self._dropped = self._dropped, 0
                if self.durable is not None:
                    dropped += self.durable.take_dropped()
                busy = time.perf_counter() - started
                await self._outbox.put_message(SubRecords(self.id, first, items, dropped))
                self._counters.records_out += len(kept)
                started = time.perf_counter() - busy  # the wait for the client is not work
            await self._rest(started)

    async def _rest(self, started: float) -> None:
        if self.tap:
            busy = time.perf_counter() - started
            await trio.sleep(busy * (1 - TAP_SHARE) / TAP_SHARE)


def check_request(
    route: str,
    *,
    ack: str,
    max_pending: int,
    kind: str,
    key: str,
    durable: str,
    tap: bool,
    client_id: str,
    input_routes: Iterable[str],
    tap_routes: Iterable[str],
    codec: RecordCodec,
) -> None:
    """Everything about a subscription request but its matcher; a ``SubscriptionError`` says
    what is wrong."""
    if tap:
        if route not in tap_routes:
            listed = ", ".join(tap_routes) or "none"
            raise SubscriptionError(
                f"route {route!r} cannot be tapped: only routes in [connector] tap_routes can "
                f"(they are: {listed})"
            )
        if durable:
            raise SubscriptionError("a tap cannot be durable")
    elif route not in input_routes:
        routes = ", ".join(input_routes) or "none"
        raise SubscriptionError(
            f"route {route!r} is not one the workflow sends to clients (the connector's input "
            f"routes: {routes}); an internal route can be tapped with tap=True if it is in "
            "[connector] tap_routes"
        )
    if ack not in ACK_MODES:
        modes = ", ".join(map(repr, ACK_MODES))
        raise SubscriptionError(f"ack must be one of {modes}, not {ack!r}")
    if not isinstance(max_pending, int) or max_pending < 1:
        raise SubscriptionError(f"max_pending must be a positive integer, not {max_pending!r}")
    if kind not in KINDS:
        raise SubscriptionError(f"type must be one of {', '.join(map(repr, KINDS))}, not {kind!r}")
    if kind != "standard" and not durable:
        raise SubscriptionError(f"a {kind} subscription must be durable (durable='name')")
    if kind == "last-value":
        if not key:
            raise SubscriptionError("a last-value subscription needs key='field'")
        if not any(key in cls.__struct_fields__ for cls in codec.types.values()):
            raise SubscriptionError(f"no record type has a field {key!r} to key on")
    elif key:
        raise SubscriptionError("key= is for last-value subscriptions")
    if durable and kind != "shared" and not client_id:
        raise SubscriptionError(
            "a durable subscription belongs to a client: connect with client_id='...'"
        )


class SubscriptionHub:
    """Every subscription and durable of a server, by route."""

    def __init__(
        self, codec: RecordCodec, counters: Counters, *, limit: int, routes: RouteTable
    ) -> None:
        self._codec = codec
        self._counters = counters
        self._limit = limit
        self.by_route: dict[str, list[Subscription]] = {}  # on input routes, but durables'
        self._routes = routes  # it offers each batch on a tapped route to the taps
        self._durables: dict[tuple[str, str], Durable] = {}
        self.durables_by_route: dict[str, list[Durable]] = {}

    def subscribe(
        self,
        sub_id: int,
        route: str,
        matcher: Any,
        *,
        ack: str,
        max_pending: int,
        kind: str,
        key: str,
        durable: str,
        tap: bool,
        client_id: str,
        input_routes: Iterable[str],
        tap_routes: Iterable[str],
        outbox: Outbox,
        wire: Wire,
        name: str,
    ) -> Subscription:
        """A new subscription, registered; ``SubscriptionError`` or ``MatcherError`` if not."""
        check_request(
            route,
            ack=ack,
            max_pending=max_pending,
            kind=kind,
            key=key,
            durable=durable,
            tap=tap,
            client_id=client_id,
            input_routes=input_routes,
            tap_routes=tap_routes,
            codec=self._codec,
        )
        compiled = Matcher(matcher, self._codec)
        store = self._durable(durable, client_id, route, kind, key, compiled) if durable else None
        sub = Subscription(
            sub_id,
            route,
            compiled,
            ack=ack,
            max_pending=max_pending,
            tap=tap,
            durable=store,
            limit=self._limit,
            outbox=outbox,
            wire=wire,
            counters=self._counters,
            name=name,
        )
        if store is not None:
            store.attached.append(sub)
        elif tap:
            self._routes.add_tap(route, sub)
        else:
            self.by_route.setdefault(route, []).append(sub)
        return sub

    def _durable(
        self, name: str, client_id: str, route: str, kind: str, key: str, matcher: Matcher
    ) -> Durable:
        owner = "" if kind == "shared" else client_id
        durable = self._durables.get((owner, name))
        if durable is None:
            durable = Durable(name, owner, route, kind, key, self._limit, self._counters)
            self._durables[(owner, name)] = durable
            self.durables_by_route.setdefault(route, []).append(durable)
        elif (durable.route, durable.kind, durable.key) != (route, kind, key):
            raise SubscriptionError(
                f"{durable!r} is on route {durable.route!r}, type {durable.kind!r}"
                + (f", key {durable.key!r}" if durable.key else "")
                + ": subscribe to it the same way"
            )
        elif durable.attached and kind != "shared":
            raise SubscriptionError(f"{durable!r} is already in use by another connection")
        durable.matcher = matcher  # the newest subscription's matcher decides what it keeps
        return durable

    def remove(self, sub: Subscription) -> None:
        sub.close()
        if sub.tap:
            self._routes.remove_tap(sub.route, sub)
        elif sub.durable is None:
            subs = self.by_route.get(sub.route, [])
            if sub in subs:
                subs.remove(sub)
            if not subs:
                self.by_route.pop(sub.route, None)

    def listens(self, route: str) -> bool:
        """Whether any subscription or durable is on an input route."""
        return route in self.durables_by_route or route in self.by_route

    def deliver(self, route: str, records: list[Any]) -> bool:
        """Records the workflow routed to every client, on an input route; whether any
        subscription or durable is on the route."""
        durables = self.durables_by_route.get(route, ())
        for durable in durables:
            durable.offer(records)
        subs = self.by_route.get(route, ())
        for sub in subs:
            sub.offer(records)
        return bool(durables or subs)


__all__ = [
    "Durable",
    "MatcherError",
    "Subscription",
    "SubscriptionError",
    "SubscriptionHub",
    "check_request",
]
