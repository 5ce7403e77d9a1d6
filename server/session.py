"""One client connection: handshake, admission, then a reader and a writer task.

The reader turns frames into protocol events and typed batches onto routes; the writer empties
the connection's bounded outbox onto the socket. Whatever goes wrong with one connection
closes that one only.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
from typing import TYPE_CHECKING, Any

import msgspec
import trio

from mzconnector import (
    NEED_DATA,
    PROTOCOL_VERSION,
    Ack,
    Bye,
    Closed,
    Error,
    Flush,
    GetMim,
    Hello,
    Message,
    Mim,
    Notice,
    Protocol,
    RecordError,
    Records,
    Refuse,
    Refused,
    RemoteProtocolError,
    Role,
)

from .connections import ConnectionEnded, ConnectionInfo, ConnectionRequest

if TYPE_CHECKING:
    from .connector import Connector

log = logging.getLogger("mzserver.connector")

#: Records taken between unsolicited acknowledgements (bounds what a client keeps for replay).
ACK_EVERY = 65536
RECEIVE_SIZE = 1 << 18
#: The writer joins queued frames into one write up to this size.
COALESCE_BYTES = 1 << 20
_raw_items = msgspec.msgpack.Decoder(list[msgspec.Raw])


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


def _nonblocking_twin(stream: trio.abc.Stream) -> socket.socket | None:
    """A duplicate of a plain TCP connection's socket, for sends that must not wait: trio has
    no public "send what fits now" call. None for TLS and other streams."""
    if not isinstance(stream, trio.SocketStream):
        return None
    trio_sock = stream.socket
    twin = socket.socket(
        trio_sock.family, trio_sock.type, trio_sock.proto, fileno=os.dup(trio_sock.fileno())
    )
    twin.setblocking(False)
    return twin


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
    """One client connection: handshake, then a reader and a writer task."""

    def __init__(self, connector: Connector, stream: trio.abc.Stream, conn_id: int) -> None:
        self.connector = connector
        self.stream = stream
        self.id = conn_id
        self.peer = _peer(stream)
        self.protocol = Protocol(Role.SERVER, max_frame_size=connector.settings.max_frame_size)
        self.counters = connector.mim.counters
        self.info: ConnectionInfo | None = None
        # Cancelled to stop taking records: one scope for the handshake, one for the reader.
        self.handshaking = trio.CancelScope()
        self.reading = trio.CancelScope()
        self.reader_done = trio.Event()
        self._guard = trio.CancelScope()
        self._outbox_send, self._outbox = trio.open_memory_channel[tuple[Any, int]](
            connector.settings.outbox_size
        )
        self._farewell: Message | None = None
        self.type_routes = connector.type_routes
        self.single_route = connector.single_route
        self._holds_slot = False
        self.decided = trio.Event()
        self.decision: tuple[bool, str] = (False, "")
        self.taken = 0
        self._acked = 0
        self.dropped = 0
        self._dropped_reported = 0
        # Items queued for the writer and not yet written; while any is, nothing may
        # overtake them on the direct path.
        self._unsent = 0
        self._direct = _nonblocking_twin(stream)

    def stop_reading(self) -> None:
        self.handshaking.cancel()
        self.reading.cancel()

    def abort(self) -> None:
        self.stop_reading()
        self._guard.cancel()

    async def run(self) -> None:
        connector = self.connector
        try:
            with self.handshaking:  # cancelled when the server stops
                opened = await self._open()
            if opened:
                await self._serve()
        finally:
            if self._holds_slot:
                connector.limiter.release_on_behalf_of(self)

    async def _open(self) -> bool:
        """Handshake, limits, connection control; True once the client is welcomed."""
        connector = self.connector
        hello = await self._handshake()
        if hello is None:
            return False
        refusal = self._admit(hello)
        if refusal is None:
            self.info = ConnectionInfo(
                id=self.id,
                peer=self.peer,
                name=hello.name,
                metadata=hello.metadata,
                tls_subject=_tls_subject(self.stream),
                connected_at=datetime.datetime.now(datetime.timezone.utc),
            )
            if connector.settings.connection_control:
                refusal = await self._ask_workflow()
        if refusal is not None:
            self.counters.connections_refused += 1
            log.info("connection %d from %s refused: %s", self.id, self.peer, refusal.reason)
            await self._send_now(refusal)
            return False
        return True

    async def _ask_workflow(self) -> Refuse | None:
        """Connection control: put the request on its route; wait for the decision."""
        settings = self.connector.settings
        assert self.info is not None
        self.connector._pending[self.id] = self
        try:
            with trio.move_on_after(settings.connection_request_timeout):
                await self.connector.routes.send(
                    settings.connection_request_route, [ConnectionRequest(self.info)], self.info
                )
                await self.decided.wait()
        finally:
            del self.connector._pending[self.id]
        if not self.decided.is_set():
            return Refuse(
                "rejected",
                f"the workflow made no decision within {settings.connection_request_timeout} s",
            )
        accept, reason = self.decision
        return None if accept else Refuse("rejected", reason or "rejected by the workflow")

    async def _serve(self) -> None:
        """The open connection: a writer task, and the reader in this one."""
        connector = self.connector
        counters = self.counters
        assert self.info is not None
        # Registered before the Welcome is queued, and nothing overtakes the Welcome: a client
        # never misses a broadcast made after it was told it is connected.
        connector.connections[self.id] = self
        counters.connections_accepted += 1
        counters.connections_open += 1
        log.info("connection %d from %s (%s) open", self.id, self.peer, self.info.name or "unnamed")
        reason = "the client closed the connection"
        try:
            await self._enqueue(connector.welcome(connection_id=self.id))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write_loop)
                try:
                    reason = await self._read_loop()
                    self.reader_done.set()
                    await self._tell_workflow_ended(reason)
                    if self.reading.cancelled_caught:
                        # The server is stopping: deliver what the workflow still makes.
                        self._farewell = Bye("the server is shutting down")
                        await connector.drained.wait()
                finally:
                    connector.connections.pop(self.id, None)  # no more records for it
                    self._outbox_send.close()
        finally:
            connector.connections.pop(self.id, None)
            counters.connections_open -= 1
            log.info("connection %d from %s closed: %s", self.id, self.peer, reason)

    async def _tell_workflow_ended(self, reason: str) -> None:
        settings = self.connector.settings
        if settings.connection_control and self.info is not None:
            await self.connector.routes.send(
                settings.connection_request_route, [ConnectionEnded(self.info, reason)], self.info
            )

    async def _handshake(self) -> Hello | None:
        """Read the client's Hello within the handshake timeout."""
        protocol = self.protocol
        with trio.move_on_after(self.connector.settings.handshake_timeout) as scope:
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
                log.warning("connection %d from %s: %s", self.id, self.peer, exc)
                await self._send_now(Error(str(exc)))
                return None
            except trio.BrokenResourceError as exc:
                if isinstance(self.stream, trio.SSLStream):
                    log.warning(
                        "connection %d from %s: TLS handshake failed: %s",
                        self.id,
                        self.peer,
                        exc.__cause__ or exc,
                    )
                    return None
                raise
        if scope.cancelled_caught and not self.handshaking.cancel_called:
            log.warning(
                "connection %d from %s: no hello within %s s; closing",
                self.id,
                self.peer,
                self.connector.settings.handshake_timeout,
            )
            await self._send_now(
                Error(f"no hello within {self.connector.settings.handshake_timeout} s")
            )
        return None

    def _admit(self, hello: Hello) -> Refuse | None:
        connector = self.connector
        if hello.protocol != PROTOCOL_VERSION:
            return Refuse(
                "protocol",
                f"this server speaks protocol {PROTOCOL_VERSION}; "
                f"the client speaks {hello.protocol}",
            )
        if connector.stop_requested.is_set():
            return Refuse("shutdown", "the server is shutting down")
        limit = connector.settings.max_nesting
        if _nested_deeper_than(hello.metadata, limit):
            return Refuse("protocol", f"the metadata is nested more than {limit} levels deep")
        try:
            connector.limiter.acquire_on_behalf_of_nowait(self)
            self._holds_slot = True
        except trio.WouldBlock:
            if connector.limit == 1 and not connector.settings.allow_multiple_connections:
                reason = "this connector allows one connection at a time, and one is open"
            else:
                reason = f"the connection limit ({connector.limit}) is reached"
            return Refuse("limit", reason)
        return None

    async def _send_now(self, message: Message) -> None:
        """Send a message directly (before the writer runs, or instead of it), best effort."""
        try:
            data = self.protocol.send(message)
        except Exception:
            log.exception("connection %d from %s: cannot send %s", self.id, self.peer, message)
            return
        with trio.move_on_after(self.connector.settings.handshake_timeout):
            try:
                await self.stream.send_all(data)
                self.counters.bytes_out += len(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    # -- reading ------------------------------------------------------------------------------
    async def _read_loop(self) -> str:
        """Take records until the client leaves; returns why the reading ended."""
        protocol = self.protocol
        stream = self.stream
        counters = self.counters
        # A graceful stop cancels `reading`; once a chunk is read, `guard` is shielded so that
        # the chunk is taken whole (abort() cancels `guard` itself). One scope toggled per chunk
        # costs a fraction of a new scope per chunk.
        with self.reading, self._guard as guard:
            while True:
                data = await stream.receive_some(RECEIVE_SIZE)
                guard.shield = True
                counters.bytes_in += len(data)
                protocol.receive_data(data)
                try:
                    for event in protocol.events():
                        if await self._on_event(event):
                            return "the client closed the connection"
                except RemoteProtocolError as exc:
                    log.warning("connection %d from %s: %s; closing", self.id, self.peer, exc)
                    self._farewell = Error(str(exc))
                    return f"protocol error: {exc}"
                guard.shield = False
        return "the server is shutting down"

    async def _on_event(self, event: Any) -> bool:
        """Handle one event; True when the client is done."""
        if isinstance(event, Records):
            await self._take(event.items)
        elif isinstance(event, Flush):
            self._acked = self.taken
            await self._enqueue(Ack(self.taken))
        elif isinstance(event, GetMim):
            await self._enqueue(Mim(self.connector.mim.snapshot()))
        elif isinstance(event, (Bye, Closed)):
            return True
        return False

    async def _take(self, raw: msgspec.Raw) -> None:
        connector = self.connector
        decoder = connector.batch_decoder
        errors: list[RecordError] = []
        try:
            if decoder is None:
                raise msgspec.ValidationError("this connector accepts nothing")
            records = decoder.decode(raw)
        except (msgspec.DecodeError, UnicodeDecodeError):  # msgspec: bad UTF-8 is the latter
            records, errors = self._take_one_by_one(raw)
        counters = self.counters
        counters.records_in += len(records)
        self.taken += len(records) + len(errors)
        if records:
            info = self.info
            send = connector.routes.send
            route = self.single_route
            if route is not None:
                await send(route, records, info)
            else:
                groups: dict[str, list[Any]] = {}
                type_routes = self.type_routes
                for record in records:
                    route = type_routes[type(record)]
                    group = groups.get(route)
                    if group is None:
                        groups[route] = [record]
                    else:
                        group.append(record)
                for route, group in groups.items():
                    await send(route, group, info)
        if errors:
            counters.records_refused += len(errors)
            log.warning(
                "connection %d from %s: refused %d record(s); first: %s",
                self.id,
                self.peer,
                len(errors),
                errors[0],
            )
            await self._enqueue(Refused(errors))
        if self.taken - self._acked >= ACK_EVERY:
            self._acked = self.taken
            await self._enqueue(Ack(self.taken))

    def _take_one_by_one(self, raw: msgspec.Raw) -> tuple[list[Any], list[RecordError]]:
        """The slow path, for a batch with a bad record: keep the good ones, explain the bad."""
        connector = self.connector
        try:
            items = _raw_items.decode(raw)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise RemoteProtocolError(f"malformed batch of records: {exc}") from None
        records: list[Any] = []
        errors: list[RecordError] = []
        decoder = connector.item_decoder
        for i, item in enumerate(items):
            try:
                if decoder is None:
                    raise msgspec.ValidationError("nothing accepted")
                records.append(decoder.decode(item))
            except (msgspec.DecodeError, UnicodeDecodeError):
                type_name, field, problem = connector.config.codec.explain(item, connector.accepted)
                errors.append(RecordError(self.taken + i, type_name, field, problem))
        return records, errors

    # -- writing ------------------------------------------------------------------------------
    async def enqueue_records(self, frames: list[bytearray], count: int) -> None:
        """Queue records for this client; if it does not read for ``delivery_timeout``
        seconds, they are counted undeliverable and the client is told."""
        if self._direct is not None and not self._unsent:
            # The writer is idle: try to send at once, without a task switch. What the
            # socket does not take now, the writer sends.
            data = frames[0] if len(frames) == 1 else b"".join(frames)
            try:
                sent = self._direct.send(data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self._undeliverable(count, f"the client is gone ({exc})")
                return
            self.counters.bytes_out += sent
            if sent == len(data):
                self.counters.records_out += count
                return
            frames = [memoryview(data)[sent:]]  # type: ignore[list-item]
        item = (frames, count)
        self._unsent += 1
        try:
            self._outbox_send.send_nowait(item)
            return
        except trio.WouldBlock:
            pass
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            self._unsent -= 1
            self._undeliverable(count, "the connection is closing")
            return
        timeout = self.connector.settings.delivery_timeout
        with trio.move_on_after(timeout):
            try:
                await self._outbox_send.send(item)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                self._unsent -= 1
                self._undeliverable(count, "the connection is closing")
            return
        self._unsent -= 1
        self._undeliverable(count, f"the client read nothing for {timeout} s")

    async def _enqueue(self, message: Message) -> None:
        """Queue a control message for the writer (waits while the outbox is full)."""
        self._unsent += 1
        try:
            await self._outbox_send.send((message, 0))
        except BaseException:
            self._unsent -= 1
            raise

    def close_twin(self) -> None:
        if self._direct is not None:
            self._direct.close()

    def _undeliverable(self, count: int, why: str) -> None:
        self.counters.undeliverable += count
        self.dropped += count
        log.warning(
            "connection %d from %s: %d record(s) undeliverable: %s", self.id, self.peer, count, why
        )

    async def _write_loop(self) -> None:
        outbox = self._outbox
        protocol = self.protocol
        counters = self.counters
        records = 0  # records in the write under way
        try:
            async for payload, count in outbox:
                parts: list[Any] = []
                size = records = 0
                taken = 1
                while True:
                    if count:
                        parts.extend(payload)
                        size += sum(map(len, payload))
                        records += count
                    else:
                        data = protocol.send(payload)
                        parts.append(data)
                        size += len(data)
                    if size >= COALESCE_BYTES:
                        break
                    try:
                        payload, count = outbox.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                    taken += 1
                await self.stream.send_all(parts[0] if len(parts) == 1 else b"".join(parts))
                counters.records_out += records
                records = 0
                counters.bytes_out += size
                if self.dropped > self._dropped_reported:
                    lost = self.dropped - self._dropped_reported
                    self._dropped_reported = self.dropped
                    await self.stream.send_all(
                        protocol.send(
                            Notice(f"{lost} record(s) for this client were undeliverable", lost)
                        )
                    )
                self._unsent -= taken
            if self._farewell is not None:
                self._unsent += 1  # nothing may overtake the farewell
                await self.stream.send_all(protocol.send(self._farewell))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            lost = records
            while True:
                try:
                    _, count = outbox.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                lost += count
            if lost:
                self._undeliverable(lost, f"the client is gone ({exc})")
            outbox.close()
