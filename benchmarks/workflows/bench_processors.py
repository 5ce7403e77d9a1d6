"""Processors of the benchmark workflows (count.toml, echo.toml, conversations.toml).

They do the least a processor can do, so that the benchmark measures the connector around them.
"""

from __future__ import annotations

from typing import Any

#: Records and payload bytes counted since the server started (never reset: the client asks
#: before and after a run and takes the difference).
records = 0
payload_bytes = 0


def count(record: Any, ctx: Any) -> None:
    """Count a record (or a bytes payload). A ``Rec`` with a negative ``i`` is a query: the
    answer, ``Rec(i=<records>, s="count", f=<payload bytes>)``, goes back to the asking client
    after every record it sent before the query has been counted."""
    global records, payload_bytes
    if type(record) is bytes:
        records += 1
        payload_bytes += len(record)
    elif record.i >= 0:
        records += 1
    else:
        answer = type(record)(i=records, s="count", f=float(payload_bytes))
        ctx.route("back", answer, connection=ctx.connection)


def echo(record: Any, ctx: Any) -> None:
    """Send the record back to the client it came from."""
    ctx.route("back", record, connection=ctx.connection)


def answer(request: Any, ctx: Any) -> None:
    """Answer a query with its own request."""
    ctx.complete(request)


def counted(request: Any, ctx: Any) -> None:
    """Answer a query with how many records were counted so far."""
    ctx.complete(type(request)(i=records, s="count", f=float(payload_bytes)))
