"""The async client: the surface it shares with the blocking client, under asyncio (with and
without anyio) and trio, against a real server (``python -m mzserver``)."""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

import mzconnector
from tests.conftest import ServerProcess

BACKENDS = ["asyncio", "trio", "asyncio-without-anyio"]


def run_async(backend: str, main: Callable[[], Any], monkeypatch: pytest.MonkeyPatch) -> Any:
    """Run ``main()`` on the backend; a test that would hang fails after a minute instead."""
    if backend == "asyncio-without-anyio":
        monkeypatch.setattr(mzconnector, "_import_anyio", lambda: None)
        return asyncio.run(asyncio.wait_for(main(), 60))

    async def bounded() -> Any:
        with anyio.fail_after(60):
            return await main()

    return anyio.run(bounded, backend=backend)


async def within(backend: str, seconds: float, awaitable: Any) -> Any:
    """``await awaitable``, failing the test if it takes more than ``seconds``."""
    if backend == "asyncio-without-anyio":
        return await asyncio.wait_for(awaitable, seconds)
    with anyio.fail_after(seconds):
        return await awaitable


# -- one surface -----------------------------------------------------------------------------------

SAME_METHODS = [
    "submit",
    "submit_many",
    "flush",
    "receive",
    "receive_many",
    "records",
    "mim",
]


def parameters(function: Callable[..., Any]) -> list[str]:
    return list(inspect.signature(function).parameters)


@pytest.mark.parametrize("name", SAME_METHODS)
def test_both_clients_take_the_same_arguments(name: str) -> None:
    blocking = getattr(mzconnector.Connection, name)
    asynchronous = getattr(mzconnector.AsyncConnection, name)
    assert parameters(asynchronous) == parameters(blocking)
    for parameter in inspect.signature(blocking).parameters.values():
        if name == "receive_many" and parameter.name == "timeout":
            continue  # documented: None (wait for the first) where the blocking client's is 0
        assert inspect.signature(asynchronous).parameters[parameter.name] == parameter


def test_closing_and_connecting_take_the_same_arguments() -> None:
    assert parameters(mzconnector.AsyncConnection.aclose) == parameters(
        mzconnector.Connection.close
    )
    # Documented: no linger, since the async client runs nothing in the background.
    assert parameters(mzconnector.connect_async) == [
        p for p in parameters(mzconnector.connect) if p != "linger"
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_async_receive_timeout_is_a_timeout_and_the_connection_goes_on(
    backend: str, echo_server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        async with await mzconnector.connect_async(echo_server.host, echo_server.port) as conn:
            start = time.monotonic()
            with pytest.raises(mzconnector.Timeout, match=r"receive: no record within 0\.2 s"):
                await conn.receive(timeout=0.2)
            assert time.monotonic() - start >= 0.2
            assert await conn.receive_many(timeout=0.05) == []
            record = conn.udrs.Subscriber(msisdn="after", balance=1)
            conn.submit(record)
            assert await conn.receive(timeout=10) == record
            conn.submit(record)
            assert [r async for r in conn.records(timeout=0.5)] == [record]
            assert not conn.closed

    run_async(backend, main, monkeypatch)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("call", ["flush", "mim"])
def test_async_flush_and_mim_lose_an_unresponsive_server_within_their_timeout(
    backend: str,
    call: str,
    start_server: Callable[..., ServerProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = start_server()

    async def main() -> None:
        conn = await mzconnector.connect_async(server.host, server.port, timeout=10)
        pending = [conn.udrs.Subscriber(msisdn=str(i), balance=i) for i in range(3)]
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            for record in pending:
                conn.submit(record)
            start = time.monotonic()
            with pytest.raises(mzconnector.ConnectionLost) as info:
                await getattr(conn, call)(timeout=0.5)
            assert 0.5 <= time.monotonic() - start < 5
            assert str(info.value) == f"{call}: no answer from the server within 0.5 s"
            assert info.value.unacknowledged == pending
            assert conn.closed
            await conn.aclose(timeout=0.5)
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)

    run_async(backend, main, monkeypatch)


# -- API modules under both clients ----------------------------------------------------------------

EVERY_PROVIDED_NAME = '''"""Uses every name the connector provides to an API module."""

__all__ = ["make", "push", "push_many", "ack", "values", "next_record", "who"]


def make(msisdn, balance):
    return udrs.Subscriber(msisdn=msisdn, balance=balance)


def push(msisdn, balance):
    submit(make(msisdn, balance))


def push_many(count):
    return submit_many([make(str(i), i) for i in range(count)])


def ack(timeout=5.0):
    return flush(timeout=timeout)


def values(timeout=5.0):
    return mim(timeout=timeout)


def next_record(timeout=5.0):
    return receive(timeout=timeout)


def who():
    return connection.connection_id
'''


@pytest.fixture
def api_server(start_server: Callable[..., ServerProcess], tmp_path: Path) -> ServerProcess:
    from tests.test_client_connect import echo_workflow

    path = echo_workflow(tmp_path, api={"provided.py": EVERY_PROVIDED_NAME})
    return start_server(str(path))


def test_the_provided_names_work_in_the_blocking_client(api_server: ServerProcess) -> None:
    with mzconnector.connect(api_server.host, api_server.port, timeout=10) as conn:
        api = conn.api
        assert api.who() == conn.connection_id
        api.push("a", 1)
        api.ack()
        assert api.next_record() == api.make("a", 1)
        assert api.push_many(3) == 3
        assert [api.next_record().balance for _ in range(3)] == [0, 1, 2]
        assert api.values()["Records In"] == 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_provided_names_work_in_the_async_client(
    backend: str, api_server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        async with await mzconnector.connect_async(api_server.host, api_server.port) as conn:
            api = conn.api
            assert api.who() == conn.connection_id
            api.push("a", 1)  # submit only buffers
            await api.ack()
            assert await api.next_record() == api.make("a", 1)
            assert await api.push_many(3) == 3
            assert [(await api.next_record()).balance for _ in range(3)] == [0, 1, 2]
            assert (await api.values())["Records In"] == 4

    run_async(backend, main, monkeypatch)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_demo_round_trip_under_the_async_client(
    backend: str, echo_server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        async with await mzconnector.connect_async(echo_server.host, echo_server.port) as conn:
            reply = await conn.api.round_trip("46700000002", 25, timeout=10)
            assert reply == conn.udrs.Subscriber(msisdn="46700000002", balance=25)

    run_async(backend, main, monkeypatch)


# -- max_buffered ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_async_max_buffered_stops_reading_during_a_send(
    backend: str, echo_server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``max_buffered`` records waiting, a send reads nothing; a receive reads on."""

    async def main() -> None:
        async with await mzconnector.connect_async(
            echo_server.host, echo_server.port, max_buffered=2
        ) as conn:
            Subscriber = conn.udrs.Subscriber
            await conn.submit_many([Subscriber(msisdn=str(i), balance=i) for i in range(2)])
            got = await conn.receive_many(timeout=10)
            while len(got) < 2:
                got += await conn.receive_many(timeout=10)
            conn._inbox.extend(got)  # two records wait, unread by the user
            pumps: list[str] = []
            pump = conn._pump

            async def counted() -> None:
                pumps.append("read")
                await pump()

            monkeypatch.setattr(conn, "_pump", counted)
            await conn.submit_many([Subscriber(msisdn="x", balance=9)])
            assert pumps == []  # the send did not read
            assert await conn.receive_many(timeout=10) == got
            assert await conn.receive(timeout=10) == Subscriber(msisdn="x", balance=9)

    run_async(backend, main, monkeypatch)
