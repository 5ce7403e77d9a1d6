"""One client's outbox: what the server has to send it, bounded, and the task that writes it.

Every frame passes the connection's protocol when it is queued, so the order of the queue is
the order of the protocol's table (nothing overtakes the Welcome, nothing follows the
farewell). Records wait for a client whose outbox is full only while its writer makes
progress: once a write has been stuck for ``delivery_timeout`` seconds (the client reads
nothing), records for it are counted undeliverable at once, until it reads again. Waiting for
one client never holds up delivery to the others (see ``Connector.deliver``).
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any, NamedTuple

import trio

from mzconnector import LocalProtocolError, Message, Notice, Protocol

from .mim import Counters

log = logging.getLogger("mzserver.connector")

#: The writer joins queued frames into one write up to this size.
COALESCE_BYTES = 1 << 20


class Waiting(NamedTuple):
    """Records that wait for room in a full outbox."""

    frames: list[bytearray]
    count: int


class Outbox:
    """The frames queued for one client (at most ``size`` items) and their writer."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        protocol: Protocol,
        counters: Counters,
        *,
        size: int,
        delivery_timeout: float,
        name: str,
    ) -> None:
        self._stream = stream
        self._protocol = protocol
        self._counters = counters
        self._timeout = delivery_timeout
        self._name = name  # "connection 3 from 127.0.0.1:5555", for the log
        self._size = size
        self._send, self._receive = trio.open_memory_channel[tuple[Any, int]](size)
        # Items queued and not yet written: while any is, nothing may take the direct path.
        self._unsent = 0
        self._direct = _nonblocking_twin(stream)
        self._write_started: float | None = None  # when the write under way began
        self._farewell: Message | None = None
        self.dropped = 0
        self._dropped_reported = 0
        self.records_out = 0  # records written to this client

    # -- queueing ---------------------------------------------------------------------------
    async def put_message(self, message: Message) -> None:
        """Queue a control message (waits while the outbox is full: the reader that answers
        this client's requests is held back by this client alone)."""
        item = (self._protocol.send(message), 0)
        self._unsent += 1
        try:
            await self._send.send(item)
        except BaseException:
            self._unsent -= 1
            raise

    def put_message_nowait(self, message: Message) -> bool:
        """Queue a control message if the outbox has room now; False (nothing queued) if not."""
        if self._send.statistics().current_buffer_used >= self._size:
            return False
        self.put_bytes_nowait(self._protocol.send(message))
        return True

    def put_bytes_nowait(self, data: bytearray) -> None:
        """Queue a control frame the protocol has already passed (the Welcome, into the
        empty outbox of a new connection)."""
        self._unsent += 1
        self._send.send_nowait((data, 0))

    def put_records_nowait(
        self, frames: list[bytearray], count: int, *, columns: bool = False
    ) -> Waiting | None:
        """Queue records (``Records`` frames; ``Columns`` frames with ``columns``) without
        waiting. Returns None when they are dealt with (queued, sent, or counted
        undeliverable), or, if the outbox is full and the client may still read in time, what
        to pass to ``put_records_when_room``."""
        try:
            if columns:
                frames = self._protocol.send_columns(frames)
            else:
                frames = self._protocol.send_records(frames)
        except LocalProtocolError:
            self._undeliverable(count, "the connection is closing")
            return None
        if self._direct is not None and not self._unsent:
            # The writer is idle: send at once, without a task switch. What the socket does
            # not take now, the writer sends.
            data = frames[0] if len(frames) == 1 else b"".join(frames)
            try:
                sent = self._direct.send(data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self._undeliverable(count, f"the client is gone ({exc})")
                return None
            self._counters.bytes_out += sent
            if sent == len(data):
                self._counters.records_out += count
                self.records_out += count
                return None
            frames = [memoryview(data)[sent:]]  # type: ignore[list-item]
        self._unsent += 1  # from here on nothing may overtake these records
        try:
            self._send.send_nowait((frames, count))
            return None
        except trio.WouldBlock:
            if self.stalled_for() < self._timeout:
                return Waiting(frames, count)
            why = f"the client read nothing for {self._timeout} s"
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            why = "the connection is closing"
        self._unsent -= 1
        self._undeliverable(count, why)
        return None

    async def put_records_when_room(self, waiting: Waiting) -> None:
        """Queue what ``put_records_nowait`` could not: once the client reads, or counted
        undeliverable when its write has been stuck for ``delivery_timeout`` seconds."""
        why = f"the client read nothing for {self._timeout} s"
        with trio.move_on_after(self._timeout - self.stalled_for()):
            try:
                await self._send.send((waiting.frames, waiting.count))
                return
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                why = "the connection is closing"
        self._unsent -= 1
        self._undeliverable(waiting.count, why)

    async def put_records(self, frames: list[bytearray], count: int) -> None:
        """Queue records, waiting for room as long as the client may still read in time."""
        waiting = self.put_records_nowait(frames, count)
        if waiting is not None:
            await self.put_records_when_room(waiting)

    def stalled_for(self) -> float:
        """How long the write under way has waited for the client (0 when none is)."""
        started = self._write_started
        return 0.0 if started is None else trio.current_time() - started

    def close(self, farewell: Message | None = None) -> None:
        """Queue nothing more; the writer sends what is queued, then ``farewell``."""
        self._farewell = farewell
        self._send.close()

    def _undeliverable(self, count: int, why: str) -> None:
        self._counters.undeliverable += count
        self.dropped += count
        log.warning("%s: %d record(s) undeliverable: %s", self._name, count, why)

    # -- writing ----------------------------------------------------------------------------
    async def run(self) -> None:
        """Write what is queued until ``close``; then the farewell."""
        outbox = self._receive
        records = 0  # records in the write under way
        try:
            async for payload, count in outbox:
                parts, size, records, taken = self._coalesce(payload, count)
                await self._write(parts[0] if len(parts) == 1 else b"".join(parts))
                self._counters.records_out += records
                self.records_out += records
                records = 0
                self._counters.bytes_out += size
                if self.dropped > self._dropped_reported and self._protocol.may_send(Notice):
                    lost = self.dropped - self._dropped_reported
                    self._dropped_reported = self.dropped
                    message = Notice(f"{lost} record(s) for this client were undeliverable", lost)
                    await self._write(self._protocol.send(message))
                self._unsent -= taken
            farewell = self._farewell
            if farewell is not None and self._protocol.may_send(type(farewell)):
                self._unsent += 1  # nothing may overtake the farewell
                await self._write(self._protocol.send(farewell))
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
        finally:
            if self._direct is not None:
                self._direct.close()

    def _coalesce(self, payload: Any, count: int) -> tuple[list[Any], int, int, int]:
        """The first item and what else is queued, up to ``COALESCE_BYTES``: (parts, bytes,
        records, items taken)."""
        parts: list[Any] = []
        size = records = 0
        taken = 1
        while True:
            if count:
                parts.extend(payload)
                size += sum(map(len, payload))
                records += count
            else:
                parts.append(payload)
                size += len(payload)
            if size >= COALESCE_BYTES:
                break
            try:
                payload, count = self._receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            taken += 1
        return parts, size, records, taken

    async def _write(self, data: bytes | bytearray) -> None:
        self._write_started = trio.current_time()
        try:
            await self._stream.send_all(data)
        finally:
            self._write_started = None


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
