"""Processors of frames.toml: an ordinary echo, a batch processor given lists, and one given
DataFrames. The batch processors send what they got back, then a ``Call`` describing the call;
a record (or row) with ``i == -1`` makes them raise, after sending nothing."""

from __future__ import annotations

from typing import Any


def echo(record: Any, ctx: Any) -> None:
    ctx.route("back", record)


def listed(records: list[Any], ctx: Any) -> None:
    if any(r.i == -1 for r in records):
        raise ValueError("a record with i == -1")
    ctx.route_many("back", records)
    call = ctx.udrs.Call(
        processor="items",
        kind=type(records).__name__,
        rows=len(records),
        first=records[0].i,
        frame_type="",
    )
    ctx.route("back", call)


def framed(df: Any, ctx: Any) -> None:
    if (df["i"] == -1).any():
        raise ValueError("a row with i == -1")
    ctx.route_frame("back", df)
    call = ctx.udrs.Call(
        processor="riches",
        kind=type(df).__name__,
        rows=len(df),
        first=int(df["i"].iloc[0]),
        frame_type=ctx.frame_type,
    )
    ctx.route("back", call)
