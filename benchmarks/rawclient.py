"""The baseline client: a plain blocking socket speaking length-prefixed frames to
``baseline_server.py``. It sends bytes prepared before the clock starts and splits what comes
back into frames without decoding them."""

from __future__ import annotations

import socket
import ssl
import struct

_HEADER = struct.Struct(">I")
_ANSWER = struct.Struct(">IQQ")
RECEIVE_SIZE = 1 << 18  # as mzconnector reads
QUERY = b"\x00\x00\x00\x00"  # an empty frame: "how many frames so far?" (sink mode)


def frame(body: bytes) -> bytes:
    return _HEADER.pack(len(body)) + body


class RawClient:
    def __init__(self, host: str, port: int, context: ssl.SSLContext | None = None) -> None:
        sock = socket.create_connection((host, port), timeout=30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if context is not None:
            sock = context.wrap_socket(sock, server_hostname=host)
        self.sock = sock
        self._buf = bytearray()

    def send(self, data: bytes | bytearray | memoryview) -> None:
        self.sock.sendall(data)

    def read_frame(self) -> bytes:
        """The next frame's body."""
        buf = self._buf
        while True:
            if len(buf) >= 4:
                (size,) = _HEADER.unpack_from(buf, 0)
                if len(buf) >= 4 + size:
                    body = bytes(buf[4 : 4 + size])
                    del buf[: 4 + size]
                    return body
            data = self.sock.recv(RECEIVE_SIZE)
            if not data:
                raise ConnectionError("the baseline server closed the connection")
            buf += data

    def round_trip(self, data: bytes) -> bytes:
        self.sock.sendall(data)
        return self.read_frame()

    def query(self) -> tuple[int, int]:
        """(frames, body bytes) the sink server counted since the last query; as a flush, it
        returns once the server has split everything sent before it."""
        self.sock.sendall(QUERY)
        frames, nbytes = _ANSWER.unpack(_HEADER.pack(16) + self.read_frame())[1:]
        return frames, nbytes

    def mz_handshake(self) -> None:
        """Open an mzconnector session on this socket (magic, Hello, then Welcome), so that
        prepared ``Records`` frames can be sent to a connector server with no client library
        around them: what the server alone costs."""
        import mzconnector

        protocol = mzconnector.Protocol(mzconnector.Role.CLIENT)
        hello = mzconnector.Hello(mzconnector.PROTOCOL_VERSION, name="raw")
        self.sock.sendall(protocol.send(hello))
        protocol.receive_data(self._frame_bytes(self.read_frame()))
        event = protocol.next_event()
        if not isinstance(event, mzconnector.Welcome):
            raise ConnectionError(f"the connector answered {event!r}")

    @staticmethod
    def _frame_bytes(body: bytes) -> bytes:
        return _HEADER.pack(len(body)) + body

    def count_frames(self, expected: int) -> int:
        """Read and split frames until ``expected`` frames have arrived (for a reader thread)."""
        buf = self._buf
        seen = 0
        unpack_from = _HEADER.unpack_from
        while seen < expected:
            data = self.sock.recv(RECEIVE_SIZE)
            if not data:
                raise ConnectionError("the baseline server closed the connection")
            buf += data
            pos, end = 0, len(buf)
            while end - pos >= 4:
                (size,) = unpack_from(buf, pos)
                if pos + 4 + size > end:
                    break
                pos += 4 + size
                seen += 1
            del buf[:pos]
        return seen

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
