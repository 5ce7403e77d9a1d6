"""The baseline server: a minimal trio server that only moves length-prefixed frames.

    python benchmarks/baseline_server.py {echo|sink} [--port 0] [--tls CERTFILE KEYFILE]

prints one line, ``baseline: <mode> listening on HOST:PORT``, and serves until killed.

A frame is a 4-byte big-endian length and that many bytes, the framing mzconnector uses. The
server splits what it reads into frames and never decodes a body, so it is what any Python
frame server on trio costs at the least: the bench compares the connector with it.

``echo``  every complete frame goes back as it came (the complete frames of one read in one
          ``send_all``, as a connector writer joins queued frames).
``sink``  frames are split and counted; an empty frame is a query: the server answers with one
          16-byte frame, the number of non-empty frames and of body bytes since the last query.
"""

from __future__ import annotations

import argparse
import ssl
import struct
import sys

import trio

RECEIVE_SIZE = 1 << 18  # as server/connector.py reads
_HEADER = struct.Struct(">I")
_ANSWER = struct.Struct(">IQQ")


def _frame_sizes(buf: bytearray) -> list[int]:
    """The body sizes of the complete frames at the start of ``buf``."""
    sizes: list[int] = []
    pos, end = 0, len(buf)
    while end - pos >= 4:
        (size,) = _HEADER.unpack_from(buf, pos)
        if pos + 4 + size > end:
            break
        sizes.append(size)
        pos += 4 + size
    return sizes


async def echo(stream: trio.abc.Stream) -> None:
    buf = bytearray()
    while data := await stream.receive_some(RECEIVE_SIZE):
        buf += data
        used = sum(4 + size for size in _frame_sizes(buf))
        if used:
            out = bytes(buf[:used])
            del buf[:used]
            await stream.send_all(out)


async def sink(stream: trio.abc.Stream) -> None:
    buf = bytearray()
    frames = nbytes = 0
    while data := await stream.receive_some(RECEIVE_SIZE):
        buf += data
        sizes = _frame_sizes(buf)
        for size in sizes:
            if size:
                frames += 1
                nbytes += size
            else:  # an empty frame asks for the counts
                await stream.send_all(_ANSWER.pack(16, frames, nbytes))
                frames = nbytes = 0
        del buf[: sum(4 + size for size in sizes)]


async def _serve_one(handler, stream: trio.abc.Stream) -> None:  # type: ignore[no-untyped-def]
    try:
        await handler(stream)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def main(mode: str, host: str, port: int, tls: list[str] | None) -> None:
    handler = echo if mode == "echo" else sink
    listeners: list[trio.abc.Listener[trio.abc.Stream]] = list(
        await trio.open_tcp_listeners(port, host=host)
    )
    bound = listeners[0].socket.getsockname()  # type: ignore[attr-defined]
    if tls:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(*tls)
        listeners = [trio.SSLListener(lst, context, https_compatible=False) for lst in listeners]
    print(f"baseline: {mode} listening on {bound[0]}:{bound[1]}", flush=True)

    async def handle(stream: trio.abc.Stream) -> None:
        await _serve_one(handler, stream)

    await trio.serve_listeners(handle, listeners)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["echo", "sink"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tls", nargs=2, metavar=("CERTFILE", "KEYFILE"))
    args = parser.parse_args()
    try:
        trio.run(main, args.mode, args.host, args.port, args.tls)
    except KeyboardInterrupt:
        sys.exit(130)
