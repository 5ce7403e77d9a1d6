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

With ``[http] port``, the HTTP listener (health, readiness, metrics, status page) runs in the
same nursery: it starts first, so that ``/readyz`` says "starting" until the workflow runs and
the connector accepts, says "stopping" during a graceful stop, and stops last. With
``[connector] tcp_probe_port``, the probe port is open exactly while the server is ready.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import Any

import trio

from .config import Config
from .connector import Connector
from .engines import Engine, open_engine
from .health import Health, Phase
from .http import GRACEFUL_TIMEOUT, HttpServer
from .mim import AssignedMims, MimTable
from .observe import Observed
from .probe import serve_probe
from .workflow import Workflow

log = logging.getLogger("mzserver")


class Server:
    """A running server: where it listens, its MIM values, its health, and ``stop()``."""

    def __init__(
        self,
        config: Config,
        mim: MimTable,
        addresses: list[Any],
        *,
        role: str = "all",
        health: Health | None = None,
    ) -> None:
        self.config = config
        self.mim = mim
        self.addresses = addresses
        self.role = role
        self.engine: Engine | None = None
        self.health = health if health is not None else Health()
        #: The status page's address (``http://host:port/``), with ``[http] port``.
        self.http_url: str | None = None
        #: The TCP probe port, with ``[connector] tcp_probe_port``.
        self.probe_port: int | None = None
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
        health = Health()
        workflow = Workflow(
            config, engine.routes, mim, control, engine.kv, only=only, health=health
        )
        listeners = [] if connector is None else await connector.open_listeners()
        addresses = [lst.socket.getsockname() for lst in listeners]
        server = Server(config, mim, addresses, role=role, health=health)
        server.engine = engine
        http = None
        if config.http.port is not None:
            observed = Observed(config, mim, engine, workflow, connector, health, role=role)
            http = HttpServer(config.http, observed)
            try:
                await http.open()
            except BaseException:
                for listener in listeners:
                    await listener.aclose()
                raise
            server.http_url = http.url
        try:
            async with trio.open_nursery() as nursery:
                if http is not None:
                    await nursery.start(http.serve, name="http")
                    log.info("HTTP on %s (/healthz /readyz /metrics)", server.http_url)
                nursery.start_soon(_watch_engine, engine, health, name="engine readiness")
                nursery.start_soon(workflow.run, name="workflow")
                await nursery.start(engine.run, connector)
                if connector is not None:
                    await nursery.start(connector.serve, listeners)
                    log.info(
                        "workflow %r listening on %s:%d", config.workflow, server.host, server.port
                    )
                health.set_phase(Phase.READY)
                probe = config.connector.tcp_probe_port
                if probe is not None:
                    server.probe_port = await nursery.start(
                        serve_probe, health, config.connector.host, probe, name="tcp probe"
                    )
                task_status.started(server)
                try:
                    await server._stop.wait()
                    health.set_phase(Phase.STOPPING)
                    await _graceful_stop(config, connector, engine)
                except BaseException:
                    # Cancelled: stop at once, including work shielded for a graceful stop.
                    if connector is not None:
                        connector.abort()
                    raise
                if http is not None:
                    http.stop()  # last: /readyz said "stopping" until now
                    with trio.move_on_after(2 * GRACEFUL_TIMEOUT):
                        await http.stopped.wait()
                nursery.cancel_scope.cancel()
        finally:
            if http is not None:
                http.close_unserved()
            server._stopped.set()


async def _watch_engine(engine: Engine, health: Health) -> None:
    """Keep ``health`` told whether the engine can take records (the NATS engine cannot while
    its connection to NATS is down); it waits for changes, never polls."""
    while True:
        ready, why = engine.ready
        health.set_engine(ready, why)
        await engine.wait_ready_changed()


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
