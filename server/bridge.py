"""An asyncio event loop in a thread of its own, for a library that speaks only asyncio
(nats-py), used from the server's trio loop.

Why a thread and not trio-asyncio: the NATS client keeps its own reader, pinger and flusher
tasks running all the time; in a loop of their own they never compete with the connector's
hot paths for the trio scheduler, and nothing of asyncio leaks into trio code. A call crosses
once each way: ``run`` hands a coroutine to the loop (``run_coroutine_threadsafe``) and the
loop's done-callback wakes the waiting trio task through its trio token. What crosses is
batches, never single records, so the cost (measured in benchmarks/nats_engine.py) is paid
once per batch.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

T = TypeVar("T")


class BridgeClosed(RuntimeError):
    """The asyncio loop is gone (the server is stopping)."""


class AsyncioBridge:
    """``async with AsyncioBridge() as bridge: await bridge.run(coroutine_function, ...)``."""

    def __init__(self, name: str = "mzserver-asyncio") -> None:
        self._name = name
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    async def __aenter__(self) -> AsyncioBridge:
        started = threading.Event()

        def main() -> None:
            loop = asyncio.new_event_loop()
            self.loop = loop
            started.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(_cancel_all())
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=main, name=self._name, daemon=True)
        self._thread.start()
        await trio.to_thread.run_sync(started.wait)
        return self

    async def __aexit__(self, *exc: object) -> None:
        loop, thread = self.loop, self._thread
        self.loop = None
        if loop is not None and thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(thread.join)

    def _submit(
        self, function: Callable[..., Awaitable[T]], *args: Any
    ) -> concurrent.futures.Future[T]:
        loop = self.loop
        if loop is None:
            raise BridgeClosed("the NATS connection is closed")
        return asyncio.run_coroutine_threadsafe(_call(function, *args), loop)

    async def run(self, function: Callable[..., Awaitable[T]], *args: Any) -> T:
        """``await function(*args)`` on the asyncio loop; its result or its exception here.
        Cancelling the trio task cancels the asyncio task."""
        future = self._submit(function, *args)
        done = trio.Event()
        token = trio.lowlevel.current_trio_token()

        def wake(_: object) -> None:
            try:
                token.run_sync_soon(done.set)
            except trio.RunFinishedError:
                pass

        future.add_done_callback(wake)
        try:
            await done.wait()
        except BaseException:
            future.cancel()
            raise
        return future.result()

    def run_blocking(self, function: Callable[..., Awaitable[T]], *args: Any, timeout: float) -> T:
        """The same from synchronous code (a sync processor's ``ctx.kv``): blocks the calling
        thread, the trio loop included, until the result comes (at most ``timeout`` s)."""
        future = self._submit(function, *args)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"no answer from NATS within {timeout} s") from None


async def _cancel_all() -> None:
    """What is left on the loop when it stops (the NATS client's tasks), cancelled."""
    pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


async def _call(function: Callable[..., Awaitable[T]], *args: Any) -> T:
    return await function(*args)
