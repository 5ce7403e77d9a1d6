"""Processor of slow.toml: an async echo that takes 50 ms per record (simulated work)."""

from __future__ import annotations

from typing import Any

import trio


async def slow_echo(record: Any, ctx: Any) -> None:
    await trio.sleep(0.05)
    ctx.route("back", record)
