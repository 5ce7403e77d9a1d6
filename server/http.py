"""The HTTP listener: ``/healthz``, ``/readyz``, ``/metrics``, the status page (``/``, its
data at ``/api/status``) and the client file (``/mzconnector.py``).

A small ASGI app served by hypercorn's trio worker, on the server's own trio loop and in its
nursery. It only reads statistics when asked; nothing on the connector's paths waits for it.
With ``[http] token``, everything but ``/healthz`` and ``/readyz`` needs it: as a Bearer token
(``Authorization: Bearer <token>``), or as the password of HTTP Basic authentication, so that a
browser, which cannot send a Bearer token when it opens a page, asks for it.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hmac
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import Any

import hypercorn.config
import hypercorn.trio
import msgspec
import trio

from .errors import BindError
from .metrics import Metrics
from .observe import Observed
from .tables import HttpTable

log = logging.getLogger("mzserver.http")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

#: The text format ``prometheus_client.generate_latest`` writes.
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: The status page's files (server/status/) and their content types.
ASSETS = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/status.css": ("status.css", "text/css; charset=utf-8"),
    "/status.js": ("status.js", "text/javascript; charset=utf-8"),
}
#: Seconds the HTTP server has to finish requests under way when the server stops.
GRACEFUL_TIMEOUT = 1.0
_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"content-security-policy", b"default-src 'self'; frame-ancestors 'none'"),
    (b"referrer-policy", b"no-referrer"),
]
_json = msgspec.json.Encoder()


def client_file() -> bytes:
    """The client file this server speaks the protocol of: the very ``mzconnector.py`` it
    imported."""
    return Path(sys.modules["mzconnector"].__file__ or "").read_bytes()


class StatusApp:
    """The ASGI application."""

    def __init__(self, observed: Observed, *, token: str = "") -> None:
        self.observed = observed
        self.metrics = Metrics(observed)
        self._token = token.encode()
        folder = resources.files("mzserver.status")
        self._assets = {
            path: ((folder / name).read_bytes(), kind) for path, (name, kind) in ASSETS.items()
        }
        self._client = client_file()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
        elif scope["type"] == "http":
            status, headers, body = self.respond(scope)
            headers = [*headers, *_HEADERS, (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": status, "headers": headers})
            if scope["method"] == "HEAD":
                body = b""
            await send({"type": "http.response.body", "body": body})
        # Anything else (a WebSocket): not accepted, and the server refuses it.

    def respond(self, scope: Scope) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """(status, headers, body) of a request."""
        path = scope["path"]
        if scope["method"] not in ("GET", "HEAD"):
            return 405, [*_text, (b"allow", b"GET, HEAD")], b"method not allowed: use GET\n"
        if path == "/healthz":
            return 200, _text, b"ok\n"
        if path == "/readyz":
            health = self.observed.health
            if health.ready:
                return 200, _text, b"ready\n"
            return 503, _text, ("not ready: " + "; ".join(health.reasons()) + "\n").encode()
        if self._token and not self._authorized(scope):
            return 401, [*_text, *_challenges], b"authentication required: the [http] token\n"
        if path in self._assets:
            body, kind = self._assets[path]
            return 200, [(b"content-type", kind.encode()), (b"cache-control", b"no-cache")], body
        if path == "/api/status":
            body = _json.encode(self.observed.status())
            return 200, [(b"content-type", b"application/json"), _no_store], body
        if path == "/metrics":
            return 200, [(b"content-type", METRICS_TYPE.encode()), _no_store], self.metrics.render()
        if path == "/mzconnector.py":
            headers = [
                (b"content-type", b"text/x-python; charset=utf-8"),
                (b"content-disposition", b'attachment; filename="mzconnector.py"'),
                (b"cache-control", b"no-cache"),
            ]
            return 200, headers, self._client
        return 404, _text, b"not found\n"

    def _authorized(self, scope: Scope) -> bool:
        for name, value in scope["headers"]:
            if name != b"authorization":
                continue
            scheme, _, credentials = value.partition(b" ")
            scheme = scheme.lower()
            if scheme == b"bearer":
                given = credentials.strip()
            elif scheme == b"basic":
                try:
                    given = base64.b64decode(credentials.strip(), validate=True).partition(b":")[2]
                except (binascii.Error, ValueError):
                    return False
            else:
                return False
            return hmac.compare_digest(given, self._token)
        return False


_text = [(b"content-type", b"text/plain; charset=utf-8"), (b"cache-control", b"no-store")]
_no_store = (b"cache-control", b"no-store")
_challenges = [
    (b"www-authenticate", b'Bearer realm="mzconnector"'),
    (b"www-authenticate", b'Basic realm="mzconnector", charset="UTF-8"'),
]


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


class HttpServer:
    """The HTTP listener of a server: ``open()`` binds (so that a port in use stops the
    server before it starts, as the connector's does), ``serve()`` runs until ``stop()``."""

    def __init__(self, settings: HttpTable, observed: Observed) -> None:
        self.settings = settings
        self.app = StatusApp(observed, token=settings.token)
        self.addresses: list[Any] = []
        self._fds: list[int] = []
        self._stop = trio.Event()
        self.stopped = trio.Event()

    @property
    def url(self) -> str:
        host, port = self.addresses[0][:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/"

    async def open(self) -> None:
        host = self.settings.host
        port = self.settings.port or 0
        try:
            listeners = await trio.open_tcp_listeners(port, host=host or None)
        except OSError as exc:
            hint = " (use --http-port 0 for any free port)" if exc.errno == errno.EADDRINUSE else ""
            raise BindError(
                f"HTTP: cannot listen on {host or '*'}:{port}: {exc.strerror or exc}{hint}"
            ) from exc
        # hypercorn takes sockets as "fd://N" binds: trio opened them (its address handling,
        # our errors), and hypercorn owns duplicates of them from here on.
        for listener in listeners:
            self.addresses.append(listener.socket.getsockname())
            self._fds.append(os.dup(listener.socket.fileno()))
            await listener.aclose()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        config = hypercorn.config.Config()
        config.bind = [f"fd://{fd}" for fd in self._fds]
        config.errorlog = log
        config.accesslog = None
        config.graceful_timeout = GRACEFUL_TIMEOUT
        try:
            await hypercorn.trio.serve(
                self.app,  # type: ignore[arg-type]
                config,
                shutdown_trigger=self._stop.wait,
                task_status=task_status,
            )
        finally:
            self._fds.clear()  # hypercorn owns them
            self.stopped.set()

    def stop(self) -> None:
        """Stop taking requests; ``serve`` returns once those under way are answered."""
        self._stop.set()

    def close_unserved(self) -> None:
        """Close what ``open()`` bound if ``serve()`` never ran."""
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
