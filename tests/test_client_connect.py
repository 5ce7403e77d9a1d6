"""Connecting: the arguments ``connect`` and ``connect_async`` check, the one handshake both
clients share, what each refusal raises, and API modules that cannot run on the client."""

from __future__ import annotations

from typing import Any

import pytest

import mzconnector
from tests.test_client_async import BACKENDS, run_async

# -- arguments -------------------------------------------------------------------------------------

TLS_FILES_WITHOUT_TLS = [
    ({"cafile": "ca.pem"}, "cafile= given with tls=False"),
    ({"certfile": "client.pem"}, "certfile= given with tls=False"),
    ({"certfile": "c.pem", "keyfile": "c.key"}, "certfile=, keyfile= given with tls=False"),
    ({"tls": True, "keyfile": "c.key"}, "keyfile= given without certfile="),
]


@pytest.mark.parametrize(("options", "message"), TLS_FILES_WITHOUT_TLS)
def test_tls_files_without_tls_are_an_error(options: dict[str, Any], message: str) -> None:
    # Port 9 (discard) on loopback: nothing is contacted, the arguments are checked first.
    with pytest.raises(ValueError, match=message):
        mzconnector.connect("127.0.0.1", 9, timeout=1, **options)


def test_tls_files_with_an_ssl_context_are_an_error() -> None:
    import ssl

    context = ssl.create_default_context()
    with pytest.raises(ValueError, match="given with tls=<an SSLContext>: load them into"):
        mzconnector.connect("127.0.0.1", 9, timeout=1, tls=context, cafile="ca.pem")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("options", "message"), TLS_FILES_WITHOUT_TLS)
def test_async_tls_files_without_tls_are_an_error(
    backend: str, options: dict[str, Any], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        with pytest.raises(ValueError, match=message):
            await mzconnector.connect_async("127.0.0.1", 9, timeout=1, **options)

    run_async(backend, main, monkeypatch)
