"""End to end: a real server process (``python -m mzserver``) and the real client
(``mzconnector.connect``), the way a notebook uses them."""

from __future__ import annotations

import datetime
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

import mzconnector
from mzserver import ConfigError, load_config
from tests.conftest import ROOT, WORKFLOWS, ServerProcess

StartServer = Callable[..., ServerProcess]
UTC = datetime.timezone.utc


def connect(server: ServerProcess, **kwargs: Any) -> mzconnector.Connection:
    return mzconnector.connect("127.0.0.1", server.port, timeout=10, **kwargs)


def wait_for_mim(
    conn: mzconnector.Connection, name: str, expected: Any, timeout: float = 10.0
) -> dict[str, Any]:
    """Read the MIM values until ``name`` has the expected value (or fail after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        values = conn.mim()
        if values[name] == expected:
            return values
        if time.monotonic() > deadline:
            raise AssertionError(f"MIM {name!r} is {values[name]!r}, expected {expected!r}")
        time.sleep(0.01)


def receive_n(conn: mzconnector.Connection, n: int, timeout: float = 10.0) -> list[Any]:
    return [conn.receive(timeout=timeout) for _ in range(n)]


def event(
    conn: mzconnector.Connection, event_id: int, note: str | None = None, **changes: Any
) -> Any:
    Address = conn.udrs.Address
    fields: dict[str, Any] = {
        "id": event_id,
        "amount": 12.5,
        "ok": True,
        "payload": bytes(range(256)),
        "at": datetime.datetime(2024, 5, 17, 8, 30, 15, 250000, tzinfo=UTC),
        "tags": ["prepaid", "roaming"],
        "counts": {"sms": 3, "calls": 0},
        "note": note,
        "address": Address(street="Main St 1", zip="11122"),
        "history": [Address(street="Old Rd 2"), Address(street="Older Ln 3", zip=None)],
        "lookup": {"home": [Address(street="Home 4", zip="1")], "gaps": [None, None]},
    }
    fields.update(changes)
    return conn.udrs.Event(**fields)


# -- the issue's snippet ---------------------------------------------------------------------------


def test_the_issue_snippet(echo_server: ServerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    port = echo_server.port
    with mzconnector.connect("127.0.0.1", port, timeout=10) as conn:
        sub = conn.udrs.Subscriber(msisdn="46700000001", balance=10)
        conn.submit(sub)
        conn.submit(b"\x00raw")
        conn.flush()
        reply = conn.receive(timeout=5)
        print(reply, conn.mim())
        print(conn.api.double(21))

        assert reply == sub
        assert type(reply) is conn.udrs.Subscriber
        assert conn.receive(timeout=5) == b"\x00raw"
        values = conn.mim()
        assert values["Workflow Name"] == "echo"
        assert values["Records In"] == 2
        assert values["Last Balance"] == 10
        assert values["Last MSISDN"] == "46700000001"
        assert values["Connected Clients"] == 1
    assert conn.closed
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(
        "Subscriber(msisdn='46700000001', balance=10) {'Workflow Name': 'echo'"
    )
    assert out[1] == "42"


def test_the_banner_says_where_it_listens(echo_server: ServerProcess) -> None:
    assert (
        echo_server.banner == f"mzserver: workflow 'echo' listening on 127.0.0.1:{echo_server.port}"
    )


def test_a_folder_of_the_users_own_names_does_not_shadow_the_server(tmp_path: Path) -> None:
    """Before: a ``server.py`` in the working folder shadowed ``python -m server``, and an
    ``api_modules/`` package made the built-in workflow refuse to start."""
    (tmp_path / "server.py").write_text("raise SystemExit('the user s own server.py ran')\n")
    (tmp_path / "api_modules").mkdir()
    (tmp_path / "api_modules" / "__init__.py").write_text("")
    (tmp_path / "mzconnector_notes.py").write_text("")
    server = ServerProcess(cwd=tmp_path)
    try:
        assert server.banner.startswith("mzserver: workflow 'echo' listening on")
        with connect(server) as conn:
            assert conn.api.double(21) == 42
    finally:
        assert server.stop()[0] == 0


def test_the_console_script_runs_from_any_folder_and_takes_host(tmp_path: Path) -> None:
    (tmp_path / "server.py").write_text("raise SystemExit('the user s own server.py ran')\n")
    script = Path(sys.executable).parent / "mzserver"
    with subprocess.Popen(
        [str(script), "--host", "127.0.0.1", "--port", "0", "--log-level", "WARNING"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    ) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.startswith("mzserver: workflow 'echo' listening on 127.0.0.1:")
            port = int(line.rsplit(":", 1)[1])
            with mzconnector.connect("127.0.0.1", port, timeout=10) as conn:
                assert conn.workflow == "echo"
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0


def test_a_second_ctrl_c_cuts_a_graceful_stop_short_with_exit_status_130() -> None:
    """The README: 0 after a graceful stop, 130 when a second Ctrl-C cuts it short."""
    server = ServerProcess(str(WORKFLOWS / "slow.toml"))
    pusher = mzconnector.connect("127.0.0.1", server.port, timeout=60)
    try:
        # 50 ms a record: the graceful stop has seconds of work to finish.
        pusher.submit_many(pusher.udrs.Subscriber(msisdn="x", balance=i) for i in range(400))
        pusher._send_buffer()
        with connect(server) as watcher:
            deadline = time.monotonic() + 20
            while watcher.mim()["Records In"] == 0:
                assert time.monotonic() < deadline, "the records never arrived"
        server.proc.send_signal(signal.SIGINT)
        # The graceful stop has begun once the server takes no new connections.
        deadline = time.monotonic() + 20
        while True:
            try:
                connect(server).close()
            except mzconnector.ConnectError:
                break
            assert time.monotonic() < deadline, "the server still takes connections"
        server.proc.send_signal(signal.SIGINT)
        assert server.proc.wait(20) == 130
    finally:
        server.stop()
        pusher.close(timeout=1)


def test_default_port_is_7777() -> None:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does
        try:
            probe.bind(("127.0.0.1", 7777))
        except OSError:
            pytest.skip("port 7777 is in use on this machine")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mzserver", "--log-level", "WARNING"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line and "Address already in use" in proc.communicate(timeout=20)[1]:
            pytest.skip("port 7777 was taken by something else meanwhile")
        assert line == "mzserver: workflow 'echo' listening on 127.0.0.1:7777\n"
        with mzconnector.connect("127.0.0.1", timeout=10) as conn:
            assert conn.workflow == "echo"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err


# -- records travel with their types intact ------------------------------------------------------


def test_rich_records_round_trip_exactly(start_server: StartServer) -> None:
    server = start_server(str(WORKFLOWS / "rich.toml"))
    with connect(server) as conn:
        cest = datetime.timezone(datetime.timedelta(hours=2))
        sent = [
            event(conn, 1),
            event(conn, 2, note="plain", tags=[], counts={}, history=[], lookup={}),
            event(conn, 3, at=datetime.datetime(1999, 12, 31, 23, 59, 59, tzinfo=cest)),
            event(conn, -(2**63), amount=-0.0, payload=b"", address=conn.udrs.Address(street="")),
        ]
        for record in sent:
            conn.submit(record)
        conn.submit(b"\x00\xff raw")
        conn.flush()
        back = receive_n(conn, 5)

    assert back == [*sent, b"\x00\xff raw"]
    for got in back[:4]:
        assert type(got) is conn.udrs.Event
        assert type(got.address) is conn.udrs.Address
        assert all(type(a) is conn.udrs.Address for a in got.history)
        assert type(got.payload) is bytes
        assert got.at.tzinfo is not None
    assert back[0].lookup == {
        "home": [conn.udrs.Address(street="Home 4", zip="1")],
        "gaps": [None, None],
    }
    assert back[0].payload == bytes(range(256))
    assert back[2].at == datetime.datetime(1999, 12, 31, 21, 59, 59, tzinfo=UTC)  # same instant
    assert back[3].id == -(2**63)
    assert str(back[3].amount) == "-0.0"
    assert type(back[4]) is bytes


def test_record_classes_come_from_the_server(start_server: StartServer) -> None:
    server = start_server(str(WORKFLOWS / "rich.toml"))
    with connect(server) as conn:
        assert sorted(conn.udrs) == ["Address", "Event", "Internal"]
        assert conn.accepted == ("Event", "bytes")
        assert conn.workflow == "rich"
        assert conn.udrs.Event.__struct_fields__[:3] == ("id", "amount", "ok")
        assert conn.udrs.Address(street="x").zip is None
        with pytest.raises(AttributeError, match="record types has no 'Nope'"):
            _ = conn.udrs.Nope


def test_plain_python_objects_arrive_unpickled(start_server: StartServer) -> None:
    server = start_server(str(WORKFLOWS / "rich.toml"))
    with connect(server) as conn:
        conn.submit(event(conn, 7, note="dict"))
        conn.submit(event(conn, 8, note="object", counts={"a": 5, "b": 2}))
        conn.flush()
        as_dict, reading = receive_n(conn, 2)
    assert as_dict == {
        "id": 7,
        "tags": ["prepaid", "roaming"],
        "at": datetime.datetime(2024, 5, 17, 8, 30, 15, 250000, tzinfo=UTC),
    }
    assert type(reading).__name__ == "Reading"
    assert (reading.event_id, reading.values) == (8, [2, 5])
    assert reading.total() == 7  # its methods came along
    assert repr(reading) == "Reading(8, [2, 5])"


def test_the_server_describes_the_first_100_refused_records_and_counts_the_rest(
    echo_server: ServerProcess,
) -> None:
    with connect(echo_server) as conn:
        Sub = conn.udrs.Subscriber
        conn.submit_many([Sub(msisdn=str(i), balance="bad") for i in range(150)])
        conn.submit(Sub(msisdn="ok", balance=1))
        with pytest.raises(mzconnector.RecordRefused) as info:
            conn.flush()
        assert len(info.value.errors) == 100
        assert info.value.omitted == 50
        assert [e.index for e in info.value.errors] == list(range(100))
        assert str(info.value).startswith("150 record(s) were refused: record #0 (Subscriber")
        assert conn.receive(timeout=5) == Sub(msisdn="ok", balance=1)


def test_refused_record_raises_at_the_next_call(echo_server: ServerProcess) -> None:
    with connect(echo_server) as conn:
        Sub = conn.udrs.Subscriber
        good1, good2 = Sub(msisdn="1", balance=1), Sub(msisdn="3", balance=3)
        conn.submit(good1)
        conn.submit(Sub(msisdn="2", balance="two"))  # the class does not check; the server does
        conn.submit(good2)
        with pytest.raises(mzconnector.RecordRefused) as info:
            conn.flush()
        assert info.value.errors == [
            mzconnector.RecordError(1, "Subscriber", "balance", "expected int, got str 'two'")
        ]
        assert "record #1 (Subscriber.balance): expected int, got str 'two'" in str(info.value)
        # The records around it were delivered; the connection and the server are still up.
        assert receive_n(conn, 2) == [good1, good2]
        conn.flush()
        values = conn.mim()
        assert (values["Records In"], values["Records Refused"]) == (2, 1)
    with connect(echo_server) as other:
        assert other.mim()["Records Refused"] == 1


def test_processor_sees_the_connection_and_sets_mim(start_server: StartServer) -> None:
    server = start_server(str(WORKFLOWS / "example.toml"))
    with connect(server, name="my notebook") as conn:
        values = conn.mim()
        assert (values["Last Balance"], values["Last Client"], values["Seen"]) == (None, None, None)
        conn.submit(conn.udrs.Subscriber(msisdn="4670", balance=99))
        conn.submit(b"bytes")
        conn.flush()
        assert receive_n(conn, 2) == [conn.udrs.Subscriber(msisdn="4670", balance=99), b"bytes"]
        values = conn.mim()
        assert (values["Last Balance"], values["Last Client"], values["Seen"]) == (
            99,
            "my notebook",
            2,
        )


# -- delivery ----------------------------------------------------------------------------------


def test_broadcast_to_every_client(echo_server: ServerProcess) -> None:
    with connect(echo_server) as a, connect(echo_server) as b, connect(echo_server) as c:
        assert c.mim()["Connected Clients"] == 3  # every connection is registered
        a.submit(b"for everyone")
        a.flush()
        assert [x.receive(timeout=5) for x in (a, b, c)] == [b"for everyone"] * 3
        b.submit(b.udrs.Subscriber(msisdn="b", balance=2))
        b.flush()
        for x in (a, b, c):
            assert x.receive(timeout=5) == x.udrs.Subscriber(msisdn="b", balance=2)


def test_not_accepted_raises_and_sends_nothing(start_server: StartServer) -> None:
    server = start_server(str(WORKFLOWS / "rich.toml"))
    other_codec = mzconnector.RecordCodec({"Event": {"id": "int"}})
    with connect(server) as conn:
        for wrong in [
            "text",
            42,
            {"id": 1},
            conn.udrs.Internal(x=1),  # declared, but not accepted
            conn.udrs.Address(street="s"),
            other_codec.types["Event"](id=1),  # an Event class that is not the connection's
        ]:
            with pytest.raises(mzconnector.NotAccepted, match="Nothing was sent") as info:
                conn.submit(wrong)
            assert isinstance(info.value, TypeError)
            assert "it accepts: Event, bytes" in str(info.value)
        with pytest.raises(mzconnector.NotAccepted, match="'Internal'"):
            conn.submit(conn.udrs.Internal(x=1))
        with pytest.raises(mzconnector.NotAccepted, match=r"build records with conn\.udrs"):
            conn.submit(other_codec.types["Event"](id=1))
        with pytest.raises(mzconnector.NotAccepted):
            conn.submit_many([b"ok", "not ok"])
        conn.flush()
        values = conn.mim()
        assert values["Records In"] == 0
        assert values["Records Refused"] == 0


def test_flush_is_the_durability_point(echo_server: ServerProcess) -> None:
    with connect(echo_server, linger=60.0) as conn:
        for i in range(2500):
            conn.submit(b"%d" % i)
        conn.submit_many(conn.udrs.Subscriber(msisdn=str(i), balance=i) for i in range(500))
        conn.flush()
        values = conn.mim()  # no waiting: flush returned, so the server has taken them all
        assert values["Records In"] == 3000
        assert values["Records Refused"] == 0
        back = receive_n(conn, 3000)
    assert back[:2500] == [b"%d" % i for i in range(2500)]
    assert [r.balance for r in back[2500:]] == list(range(500))


def test_receive_timeout_is_a_timeout_error(echo_server: ServerProcess) -> None:
    with connect(echo_server) as conn:
        start = time.monotonic()
        with pytest.raises(mzconnector.Timeout) as info:
            conn.receive(timeout=0.2)
        assert time.monotonic() - start >= 0.2
        assert isinstance(info.value, TimeoutError)
        assert isinstance(info.value, mzconnector.MZConnectorError)
        with pytest.raises(TimeoutError):
            conn.receive(timeout=0)
        assert conn.receive_many(timeout=0.05) == []


def test_receive_sends_buffered_submits_first(echo_server: ServerProcess) -> None:
    with connect(echo_server, linger=60.0) as conn:  # nothing would send them for a minute
        conn.submit(b"ping")
        assert conn.receive(timeout=5) == b"ping"


def test_records_iterates(echo_server: ServerProcess) -> None:
    with connect(echo_server) as conn:
        for i in range(5):
            conn.submit(b"%d" % i)
        conn.flush()
        assert list(itertools.islice(conn.records(timeout=5), 3)) == [b"0", b"1", b"2"]
        assert list(conn.records(timeout=0.2)) == [b"3", b"4"]  # ends when nothing more comes


def test_records_arriving_while_idle_are_buffered(echo_server: ServerProcess) -> None:
    with connect(echo_server, max_buffered=3) as conn:
        for i in range(50):
            conn.submit(conn.udrs.Subscriber(msisdn="idle", balance=i))
        conn.flush()
        # The server sends them while this client does not call receive.
        wait_for_mim(conn, "Records Out", 50)
        values = conn.mim()
        assert values["Undeliverable Records"] == 0
        back = receive_n(conn, 50)
        assert [r.balance for r in back] == list(range(50))
        with pytest.raises(mzconnector.Timeout):
            conn.receive(timeout=0.05)


def test_processor_errors_are_counted_and_the_workflow_goes_on(start_server: StartServer) -> None:
    server = start_server(str(WORKFLOWS / "rich.toml"))
    with connect(server) as conn:
        conn.submit(event(conn, 1))
        conn.submit(event(conn, 2, note="raise"))
        conn.submit(event(conn, 3))
        conn.flush()
        assert [r.id for r in receive_n(conn, 2)] == [1, 3]
        values = conn.mim()
        assert values["Processor Errors"] == 1
        assert values["Last Id"] == 3
        conn.submit(event(conn, 4, note="raise"))
        conn.submit(event(conn, 5))
        conn.flush()
        assert conn.receive(timeout=5).id == 5
        assert conn.mim()["Processor Errors"] == 2


def test_unpicklable_result_is_counted_undeliverable(start_server: StartServer) -> None:
    server = start_server(str(WORKFLOWS / "rich.toml"))
    with connect(server) as conn:
        conn.submit(event(conn, 1, note="unpicklable"))
        conn.submit(event(conn, 2))
        conn.flush()
        assert conn.receive(timeout=5).id == 2
        assert conn.mim()["Undeliverable Records"] == 1


def small_frames_toml(tmp_path: Path, *, api: bool) -> Path:
    """The echo workflow with the smallest maximum frame size a config allows (1024 bytes)."""
    text = (ROOT / "server" / "default" / "echo.toml").read_text()
    text = text.replace("max_connections = 100\n", "max_connections = 100\nmax_frame_size = 1024\n")
    text = text.replace('"echo.py:echo"', '"mzserver.default.echo:echo"')
    if not api:
        text = text.replace('modules = ["mzapi.demo"]', "modules = []")
    assert "max_frame_size = 1024" in text
    path = tmp_path / "small_frames.toml"
    path.write_text(text)
    return path


def small_frames_server(start_server: StartServer, tmp_path: Path) -> ServerProcess:
    return start_server(str(small_frames_toml(tmp_path, api=False)))


def test_a_welcome_larger_than_max_frame_size(start_server: StartServer, tmp_path: Path) -> None:
    path = small_frames_toml(tmp_path, api=True)
    try:
        load_config(path)
    except ConfigError as exc:
        problem = str(exc)
    else:
        problem = ""
    if problem:  # refusing the configuration is a fix too
        assert "connector.max_frame_size" in problem
        return
    server = start_server(str(path))
    with mzconnector.connect("127.0.0.1", server.port, timeout=2) as conn:
        assert conn.api.double(2) == 4


def test_batches_are_split_to_the_servers_frame_size(
    start_server: StartServer, tmp_path: Path
) -> None:
    server = small_frames_server(start_server, tmp_path)
    with connect(server) as conn:
        sent = [conn.udrs.Subscriber(msisdn=f"4670000{i:04d}", balance=i) for i in range(200)]
        conn.submit_many(sent)  # about 5 kB: more than one frame
        conn.flush()
        assert receive_n(conn, 200) == sent
        assert conn.mim()["Records In"] == 200


def test_a_record_too_large_for_the_server_is_refused_alone(
    start_server: StartServer, tmp_path: Path
) -> None:
    server = small_frames_server(start_server, tmp_path)
    with connect(server) as conn:
        Sub = conn.udrs.Subscriber
        good1, good2 = Sub(msisdn="1", balance=1), Sub(msisdn="4", balance=4)
        errors: list[mzconnector.RecordError] = []
        # Refusals are raised at the next call, whichever it is.
        for record in [good1, b"x" * 2000, Sub(msisdn="3", balance="three"), good2]:
            try:
                conn.submit(record)
            except mzconnector.RecordRefused as exc:
                errors.extend(exc.errors)
                conn.submit(record)
        while True:
            try:
                conn.flush()
                break
            except mzconnector.RecordRefused as exc:
                errors.extend(exc.errors)
        assert [(e.index, e.type, e.field) for e in errors] == [
            (1, "bytes", None),
            (2, "Subscriber", "balance"),
        ]
        assert receive_n(conn, 2) == [good1, good2]


# -- stopping --------------------------------------------------------------------------------------


def test_sigterm_delivers_then_closes(start_server: StartServer) -> None:
    server = start_server(str(WORKFLOWS / "slow.toml"))
    with connect(server, name="sender") as conn, connect(server, name="watcher") as watcher:
        sent = [conn.udrs.Subscriber(msisdn="s", balance=i) for i in range(20)]  # 1 s of work
        conn.submit_many(sent)  # sent within a few ms (linger), no flush
        # Once the server has taken them all, stop it while the workflow is still busy.
        wait_for_mim(watcher, "Records In", 20)
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=20) == 0
        for client in (conn, watcher):  # everything taken was processed and delivered
            assert [r.balance for r in receive_n(client, 20)] == list(range(20))
            with pytest.raises(mzconnector.ConnectionClosed, match="the server is shutting down"):
                client.receive(timeout=5)
        with pytest.raises(mzconnector.ConnectionClosed):
            conn.mim()
        with pytest.raises(mzconnector.ConnectionClosed):
            conn.submit(sent[0])
        assert conn.closed
    _, err = server.stop()
    assert "Traceback" not in err


def test_sigterm_with_an_idle_client(echo_server: ServerProcess) -> None:
    with connect(echo_server) as conn:
        conn.flush()
        echo_server.proc.send_signal(signal.SIGTERM)
        assert echo_server.proc.wait(timeout=20) == 0
        with pytest.raises(mzconnector.ConnectionClosed) as info:
            conn.flush()
        assert info.value.unacknowledged == []


def test_connect_to_nothing_is_a_connect_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening
    with pytest.raises(mzconnector.ConnectError, match=f"cannot connect to 127.0.0.1:{port}"):
        mzconnector.connect("127.0.0.1", port, timeout=5)


# -- API modules -----------------------------------------------------------------------------------


def test_api_with_all_exposes_exactly_those_names(echo_server: ServerProcess) -> None:
    with connect(echo_server) as conn:
        assert sorted(conn.api) == ["double", "round_trip", "top_up"]
        assert "_not_exported" not in conn.api
        with pytest.raises(AttributeError, match="API has no '_not_exported'"):
            _ = conn.api._not_exported
        assert conn.api.double(21) == 42
        assert conn.api.double.__doc__.startswith("Return twice")
        assert sorted(conn.api_modules) == ["demo"]


def test_api_function_using_submit_and_receive(echo_server: ServerProcess) -> None:
    with connect(echo_server) as conn:
        reply = conn.api.round_trip("46700000002", 25)
        assert reply == conn.udrs.Subscriber(msisdn="46700000002", balance=25)
        conn.api.top_up("46700000003", 5)
        conn.flush()
        assert conn.receive(timeout=5) == conn.udrs.Subscriber(msisdn="46700000003", balance=5)
        assert conn.mim()["Last Balance"] == 5


def test_api_without_all_exposes_every_public_name(start_server: StartServer) -> None:
    server = start_server(str(WORKFLOWS / "rich.toml"))
    with connect(server) as conn:
        names = set(conn.api)
        assert {"GREETING", "triple", "hypotenuse", "Counter", "echo_bytes"} <= names
        assert "_private" not in names
        assert "math" not in names  # an imported module
        assert not names & set(mzconnector.API_PROVIDED)  # submit, receive, ... stay private
        assert conn.api.triple(2) == 6
        assert conn.api.hypotenuse(3, 4) == 5.0
        assert conn.api.Counter().bump() == 1
        assert conn.api.GREETING == "hello from the API"
        assert conn.api.echo_bytes(b"via the API") == b"via the API"


def test_api_without_all_exposes_only_what_it_defines(start_server: StartServer) -> None:
    server = start_server(str(WORKFLOWS / "rich.toml"))
    with connect(server) as conn:
        assert sorted(conn.api) == [
            "Counter",
            "GREETING",
            "echo_bytes",
            "hypotenuse",
            "round_down",
            "triple",
        ]
        assert conn.api.round_down(2.5) == 2
        # The server applies the same rule (it finds clashes between modules with it).
        source = (WORKFLOWS / "api_noall.py").read_text()
        assert sorted(mzconnector.api_exports(source)) == sorted(conn.api)


def test_api_modules_by_path_and_by_name(start_server: StartServer) -> None:
    server = start_server(str(WORKFLOWS / "example.toml"))
    with connect(server) as conn:
        assert sorted(conn.api_modules) == ["api_noall", "demo"]
        assert conn.api.double(2) == 4
        assert conn.api.triple(2) == 6


# -- the client file alone -----------------------------------------------------------------------

CLIENT_SCRIPT = """
import datetime, sys
import mzconnector

port = int(sys.argv[1])
with mzconnector.connect("127.0.0.1", port, timeout=10) as conn:
    sub = conn.udrs.Subscriber(msisdn="46700000001", balance=10)
    conn.submit(sub)
    conn.submit(b"\\x00raw")
    conn.flush()
    reply = conn.receive(timeout=5)
    assert reply == sub, reply
    assert type(reply) is conn.udrs.Subscriber
    assert conn.receive(timeout=5) == b"\\x00raw"
    assert conn.mim()["Records In"] == 2
    assert conn.api.double(21) == 42
    assert conn.api.round_trip("4670", 3) == conn.udrs.Subscriber(msisdn="4670", balance=3)
    try:
        conn.receive(timeout=0.05)
    except TimeoutError:
        pass
    else:
        raise AssertionError("no timeout")
print("client file:", mzconnector.__file__)
print("trio imported:", "trio" in sys.modules)
print("server imported:", "mzserver" in sys.modules)
print("repo on sys.path:", any(p.rstrip("/") == sys.argv[2] for p in sys.path))
print("ok")
"""


def copy_client(tmp_path: Path) -> Path:
    where = tmp_path / "notebook"
    where.mkdir()
    shutil.copy(ROOT / "mzconnector.py", where / "mzconnector.py")
    return where


def check_client_output(result: subprocess.CompletedProcess[str], where: Path) -> None:
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"client file: {where / 'mzconnector.py'}",
        "trio imported: False",
        "server imported: False",
        "repo on sys.path: False",
        "ok",
    ]


def test_the_client_file_alone_works(echo_server: ServerProcess, tmp_path: Path) -> None:
    where = copy_client(tmp_path)
    site_packages = Path(msgspec.__file__).resolve().parent.parent
    # -S: no site processing, so the editable install of this repo is not on the path either;
    # msgspec comes from PYTHONPATH alone.
    result = subprocess.run(
        [sys.executable, "-S", "-c", CLIENT_SCRIPT, str(echo_server.port), str(ROOT)],
        cwd=where,
        env={"PYTHONPATH": str(site_packages), "PATH": os.environ.get("PATH", "")},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    check_client_output(result, where)


def _pyenv_pythons() -> list[Any]:
    found = []
    for pattern in ("3.12*", "3.10*"):
        matches = sorted(Path("/root/.pyenv/versions").glob(f"{pattern}/bin/python"))
        marks = [pytest.mark.slow]
        if not matches:
            marks.append(pytest.mark.skip(reason=f"no pyenv Python {pattern}"))
        found.append(
            pytest.param(matches[-1] if matches else None, id=pattern.rstrip("*"), marks=marks)
        )
    return found


@pytest.fixture(scope="module", params=_pyenv_pythons())
def other_python(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv of another Python version with only msgspec installed (by this venv's pip)."""
    base: Path = request.param
    env_dir = tmp_path_factory.mktemp(f"venv-{base.parent.parent.name}")
    subprocess.run(
        [str(base), "-m", "venv", "--without-pip", str(env_dir)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    python = env_dir / "bin" / "python"
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "msgspec"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if pip.returncode != 0:
        pytest.skip(f"cannot install msgspec for {base} (no network?): {pip.stderr[-500:]}")
    return python


def test_the_client_file_on_another_python(
    other_python: Path, echo_server: ServerProcess, tmp_path: Path
) -> None:
    where = copy_client(tmp_path)
    result = subprocess.run(
        [str(other_python), "-c", CLIENT_SCRIPT, str(echo_server.port), str(ROOT)],
        cwd=where,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    check_client_output(result, where)


RICH_SCRIPT = """
import datetime, sys
import mzconnector

UTC = datetime.timezone.utc
with mzconnector.connect("127.0.0.1", int(sys.argv[1]), timeout=10) as conn:
    A = conn.udrs.Address
    e = conn.udrs.Event(
        id=1, amount=1.5, ok=False, payload=b"\\x00", at=datetime.datetime(2024, 1, 1, tzinfo=UTC),
        tags=["t"], counts={"c": 1}, note=sys.argv[2], address=A(street="s"),
        history=[A(street="h", zip="z")], lookup={"k": [None, A(street="l")]},
    )
    conn.submit(e)
    conn.flush()
    back = conn.receive(timeout=5)
    print(type(back).__name__, getattr(back, "total", lambda: back)())
"""


def run_rich(
    python: Path, server: ServerProcess, where: Path, note: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(python), "-c", RICH_SCRIPT, str(server.port), note],
        cwd=where,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_rich_records_and_dicts_on_another_python(
    other_python: Path, start_server: StartServer, tmp_path: Path
) -> None:
    server = start_server(str(WORKFLOWS / "rich.toml"))
    where = copy_client(tmp_path)
    result = run_rich(other_python, server, where, "plain")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Event Event(id=1, amount=1.5, ok=False")
    result = run_rich(other_python, server, where, "dict")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(
        "dict {'id': 1, 'tags': ['t'], 'at': datetime.datetime(2024, 1, 1"
    )


UNLOADABLE_SCRIPT = RICH_SCRIPT.replace(
    'print(type(back).__name__, getattr(back, "total", lambda: back)())',
    """print(type(back).__name__, "cloudpickle" in back.error)
    conn.submit(e)  # the connection goes on
    print(type(conn.receive(timeout=5)).__name__)""",
)


def test_custom_objects_on_a_client_with_only_msgspec(
    other_python: Path, start_server: StartServer, tmp_path: Path
) -> None:
    """An object of a class defined in a workflow file needs cloudpickle to load: without it,
    the client gets an UnloadableObject that says so, and the connection goes on."""
    server = start_server(str(WORKFLOWS / "rich.toml"))
    where = copy_client(tmp_path)
    result = subprocess.run(
        [str(other_python), "-c", UNLOADABLE_SCRIPT, str(server.port), "object"],
        cwd=where,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "UnloadableObject True\nUnloadableObject\n"
