"""Processors of example.toml: a sync one that passes records on, an async one that sets MIM
values from the record and the connection it came from, and sends it back."""

from __future__ import annotations

from typing import Any

import trio


def first(record: Any, ctx: Any) -> None:
    ctx.mim["Seen"] = (ctx.mim["Seen"] or 0) + 1
    ctx.route("r_2", record)


async def second(record: Any, ctx: Any) -> None:
    await trio.lowlevel.checkpoint()
    if not isinstance(record, bytes):
        ctx.mim["Last Balance"] = record.balance
    ctx.mim["Last Client"] = ctx.connection.name if ctx.connection is not None else "?"
    ctx.route("out", record)
