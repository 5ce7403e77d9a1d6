"""The client's side of submitting: records it cannot encode, and progress bars. A real server
(``python -m mzserver``) and both clients."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import pytest

import mzconnector
from tests.conftest import ServerProcess
from tests.test_client_async import BACKENDS, run_async

StartServer = Callable[..., ServerProcess]


def connect(server: ServerProcess, **kwargs: Any) -> mzconnector.Connection:
    return mzconnector.connect(server.host, server.port, timeout=10, **kwargs)


# -- progress bars ---------------------------------------------------------------------------------


def test_progress_without_tqdm_says_what_to_install(
    echo_server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    with connect(echo_server) as conn:
        record = conn.udrs.Subscriber(msisdn="1", balance=1)
        with pytest.raises(ImportError, match=r"need tqdm \(pip install tqdm\)"):
            conn.submit_many([record], progress=True)
        assert conn.submit_many([record]) == 1  # nothing was queued by the failed call
        assert conn.receive(timeout=10) == record
        with pytest.raises(mzconnector.Timeout):
            conn.receive(timeout=0.1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_async_progress_without_tqdm_says_what_to_install(
    backend: str, echo_server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)

    async def main() -> None:
        async with await mzconnector.connect_async(echo_server.host, echo_server.port) as conn:
            record = conn.udrs.Subscriber(msisdn="1", balance=1)
            with pytest.raises(ImportError, match=r"need tqdm \(pip install tqdm\)"):
                await conn.submit_many([record], progress=True)
            assert await conn.submit_many([record]) == 1
            assert await conn.receive() == record

    run_async(backend, main, monkeypatch)
