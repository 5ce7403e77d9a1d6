"""The processors of conversations.toml.

``classify`` keeps each sensor's recent readings and sends a reading above the threshold in
the key-value map ``settings`` (50.0 until a client sets one) on ``alerts``. ``history``
answers the query of that name: it streams a sensor's recent readings, newest first.
"""

from __future__ import annotations

import collections
from typing import Any

import trio.lowlevel

RECENT: dict[str, collections.deque[float]] = collections.defaultdict(
    lambda: collections.deque(maxlen=100)
)


def classify(reading: Any, ctx: Any) -> None:
    RECENT[reading.sensor].append(reading.value)
    if reading.value > ctx.kv("settings").get("threshold", 50.0):
        ctx.route("alerts", reading)


async def history(request: Any, ctx: Any) -> None:
    values = RECENT.get(request.sensor)
    if not values:
        ctx.error("unknown-sensor", "no readings from sensor {0} yet", [request.sensor])
        return
    newest_first = list(values)[::-1][: request.limit]
    for seq, value in enumerate(newest_first):
        if ctx.cancelled:
            return
        ctx.partial({"sensor": request.sensor, "seq": seq, "value": value})
        await trio.lowlevel.checkpoint()  # other work runs between replies: a history streams
    ctx.complete()
