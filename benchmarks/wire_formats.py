"""The wire format of column batches, chosen by measurement: the bench's DataFrame (1,000,000
rows of int, str, float) in batches of 65,536 rows, encoded from the DataFrame and decoded to
a DataFrame again, in three formats:

- ``Columns`` (what the protocol sends): numbers as little-endian buffers, strings as Arrow
  offsets + UTF-8, checked against the declared type on receipt (``ColumnBatch.decode``);
- Arrow IPC: a record batch stream per batch (``pa.ipc``), what Flight sends;
- msgpack arrays of values, one per column (``Column`` kind "values" for every field).

    python benchmarks/wire_formats.py [--rows N] [--runs 5]

prints the median ms of each step per format, for strings as Python objects and as pandas'
default string dtype. Needs pandas, numpy and pyarrow (the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import msgspec
import pyarrow as pa
from bench import _frames

import mzconnector

BATCH = 65_536
TYPES = mzconnector.build_record_types({"Rec": {"i": "int", "s": "str", "f": "float"}})
REC = TYPES["Rec"]


def columns_encode(df: Any) -> list[bytearray]:
    prepared = mzconnector.frame_columns(df, REC)
    return [prepared.frame(start, stop) for start, stop in prepared.plan(1 << 24, 1 << 30)]


def columns_decode(frames: list[bytearray]) -> list[Any]:
    out = []
    for frame in frames:
        message = mzconnector._message_decoder.decode(memoryview(frame)[4:])
        batch, bad = mzconnector.ColumnBatch.decode(message, TYPES, ["Rec"])
        assert not bad
        out.append(batch.dataframe())
    return out


def ipc_encode(df: Any) -> list[bytes]:
    out = []
    for start in range(0, len(df), BATCH):
        table = pa.Table.from_pandas(df.iloc[start : start + BATCH], preserve_index=False)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        out.append(sink.getvalue().to_pybytes())
    return out


def ipc_decode(payloads: list[bytes]) -> list[Any]:
    return [pa.ipc.open_stream(p).read_all().to_pandas() for p in payloads]


def values_encode(df: Any) -> list[bytes]:
    encoder = msgspec.msgpack.Encoder()
    out = []
    for start in range(0, len(df), BATCH):
        part = df.iloc[start : start + BATCH]
        out.append(encoder.encode([part[c].tolist() for c in ("i", "s", "f")]))
    return out


def values_decode(payloads: list[bytes]) -> list[Any]:
    import pandas as pd

    decoder = msgspec.msgpack.Decoder(tuple[list[int], list[str], list[float]])
    return [pd.DataFrame(dict(zip(("i", "s", "f"), decoder.decode(p)))) for p in payloads]


FORMATS: dict[str, tuple[Callable[[Any], list[Any]], Callable[[list[Any]], list[Any]]]] = {
    "Columns": (columns_encode, columns_decode),
    "Arrow IPC": (ipc_encode, ipc_decode),
    "msgpack values": (values_encode, values_decode),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    frames = _frames(args.rows)
    times: dict[tuple[str, str, str], list[float]] = {}
    sizes: dict[str, int] = {}
    for _ in range(args.runs):  # formats in turn in each run, so that all see the same noise
        for kind, df in frames.items():
            for name, (encode, decode) in FORMATS.items():
                t0 = time.perf_counter()
                payloads = encode(df)
                t1 = time.perf_counter()
                back = decode(payloads)
                t2 = time.perf_counter()
                assert sum(map(len, back)) == len(df)
                times.setdefault((kind, name, "encode"), []).append(t1 - t0)
                times.setdefault((kind, name, "decode"), []).append(t2 - t1)
                sizes[name] = sum(len(p) for p in payloads)
    print(f"{args.rows:,} rows, batches of {BATCH:,}; medians of {args.runs} runs")
    print(f"{'strings':8s} {'format':15s} {'encode ms':>10s} {'decode ms':>10s} {'MB':>6s}")
    for kind in frames:
        for name in FORMATS:
            encode = statistics.median(times[(kind, name, "encode")]) * 1e3
            decode = statistics.median(times[(kind, name, "decode")]) * 1e3
            print(f"{kind:8s} {name:15s} {encode:10.1f} {decode:10.1f} {sizes[name] / 1e6:6.1f}")


if __name__ == "__main__":
    main()
