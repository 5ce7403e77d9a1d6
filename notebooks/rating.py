"""The processor of exploration.toml: rate each call and keep running totals."""

from __future__ import annotations

from typing import Any

import msgspec

#: Price per started minute, by plan, and a fee for every call.
PRICE_PER_MINUTE = {"basic": 0.10, "plus": 0.05, "unlimited": 0.0}
CALL_FEE = 0.02


def rate(call: Any, ctx: Any) -> None:
    """Fill in the call's cost, count it in the MIM values, and send it back."""
    cost = round(CALL_FEE + PRICE_PER_MINUTE[call.plan] * call.minutes, 4)
    ctx.mim["Calls Rated"] = (ctx.mim["Calls Rated"] or 0) + 1
    ctx.mim["Minutes Rated"] = round((ctx.mim["Minutes Rated"] or 0.0) + call.minutes, 2)
    ctx.mim["Revenue"] = round((ctx.mim["Revenue"] or 0.0) + cost, 4)
    ctx.route("rated", msgspec.structs.replace(call, cost=cost))
