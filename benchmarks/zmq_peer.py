"""The round trip's peer to beat: pyzmq REQ/REP carrying one msgpack record.

    python benchmarks/zmq_peer.py

prints ``zmq: rep listening on HOST:PORT`` and serves until killed: a REP socket that decodes
each request as a record (msgspec, validated against the same ``Rec`` type as the echo
workflow's), encodes it again and sends it back. ``ZmqPeer`` is the REQ side bench.py uses:
encode, send, receive, decode and validate, as the connector's client does for a record.

pyzmq is optional (the ``bench`` extra); without it the bench reports the peer as not available.
"""

from __future__ import annotations

import msgspec

HOST = "127.0.0.1"


class Rec(msgspec.Struct, tag="Rec", array_like=True):
    """The echo workflow's record type (benchmarks/workflows/echo.toml), encoded as the
    connector encodes records (tagged, as an array)."""

    i: int
    s: str
    f: float


def available() -> str:
    """Why the peer cannot run here ('' if it can)."""
    try:
        import zmq  # noqa: F401
    except ImportError:
        return "pyzmq is not installed (pip install -e '.[bench]')"
    return ""


def serve() -> None:
    import zmq

    context = zmq.Context()
    sock = context.socket(zmq.REP)
    port = sock.bind_to_random_port(f"tcp://{HOST}")
    print(f"zmq: rep listening on {HOST}:{port}", flush=True)
    decoder = msgspec.msgpack.Decoder(Rec)
    encoder = msgspec.msgpack.Encoder()
    while True:
        sock.send(encoder.encode(decoder.decode(sock.recv(copy=False).buffer)))


class ZmqPeer:
    """The REQ side: one record out, the same record back."""

    def __init__(self, host: str, port: int) -> None:
        import zmq

        self._context = zmq.Context()
        self._sock = self._context.socket(zmq.REQ)
        self._sock.connect(f"tcp://{host}:{port}")
        self._encode = msgspec.msgpack.Encoder().encode
        self._decode = msgspec.msgpack.Decoder(Rec).decode

    def round_trip(self, record: Rec) -> Rec:
        self._sock.send(self._encode(record))
        return self._decode(self._sock.recv(copy=False).buffer)

    def close(self) -> None:
        self._sock.close(linger=0)
        self._context.term()


if __name__ == "__main__":
    serve()
