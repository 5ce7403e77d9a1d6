"""The TCP probe port (``[connector] tcp_probe_port``): a plain TCP port that accepts (and at
once closes) connections while the server is ready, and is not listening while it is not, for
Kubernetes TCP probes. It follows ``Health`` by waiting for its changes."""

from __future__ import annotations

import errno
import logging

import trio

from .errors import BindError
from .health import Health

log = logging.getLogger("mzserver.probe")

#: Seconds between attempts to listen again when the port cannot be had back.
RETRY = 1.0


async def serve_probe(
    health: Health, host: str, port: int, *, task_status: trio.TaskStatus[int]
) -> None:
    """Listen on ``port`` while ``health`` is ready; reports the port (0: the one the system
    chose, kept for every later opening). Raises ``BindError`` if it cannot listen the first
    time; later, it logs and tries again."""
    started = False
    while True:
        await health.wait_ready(True)
        try:
            listeners = await trio.open_tcp_listeners(port, host=host or None)
        except OSError as exc:
            where = f"{host or '*'}:{port}"
            if not started:
                hint = " (is another server running?)" if exc.errno == errno.EADDRINUSE else ""
                raise BindError(
                    f"TCP probe: cannot listen on {where}: {exc.strerror or exc}{hint}"
                ) from exc
            log.warning("TCP probe: cannot listen on %s again: %s; retrying", where, exc)
            await trio.sleep(RETRY)
            continue
        port = listeners[0].socket.getsockname()[1]
        log.info("TCP probe port %d open: the server is ready", port)
        if not started:
            started = True
            task_status.started(port)
        try:
            async with trio.open_nursery() as nursery:
                for listener in listeners:
                    nursery.start_soon(_accept_and_close, listener)
                await health.wait_ready(False)
                nursery.cancel_scope.cancel()
        finally:
            for listener in listeners:
                listener.socket.close()
        log.info("TCP probe port %d closed: %s", port, "; ".join(health.reasons()))


async def _accept_and_close(listener: trio.SocketListener) -> None:
    while True:
        stream = await listener.accept()
        stream.socket.close()
