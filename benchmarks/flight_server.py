"""The DataFrame peer: an Apache Arrow Flight server in its own process that counts the rows
clients put.

    python benchmarks/flight_server.py

prints ``flight: listening on HOST:PORT`` and serves until killed. ``do_put`` reads the record
batches of a stream and counts their rows; the action ``count`` answers with the number of
rows counted so far (8 bytes, little-endian). The client side (``FlightPeer``) is imported by
bench.py. pyarrow (with Flight, as its wheels have it) is in the ``bench`` extra; without it
the bench reports the comparison as not available.
"""

from __future__ import annotations

import sys
import time
from typing import Any


def available() -> str:
    """Why Flight cannot be measured here, or "" if it can."""
    try:
        import pyarrow.flight  # noqa: F401
    except ImportError as exc:
        return f"pyarrow.flight is not installed ({exc}); pip install -e '.[bench]'"
    return ""


def serve() -> None:
    import pyarrow.flight as flight

    class Counter(flight.FlightServerBase):  # type: ignore[misc]
        rows = 0

        def do_put(self, context: Any, descriptor: Any, reader: Any, writer: Any) -> None:
            for chunk in reader:
                Counter.rows += chunk.data.num_rows

        def do_action(self, context: Any, action: Any) -> Any:
            if action.type != "count":
                raise flight.FlightServerError(f"unknown action {action.type!r}")
            return [Counter.rows.to_bytes(8, "little")]

    server = Counter("grpc://127.0.0.1:0")
    print(f"flight: listening on 127.0.0.1:{server.port}", flush=True)
    server.serve()


class FlightPeer:
    """A Flight client of ``serve``: ``put(df)`` sends a DataFrame as a do_put does (the
    conversion to an Arrow table included), ``count()`` asks for the rows counted."""

    def __init__(self, host: str, port: int) -> None:
        import pyarrow as pa
        import pyarrow.flight as flight

        self._pa = pa
        self._flight = flight
        self.client = flight.FlightClient(f"grpc://{host}:{port}")
        self.descriptor = flight.FlightDescriptor.for_path("frames")

    def put(self, df: Any) -> None:
        table = self._pa.Table.from_pandas(df, preserve_index=False)
        writer, _ = self.client.do_put(self.descriptor, table.schema)
        writer.write_table(table)
        writer.close()

    def count(self) -> int:
        (result,) = self.client.do_action(self._flight.Action("count", b""))
        return int.from_bytes(result.body.to_pybytes(), "little")

    def close(self) -> None:
        self.client.close()


if __name__ == "__main__":
    why = available()
    if why:
        print(f"flight: not available: {why}", flush=True)
        sys.exit(1)
    try:
        serve()
    except KeyboardInterrupt:
        time.sleep(0)
