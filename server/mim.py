"""MIM values: the server's built-in counters and the workflow's assigned values.

``Counters`` are plain integers bumped once per batch on the hot path; ``snapshot()`` turns them,
with the assigned values, into the name -> value dict clients read.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

import msgspec

#: The built-in MIM values, in the order clients see them; an assigned MIM takes another name.
BUILTIN_MIMS = (
    "Workflow Name",
    "Started",
    "Uptime",
    "Connected Clients",
    "Connections Accepted",
    "Connections Refused",
    "Records In",
    "Bytes In",
    "Records Out",
    "Bytes Out",
    "Records Refused",
    "Undeliverable Records",
    "Unacknowledged Records",
    "Processor Errors",
)


class Counters:
    """The built-in counters. Plain attributes: incremented per batch, read on demand."""

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "connections_accepted",
        "connections_open",
        "connections_refused",
        "processor_errors",
        "records_in",
        "records_out",
        "records_refused",
        "unacknowledged",
        "undeliverable",
    )

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)


class AssignedMims(MutableMapping[str, Any]):
    """The MIM values a workflow assigns (``ctx.mim["Last Balance"] = 10``), each checked
    against its declared type. Unset values read as None."""

    def __init__(self, declared: Mapping[str, Any], declared_text: Mapping[str, str]) -> None:
        self._types = dict(declared)
        self._text = dict(declared_text)
        self._values: dict[str, Any] = dict.fromkeys(declared)
        #: When each was last set (time.time()), so that totals over processes take the last.
        self.times: dict[str, float] = {}

    def __getitem__(self, name: str) -> Any:
        self._known(name)
        return self._values[name]

    def __setitem__(self, name: str, value: Any) -> None:
        self._known(name)
        if value is not None:
            try:
                value = msgspec.convert(value, self._types[name], strict=True)
            except msgspec.ValidationError:
                raise TypeError(
                    f"MIM {name!r} is declared {self._text[name]}; cannot assign "
                    f"{type(value).__name__} {value!r}"
                ) from None
        self._values[name] = value
        self.times[name] = time.time()

    def __delitem__(self, name: str) -> None:
        self[name] = None

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def _known(self, name: str) -> None:
        if name not in self._types:
            known = ", ".join(repr(n) for n in self._types) or "none"
            raise KeyError(f"no assigned MIM named {name!r} (declared in [mim]: {known})")


class MimTable:
    """Everything a client can read with ``conn.mim()``."""

    def __init__(self, workflow: str, assigned: AssignedMims) -> None:
        self.workflow = workflow
        self.counters = Counters()
        self.assigned = assigned
        self._started = time.monotonic()
        self.started_at = datetime.datetime.now(datetime.timezone.utc)

    def snapshot(self) -> dict[str, Any]:
        c = self.counters
        builtin = (
            self.workflow,
            self.started_at,
            round(time.monotonic() - self._started, 3),
            c.connections_open,
            c.connections_accepted,
            c.connections_refused,
            c.records_in,
            c.bytes_in,
            c.records_out,
            c.bytes_out,
            c.records_refused,
            c.undeliverable,
            c.unacknowledged,
            c.processor_errors,
        )
        values: dict[str, Any] = dict(zip(BUILTIN_MIMS, builtin, strict=True))
        values.update(self.assigned.items())
        return values
