"""Faults: slow and stuck peers, clients that vanish, a processor that raises, a server stopped
under load, and a client that loses its server. Real server processes (the reliability
workflows ``tests/workflows/rel_*.toml``, whose processor logs every ``Rec`` it processes as a
"client seq" line) and the real client; raw sockets where a client must misbehave.

The invariants: nothing a client had acknowledged (``flush()`` returned) is lost, nothing is
processed twice, nothing is dropped without being counted and reported, and no call of a
client whose server is gone waits longer than its timeout.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
import trustme

import mzconnector
from mzconnector import (
    MAGIC,
    NEED_DATA,
    PROTOCOL_VERSION,
    Ack,
    Error,
    Flush,
    Hello,
    Protocol,
    Records,
    Role,
    Welcome,
    encode_frame,
)
from mzserver import Config, serve
from tests.conftest import ROOT, WORKFLOWS, ServerProcess

StartServer = Callable[..., ServerProcess]
LOG_WORKFLOW = str(WORKFLOWS / "rel_log.toml")  # handshake_timeout = 1.0
FLOOD_WORKFLOW = str(WORKFLOWS / "rel_flood.toml")  # outbox_size = 2, delivery_timeout = 0.05


# -- helpers -----------------------------------------------------------------------------------


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    """Poll ``predicate`` (an observation of another process) until it is truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what or predicate}")
        time.sleep(0.01)


def returns_within(seconds: float, call: Callable[[], Any]) -> tuple[Any, float]:
    """Run ``call`` in a thread; (its result or the exception it raised, seconds it took).
    Fails if it has not returned after ``seconds``: a hung call must not hang the tests."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = call()
        except BaseException as exc:
            box["value"] = exc

    t0 = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{call} still blocked after {seconds} s"
    return box["value"], time.monotonic() - t0


class Log:
    """The processed-records file of the rel_log processor (MZ_REL_LOG)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def lines(self) -> list[tuple[str, int]]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            client, seq = line.split(" ")
            out.append((client, int(seq)))
        return out

    def seqs(self, client: str) -> list[int]:
        return [seq for c, seq in self.lines() if c == client]

    def wait_for(self, client: str, seqs: Iterator[int] | range, timeout: float = 10.0) -> None:
        wanted = set(seqs)
        wait_for(lambda: wanted <= set(self.seqs(client)), timeout, f"{client} processed")


@pytest.fixture
def log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Log:
    path = tmp_path / "processed.log"
    monkeypatch.setenv("MZ_REL_LOG", str(path))  # inherited by the servers started after it
    return Log(path)


def connect(port: int, **kwargs: Any) -> mzconnector.Connection:
    kwargs.setdefault("timeout", 10)
    return mzconnector.connect("127.0.0.1", port, **kwargs)


def recs(conn: mzconnector.Connection, client: str, seqs: range) -> list[Any]:
    return [conn.udrs.Rec(client=client, seq=i) for i in seqs]


def submit_and_flush(conn: mzconnector.Connection, client: str, seqs: range) -> None:
    conn.submit_many(recs(conn, client, seqs))
    conn.flush()


def connected_clients(conn: mzconnector.Connection) -> int:
    return int(conn.mim()["Connected Clients"])


class RawSocket:
    """A blocking socket client that speaks the protocol with hand-built frames."""

    def __init__(self, port: int, *, hello: bool = True, rcvbuf: int | None = None) -> None:
        self.sock = socket.socket()
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.connect(("127.0.0.1", port))
        self.sock.settimeout(10)
        self.protocol = Protocol(Role.CLIENT)
        if hello:
            self.sock.sendall(self.protocol.send(Hello(PROTOCOL_VERSION, name="raw")))
            assert isinstance(self.next_event(), Welcome)

    def next_event(self) -> Any:
        while (event := self.protocol.next_event()) is NEED_DATA:
            self.protocol.receive_data(self.sock.recv(1 << 16))
        return event

    def send(self, *messages: Any) -> None:
        self.sock.sendall(b"".join(bytes(self.protocol.send(m)) for m in messages))

    def reset(self) -> None:
        """Close with a TCP reset, as a killed process or a dropped NAT entry looks."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


def rec_batch(client: str, seqs: range) -> Records:
    return Records(msgspec.Raw(msgspec.msgpack.encode([["Rec", client, i] for i in seqs])))


def bytes_batch(items: list[bytes]) -> Records:
    return Records(msgspec.Raw(msgspec.msgpack.encode(items)))


# -- slow and stuck peers ------------------------------------------------------------------------


def test_a_client_that_says_nothing_gets_a_handshake_timeout(
    start_server: StartServer, log: Log
) -> None:
    server = start_server(LOG_WORKFLOW)
    with connect(server.port, name="bystander") as bystander:
        t0 = time.monotonic()  # before connecting: the server's clock starts later
        silent = RawSocket(server.port, hello=False)
        event = silent.next_event()  # the server speaks first, after its handshake timeout
        elapsed = time.monotonic() - t0
        assert event == Error("no hello within 1.0 s")
        assert silent.sock.recv(1) == b""  # and closes
        assert 1.0 <= elapsed < 5.0
        silent.sock.close()
        submit_and_flush(bystander, "bystander", range(10))
        log.wait_for("bystander", range(10))
        assert connected_clients(bystander) == 1


def test_a_client_that_trickles_its_hello_gets_the_same_timeout(start_server: StartServer) -> None:
    """The handshake timeout bounds the whole handshake, not each read: a hello sent one byte
    every 0.2 s (it would take 6 s) is cut off after 1 s."""
    server = start_server(LOG_WORKFLOW)
    hello = MAGIC + bytes(encode_frame(Hello(PROTOCOL_VERSION, name="slow loris")))
    assert len(hello) * 0.2 > 5
    t0 = time.monotonic()  # before connecting: the server's clock starts later
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.settimeout(10)
    stop = threading.Event()

    def trickle() -> None:
        for i in range(len(hello)):
            try:
                sock.send(hello[i : i + 1])
            except OSError:
                return
            if stop.wait(0.2):  # the pace of a slow client, not a wait for a result
                return

    sender = threading.Thread(target=trickle, daemon=True)
    sender.start()
    try:
        reader = Protocol(Role.CLIENT)
        reader.send(Hello(PROTOCOL_VERSION))
        while (event := reader.next_event()) is NEED_DATA:
            reader.receive_data(sock.recv(1 << 16))
        elapsed = time.monotonic() - t0
        assert event == Error("no hello within 1.0 s")
        assert 1.0 <= elapsed < 4.0
    finally:
        stop.set()
        sender.join()
        sock.close()
    with connect(server.port) as conn:
        assert conn.mim()["Connections Accepted"] == 1


async def test_a_silent_tls_client_is_closed_after_the_handshake_timeout(tmp_path: Path) -> None:
    """With TLS, the TLS handshake is part of the handshake: a client that connects and says
    nothing, or starts TLS and stops, is closed after handshake_timeout."""
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "server.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    config = Config.from_dict(
        {
            "workflow": {"name": "tls"},
            "connector": {
                "host": "127.0.0.1",
                "port": 0,
                "handshake_timeout": 0.5,
                "accepted_types": ["bytes"],
                "output_routes": {"bytes": "in"},
                "tls": {"enabled": True, "certfile": "server.pem", "keyfile": "server.key"},
            },
            "processors": [{"name": "drop", "entry": lambda record, ctx: None, "routes": ["in"]}],
        },
        base_dir=tmp_path,
    )
    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve, config)
        for starts_tls in (False, True):
            t0 = trio.current_time()  # before connecting: the server's clock starts later
            async with await trio.open_tcp_stream("127.0.0.1", server.port) as stream:
                if starts_tls:  # a ClientHello, and then nothing
                    context = ssl.create_default_context()
                    ca.configure_trust(context)
                    outgoing = ssl.MemoryBIO()
                    tls = context.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname="localhost")
                    with pytest.raises(ssl.SSLWantReadError):
                        tls.do_handshake()
                    await stream.send_all(outgoing.read())
                with trio.fail_after(5):
                    try:
                        while await stream.receive_some(1 << 16):
                            pass
                    except trio.BrokenResourceError:
                        pass
                assert 0.5 <= trio.current_time() - t0 < 3.0
        assert server.statistics()["Connected Clients"] == 0
        nursery.cancel_scope.cancel()


def test_a_client_that_stops_reading_is_told_what_it_missed(start_server: StartServer) -> None:
    """The client stops reading (its buffer of one record is full): the server's outbox fills,
    what cannot be delivered within delivery_timeout is counted in 'Undeliverable Records',
    and once the client reads again it gets every other record and a Notice (a RuntimeWarning,
    counted in conn.dropped): each record either arrives or is reported, none vanishes."""
    server = start_server(FLOOD_WORKFLOW)
    floods, count, size = 40, 50, 16384  # 32 MB in 40 batches
    total = floods * count
    with (
        connect(server.port, name="watcher") as watcher,
        connect(server.port, name="stuck", max_buffered=1, batch_size=2) as stuck,
    ):
        for _ in range(floods):  # batch_size=2: at most two commands a frame, 20+ batches back
            stuck.submit(b"flood:%d:%d" % (count, size))
        wait_for(lambda: watcher.mim()["Undeliverable Records"] > 0, what="a drop")
        received: list[bytes] = []

        def drain() -> None:
            deadline = time.monotonic() + 20
            while len(received) + stuck.dropped < total and time.monotonic() < deadline:
                received.extend(stuck.receive_many(timeout=0.5))
            # The reader thread counts a Notice, then warns: a round trip lets it finish.
            stuck.mim()

        with pytest.warns(RuntimeWarning, match=r"record\(s\) for this client were undeliverable"):
            drain()
        assert stuck.dropped > 0
        assert len(received) + stuck.dropped == total
        values = watcher.mim()
        assert values["Undeliverable Records"] == stuck.dropped
        assert values["Records Out"] == len(received)
        assert all(len(r) == size for r in received)  # what arrived arrived whole


def _peak_rss_mb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    raise AssertionError("no VmHWM")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_memory_stays_bounded_for_a_client_that_never_reads(start_server: StartServer) -> None:
    """256 MB routed to a client that never reads: the server holds at most its outbox (2
    batches of 8 MB here) and the socket buffers; the rest is counted undeliverable."""
    server = start_server(FLOOD_WORKFLOW)
    floods, count, size = 32, 500, 16384
    total = floods * count
    with connect(server.port, name="watcher") as watcher:
        baseline = _peak_rss_mb(server.proc.pid)
        stuck = RawSocket(server.port, rcvbuf=4096)
        try:
            command = bytes_batch([b"flood:%d:%d" % (count, size)])
            stuck.send(*[command] * floods)
            # All but what the outbox and the writer hold is counted undeliverable.
            wait_for(
                lambda: watcher.mim()["Undeliverable Records"] >= total - 3 * count,
                timeout=30,
                what="the flood is over",
            )
            growth = _peak_rss_mb(server.proc.pid) - baseline
            assert growth < floods * count * size / 2**20 / 2, f"peak RSS grew by {growth} MB"
        finally:
            stuck.reset()
        wait_for(lambda: connected_clients(watcher) == 1, what="the stuck client is gone")
        submit_and_flush_bytes(watcher)


def submit_and_flush_bytes(conn: mzconnector.Connection) -> None:
    conn.submit(b"still serving")
    conn.flush()
    assert conn.receive(timeout=10) == b"still serving"


def test_records_for_a_client_that_vanishes_mid_write_are_all_counted(
    start_server: StartServer,
) -> None:
    server = start_server(FLOOD_WORKFLOW)
    floods, count, size = 4, 500, 16384
    total = floods * count
    with connect(server.port, name="watcher") as watcher:
        stuck = RawSocket(server.port, rcvbuf=4096)
        stuck.send(*[bytes_batch([b"flood:%d:%d" % (count, size)])] * floods)
        # The writer is stuck on the first batch and the outbox holds two: once the write has
        # been stuck for delivery_timeout, what does not fit is dropped.
        wait_for(lambda: watcher.mim()["Undeliverable Records"] > 0, what="a drop")
        stuck.reset()
        wait_for(lambda: connected_clients(watcher) == 1, what="the stuck client is gone")
        values = watcher.mim()
        assert values["Records Out"] + values["Undeliverable Records"] == total, values


@pytest.mark.parametrize("how", ["close", "reset"])
def test_a_client_that_sends_half_a_frame_and_vanishes(
    start_server: StartServer, log: Log, how: str
) -> None:
    """It closes (FIN) or vanishes (reset, as when its host dies): the server closes its side,
    the records of its whole frames are processed, those of the half frame are not."""
    server = start_server(LOG_WORKFLOW)
    with connect(server.port, name="bystander") as bystander:
        half_frame_and_vanish(server.port, how)
        submit_and_flush(bystander, "bystander", range(5))
        wait_for(lambda: connected_clients(bystander) == 1, what="the half-frame client is gone")
        submit_and_flush(bystander, "bystander", range(5, 10))
        log.wait_for("raw", range(100))
        log.wait_for("bystander", range(10))
        assert log.seqs("raw") == list(range(100))  # whole frames only, each once
    assert server.stop()[0] == 0


def half_frame_and_vanish(port: int, how: str) -> None:
    raw = RawSocket(port)
    raw.send(rec_batch("raw", range(100)), Flush())
    assert raw.next_event() == Ack(100)
    half = bytes(encode_frame(rec_batch("raw", range(100, 200))))
    raw.sock.sendall(half[: len(half) // 2])
    raw.sock.close() if how == "close" else raw.reset()


@pytest.mark.parametrize("how", ["close", "reset"])
def test_a_client_that_vanishes_is_not_logged_as_a_server_failure(
    start_server: StartServer, log: Log, how: str
) -> None:
    server = start_server(LOG_WORKFLOW)
    with connect(server.port, name="bystander") as bystander:
        half_frame_and_vanish(server.port, how)
        wait_for(lambda: connected_clients(bystander) == 1, what="the half-frame client is gone")
    code, err = server.stop()
    assert code == 0
    assert "Traceback" not in err
    assert " ERROR " not in err


# -- faults --------------------------------------------------------------------------------------

VICTIM = """
import sys
import mzconnector

conn = mzconnector.connect("127.0.0.1", int(sys.argv[1]), timeout=10, name="victim")
Rec = conn.udrs.Rec
seq = 0
for _ in range(4):
    conn.submit_many(Rec(client="victim", seq=seq + i) for i in range(1000))
    seq += 1000
    conn.flush()
    print("acked", seq, flush=True)
while True:  # submit without flushing until killed: the kill lands in the middle of a batch
    conn.submit_many(Rec(client="victim", seq=seq + i) for i in range(5000))
    seq += 5000
"""


def test_a_client_killed_mid_batch(start_server: StartServer, log: Log) -> None:
    """Others are unaffected; every record the victim had acknowledged is processed, once;
    what it sent after that is processed only in whole frames, in order, without gaps."""
    server = start_server(LOG_WORKFLOW)
    victim = subprocess.Popen(
        [sys.executable, "-c", VICTIM, str(server.port)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        with connect(server.port, name="bystander") as bystander:
            assert victim.stdout is not None
            assert victim.stdout.readline().split() == ["acked", "1000"]
            submit_and_flush(bystander, "bystander", range(0, 500))
            for expected in (2000, 3000, 4000):
                assert victim.stdout.readline().split() == ["acked", str(expected)]
            # Wait until it has sent more than it acknowledged: it is busy sending batches.
            wait_for(lambda: bystander.mim()["Records In"] > 4500 + 5000, what="more sent")
            victim.kill()
            victim.wait(10)
            submit_and_flush(bystander, "bystander", range(500, 1000))
            wait_for(lambda: connected_clients(bystander) == 1, what="the victim is gone")
            log.wait_for("victim", range(4000))
            log.wait_for("bystander", range(1000))
            taken = bystander.mim()["Records In"] - 1000
            wait_for(lambda: len(log.seqs("victim")) == taken, what="all it sent processed")
            assert sorted(log.seqs("bystander")) == list(range(1000))
            victim_seqs = log.seqs("victim")
            assert victim_seqs == list(range(len(victim_seqs)))
            assert len(victim_seqs) >= 4000
    finally:
        victim.kill()
        victim.wait()
        victim.stdout.close()


def test_a_processor_that_raises(start_server: StartServer, log: Log) -> None:
    """The record and the error go to the log and the MIM counter; the workflow goes on."""
    server = start_server(LOG_WORKFLOW)
    with connect(server.port) as conn:
        Rec = conn.udrs.Rec
        conn.submit_many([Rec(client="e", seq=0), Rec(client="e", seq=-3), Rec(client="e", seq=1)])
        conn.flush()
        log.wait_for("e", range(2))
        assert conn.mim()["Processor Errors"] == 1
        submit_and_flush(conn, "e", range(2, 4))
        log.wait_for("e", range(4))
        assert log.seqs("e") == [0, 1, 2, 3]
        assert conn.mim()["Processor Errors"] == 1
    code, err = server.stop()
    assert code == 0
    [line] = [line for line in err.splitlines() if "processor 'log' failed" in line]
    assert "ValueError: negative seq -3" in line
    assert "Rec(client='e', seq=-3)" in line
    assert "Traceback" in err  # with the processor's traceback
    assert 'raise ValueError(f"negative seq {record.seq}")' in err


def test_server_stopped_under_load_loses_nothing_acknowledged(
    start_server: StartServer, log: Log
) -> None:
    """Clients submit and flush at random points while the server is stopped (SIGTERM).
    Every acknowledged record was processed exactly once; every other record submitted is
    either processed or in the client's ConnectionClosed.unacknowledged; nothing else."""
    server = start_server(LOG_WORKFLOW)
    workers = 4
    results: dict[int, tuple[int, int, list[int], BaseException | None]] = {}

    def work(k: int) -> None:
        rng = random.Random(k)
        acked = submitted = 0
        unacked: list[int] = []
        failure: BaseException | None = None
        try:
            with connect(server.port, name=f"w{k}") as conn:
                Rec = conn.udrs.Rec
                while True:
                    for _ in range(rng.randint(1, 400)):
                        conn.submit(Rec(client=f"w{k}", seq=submitted))
                        submitted += 1
                    if rng.random() < 0.5:
                        target = submitted
                        conn.flush(timeout=15)
                        acked = target
        except mzconnector.ConnectionClosed as exc:
            unacked = [r.seq for r in exc.unacknowledged]
        except BaseException as exc:
            failure = exc
        results[k] = (acked, submitted, unacked, failure)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(workers)]
    for thread in threads:
        thread.start()
    wait_for(lambda: len(log.lines()) >= 40_000, timeout=30, what="load")
    server.proc.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join(30)
        assert not thread.is_alive(), "a client call did not return after the server stopped"
    assert server.proc.wait(20) == 0
    lines = log.lines()
    assert len(lines) == len(set(lines)), "a record was processed twice"
    for k in range(workers):
        acked, submitted, unacked, failure = results[k]
        assert failure is None, repr(failure)
        assert acked > 0
        processed = set(log.seqs(f"w{k}"))
        assert set(range(acked)) <= processed, f"w{k}: acknowledged records were lost"
        assert processed <= set(range(submitted + 1))
        missing = set(range(submitted)) - processed
        assert missing <= set(unacked), f"w{k}: {len(missing - set(unacked))} silently lost"
        assert not set(unacked) & set(range(acked))


# -- a client that loses its server --------------------------------------------------------------


class PinnedServer:
    """``python -m mzserver`` on a given port (for a restart on the same port)."""

    def __init__(self, toml: str, port: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mzserver", toml, "--port", str(port), "--log-level", "WARNING"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.endswith(f":{port}\n"), line

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()


def lost_server_checks(conn: mzconnector.Connection, unacked: list[Any]) -> None:
    """Every call of a client whose server is gone raises ConnectionClosed at once (well
    within its timeout), with the records never acknowledged, in order."""
    for call in (
        lambda: conn.flush(timeout=5),
        lambda: conn.mim(timeout=5),
        lambda: conn.receive(),  # no timeout at all: must still not wait forever
        lambda: conn.receive_many(timeout=None),
        lambda: conn.submit(conn.udrs.Rec(client="late", seq=0)),
    ):
        error, took = returns_within(5, call)
        assert isinstance(error, mzconnector.ConnectionClosed), repr(error)
        assert error.unacknowledged == unacked
        assert took < 2
    assert list(conn.records(timeout=None)) == []  # ends, does not hang
    _, took = returns_within(5, conn.close)
    assert took < 2
    assert conn.closed


def test_a_killed_server(start_server: StartServer, log: Log) -> None:
    server = start_server(LOG_WORKFLOW)
    conn = connect(server.port, linger=60)  # submits stay buffered until a flush
    submit_and_flush(conn, "c", range(100))
    sent = recs(conn, "c", range(100, 150))
    conn.submit_many(sent)
    conn.receive_many()  # sends the buffer without waiting for an ack
    log.wait_for("c", range(150))
    later = recs(conn, "c", range(150, 160))
    conn.submit_many(later)
    # A call blocked on the server when it dies (receive without a timeout) is woken.
    box: list[Any] = []
    blocked = threading.Thread(target=lambda: box.append(_raised(conn.receive)))
    blocked.start()
    server.proc.kill()
    server.proc.wait()
    blocked.join(5)
    assert not blocked.is_alive()
    assert isinstance(box[0], mzconnector.ConnectionClosed)
    lost_server_checks(conn, sent + later)


def _raised(call: Callable[[], Any]) -> BaseException | None:
    try:
        call()
    except BaseException as exc:
        return exc
    return None


def test_a_restarted_server(start_server: StartServer, log: Log) -> None:
    first = start_server(LOG_WORKFLOW)
    port = first.port
    conn = connect(port, linger=60)
    submit_and_flush(conn, "c", range(10))
    pending = recs(conn, "c", range(10, 20))
    conn.submit_many(pending)
    first.proc.kill()
    first.proc.wait()
    second = PinnedServer(LOG_WORKFLOW, port)
    try:
        # The old connection does not silently carry on with the new server.
        lost_server_checks(conn, pending)
        with connect(port) as again:
            submit_and_flush(again, "again", range(5))
            assert again.mim()["Records In"] == 5  # the new server saw nothing of the old
        log.wait_for("again", range(5))
        assert log.seqs("c") == list(range(10))
    finally:
        second.stop()


def test_an_unresponsive_server(start_server: StartServer, log: Log) -> None:
    """A server that stops answering (SIGSTOP; on loopback it stands in for a cut network:
    the connection stays up but nothing comes back): every call with a timeout returns within
    it, close() too, and the records never acknowledged are then in ConnectionClosed."""
    server = start_server(LOG_WORKFLOW)
    conn = connect(server.port, timeout=1, linger=60)
    submit_and_flush(conn, "c", range(10))
    pending = recs(conn, "c", range(10, 20))
    conn.submit_many(pending)
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        error, took = returns_within(5, lambda: conn.receive(timeout=0.5))
        assert type(error) is mzconnector.Timeout  # no record is not a lost connection
        assert took < 2.5
        # No answer to a flush within its timeout: the connection is lost, and says what
        # was not acknowledged.
        error, took = returns_within(5, lambda: conn.flush(timeout=0.5))
        assert isinstance(error, mzconnector.ConnectionLost), repr(error)
        assert isinstance(error, mzconnector.Timeout)
        assert error.unacknowledged == pending
        assert took < 2.5
        for call in (conn.mim, conn.flush, lambda: conn.receive(timeout=0.5)):
            error, took = returns_within(5, call)
            assert isinstance(error, mzconnector.ConnectionClosed), repr(error)
            assert error.unacknowledged == pending
            assert took < 0.5
        _, took = returns_within(5, conn.close)
        assert took < 2.5
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)


def test_a_flush_on_a_cut_connection_raises_connection_closed(
    start_server: StartServer, log: Log
) -> None:
    server = start_server(LOG_WORKFLOW)
    conn = connect(server.port, timeout=1, linger=60)
    pending = recs(conn, "c", range(5))
    conn.submit_many(pending)
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        error, took = returns_within(5, conn.flush)
        assert took < 2.5
        assert isinstance(error, mzconnector.ConnectionClosed), repr(error)
        assert error.unacknowledged == pending
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
        conn.close()


def test_an_unresponsive_server_that_then_dies(start_server: StartServer, log: Log) -> None:
    """A call blocked without a timeout on a server that hangs and then dies is woken."""
    server = start_server(LOG_WORKFLOW)
    conn = connect(server.port, linger=60)
    conn.submit_many(pending := recs(conn, "c", range(5)))
    os.kill(server.proc.pid, signal.SIGSTOP)
    box: list[Any] = []
    blocked = threading.Thread(target=lambda: box.append(_raised(conn.receive)))
    blocked.start()
    server.proc.kill()
    server.proc.wait()
    blocked.join(5)
    assert not blocked.is_alive()
    assert isinstance(box[0], mzconnector.ConnectionClosed)
    assert box[0].unacknowledged == pending
    conn.close()


def test_a_cut_network_is_noticed_by_tcp_keepalive(echo_server: ServerProcess) -> None:
    """A cut network (no FIN, no reset) cannot be made on loopback without privileges; what
    makes the connection fail then is TCP keep-alive, set from the connect timeout."""
    with mzconnector.connect("127.0.0.1", echo_server.port, timeout=3) as conn:
        sock = conn._transport.sock
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        if hasattr(socket, "TCP_KEEPIDLE"):
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 3
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 1
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
