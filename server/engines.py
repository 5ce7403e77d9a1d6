"""Engines: where a workflow's routes run.

An engine gives the rest of the server three things: a ``RouteTable`` (``send`` a batch on a
route, ``bind`` a consumer to one), a ``KvBackend`` (the shared key-value maps), and the MIM
values of the whole workflow (``mim_snapshot``). The ``local`` engine keeps all of it in this
process, as bounded in-process channels: the server as it always was. The ``nats`` engine
(``nats_engine.py``) puts routes, maps and totals on NATS JetStream, so that connectors and
workers run in as many processes, on as many machines, as the load needs.

Roles: a process runs ``all`` (the connector and every processor), only the ``connector``, or
as a ``worker`` only (some) processors; roles other than ``all`` need the ``nats`` engine.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Protocol

import trio

from .errors import ConfigError
from .kv import KvBackend, KvError, KvStore
from .mim import MimTable
from .routes import RouteTable

if TYPE_CHECKING:
    from .config import Config
    from .connections import ConnectionControl

ROLES = ("all", "connector", "worker")


class Engine(Protocol):
    kind: str
    #: This process, among the workflow's processes ("" for the local engine).
    instance: str
    routes: RouteTable
    kv: KvBackend

    @property
    def ready(self) -> tuple[bool, str]:
        """Whether the engine can take records now, and why not."""
        ...

    async def wait_ready_changed(self) -> None:
        """Return when ``ready`` may have changed (readiness waits on it, never polls)."""
        ...

    async def run(
        self, control: ConnectionControl | None, *, task_status: trio.TaskStatus[None]
    ) -> None:
        """Consume the routes bound so far (and, for a connector, what is routed to it)
        until cancelled; ``control`` is the local connector, if this process runs one."""
        ...

    def remote_control(self) -> ConnectionControl:
        """What processors use to control connections when no connector runs here."""
        ...

    def mim_snapshot(self) -> dict[str, Any]:
        """The MIM values of the whole workflow."""
        ...

    async def stop_consuming(self) -> None:
        """Take nothing more; return once what was taken is done (a graceful stop)."""
        ...


class LocalEngine:
    """Everything in this process: routes are in-process channels, maps in memory or SQLite."""

    kind = "local"
    instance = ""

    def __init__(self, config: Config, mim: MimTable) -> None:
        self.routes = RouteTable()
        self._mim = mim
        try:
            self.kv: KvBackend = KvStore(config.codec, config.kv_path)
        except KvError as exc:
            raise ConfigError(config.source, "kv.path", str(exc)) from None

    @property
    def ready(self) -> tuple[bool, str]:
        return True, ""

    async def wait_ready_changed(self) -> None:
        await trio.sleep_forever()  # always ready

    async def run(
        self,
        control: ConnectionControl | None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        task_status.started()  # routes are function calls and channels: nothing to run

    def remote_control(self) -> ConnectionControl:
        raise RuntimeError("the local engine runs the connector in every process")

    def mim_snapshot(self) -> dict[str, Any]:
        return self._mim.snapshot()

    async def stop_consuming(self) -> None:
        await self.routes.in_flight.wait_idle()


@contextlib.asynccontextmanager
async def open_engine(config: Config, mim: MimTable, role: str) -> AsyncIterator[Engine]:
    """The engine ``config`` names, for a process of ``role``; closed on leaving."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    if config.engine.kind == "local":
        if role != "all":
            raise ConfigError(
                config.source,
                "engine.kind",
                f"--role {role} needs the nats engine: with the local engine one process runs "
                "the connector and every processor",
            )
        engine = LocalEngine(config, mim)
        try:
            yield engine
        finally:
            engine.kv.close()
        return
    from .nats_engine import open_nats_engine  # nats-py is needed only for this engine

    async with open_nats_engine(config, mim, role) as nats_engine:
        yield nats_engine
