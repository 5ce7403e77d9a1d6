"""The client's command line against real servers: every command's JSON output (one document
per line, keys sorted, records as objects with ``_type``, datetimes in ISO 8601, bytes in
base64) and its exit status. Most run ``mzconnector.main`` in-process (the code the console
script runs); the console script and ``python mzconnector.py`` run as processes too."""

from __future__ import annotations

import datetime
import io
import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import mzconnector
from tests.conftest import ROOT, WORKFLOWS, ServerProcess

EVENT = {
    "_type": "Event",
    "id": 7,
    "amount": 2.5,
    "ok": True,
    "payload": "AAH/",  # base64 of 00 01 ff
    "at": "2026-11-30T12:00:00+00:00",
    "tags": ["a", "b"],
    "counts": {"x": 1},
    "note": None,
    "address": {"_type": "Address", "street": "Main St", "zip": None},
    "history": [{"_type": "Address", "street": "Old Rd", "zip": "12345"}],
    "lookup": {"k": [None, {"_type": "Address", "street": "Side St", "zip": None}]},
}


MZCONNECTOR = [sys.executable, "-m", "mzconnector"]


@pytest.fixture
def rich(start_server: Callable[..., ServerProcess]) -> ServerProcess:
    return start_server(str(WORKFLOWS / "rich.toml"))


def run(
    server: ServerProcess | None,
    *args: str,
    stdin: str = "",
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[int, list[str], str]:
    """``mzconnector --port <server> ARGS`` in-process: (exit status, stdout lines, stderr)."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    where = ["--port", str(server.port)] if server is not None else []
    status = mzconnector.main([*where, *args])
    out, err = capsys.readouterr()
    return status, out.splitlines(), err


@pytest.fixture
def cli(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Callable[..., tuple[int, list[str], str]]:
    def call(server: ServerProcess | None, *args: str, stdin: str = "") -> Any:
        return run(server, *args, stdin=stdin, capsys=capsys, monkeypatch=monkeypatch)

    return call


def documents(lines: list[str]) -> list[Any]:
    """JSON lines, each checked to be deterministic: keys sorted, compact."""
    docs = [json.loads(line) for line in lines]
    for line, doc in zip(lines, docs, strict=True):
        assert line == json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return docs


def test_mim_json(echo_server: ServerProcess, cli: Any) -> None:
    status, lines, err = cli(echo_server, "--json", "mim")
    assert (status, err) == (0, "")
    [mim] = documents(lines)
    assert mim["Workflow Name"] == "echo"
    assert datetime.datetime.fromisoformat(mim["Started"]).tzinfo is not None
    assert mim["Last Balance"] is None
    assert list(mim) == sorted(mim)


def test_mim_text_after_the_command(echo_server: ServerProcess, cli: Any) -> None:
    status, lines, _ = cli(echo_server, "mim")
    assert status == 0
    assert lines[0].split() == ["Workflow", "Name", "echo"]


def test_types_json(rich: ServerProcess, cli: Any) -> None:
    status, lines, _ = cli(rich, "types", "--json")
    assert status == 0
    docs = documents(lines)
    assert [(d["type"], d["accepted"]) for d in docs] == [
        ("Address", False),
        ("Event", True),
        ("Internal", False),
        ("bytes", True),
    ]
    assert docs[0]["fields"] == {"street": "str", "zip": "str | None"}


def test_api_json(echo_server: ServerProcess, cli: Any) -> None:
    status, lines, _ = cli(echo_server, "--json", "api")
    assert status == 0
    docs = documents(lines)
    assert [(d["name"], d["module"]) for d in docs] == [
        ("double", "demo"),
        ("round_trip", "demo"),
        ("top_up", "demo"),
    ]
    assert docs[0]["signature"] == "(x: 'float') -> 'float'"
    assert docs[0]["doc"] == "Return twice ``x``: the smallest possible API function."


def test_submit_then_tail_round_trips_every_field_type(rich: ServerProcess, cli: Any) -> None:
    # The rich workflow sends every record back to every client: a tail sees what we submit.
    with mzconnector.connect(rich.host, rich.port) as watcher:
        status, lines, _ = cli(rich, "--json", "submit", "Event", stdin=json.dumps(EVENT) + "\n")
        assert status == 0
        assert documents(lines) == [{"submitted": 1, "refused": 0, "errors": []}]
        [event] = [watcher.receive(timeout=10)]
    assert event.payload == b"\x00\x01\xff"
    assert event.at == datetime.datetime(2026, 11, 30, 12, tzinfo=datetime.timezone.utc)
    assert event.lookup["k"][1].street == "Side St"
    # What tail prints is what submit takes: the same JSON.
    assert mzconnector._record_json(event) == EVENT


def test_tail_prints_what_arrives(rich: ServerProcess) -> None:
    with subprocess.Popen(
        [*MZCONNECTOR, "--port", str(rich.port), "--json", "tail", "back", "--count", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as tail:
        with mzconnector.connect(rich.host, rich.port) as conn:
            while conn.mim()["Connected Clients"] < 2:  # until the tail has connected
                pass
            time.sleep(0.5)  # and subscribed to "back"
            conn.submit(b"raw")
            conn.submit(mzconnector._record_from_json(EVENT, conn._codec, "EVENT"))
            conn.flush()
        out, err = tail.communicate(timeout=30)
    assert (tail.returncode, err) == (0, "")
    assert documents(out.splitlines()) == [{"_type": "bytes", "data": "cmF3"}, EVENT]


def test_tail_prints_other_objects_as_objects(rich: ServerProcess, cli: Any) -> None:
    with mzconnector.connect(rich.host, rich.port) as conn:
        event = mzconnector._record_from_json({**EVENT, "note": "dict"}, conn._codec, "EVENT")
        conn.submit(event)
        conn.flush()
        [item] = [conn.receive(timeout=10)]
    document = mzconnector._record_json(item)
    assert document["_type"] == "object"
    assert document["class"] == "builtins.dict"
    assert document["value"]["id"] == 7


def test_smoke(echo_server: ServerProcess, cli: Any) -> None:
    status, lines, err = cli(echo_server, "smoke", "--json")
    assert (status, err) == (0, "")
    [report] = documents(lines)
    assert report["connected"] is True
    assert report["workflow"] == "echo"
    assert report["pushed"] == {"_type": "Subscriber", "msisdn": "smoke", "balance": 0}
    assert report["answer"] == report["pushed"]  # the echo workflow answers
    assert report["mim"]["Records In"] >= 1


def test_smoke_without_an_answer_is_still_ok(rich: ServerProcess, cli: Any) -> None:
    # The rich workflow answers an Event; bytes only when pushed: push bytes explicitly.
    status, lines, _ = cli(rich, "--json", "smoke", "--type", "bytes", "--answer-timeout", "5")
    assert status == 0
    [report] = documents(lines)
    assert report["pushed"] == {"_type": "bytes", "data": "c21va2U="}
    assert report["answer"] == report["pushed"]


@pytest.fixture
def recording(tmp_path: Path) -> Path:
    return tmp_path / "traffic.jsonl"


def test_record_and_replay(rich: ServerProcess, recording: Path, cli: Any) -> None:
    with mzconnector.connect(rich.host, rich.port) as conn:
        events = [
            mzconnector._record_from_json({**EVENT, "id": i}, conn._codec, "EVENT")
            for i in range(3)
        ]
        back = conn.subscribe("back")  # before submitting: a subscription made now sees them
        conn.submit_many([*events, b"tail"])
        conn.flush()
        assert mzconnector.record(conn, back, str(recording), max_records=4) == 4

    header, *lines = recording.read_text().splitlines()
    assert json.loads(header)["_recording"] == "mzconnector recording"
    assert json.loads(header)["route"] == "back"
    entries = documents(lines)
    assert [e["record"]["_type"] for e in entries] == ["Event", "Event", "Event", "bytes"]
    assert all(datetime.datetime.fromisoformat(e["at"]).tzinfo for e in entries)

    # The CLI replays it; a client watching sees the same records again.
    with mzconnector.connect(rich.host, rich.port) as watcher:
        status, out, _ = cli(rich, "--json", "replay", str(recording))
        assert status == 0
        assert documents(out) == [
            {"sent": 4, "refused": 0, "errors": [], "not_accepted": 0, "skipped": 0}
        ]
        again = [watcher.receive(timeout=10) for _ in range(4)]
    as_json = mzconnector._record_json  # (each connection has its own record classes)
    assert [as_json(r) for r in again] == [as_json(r) for r in [*events, b"tail"]]


def test_the_record_command(rich: ServerProcess, tmp_path: Path) -> None:
    path = tmp_path / "cli.jsonl"
    with subprocess.Popen(
        [
            *MZCONNECTOR,
            "--port",
            str(rich.port),
            "--json",
            *("record", "back", path, "--count", "2"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as recorder:
        with mzconnector.connect(rich.host, rich.port) as conn:
            while conn.mim()["Connected Clients"] < 2:  # until the recorder has connected
                pass
            time.sleep(0.5)  # and subscribed to "back"
            conn.submit_many([b"one", b"two"])
            conn.flush()
        out, err = recorder.communicate(timeout=30)
    assert (recorder.returncode, err) == (0, "")
    assert documents(out.splitlines()) == [{"recorded": 2, "file": str(path)}]
    entries = documents(path.read_text().splitlines()[1:])
    assert [e["record"] for e in entries] == [
        {"_type": "bytes", "data": "b25l"},
        {"_type": "bytes", "data": "dHdv"},
    ]


def test_replay_keeps_the_original_pace_or_a_multiple(rich: ServerProcess, tmp_path: Path) -> None:
    path = tmp_path / "paced.jsonl"
    start = datetime.datetime(2026, 11, 30, 12, tzinfo=datetime.timezone.utc)
    header = {"_recording": "mzconnector recording", "version": 1}
    lines = [json.dumps(header)] + [
        json.dumps({"at": (start + datetime.timedelta(seconds=s)).isoformat(), "record": {**EVENT}})
        for s in (0.0, 0.4)
    ]
    path.write_text("\n".join(lines) + "\n")

    with mzconnector.connect(rich.host, rich.port) as conn:
        began = time.monotonic()
        report = mzconnector.replay(conn, str(path), pace="original")
        original = time.monotonic() - began
        began = time.monotonic()
        report = mzconnector.replay(conn, str(path), pace=4)
        faster = time.monotonic() - began
    assert report.sent == 2
    assert original >= 0.4
    assert 0.1 <= faster < original


def test_replay_reports_what_was_refused_and_not_sent(rich: ServerProcess, tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    at = "2026-11-30T12:00:00+00:00"
    records = [
        EVENT,
        {**EVENT, "id": 2**64},  # cannot be encoded: refused
        {"_type": "Internal", "x": 1},  # declared, not accepted
        {"_type": "Gone", "y": 1},  # not a type of this workflow
        {"_type": "object", "class": "builtins.dict", "repr": "{}"},  # not a record
        {**EVENT, "id": 3},
    ]
    path.write_text(
        "\n".join(
            [json.dumps({"_recording": "mzconnector recording", "version": 1})]
            + [json.dumps({"at": at, "record": r}) for r in records]
        )
    )
    with mzconnector.connect(rich.host, rich.port) as conn:
        report = mzconnector.replay(conn, str(path))
    assert (report.sent, report.not_accepted, report.skipped) == (3, 2, 1)
    [error] = report.refused
    assert (error.index, error.type, error.field) == (1, "Event", "id")
    assert "int out of range" in error.message


def test_parquet_recording_round_trips(rich: ServerProcess, tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    path = tmp_path / "traffic.parquet"
    with mzconnector.connect(rich.host, rich.port) as conn:
        events = [
            mzconnector._record_from_json({**EVENT, "id": i}, conn._codec, "EVENT")
            for i in range(5)
        ]
        back = conn.subscribe("back")
        conn.submit_many(events)
        conn.flush()
        assert mzconnector.record(conn, back, str(path), max_records=5) == 5
        report = mzconnector.replay(conn, str(path))
        again = [back.receive(timeout=10) for _ in range(5)]
    assert report.sent == 5
    assert again == events
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    assert table.column_names == ["at", "type", "record"]
    assert table.column("type").to_pylist() == ["Event"] * 5


# -- conversations: query, and tail/record on a subscription or a tap ---------------------------


@pytest.fixture
def conversations(start_server: Callable[..., ServerProcess]) -> ServerProcess:
    return start_server(str(WORKFLOWS / "conversations.toml"))


def test_query_prints_each_reply(conversations: ServerProcess, cli: Any) -> None:
    request = json.dumps({"topic": "count", "count": 3})
    status, lines, err = cli(conversations, "--json", "query", "ask", request)
    assert (status, err) == (0, "")
    assert documents(lines) == [
        {"_type": "Reply", "n": 0, "text": "part 0"},
        {"_type": "Reply", "n": 1, "text": "part 1"},
        {"_type": "Reply", "n": 2, "text": "ask"},
    ]
    status, lines, _ = cli(conversations, "query", "ask", '{"topic": "none", "count": 0}')
    assert (status, lines) == (0, [])


def test_query_errors(conversations: ServerProcess, cli: Any) -> None:
    status, _, err = cli(conversations, "--json", "query", "ask", '{"topic": "error", "count": 11}')
    [error] = documents(err.splitlines())
    assert (status, error["kind"]) == (1, "QueryError")
    assert "count 11 is more than 10" in error["error"]
    status, _, err = cli(conversations, "--json", "query", "ask", '{"topic": 1}')
    assert status == 2
    assert "request.topic: expected str, got int 1" in err
    status, _, err = cli(conversations, "query", "ask", "{not json")
    assert (status, err.startswith("mzconnector: the request is not JSON")) == (2, True)


def test_tail_with_a_matcher_and_a_tap(conversations: ServerProcess) -> None:
    tails = {
        name: subprocess.Popen(
            [*MZCONNECTOR, "--port", str(conversations.port), "--json", "tail", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, args in {
            "alerts": ["alerts", "--match", '{"sensor": "b"}', "--count", "1"],
            "tap": ["readings", "--count", "2"],
        }.items()
    }
    with mzconnector.connect(conversations.host, conversations.port) as conn:
        while conn.mim()["Connected Clients"] < 3:  # until both tails have connected
            pass
        time.sleep(0.5)  # and subscribed
        Reading = conn.udrs.Reading
        conn.submit_many([Reading(sensor="a", value=99.0), Reading(sensor="b", value=98.0)])
        conn.flush()
    results = {name: tail.communicate(timeout=30) for name, tail in tails.items()}
    for tail in tails.values():
        assert tail.returncode == 0
    assert documents(results["alerts"][0].splitlines()) == [
        {"_type": "Reading", "place": None, "sensor": "b", "value": 98.0}
    ]
    assert [d["sensor"] for d in documents(results["tap"][0].splitlines())] == ["a", "b"]


def test_tail_refuses_a_matcher_the_types_cannot_match(
    conversations: ServerProcess, cli: Any
) -> None:
    status, _, err = cli(conversations, "--json", "tail", "alerts", "--match", '{"colour": 1}')
    [error] = documents(err.splitlines())
    assert (status, error["kind"]) == (2, "SubscriptionError")


# -- exit status ------------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def fake_server(answer: Callable[[Any], None]) -> tuple[int, Any]:
    """A one-connection TCP server in a thread that lets ``answer(socket)`` talk."""
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def serve() -> None:
        with listener:
            conn, _ = listener.accept()
            with conn:
                answer(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener.getsockname()[1], thread


def welcome_then_silence(conn: Any) -> None:
    protocol = mzconnector.Protocol(mzconnector.Role.SERVER)
    while protocol.next_event() is mzconnector.NEED_DATA:  # the Hello
        protocol.receive_data(conn.recv(65536))
    welcome = mzconnector.Welcome(
        protocol=mzconnector.PROTOCOL_VERSION,
        connection_id=1,
        workflow="silent",
        schema={},
        accepted=["bytes"],
        api=[],
        max_frame_size=1 << 20,
    )
    conn.sendall(protocol.send(welcome))
    while conn.recv(65536):  # reads, answers nothing, until the client goes
        pass


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (["bogus"], 2, "argument COMMAND: invalid choice: 'bogus'"),
        (["--timeout", "0", "mim"], 2, "argument --timeout: expected a number above 0"),
        (["--cafile", "ca.pem", "mim"], 2, "cafile= given with tls=False"),
        (["--server", "nowhere", "mim"], 2, "argument --server: expected HOST:PORT"),
        (["--token-env", "MZ_TEST_UNSET", "mim"], 2, "MZ_TEST_UNSET: the variable is not set"),
        (["--server-hostname", "x", "mim"], 2, "server_hostname= given with tls=False"),
        (["query", "top", "{}"], 2, "no query 'top' (this server offers: none)"),
        (["tail", "nowhere"], 2, "the server offers no route 'nowhere' (it offers: back)"),
    ],
)
def test_bad_arguments(
    echo_server: ServerProcess, cli: Any, args: list[str], status: int, message: str
) -> None:
    got, out, err = cli(echo_server, "--json", *args)
    assert (got, out) == (status, [])
    [error] = documents(err.splitlines())
    assert error["exit"] == status
    assert message in error["error"]


def test_bad_input_says_which_line(echo_server: ServerProcess, cli: Any) -> None:
    lines = '{"msisdn": "1", "balance": 1}\n{"msisdn": "2", "balance": "two"}\n'
    status, out, err = cli(echo_server, "submit", "Subscriber", stdin=lines)
    assert (status, out) == (2, [])
    assert err == "mzconnector: <stdin>: line 2.balance: expected int, got str 'two'\n"
    status, _, err = cli(echo_server, "submit", "Nothing", stdin="")
    assert status == 2
    assert err == (
        "mzconnector: the connector does not accept 'Nothing'; it accepts: Subscriber, bytes\n"
    )


def test_records_the_client_cannot_send_are_refused(echo_server: ServerProcess, cli: Any) -> None:
    lines = '{"msisdn": "1", "balance": 1}\n{"msisdn": "2", "balance": 36893488147419103232}\n'
    status, out, err = cli(echo_server, "--json", "submit", "Subscriber", stdin=lines)
    assert status == 4
    [summary] = documents(out)
    assert (summary["submitted"], summary["refused"]) == (2, 1)
    assert summary["errors"][0]["field"] == "balance"
    assert json.loads(err)["kind"] == "RecordRefused"


def test_cannot_connect(cli: Any) -> None:
    port = free_port()
    status, _, err = cli(None, "--port", str(port), "mim")
    assert status == 3
    assert err.startswith(f"mzconnector: cannot connect to 127.0.0.1:{port}: ")
    assert err.count("\n") == 1


def test_refused(start_server: Callable[..., ServerProcess], tmp_path: Path, cli: Any) -> None:
    toml = (ROOT / "server" / "default" / "echo.toml").read_text()
    toml = toml.replace('entry = "echo.py:echo"', 'entry = "mzserver.default.echo:echo"')
    toml = toml.replace("allow_multiple_connections = true", "allow_multiple_connections = false")
    (tmp_path / "one.toml").write_text(toml)
    server = start_server(str(tmp_path / "one.toml"))
    with mzconnector.connect(server.host, server.port):
        status, _, err = cli(server, "--json", "mim")
    assert status == 4
    assert json.loads(err)["kind"] == "ConnectionLimitReached"


def test_protocol_error(cli: Any) -> None:
    port, thread = fake_server(lambda conn: conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n"))
    status, _, err = cli(None, "--port", str(port), "mim")
    thread.join(10)
    assert status == 5
    assert "is not an mzconnector server" in err


def test_timeout(cli: Any) -> None:
    port, thread = fake_server(welcome_then_silence)
    status, _, err = cli(None, "--port", str(port), "--timeout", "0.5", "--json", "mim")
    thread.join(10)
    assert status == 6
    assert json.loads(err) == {
        "error": "mim: no answer from the server within 0.5 s",
        "exit": 6,
        "kind": "ConnectionLost",
    }


def test_an_error_never_shows_the_token(
    echo_server: ServerProcess, cli: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MZCONNECTOR_AUTH_TOKEN", "tok-very-secret")
    monkeypatch.chdir(tmp_path)
    status, _, err = cli(echo_server, "submit", "Subscriber", "--file", "tok-very-secret")
    assert status == 1
    assert "tok-very-secret" not in err
    assert "***" in err


def test_a_token_from_a_named_variable_and_a_list_of_servers(
    start_server: Callable[..., ServerProcess],
    tmp_path: Path,
    cli: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    toml = (ROOT / "server" / "default" / "echo.toml").read_text()
    toml = toml.replace('entry = "echo.py:echo"', 'entry = "mzserver.default.echo:echo"')
    toml += '\n[connector.auth]\ntoken = "tok-cli-secret"\n'
    (tmp_path / "auth.toml").write_text(toml)
    server = start_server(str(tmp_path / "auth.toml"))
    with socket.socket() as dead:
        dead.bind(("127.0.0.1", 0))
        nowhere = f"127.0.0.1:{dead.getsockname()[1]}"  # bound, not listening: refused
        here = f"127.0.0.1:{server.port}"
        monkeypatch.setenv("MZ_CLI_TOKEN", "tok-cli-secret")
        args = ["--server", nowhere, "--server", here, "--token-env", "MZ_CLI_TOKEN"]
        status, out, err = cli(None, *args, "--json", "mim")
        assert (status, err) == (0, "")
        assert documents(out)[0]["Workflow Name"] == "echo"
        monkeypatch.setenv("MZ_CLI_TOKEN", "tok-cli-wrong")
        status, out, err = cli(None, "--server", here, "--token-env", "MZ_CLI_TOKEN", "mim")
        assert status == 4
        assert "authentication failed" in err
        assert "tok-cli" not in err + "".join(out)


# -- as processes -----------------------------------------------------------------------------


def test_the_console_script(echo_server: ServerProcess) -> None:
    script = shutil.which("mzconnector", path=str(Path(sys.executable).parent))
    assert script is not None
    done = subprocess.run(
        [script, "--port", str(echo_server.port), "--json", "smoke"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stderr) == (0, "")
    assert json.loads(done.stdout)["workflow"] == "echo"


def test_the_client_file_alone(echo_server: ServerProcess, tmp_path: Path) -> None:
    shutil.copy(ROOT / "mzconnector.py", tmp_path / "mzconnector.py")
    done = subprocess.run(
        [sys.executable, "mzconnector.py", "--port", str(echo_server.port), "--json", "types"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stderr) == (0, "")
    assert json.loads(done.stdout.splitlines()[0])["type"] == "Subscriber"
    failed = subprocess.run(
        [sys.executable, "mzconnector.py", "--port", str(free_port()), "mim"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert failed.returncode == 3
