"""Readiness: whether the server should be sent traffic now, and why not.

A server is *starting* until its workflow runs and its connector accepts connections, then
*ready*, and *stopping* from the moment a graceful stop is asked for. While ready, any
processor may declare the workflow unhealthy (``ctx.set_unhealthy(reason)``) until it takes
that back (``ctx.set_healthy()``), and the engine may be unable to take records (the NATS
engine while its connection to NATS is down); the server is ready only while neither holds.
The HTTP ``/readyz`` and the TCP probe port read this; both wait for changes, never poll.
"""

from __future__ import annotations

import enum

import trio


class Phase(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"


class Health:
    """The server's phase and the processors that declared the workflow unhealthy."""

    def __init__(self) -> None:
        self.phase = Phase.STARTING
        self._unhealthy: dict[str, str] = {}  # processor -> reason, in declaration order
        self._engine_down = ""  # why the engine cannot take records ("": it can)
        self._changed = trio.Event()

    @property
    def ready(self) -> bool:
        return self.phase is Phase.READY and not self._unhealthy and not self._engine_down

    def reasons(self) -> list[str]:
        """Why the server is not ready, in words (empty while it is)."""
        if self.phase is Phase.STARTING:
            return ["starting: the workflow and the connector are not running yet"]
        if self.phase is Phase.STOPPING:
            return ["stopping: a graceful stop is under way"]
        engine = [f"engine: {self._engine_down}"] if self._engine_down else []
        return engine + [
            f"processor {name!r} says: {reason}" for name, reason in self._unhealthy.items()
        ]

    def set_phase(self, phase: Phase) -> None:
        if phase is not self.phase:
            self.phase = phase
            self._notify()

    def declare_unhealthy(self, processor: str, reason: str) -> None:
        if self._unhealthy.get(processor) != reason:
            self._unhealthy.pop(processor, None)  # a new reason goes last
            self._unhealthy[processor] = reason
            self._notify()

    def declare_healthy(self, processor: str) -> None:
        if self._unhealthy.pop(processor, None) is not None:
            self._notify()

    def set_engine(self, ready: bool, reason: str = "") -> None:
        """Whether the engine can take records now; ``reason`` says why not."""
        down = "" if ready else (reason or "the engine cannot take records")
        if down != self._engine_down:
            self._engine_down = down
            self._notify()

    async def wait_ready(self, ready: bool) -> None:
        """Return once ``self.ready == ready``."""
        while self.ready is not ready:
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()
