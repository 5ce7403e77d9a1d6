"""``serve(config)``: the connector and the workflow in one nursery, embeddable in any trio
program::

    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve, config)
        print(server.port)
        ...
        server.stop()             # graceful: stop taking, finish, say goodbye
        await server.wait_stopped()

A graceful stop stops accepting and reading, lets the workflow finish every record taken,
delivers what it routes back, tells every client the server is going away, and returns. What
is not done within ``shutdown_timeout`` is cancelled.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import Any

import trio

from .config import Config
from .connector import Connector
from .engines import Engine, open_engine
from .mim import AssignedMims, MimTable
from .workflow import Workflow

log = logging.getLogger("mzserver")


class Server:
    """A running server: where it listens, its MIM values, and ``stop()``."""

    def __init__(
        self, config: Config, mim: MimTable, addresses: list[Any], *, role: str = "all"
    ) -> None:
        self.config = config
        self.mim = mim
        self.addresses = addresses
        self.role = role
        self.engine: Engine | None = None
        self._stop = trio.Event()
        self._stopped = trio.Event()

    @property
    def host(self) -> str:
        return str(self.addresses[0][0])

    @property
    def port(self) -> int:
        return int(self.addresses[0][1])

    def statistics(self) -> dict[str, Any]:
        """The MIM values now (a snapshot)."""
        return self.mim.snapshot()

    def stop(self) -> None:
        """Ask for a graceful stop; ``serve`` returns when it is done."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        """Whether a graceful stop was asked for."""
        return self._stop.is_set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


async def serve(
    config: Config,
    *,
    role: str = "all",
    processors: Collection[str] | None = None,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the connector and workflow of ``config`` until ``Server.stop()`` (graceful) or
    cancellation (immediate). Reports the ``Server`` through ``task_status``.

    ``role`` (with the nats engine): ``"connector"`` runs only the connector, ``"worker"``
    only the processors named in ``processors`` (None: every one); ``"all"`` runs both.
    """
    mim = MimTable(config.workflow, AssignedMims(config.mim, config.mim_declared))
    async with open_engine(config, mim, role) as engine:
        connector = None if role == "worker" else Connector(config, engine, mim)
        control = connector if connector is not None else engine.remote_control()
        only = () if role == "connector" else processors
        workflow = Workflow(config, engine.routes, mim, control, engine.kv, only=only)
        listeners = [] if connector is None else await connector.open_listeners()
        server = Server(config, mim, [lst.socket.getsockname() for lst in listeners], role=role)
        server.engine = engine
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(workflow.run, name="workflow")
                await nursery.start(engine.run, connector)
                if connector is not None:
                    await nursery.start(connector.serve, listeners)
                    log.info(
                        "workflow %r listening on %s:%d", config.workflow, server.host, server.port
                    )
                task_status.started(server)
                try:
                    await server._stop.wait()
                    await _graceful_stop(config, connector, engine)
                except BaseException:
                    # Cancelled: stop at once, including work shielded for a graceful stop.
                    if connector is not None:
                        connector.abort()
                    raise
                nursery.cancel_scope.cancel()
        finally:
            server._stopped.set()


async def _graceful_stop(config: Config, connector: Connector | None, engine: Engine) -> None:
    timeout = config.connector.shutdown_timeout
    log.info("stopping: no new connections; finishing what was taken (at most %s s)", timeout)
    with trio.move_on_after(timeout) as scope:
        if connector is not None:
            connector.stop_accepting()
            connector.stop_reading()
            await connector.wait_readers_stopped()
        await engine.stop_consuming()
        if connector is not None:
            connector.drained.set()
            await connector.wait_closed()
    if scope.cancelled_caught:
        log.warning("graceful stop did not finish within %s s; closing what is left", timeout)
        if connector is not None:
            connector.abort()
    log.info("stopped")
