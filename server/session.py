"""One client connection: handshake, admission, then a reader and a writer task.

The reader turns frames into protocol events and typed batches onto routes; the writer empties
the connection's bounded outbox onto the socket. Whatever goes wrong with one connection
closes that one only.

Admission, in order: the protocol version, a server not shutting down, metadata not nested too
deeply, the token (``[connector.auth]``), the client's session (a new connection of a session
still open here supersedes the old one, whose link is taken for half-dead), the connection
limit, and last the workflow (connection control). Records a client numbers in its session
are taken once: one it resends after a reconnection, numbered at or below what the session
has taken, is dropped (and acknowledged).
"""

from __future__ import annotations

import collections
import datetime
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import msgspec
import trio

from mzconnector import (
    NEED_DATA,
    PROTOCOL_VERSION,
    Ack,
    Answer,
    Bye,
    CancelQuery,
    Closed,
    ColumnBatch,
    Columns,
    Error,
    FieldMismatch,
    Flush,
    GetMim,
    Hello,
    Keepalive,
    KvRequest,
    Message,
    Mim,
    Ping,
    Pong,
    Protocol,
    Query,
    QueryFailed,
    RecordError,
    Records,
    Refuse,
    Refused,
    RemoteProtocolError,
    Role,
    SubAck,
    Subscribe,
    SubscriptionControl,
    batch_length,
)

from .auth import AUTH_FAILED
from .connections import ConnectionEnded, ConnectionInfo, ConnectionRequest
from .kv import kv_answer
from .matcher import MatcherError
from .outbox import Outbox
from .queries import QueryCall
from .routes import OutputRoutes
from .sessions import Session
from .subscriptions import Subscription, SubscriptionError

if TYPE_CHECKING:
    from .connector import Connector

log = logging.getLogger("mzserver.connector")

#: Records taken between unsolicited acknowledgements (bounds what a client keeps for replay).
ACK_EVERY = 65536
RECEIVE_SIZE = 1 << 18
#: Refused records described in detail per batch; the rest are counted.
REFUSALS_DESCRIBED = 100
#: The slow path lets other connections run after this many records.
YIELD_EVERY = 1024
_raw_items = msgspec.msgpack.Decoder(list[msgspec.Raw])
_LOST = (trio.BrokenResourceError, trio.ClosedResourceError)


def _nested_deeper_than(value: Any, limit: int) -> bool:
    """Whether containers nest more than ``limit`` levels deep in a decoded msgpack value
    (a flat dict is one level)."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth >= limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return False


def _tls_subject(stream: trio.abc.Stream) -> str | None:
    """The client certificate's subject, e.g. ``"CN=alice,O=Example"``, if there is one."""
    if not isinstance(stream, trio.SSLStream):
        return None
    cert = stream.getpeercert()
    if not cert:
        return None
    return ",".join(
        f"{_RDN_NAMES.get(k, k)}={v}" for rdn in cert.get("subject", ()) for k, v in rdn
    )


_RDN_NAMES = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "stateOrProvinceName": "ST",
    "localityName": "L",
}


def _peer(stream: trio.abc.Stream) -> str:
    inner = getattr(stream, "transport_stream", stream)
    sock = getattr(inner, "socket", None)
    try:
        host, port = sock.getpeername()[:2]  # type: ignore[union-attr]
    except (AttributeError, OSError, TypeError, ValueError):
        return "?"
    return f"{host}:{port}"


class ServerConnection:
    """One client connection: handshake, admission, then a reader (here) and the writer of
    its outbox. It owns its state; the connector and the workflow change it through its
    methods (``decide``, ``set_output_route``) and its ``outbox``."""

    def __init__(self, connector: Connector, stream: trio.abc.Stream, conn_id: int) -> None:
        self.connector = connector
        self.settings = settings = connector.settings
        self.stream = stream
        self.id = conn_id
        self.peer = _peer(stream)
        self.name = f"connection {conn_id} from {self.peer}"
        self.protocol = Protocol(Role.SERVER, max_frame_size=settings.max_frame_size)
        self.counters = connector.mim.counters
        self.info: ConnectionInfo | None = None
        self.output_routes: OutputRoutes = connector.output_routes
        self.outbox: Outbox  # made when the connection opens
        # Cancelled to stop taking records: one scope for the handshake, one for the reader.
        self._handshaking = trio.CancelScope()
        self._reading = trio.CancelScope()
        self._guard = trio.CancelScope()
        self.reader_done = trio.Event()
        self._holds_slot = False
        self._decided = trio.Event()
        self._decision: tuple[bool, str] | None = None
        self._awaiting_decision = False
        # The client's session: how far its numbered records were taken (a session of its own
        # for a client that names none), and whether the server knew it when it connected.
        self.session = Session(("", ""))
        self._in_table = False
        self._session_known = False
        self._acked = 0
        self.user = ""  # the name of the client's token ("" for the shared one, or none)
        self._client_keepalive = 0.0
        # For the keepalive: what arrived, and whether the reader waits for more (a reader
        # held back by a full route is busy, not idle).
        self.bytes_received = 0
        self._receiving = False
        self._dropped: str | None = None  # why the server ended it (keepalive, superseded)
        self.ended = trio.Event()
        self.records_in = 0  # records taken from this client (refused ones not counted)
        self.client_id = ""
        self._tasks: trio.Nursery | None = None
        self._queries: dict[int, QueryCall] = {}
        self._subs: dict[int, Subscription] = {}
        self._subscribed: collections.Counter[str] = collections.Counter()  # input route -> subs

    # -- what others may do with it ---------------------------------------------------------
    def stop_reading(self) -> None:
        self._handshaking.cancel()
        self._reading.cancel()

    def abort(self) -> None:
        self.stop_reading()
        self._guard.cancel()

    async def supersede(self, by: str) -> None:
        """A newer connection of this client's session takes over (this one's link is taken
        for half-dead): stop taking records (a chunk being taken is taken whole, so that the
        session says exactly how far it got), close, and return once this connection has
        ended, or after the handshake timeout (twice) at most."""
        bound = self.settings.handshake_timeout
        await self._drop(f"superseded by {by}, a new connection of the same client session")
        with trio.move_on_after(bound):
            await self.reader_done.wait()
        if not self.reader_done.is_set():
            log.warning("%s: still taking records after %s s; cut short", self.name, bound)
            self.abort()
        with trio.move_on_after(bound):
            await self.ended.wait()

    async def _drop(self, reason: str) -> None:
        """End the connection from the server's side without a farewell: the peer is gone or
        replaced. Closing the stream also ends a write stuck on a peer that reads nothing."""
        if self._dropped is None:
            self._dropped = reason
        self.stop_reading()
        await trio.aclose_forcefully(self.stream)

    def decide(self, accept: bool, reason: str = "") -> None:
        """Connection control: the workflow's answer to this connection's request."""
        if not self._awaiting_decision or self._decided.is_set():
            raise LookupError(f"no connection request {self.id} is waiting for a decision")
        self._decision = (accept, reason)
        self._decided.set()

    def set_output_route(self, kind: type, route: str) -> None:
        """From its next records on, this connection's records of ``kind`` leave on ``route``."""
        self.output_routes = self.output_routes.replace(kind, route)

    def subscribes(self, route: str) -> bool:
        """Whether it gets the records of an input route through subscriptions only."""
        return self._subscribed[route] > 0

    def offer(self, route: str, records: list[Any]) -> None:
        """Records of an input route routed to this connection: to its subscriptions."""
        for sub in self._subs.values():
            if sub.route == route and not sub.tap:
                sub.offer(records)

    # -- the connection's life --------------------------------------------------------------
    async def run(self) -> None:
        try:
            with self._handshaking:  # cancelled when the server stops
                opened = await self._open()
            if opened:
                await self._serve()
        finally:
            if self._holds_slot:
                self.connector.limiter.release_on_behalf_of(self)
            if self._in_table:
                self.connector.sessions.detach(self.session, self)
            self.ended.set()

    async def _open(self) -> bool:
        """Handshake, limits, connection control; True once the client is welcomed."""
        hello = await self._handshake()
        if hello is None:
            return False
        refusal = self._check(hello)
        if refusal is None:
            await self._take_session(hello)
            refusal = self._admit()
        if refusal is None:
            self.info = ConnectionInfo(
                id=self.id,
                peer=self.peer,
                name=hello.name,
                metadata=hello.metadata,
                tls_subject=_tls_subject(self.stream),
                connected_at=datetime.datetime.now(datetime.timezone.utc),
                user=self.user,
                server=self.connector.engine.instance,
            )
            self.client_id = hello.client_id
            self._client_keepalive = hello.keepalive
            if self.settings.connection_control:
                refusal = await self._ask_workflow()
        if refusal is not None:
            self.counters.connections_refused += 1
            log.info("%s refused: %s", self.name, refusal.reason)
            await self._send_now(refusal)
            return False
        return True

    async def _ask_workflow(self) -> Refuse | None:
        """Connection control: put the request on its route; wait for the decision."""
        settings = self.settings
        assert self.info is not None
        self._awaiting_decision = True
        try:
            with trio.move_on_after(settings.connection_request_timeout):
                await self.connector.routes.send(
                    settings.connection_request_route, [ConnectionRequest(self.info)], self.info
                )
                await self._decided.wait()
        finally:
            self._awaiting_decision = False
        if self._decision is None:
            return Refuse(
                "rejected",
                f"the workflow made no decision within {settings.connection_request_timeout} s",
            )
        accept, reason = self._decision
        return None if accept else Refuse("rejected", reason or "rejected by the workflow")

    async def _serve(self) -> None:
        """The open connection: the outbox's writer, and the reader in this task."""
        counters = self.counters
        assert self.info is not None
        self.outbox = Outbox(
            self.stream,
            self.protocol,
            counters,
            size=self.settings.outbox_size,
            delivery_timeout=self.settings.delivery_timeout,
            name=self.name,
        )
        # The Welcome passes the protocol as the connection is registered, with nothing in
        # between: the table then keeps every broadcast from overtaking it.
        self.connector.opened(self)
        settings = self.settings
        keepalive = 0.0
        if self._client_keepalive > 0 and settings.keepalive > 0 and settings.keepalive_misses:
            keepalive = settings.keepalive  # only for a client that pings and answers pings
        session = self.session
        self._acked = session.taken
        welcome = self.connector.welcome(
            connection_id=self.id,
            resumed=session.taken if self._session_known else -1,
            keepalive=keepalive,
        )
        self.outbox.put_bytes_nowait(self.protocol.send(welcome))
        counters.connections_accepted += 1
        counters.connections_open += 1
        log.info("%s (%s) open", self.name, self.info.name or "unnamed")
        reason = "the client closed the connection"
        farewell: Message | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.outbox.run)
                try:
                    # Conversations run their own tasks: subscriptions' deliveries, and
                    # replies that wait for room in the outbox.
                    async with trio.open_nursery() as tasks:
                        self._tasks = tasks
                        if keepalive:
                            tasks.start_soon(self._keepalive, keepalive, settings.keepalive_misses)
                        try:
                            reason, farewell = await self._read_loop()
                            if self._dropped is not None:
                                reason, farewell = self._dropped, None
                            self.reader_done.set()
                            await self._tell_workflow_ended(reason)
                            if self._reading.cancelled_caught and self._dropped is None:
                                # The server is stopping: deliver what the workflow still makes.
                                await self.connector.drained.wait()
                                for sub in list(self._subs.values()):
                                    await sub.wait_idle()
                        finally:
                            self._end_conversations()
                            tasks.cancel_scope.cancel()
                finally:
                    self.connector.closed(self)  # no more records for it
                    self.outbox.close(farewell)
        finally:
            self.connector.closed(self)
            counters.connections_open -= 1
            log.info("%s closed: %s", self.name, reason)

    async def _tell_workflow_ended(self, reason: str) -> None:
        settings = self.settings
        if settings.connection_control and self.info is not None:
            await self.connector.routes.send(
                settings.connection_request_route, [ConnectionEnded(self.info, reason)], self.info
            )

    async def _handshake(self) -> Hello | None:
        """Read the client's Hello within the handshake timeout."""
        protocol = self.protocol
        timeout = self.settings.handshake_timeout
        with trio.move_on_after(timeout) as scope:
            try:
                while True:
                    event = protocol.next_event()
                    if event is NEED_DATA:
                        data = await self.stream.receive_some(RECEIVE_SIZE)
                        self.counters.bytes_in += len(data)
                        protocol.receive_data(data)
                    elif isinstance(event, Hello):
                        return event
                    else:  # Closed: the client left before saying hello
                        return None
            except RemoteProtocolError as exc:
                log.warning("%s: %s", self.name, exc)
                await self._send_now(Error(str(exc)))
                return None
            except _LOST as exc:
                if isinstance(self.stream, trio.SSLStream):
                    log.warning("%s: TLS handshake failed: %s", self.name, exc.__cause__ or exc)
                else:
                    log.info("%s lost before hello: %s", self.name, exc.__cause__ or exc)
                return None
        if scope.cancelled_caught and not self._handshaking.cancel_called:
            log.warning("%s: no hello within %s s; closing", self.name, timeout)
            await self._send_now(Error(f"no hello within {timeout} s"))
        return None

    def _check(self, hello: Hello) -> Refuse | None:
        """What the Hello alone decides: protocol, shutdown, metadata, the token."""
        connector = self.connector
        if hello.protocol != PROTOCOL_VERSION:
            return Refuse(
                "protocol",
                f"this server speaks protocol {PROTOCOL_VERSION}; "
                f"the client speaks {hello.protocol}",
            )
        if connector.stop_requested.is_set():
            return Refuse("shutdown", "the server is shutting down")
        limit = self.settings.max_nesting
        if _nested_deeper_than(hello.metadata, limit):
            return Refuse("protocol", f"the metadata is nested more than {limit} levels deep")
        auth = connector.config.auth
        if auth is not None:
            user = auth.user(hello.token)
            if user is None:  # the same answer for a wrong token and a missing one
                return Refuse("auth", AUTH_FAILED)
            self.user = user
        return None

    async def _take_session(self, hello: Hello) -> None:
        """Attach to the client's session; a connection of it still open here (its link
        half-dead: the client has given up on it) is superseded first, so that the session
        says exactly how far its records were taken before this one reads any."""
        if not hello.session:
            return
        sessions = self.connector.sessions
        self.session, previous, self._session_known = sessions.attach(
            (self.user, hello.session), self
        )
        self._in_table = True
        if previous is not None:
            log.info("%s takes over the session of %s", self.name, previous.name)
            await previous.supersede(self.name)

    def _admit(self) -> Refuse | None:
        """The connection limit."""
        connector = self.connector
        try:
            connector.limiter.acquire_on_behalf_of_nowait(self)
            self._holds_slot = True
        except trio.WouldBlock:
            return Refuse("limit", connector.limit_reason())
        return None

    async def _send_now(self, message: Message) -> None:
        """Send a message directly, before the writer runs (handshake answers), best effort."""
        if not self.protocol.may_send(type(message)):
            return
        data = self.protocol.send(message)
        with trio.move_on_after(self.settings.handshake_timeout):
            try:
                await self.stream.send_all(data)
                self.counters.bytes_out += len(data)
            except _LOST:
                pass

    # -- conversations ------------------------------------------------------------------------
    def _spawn(self, function: Callable[[], Awaitable[None]]) -> None:
        assert self._tasks is not None
        self._tasks.start_soon(function)

    async def _query(self, event: Query) -> None:
        connector = self.connector
        queries = connector.config.queries
        spec = queries.get(event.name)
        failed: QueryFailed | None = None
        if spec is None:
            known = ", ".join(queries) or "none"
            failed = QueryFailed(
                event.id, "unknown-query", "no query {0} (queries: {1})", [event.name, known]
            )
        elif event.id in self._queries:
            failed = QueryFailed(event.id, "duplicate-id", "query {0} is in flight", [event.id])
        else:
            try:
                request = connector.query_decoders[event.name].decode(event.request)
            except (msgspec.DecodeError, UnicodeDecodeError):
                name, field, problem = connector.config.codec.explain(
                    event.request, [spec.request.__name__]
                )
                failed = QueryFailed(
                    event.id,
                    "bad-request",
                    "the request does not match {0}: {1}",
                    [f"{name}.{field}" if field else name, problem],
                )
        if failed is not None:
            await self.outbox.put_message(failed)
            return
        assert spec is not None
        assert self.info is not None
        call = QueryCall(
            event.id,
            spec,
            self.info,
            self.outbox,
            connector.config.codec,
            max_frame_size=self.settings.max_frame_size,
            spawn=self._spawn,
            on_done=lambda done: self._queries.pop(done.id, None),
        )
        self._queries[event.id] = call
        await connector.routes.send(spec.route, [request], self.info, query=call)

    async def _subscribe(self, event: Subscribe) -> None:
        connector = self.connector
        settings = self.settings
        if event.id in self._subs:
            await self.outbox.put_message(
                Answer(event.id, error=f"subscription {event.id} exists already")
            )
            return
        try:
            sub = connector.hub.subscribe(
                event.id,
                event.route,
                event.matcher,
                ack=event.ack,
                max_pending=event.max_pending,
                kind=event.kind,
                key=event.key,
                durable=event.durable,
                tap=event.tap,
                client_id=self.client_id,
                input_routes=settings.input_routes,
                tap_routes=settings.tap_routes,
                outbox=self.outbox,
                wire=connector.wire,
                name=self.name,
            )
        except (SubscriptionError, MatcherError) as exc:
            await self.outbox.put_message(Answer(event.id, error=str(exc)))
            return
        self._subs[event.id] = sub
        if not sub.tap:
            self._subscribed[sub.route] += 1
        else:
            await connector.routes.tap_ready(sub.route)
        await self.outbox.put_message(Answer(event.id))  # before any of its records
        self._spawn(sub.run)

    def _control_subscription(self, event: SubscriptionControl) -> Answer:
        sub = self._subs.get(event.id)
        if sub is None:
            return Answer(event.id, error=f"no subscription {event.id}")
        if event.op == "stop":
            sub.pause()
        elif event.op == "start":
            sub.resume()
        elif event.op == "close":
            self._unsubscribe(sub)
        else:
            return Answer(event.id, error=f"no operation {event.op!r} on a subscription")
        return Answer(event.id)

    def _unsubscribe(self, sub: Subscription) -> None:
        del self._subs[sub.id]
        if not sub.tap:
            self._subscribed[sub.route] -= 1
        self.connector.hub.remove(sub)

    def _end_conversations(self) -> None:
        """The connection is over: every query is cancelled, every subscription closed."""
        for call in list(self._queries.values()):
            call.cancel()
        self._queries.clear()
        for sub in list(self._subs.values()):
            self._unsubscribe(sub)

    # -- keepalive ----------------------------------------------------------------------------
    async def _keepalive(self, interval: float, misses: int) -> None:
        """Ping a client that asked for it after ``interval`` idle seconds, and end its
        connection after ``misses`` unanswered pings: a frozen or vanished client must not keep
        its slot. Anything that arrives is an answer; a reader held back by a full route is
        busy, not idle."""
        state = Keepalive(interval, misses, trio.current_time())
        seen = -1
        while True:
            await trio.sleep_until(state.deadline)
            if self.bytes_received != seen or not self._receiving:
                seen = self.bytes_received
                state.heard()
            ping = state.tick(trio.current_time())
            if state.dead:
                log.warning(
                    "%s: no answer to %d pings, %s s apart; closing", self.name, misses, interval
                )
                await self._drop(f"no answer to {misses} pings, {interval} s apart")
                return
            if ping is not None and self.protocol.may_send(Ping):
                self.outbox.put_message_nowait(ping)

    # -- reading ------------------------------------------------------------------------------
    async def _read_loop(self) -> tuple[str, Message | None]:
        """Take records until the client leaves; returns why the reading ended, and what to
        tell the client last."""
        protocol = self.protocol
        stream = self.stream
        counters = self.counters
        # A graceful stop cancels `reading`; while a chunk is taken, `guard` is shielded so
        # that the chunk is taken whole (abort() cancels `guard` itself). One scope toggled
        # per chunk costs a fraction of a new scope per chunk.
        with self._reading, self._guard as guard:
            while True:
                guard.shield = True
                try:
                    # Frames that came with the Hello are taken before anything more is read.
                    for event in protocol.events():
                        done = await self._on_event(event)
                        if done is not None:
                            return done, None
                except RemoteProtocolError as exc:
                    log.warning("%s: %s; closing", self.name, exc)
                    return f"protocol error: {exc}", Error(str(exc))
                guard.shield = False
                self._receiving = True
                try:
                    data = await stream.receive_some(RECEIVE_SIZE)
                except _LOST as exc:
                    return f"the connection was lost: {exc.__cause__ or exc}", None
                self._receiving = False
                self.bytes_received += len(data)
                counters.bytes_in += len(data)
                protocol.receive_data(data)
        return "the server is shutting down", Bye("the server is shutting down")

    async def _on_event(self, event: Any) -> str | None:
        """Handle one event; why the client is done, or None."""
        if isinstance(event, Records):
            await self._take(event.items, event.first)
        elif isinstance(event, Columns):
            await self._take_columns(event)
        elif isinstance(event, Flush):
            self._acked = taken = self.session.taken
            await self.outbox.put_message(Ack(taken))
        elif isinstance(event, GetMim):
            await self.outbox.put_message(Mim(self.connector.engine.mim_snapshot()))
        elif isinstance(event, Query):
            await self._query(event)
        elif isinstance(event, CancelQuery):
            call = self._queries.get(event.id)
            if call is not None:
                call.cancel()
        elif isinstance(event, Subscribe):
            await self._subscribe(event)
        elif isinstance(event, SubscriptionControl):
            await self.outbox.put_message(self._control_subscription(event))
        elif isinstance(event, SubAck):
            sub = self._subs.get(event.id)
            if sub is not None:
                sub.acknowledge(event.seq, event.through)
        elif isinstance(event, KvRequest):
            await self.outbox.put_message(await kv_answer(self.connector.kv, event))
        elif isinstance(event, Ping):
            await self.outbox.put_message(Pong(event.id))
        elif isinstance(event, (Bye, Closed)):
            return "the client closed the connection"
        elif isinstance(event, Error):
            log.warning("%s reported an error: %s", self.name, event.message)
            return f"the client reported an error: {event.message}"
        return None

    def _numbered(self, first: int, length: Callable[[], int]) -> tuple[int, int] | None:
        """The number of a batch's first record (``first``, or for 0 what follows what was
        taken) and how many of its first records were taken before (a resent batch); None
        when all of them were. ``length()`` (the batch's) is asked for a resent batch only."""
        taken = self.session.taken
        if not first:
            return taken + 1, 0
        skip = taken - first + 1
        if skip <= 0:
            return first, 0
        if skip >= length():
            log.debug("%s: a resent batch, every record taken before", self.name)
            return None
        log.debug("%s: a resent batch, its first %d records taken before", self.name, skip)
        return first, skip

    async def _take(self, raw: msgspec.Raw, first: int) -> None:
        """Take a batch whose first record is number ``first`` of the client's session (0:
        unnumbered, so it follows what was taken). Records numbered at or below what the
        session has taken were taken before this resend: they are dropped."""
        numbered = self._numbered(first, lambda: batch_length(raw))
        if numbered is None:
            return
        first, skip = numbered
        session = self.session
        connector = self.connector
        decoder = connector.batch_decoder
        errors: list[RecordError] = []
        refused = 0
        try:
            if decoder is None:
                raise msgspec.ValidationError("this connector accepts nothing")
            records = decoder.decode(raw)
            if skip:
                records = records[skip:]
        except (msgspec.DecodeError, UnicodeDecodeError):  # msgspec: bad UTF-8 is the latter
            records, errors, refused = await self._take_one_by_one(raw, first, skip)
        counters = self.counters
        counters.records_in += len(records)
        session.taken = first - 1 + skip + len(records) + refused
        self.records_in += len(records)
        if records:
            info = self.info
            send = connector.routes.send
            routes = self.output_routes
            if routes.single is not None:
                await send(routes.single, records, info, raw=None if refused else raw)
            else:
                for route, group in routes.split(records).items():
                    await send(route, group, info)
        if refused:
            counters.records_refused += refused
            log.warning("%s: refused %d record(s); first: %s", self.name, refused, errors[0])
            await self.outbox.put_message(Refused(errors, refused - len(errors)))
        if session.taken - self._acked >= ACK_EVERY:
            self._acked = session.taken
            await self.outbox.put_message(Ack(session.taken))

    async def _take_columns(self, event: Columns) -> None:
        """A column batch, checked against its declared type, goes to its route whole (a
        batch processor takes it as it is; an ordinary one makes records of it). Bad rows are
        refused as bad records are, and the others are taken, as records. Rows are numbered
        in the session as records are (a resent batch is taken once)."""
        rows = event.rows
        numbered = self._numbered(event.first, lambda: rows)
        if numbered is None:
            return
        first, skip = numbered
        connector = self.connector
        errors: list[RecordError] = []
        refused = 0
        items: ColumnBatch | list[Any] = []
        try:
            batch, bad = ColumnBatch.decode(event, connector.config.codec.types, connector.accepted)
        except FieldMismatch as exc:  # no row can be taken: the first describes them all
            refused = rows - skip
            if refused:
                errors.append(RecordError(first - 1 + skip, exc.type, exc.field, exc.problem))
        else:
            items = batch
            bad = [entry for entry in bad if entry[0] >= skip]
            if skip and not bad:
                items = batch.slice(skip, rows)
            elif bad:
                refused = len(bad)
                name = batch.type_name
                errors = [
                    RecordError(first - 1 + row, name, field or None, problem)
                    for row, field, problem in bad[:REFUSALS_DESCRIBED]
                ]
                items = batch.records(skip=[*range(skip), *(row for row, _, _ in bad)])
        session = self.session
        counters = self.counters
        taken = rows - skip - refused
        counters.records_in += taken
        session.taken = first - 1 + rows
        self.records_in += taken
        if taken:
            route = self.output_routes.single or self.output_routes.by_type[batch.record_type]
            await connector.routes.send(route, items, self.info)
        if refused:
            counters.records_refused += refused
            log.warning("%s: refused %d row(s); first: %s", self.name, refused, errors[0])
            await self.outbox.put_message(Refused(errors, refused - len(errors)))
        if session.taken - self._acked >= ACK_EVERY:
            self._acked = session.taken
            await self.outbox.put_message(Ack(session.taken))

    async def _take_one_by_one(
        self, raw: msgspec.Raw, first: int, skip: int
    ) -> tuple[list[Any], list[RecordError], int]:
        """The slow path, for a batch with a bad record: keep the good ones, describe the
        first bad ones, count the rest. Other connections run between every few records.
        The first ``skip`` were taken before; an error names a record by its position in the
        session (from 0)."""
        connector = self.connector
        items = _raw_items.decode(raw)  # the protocol checked it is an array
        records: list[Any] = []
        errors: list[RecordError] = []
        refused = 0
        decoder = connector.item_decoder
        codec = connector.config.codec
        for i, item in enumerate(items):
            if i < skip:
                continue
            if i % YIELD_EVERY == YIELD_EVERY - 1:
                await trio.lowlevel.checkpoint()
            try:
                if decoder is None:
                    raise msgspec.ValidationError("nothing accepted")
                records.append(decoder.decode(item))
            except (msgspec.DecodeError, UnicodeDecodeError):
                refused += 1
                if len(errors) < REFUSALS_DESCRIBED:
                    type_name, field, problem = codec.explain(item, connector.accepted)
                    errors.append(RecordError(first - 1 + i, type_name, field, problem))
        return records, errors, refused
