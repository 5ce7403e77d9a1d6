"""The processor of the built-in echo workflow."""

from __future__ import annotations

from typing import Any


def echo(record: Any, ctx: Any) -> None:
    """Send every record back to the connector; remember the last subscriber's balance."""
    if not isinstance(record, bytes):
        ctx.mim["Last Balance"] = record.balance
        ctx.mim["Last MSISDN"] = record.msisdn
    ctx.route("back", record)
