"""Processor of rich.toml. What it does with an ``Event`` depends on ``note``:

- ``"raise"``: raises (the workflow must go on; MIM 'Processor Errors' counts it);
- ``"dict"``: sends a plain dict back instead of the record;
- ``"object"``: sends an object of a class defined in this file (``Reading``) back;
- ``"unpicklable"``: sends something that cannot be pickled (counted as undeliverable);
- anything else: sends the record back unchanged.

Bytes are sent back unchanged.
"""

from __future__ import annotations

from typing import Any


class Reading:
    """A plain Python class that clients do not have: it arrives pickled by value."""

    def __init__(self, event_id: int, values: list[int]) -> None:
        self.event_id = event_id
        self.values = values

    def total(self) -> int:
        return sum(self.values)

    def __repr__(self) -> str:
        return f"Reading({self.event_id}, {self.values})"


def process(record: Any, ctx: Any) -> None:
    if isinstance(record, bytes):
        ctx.route("back", record)
        return
    ctx.mim["Last Id"] = record.id
    if record.note == "raise":
        raise ValueError(f"event {record.id} asked to fail")
    if record.note == "dict":
        ctx.route("back", {"id": record.id, "tags": record.tags, "at": record.at})
    elif record.note == "object":
        ctx.route("back", Reading(record.id, sorted(record.counts.values())))
    elif record.note == "unpicklable":
        ctx.route("back", (i for i in range(3)))
    else:
        ctx.route("back", record)
