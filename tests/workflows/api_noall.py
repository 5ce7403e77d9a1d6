"""An API module without ``__all__``: every public name it defines is exposed."""

from __future__ import annotations

import math
from math import floor

GREETING = "hello from the API"
#: An alias of an imported function is the module's own name: exported, on both sides.
round_down = floor


def triple(x: float) -> float:
    return 3 * x


def hypotenuse(a: float, b: float) -> float:
    return math.hypot(a, b)


class Counter:
    def __init__(self) -> None:
        self.n = 0

    def bump(self) -> int:
        self.n += 1
        return self.n


def echo_bytes(data: bytes, timeout: float = 5.0) -> object:
    """Submit raw bytes and return the next thing the workflow sends back."""
    submit(data)  # noqa: F821 - provided by the connector
    flush()  # noqa: F821
    return receive(timeout=timeout)  # noqa: F821


def _private() -> None:
    pass
