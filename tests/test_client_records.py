"""The client's side of submitting: records it cannot encode, and progress bars. A real server
(``python -m mzserver``) and both clients."""

from __future__ import annotations

import datetime
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

import mzconnector
from tests.conftest import WORKFLOWS, ServerProcess
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


# -- records the client cannot encode --------------------------------------------------------------

BOUND = 10  # seconds a thread that should end at once may take before the test fails
RICH = str(WORKFLOWS / "rich.toml")
PLUS_ONE = datetime.timezone(datetime.timedelta(hours=1))

BAD_VALUES = [
    pytest.param({"id": 2**64}, "id", "int out of range (-2**63 to 2**64-1)", id="int"),
    pytest.param(
        {"note": "lone \ud800"},
        "note",
        "str that is not valid Unicode (a lone surrogate)",
        id="surrogate",
    ),
    pytest.param(
        {"at": datetime.datetime(1, 1, 1, tzinfo=PLUS_ONE)},
        "at",
        "datetime out of range (in UTC: years 1 to 9999)",
        id="datetime",
    ),
    pytest.param(
        {"note": object()},
        "note",
        "a value of type object",
        id="object",
    ),
    pytest.param(
        {"tags": ["fine", "\udc80"]},
        "tags[1]",
        "str that is not valid Unicode (a lone surrogate)",
        id="in-a-list",
    ),
    pytest.param(
        {"counts": {"calls": 2**70}},
        "counts['calls']",
        "int out of range (-2**63 to 2**64-1)",
        id="in-a-dict",
    ),
    pytest.param(
        {"address": "nested", "history": "nested"},
        "history[0].zip",
        "a value of type object",
        id="nested",
    ),
]


def event(conn: Any, event_id: int, **changes: Any) -> Any:
    Address = conn.udrs.Address
    fields: dict[str, Any] = {
        "id": event_id,
        "amount": 1.5,
        "ok": True,
        "payload": b"\x00",
        "at": datetime.datetime(2026, 11, 30, 12, tzinfo=datetime.timezone.utc),
        "tags": [],
        "counts": {},
        "note": None,
        "address": Address(street="Main St 1"),
        "history": [],
        "lookup": {},
    }
    if changes.get("history") == "nested":  # a bad value inside a record inside a list
        changes = {"history": [Address(street="Old Rd 2", zip=object())]}
    fields.update(changes)
    return conn.udrs.Event(**fields)


@pytest.mark.parametrize(("bad", "field", "problem"), BAD_VALUES)
def test_a_record_that_cannot_be_encoded_is_refused_alone(
    bad: dict[str, Any], field: str, problem: str, start_server: StartServer
) -> None:
    server = start_server(RICH)
    with connect(server, linger=60) as conn:  # sent by flush, not by the linger thread
        good1, good2 = event(conn, 1), event(conn, 3)
        conn.submit(good1)
        conn.submit(event(conn, 2, **bad))
        conn.submit(good2)
        with pytest.raises(mzconnector.RecordRefused) as info:
            conn.flush()
        assert info.value.errors == [
            mzconnector.RecordError(1, "Event", field, f"cannot be encoded: {problem}")
        ]
        conn.flush()  # the records around it were sent, and taken
        assert [conn.receive(timeout=10), conn.receive(timeout=10)] == [good1, good2]
        assert conn.mim()["Records In"] == 2


def test_refusals_keep_submit_order_across_batches(start_server: StartServer) -> None:
    """Client refusals and server refusals, in several batches, numbered in submit order."""
    server = start_server(RICH)
    with connect(server, linger=60, batch_size=3) as conn:
        records = [
            event(conn, 0),
            event(conn, 1, id=-(2**64)),  # refused here
            event(conn, 2),
            event(conn, 3, note="\ud800"),  # refused here
            event(conn, 4, amount="not a float"),  # refused by the server
            event(conn, 5),
            event(conn, 6, id=2**64),  # refused here
        ]
        errors: list[mzconnector.RecordError] = []
        for record in records:
            try:
                conn.submit(record)
            except mzconnector.RecordRefused as exc:  # raised at the next call
                errors += exc.errors
                conn.submit(record)
        while True:
            try:
                conn.flush()
                break
            except mzconnector.RecordRefused as exc:
                errors += exc.errors
        # Numbered in submit order (reported as they are found: the client's own at once).
        assert sorted((e.index, e.field) for e in errors) == [
            (1, "id"),
            (3, "note"),
            (4, "amount"),
            (6, "id"),
        ]
        assert [conn.receive(timeout=10).id for _ in range(3)] == [0, 2, 5]


def watch_frames(conn: mzconnector.Connection) -> tuple[threading.Event, list[str]]:
    """An event set when the ledger made frames, and the names of the threads that did."""
    made = threading.Event()
    threads: list[str] = []
    frames = conn._ledger.frames

    def watched(records: list[Any]) -> Any:
        result = frames(records)
        threads.append(threading.current_thread().name)
        made.set()
        return result

    conn._ledger.frames = watched  # type: ignore[method-assign]
    return made, threads


def test_on_the_linger_path_a_bad_record_is_refused_at_the_next_call(
    start_server: StartServer,
) -> None:
    server = start_server(RICH)
    with connect(server) as conn:  # linger: 5 ms
        made, threads = watch_frames(conn)
        good1, good2 = event(conn, 1), event(conn, 3)
        conn.submit_many([good1, event(conn, 2, id=2**64), good2])
        assert made.wait(BOUND)
        assert threads == ["mzconnector-linger"]
        with pytest.raises(mzconnector.RecordRefused) as info:
            conn.flush()
        assert [(e.index, e.field) for e in info.value.errors] == [(1, "id")]
        assert [conn.receive(timeout=10), conn.receive(timeout=10)] == [good1, good2]
        assert conn._flusher.is_alive()  # the linger thread goes on


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("bad", "field", "problem"), BAD_VALUES[:3])
def test_async_a_record_that_cannot_be_encoded_is_refused_alone(
    backend: str,
    bad: dict[str, Any],
    field: str,
    problem: str,
    start_server: StartServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = start_server(RICH)

    async def main() -> None:
        async with await mzconnector.connect_async(server.host, server.port) as conn:
            good1, good2 = event(conn, 1), event(conn, 3)
            conn.submit(good1)
            conn.submit(event(conn, 2, **bad))
            conn.submit(good2)
            with pytest.raises(mzconnector.RecordRefused) as info:
                await conn.flush()
            assert info.value.errors == [
                mzconnector.RecordError(1, "Event", field, f"cannot be encoded: {problem}")
            ]
            await conn.flush()
            assert [await conn.receive(), await conn.receive()] == [good1, good2]

    run_async(backend, main, monkeypatch)


# -- no thread of the client dies silently ---------------------------------------------------------


def test_a_failure_in_the_linger_thread_reaches_the_next_call(echo_server: ServerProcess) -> None:
    conn = connect(echo_server)
    try:
        record = conn.udrs.Subscriber(msisdn="1", balance=1)

        def broken(records: list[Any]) -> Any:
            raise RuntimeError("a bug")

        conn._ledger.frames = broken  # type: ignore[method-assign]
        conn.submit(record)
        conn._flusher.join(BOUND)  # it ends, without a traceback (pytest would fail on one)
        assert not conn._flusher.is_alive()
        with pytest.raises(mzconnector.ConnectionClosed) as info:
            conn.flush()
        assert str(info.value) == "the linger thread failed: RuntimeError('a bug')"
        assert isinstance(info.value.__cause__, RuntimeError)
        assert info.value.unacknowledged == [record]  # nothing vanished
    finally:
        conn.close()


def test_a_failure_in_the_background_reader_reaches_the_next_call(
    echo_server: ServerProcess,
) -> None:
    conn = connect(echo_server)
    try:

        def broken(event: Any) -> bool:
            raise RuntimeError("a bug")

        conn._on_event = broken  # type: ignore[method-assign]
        conn.submit(b"echoed, and read by the background reader")  # sent 5 ms later
        conn._reader.join(BOUND)
        assert not conn._reader.is_alive()
        with pytest.raises(mzconnector.ConnectionClosed) as info:
            conn.mim()
        assert str(info.value) == ("handling what the server sent failed: RuntimeError('a bug')")
        assert isinstance(info.value.__cause__, RuntimeError)
    finally:
        conn.close()


def test_receive_raises_a_refusal_instead_of_waiting_for_a_record(
    echo_server: ServerProcess,
) -> None:
    """A record refused by the server is reported by the next call even when that call is a
    receive: it does not wait out its timeout for an echo that will never come."""
    with connect(echo_server) as conn:
        Subscriber = conn.udrs.Subscriber
        conn.submit(Subscriber(msisdn="1", balance="one"))  # the server refuses it
        start = time.monotonic()
        with pytest.raises(mzconnector.RecordRefused) as info:
            conn.receive(timeout=30)
        assert time.monotonic() - start < 10
        assert [(e.index, e.field) for e in info.value.errors] == [(0, "balance")]
        conn.submit(Subscriber(msisdn="2", balance=2))
        assert conn.receive(timeout=10) == Subscriber(msisdn="2", balance=2)
