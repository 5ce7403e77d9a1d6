"""A CPU-heavy processor for the NATS engine benchmark: a fixed amount of pure Python per record
(about 20 µs on the machines this was written on; the benchmark measures and prints it), and
nothing more: the benchmark watches the route's consumer in JetStream to see it all done."""

from __future__ import annotations

from typing import Any

#: Loop rounds per record; `work()` is timed by the benchmark so that the figure is measured.
ROUNDS = 300


def work(seed: int) -> int:
    value = seed
    for i in range(ROUNDS):
        value = (value * 31 + i) & 0xFFFF
    return value


def heavy(record: Any, ctx: Any) -> None:
    work(record.i)
