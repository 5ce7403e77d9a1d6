"""The async client: the surface it shares with the blocking client, under asyncio (with and
without anyio) and trio, against a real server (``python -m mzserver``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import anyio
import pytest

import mzconnector

BACKENDS = ["asyncio", "trio", "asyncio-without-anyio"]


def run_async(backend: str, main: Callable[[], Any], monkeypatch: pytest.MonkeyPatch) -> Any:
    """Run ``main()`` on the backend; a test that would hang fails after a minute instead."""
    if backend == "asyncio-without-anyio":
        monkeypatch.setattr(mzconnector, "_import_anyio", lambda: None)
        return asyncio.run(asyncio.wait_for(main(), 60))

    async def bounded() -> Any:
        with anyio.fail_after(60):
            return await main()

    return anyio.run(bounded, backend=backend)


async def within(backend: str, seconds: float, awaitable: Any) -> Any:
    """``await awaitable``, failing the test if it takes more than ``seconds``."""
    if backend == "asyncio-without-anyio":
        return await asyncio.wait_for(awaitable, seconds)
    with anyio.fail_after(seconds):
        return await awaitable
