"""What the HTTP tests share: a server with ``[http]`` in-process, and GETs over loopback made
by the standard library's client in a worker thread (the server runs on the test's loop)."""

from __future__ import annotations

import base64
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, NamedTuple

import trio

from mzserver import Config, Server, serve
from tests.test_server import make_config


class Response(NamedTuple):
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()


def _headers(message: Any) -> dict[str, str]:
    """Header name (lower case) -> value; repeated headers joined with ", " (RFC 9110)."""
    joined: dict[str, list[str]] = {}
    for name, text in message.items():
        joined.setdefault(name.lower(), []).append(text)
    return {name: ", ".join(texts) for name, texts in joined.items()}


def _fetch(url: str, headers: dict[str, str], method: str) -> Response:
    request = urllib.request.Request(url, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return Response(answer.status, _headers(answer.headers), answer.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return Response(exc.code, _headers(exc.headers), exc.read())


async def get(
    url: str, *, token: str | None = None, basic: str | None = None, method: str = "GET"
) -> Response:
    """``method url`` (with a Bearer token, or a Basic password), from a worker thread."""
    headers = {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if basic is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(f"me:{basic}".encode()).decode()
    return await trio.to_thread.run_sync(_fetch, url, headers, method)


def http_config(
    processor: Callable[..., Any] | None = None,
    *,
    http: dict[str, Any] | None = None,
    **connector: Any,
) -> Config:
    """A workflow: Subscriber records go to ``proc`` on route "in"; "back" is the input route."""

    def echo(record: Any, ctx: Any) -> None:
        ctx.route("back", record)

    tables = {
        "workflow": {"name": "observed"},
        "http": {"host": "127.0.0.1", "port": 0, **(http or {})},
        "mim": {"Last Balance": "int", "Ratio": "float", "Last Client": "str"},
    }
    return make_config(processor or echo, tables=tables, source="observed.toml", **connector)


@asynccontextmanager
async def serving(config: Config) -> AsyncIterator[Server]:
    """A running server; cancelled (stopped at once) when the block ends."""
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve, config)
            try:
                yield server
            finally:
                nursery.cancel_scope.cancel()
