"""A client that survives (issue 12): failover over a list of servers, reconnection with
exactly-once resend (at-least-once across a server restart), the connection's states and their
callback, keepalive, tokens. End to end over loopback against the real server, with a proxy the
test controls standing for the network; the reconnect logic without sockets first."""

from __future__ import annotations

import asyncio
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import mzconnector
from mzconnector import ConnectionState as S
from tests.conftest import ROOT, WORKFLOWS, ServerProcess
from tests.test_connections import write_config
from tests.test_faults import LOG_WORKFLOW, Log, PinnedServer, returns_within, wait_for

StartServer = Callable[..., ServerProcess]
CONVERSATIONS = str(WORKFLOWS / "conversations.toml")
TOKEN = "tok-RECOGNISABLE-4f1e9c"


@pytest.fixture
def processed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Log:
    path = tmp_path / "processed.log"
    monkeypatch.setenv("MZ_REL_LOG", str(path))  # inherited by the servers started after it
    return Log(path)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Proxy:
    """A TCP proxy on 127.0.0.1 that the test controls: ``cut()`` ends every link (the server
    stays up), ``refusing`` closes new links at once (a server that is not there), ``frozen``
    forwards nothing and ends nothing (a peer behind a dead NAT, or stopped)."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.refusing = False
        self.frozen = False
        self.links = 0  # links accepted and forwarded
        self._socks: list[socket.socket] = []
        self._all: list[socket.socket] = []  # closed at the end
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.refusing:
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target))
            with self._lock:
                self._socks += [client, upstream]
                self._all += [client, upstream]
                self.links += 1
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                if not self.frozen:
                    dst.sendall(data)
        except OSError:
            pass
        if not self.frozen:
            self._end(src, dst)

    @staticmethod
    def _end(*socks: socket.socket) -> None:
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        """End every link now (each side sees the end of its stream)."""
        with self._lock:
            socks, self._socks = self._socks, []
        self._end(*socks)

    def close(self) -> None:
        self.listener.close()
        self.frozen = False
        self.cut()
        with self._lock:
            for sock in self._all:
                sock.close()


@pytest.fixture
def proxies() -> Iterator[Callable[[int], Proxy]]:
    made: list[Proxy] = []

    def make(target: int) -> Proxy:
        made.append(Proxy(target))
        return made[-1]

    yield make
    for proxy in made:
        proxy.close()


class States:
    """An ``on_state_change`` that remembers each change, the thread that told it, and whether
    it could take the connection's locks (it must never be called holding one)."""

    def __init__(self) -> None:
        self.seen: list[S] = []
        self.free: list[bool] = []
        self.changed = threading.Condition()

    def __call__(self, conn: Any, state: S) -> None:
        if isinstance(conn, mzconnector.Connection):
            free = conn._send_lock.acquire(timeout=5)
            if free:
                conn._send_lock.release()
            with conn._cond:
                pass
        else:
            free = not conn._send_lock.locked() and not conn._read_lock.locked()
        with self.changed:
            self.seen.append(state)
            self.free.append(free)
            self.changed.notify_all()

    def wait_for(self, state: S, count: int = 1, timeout: float = 10) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: self.seen.count(state) >= count, timeout), (
                self.seen
            )


def recs(conn: Any, client: str, seqs: range) -> list[Any]:
    return [conn.udrs.Rec(client=client, seq=i) for i in seqs]


# -- the reconnect logic, without sockets -----------------------------------------------------


def test_backoff_doubles_up_to_the_maximum_with_jitter_in_its_upper_half() -> None:
    life = mzconnector._Lifecycle(
        attempts=None, max_delay=2.0, first_delay=0.1, rng=random.Random(7)
    )
    assert life.delay(1) == 0.0  # the server may be back already
    for attempt, ceiling in [(2, 0.1), (3, 0.2), (4, 0.4), (5, 0.8), (6, 1.6), (7, 2.0), (40, 2.0)]:
        delays = {life.delay(attempt) for _ in range(200)}
        assert all(ceiling / 2 <= d <= ceiling for d in delays), (attempt, delays)
        assert len(delays) > 100  # jittered: the clients of one server spread out
    assert not life.exhausted(10**6)
    limited = mzconnector._Lifecycle(attempts=3, max_delay=1.0)
    assert [limited.exhausted(n) for n in (1, 2, 3)] == [False, False, True]
    with pytest.raises(ValueError, match="reconnect_attempts"):
        mzconnector._Lifecycle(attempts=0, max_delay=1.0)


def test_states_change_only_along_the_table() -> None:
    life = mzconnector._Lifecycle(attempts=None, max_delay=1.0)
    for state in [S.CONNECTED, S.RECONNECTING, S.CONNECTED, S.DISCONNECTING, S.DISCONNECTED]:
        assert life.change(state)
    assert not life.change(S.DISCONNECTED)  # there already: no change told
    assert list(life.changes) == [
        S.CONNECTING,
        S.CONNECTED,
        S.RECONNECTING,
        S.CONNECTED,
        S.DISCONNECTING,
        S.DISCONNECTED,
    ]
    with pytest.raises(RuntimeError, match="DISCONNECTED to CONNECTED"):
        life.change(S.CONNECTED)


def test_server_lists_are_read_as_people_write_them() -> None:
    assert mzconnector._addresses("a:1|b|[::1]:3", 7777) == [("a", 1), ("b", 7777), ("::1", 3)]
    assert mzconnector._addresses(["a:1", "b:2"], 9) == [("a", 1), ("b", 2)]
    with pytest.raises(ValueError, match="no valid port"):
        mzconnector._addresses("a:99999", 1)
    with pytest.raises(ValueError, match="at least one server"):
        mzconnector._addresses([], 1)


def test_a_changed_schema_is_said_in_words() -> None:
    old = {"Rec": {"client": "str", "seq": "int"}, "Gone": {"x": "int"}}
    new = {"Rec": {"client": "str", "seq": "str", "extra": "int"}, "New": {"y": "int"}}
    assert mzconnector._schema_changes(old, new) == [
        "type Gone was removed",
        "type New was added",
        "Rec.seq changed from int to str",
        "Rec.extra was added (int)",
    ]
    assert mzconnector._schema_changes(old, old) == []


# -- failover over a list of servers ------------------------------------------------------------


def test_a_list_is_tried_in_random_order_until_one_answers(start_server: StartServer) -> None:
    server = start_server()
    dead = free_port()
    dialer_orders = set()
    for text in [f"127.0.0.1:{dead}|127.0.0.1:{server.port}"] * 20:
        dialer = mzconnector._Dialer(
            text, 1, timeout=5, name="", metadata=None, client_id="", client="t", token=None,
            keepalive=0, keepalive_misses=0, tls=False, cafile=None, certfile=None,
            keyfile=None, server_hostname=None,
        )  # fmt: skip
        dialer_orders.add(tuple(dialer.order()))
    assert len(dialer_orders) == 2  # both orders (20 draws of a coin: 2**-19 to fail)
    for _ in range(4):
        with mzconnector.connect([f"127.0.0.1:{dead}", f"127.0.0.1:{server.port}"]) as conn:
            assert conn.state is S.CONNECTED


def test_when_no_server_answers_the_error_names_each_and_why(start_server: StartServer) -> None:
    refused = free_port()
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never answers
        silent_port = silent.getsockname()[1]
        with pytest.raises(mzconnector.ConnectError) as info:
            mzconnector.connect(f"127.0.0.1:{refused}|127.0.0.1:{silent_port}", timeout=0.5)
    message = str(info.value)
    assert message.startswith("cannot connect to any of 2 servers: ")
    assert f"127.0.0.1:{refused}: cannot connect to 127.0.0.1:{refused}: " in message
    assert (
        f"127.0.0.1:{silent_port}: no answer from 127.0.0.1:{silent_port} within 0.5 s" in message
    )
    assert [where for where, _ in info.value.failures] in (  # type: ignore[attr-defined]
        [f"127.0.0.1:{refused}", f"127.0.0.1:{silent_port}"],
        [f"127.0.0.1:{silent_port}", f"127.0.0.1:{refused}"],
    )


# -- reconnection: nothing lost, nothing doubled -------------------------------------------------


def test_a_killed_and_restarted_server_loses_nothing(
    start_server: StartServer, processed: Log
) -> None:
    """SIGKILL mid-push, restart on the same port: every record is processed at least once
    (the new server cannot know what the dead one took but had not acknowledged)."""
    first = start_server(LOG_WORKFLOW)
    port = first.port
    states = States()
    conn = mzconnector.connect(
        "127.0.0.1", port, timeout=5, auto_reconnect=True, reconnect_max_delay=0.2,
        linger=60, on_state_change=states,
    )  # fmt: skip
    conn.submit_many(recs(conn, "k", range(300)))
    conn.flush()
    conn.submit_many(recs(conn, "k", range(300, 500)))
    conn.receive_many()  # sent, not acknowledged
    first.proc.kill()
    first.proc.wait()
    states.wait_for(S.RECONNECTING)
    conn.submit_many(recs(conn, "k", range(500, 600)))  # buffered while the link is down
    second = PinnedServer(LOG_WORKFLOW, port)
    try:
        conn.flush(timeout=10)
        states.wait_for(S.CONNECTED, 2)
        conn.close()
        seqs = processed.seqs("k")
        assert set(seqs) == set(range(600))  # at least once
        assert sorted(set(seqs[: seqs.index(299) + 1])) == list(range(300))
    finally:
        second.stop()
    assert states.seen == [S.CONNECTING, S.CONNECTED, S.RECONNECTING, S.CONNECTED,
                           S.DISCONNECTING, S.DISCONNECTED]  # fmt: skip
    assert all(states.free)


@pytest.mark.parametrize("client", ["blocking", "trio", "asyncio"])
def test_a_cut_link_resends_and_every_record_is_processed_exactly_once(
    client: str, start_server: StartServer, processed: Log, proxies: Callable[[int], Proxy]
) -> None:
    server = start_server(LOG_WORKFLOW)
    proxy = proxies(server.port)
    options = dict(timeout=5, auto_reconnect=True, reconnect_max_delay=0.05)
    if client == "blocking":
        conn = mzconnector.connect("127.0.0.1", proxy.port, linger=60, **options)
        for block in range(6):
            conn.submit_many(recs(conn, "x", range(block * 1000, block * 1000 + 1000)))
            conn.receive_many()  # sent, not waited for
            proxy.cut()  # mid-stream: some taken, some in flight, none acknowledged
            if block % 2:
                conn.flush()
        conn.flush()
        assert conn.state is S.CONNECTED
        conn.close()
    else:

        async def main() -> None:
            conn = await mzconnector.connect_async("127.0.0.1", proxy.port, **options)
            async with conn:
                for block in range(6):
                    await conn.submit_many(
                        recs(conn, "x", range(block * 1000, block * 1000 + 1000))
                    )
                    proxy.cut()
                    if block % 2:
                        await conn.flush()
                await conn.flush()
                assert conn.state is S.CONNECTED

        anyio.run(main, backend=client)
    seqs = processed.seqs("x")
    assert sorted(seqs) == list(range(6000))  # exactly once
    assert proxy.links >= 4


@pytest.mark.parametrize("client", ["blocking", "asyncio"])
def test_dataframes_sent_across_a_cut_link_are_processed_exactly_once(
    client: str, start_server: StartServer, processed: Log, proxies: Callable[[int], Proxy]
) -> None:
    """Column batches (``submit_frame``) are numbered and resent like records."""
    pd = pytest.importorskip("pandas")
    server = start_server(LOG_WORKFLOW)
    proxy = proxies(server.port)
    options = dict(timeout=5, auto_reconnect=True, reconnect_max_delay=0.05)

    def block(i: int) -> Any:
        return pd.DataFrame({"client": "f", "seq": range(i * 1000, i * 1000 + 1000)})

    if client == "blocking":
        with mzconnector.connect("127.0.0.1", proxy.port, **options) as conn:
            for i in range(6):
                conn.submit_frame(block(i), "Rec")
                proxy.cut()  # mid-stream: some taken, some in flight, none acknowledged
                if i % 2:
                    conn.flush()
            conn.flush()
            assert conn.state is S.CONNECTED
    else:

        async def main() -> None:
            conn = await mzconnector.connect_async("127.0.0.1", proxy.port, **options)
            async with conn:
                for i in range(6):
                    await conn.submit_frame(block(i), "Rec")
                    proxy.cut()
                    if i % 2:
                        await conn.flush()
                await conn.flush()

        anyio.run(main, backend=client)
    assert sorted(processed.seqs("f")) == list(range(6000))  # exactly once
    assert proxy.links >= 4


def test_calls_while_reconnecting_wait_bounded_and_receive_keeps_what_was_buffered(
    start_server: StartServer, processed: Log, proxies: Callable[[int], Proxy]
) -> None:
    server = start_server(LOG_WORKFLOW)
    proxy = proxies(server.port)
    states = States()
    conn = mzconnector.connect(
        "127.0.0.1", proxy.port, timeout=5, auto_reconnect=True, reconnect_max_delay=0.05,
        on_state_change=states,
    )  # fmt: skip
    conn.submit(b"flood:3:16")
    conn.flush()
    assert conn.receive(timeout=5)[:8] == b"00000000"
    wait_for(lambda: len(conn._inbox) == 2, 5, "the other two buffered")
    proxy.refusing = True
    proxy.cut()
    states.wait_for(S.RECONNECTING)
    # What was buffered is there while reconnecting.
    assert [r[:8] for r in conn.receive_many()] == [b"00000001", b"00000002"]
    for call in (lambda: conn.flush(timeout=0.3), lambda: conn.mim(timeout=0.3)):
        error, took = returns_within(5, call)
        assert type(error) is mzconnector.Timeout, repr(error)
        assert "reconnecting" in str(error)
        assert 0.25 < took < 2
    error, took = returns_within(5, lambda: conn.receive(timeout=0.3))
    assert isinstance(error, mzconnector.Timeout)
    assert conn.state is S.RECONNECTING
    conn.submit(conn.udrs.Rec(client="w", seq=1))
    proxy.refusing = False
    assert conn.mim(timeout=5)["Records In"] >= 1  # waits for the link, then asks
    conn.flush()
    processed.wait_for("w", [1])
    conn.close()
    assert all(states.free)


def test_without_auto_reconnect_a_cut_link_is_final_and_reconnect_brings_it_back(
    start_server: StartServer, processed: Log, proxies: Callable[[int], Proxy]
) -> None:
    server = start_server(LOG_WORKFLOW)
    proxy = proxies(server.port)
    conn = mzconnector.connect("127.0.0.1", proxy.port, timeout=5, linger=60)
    conn.submit_many(recs(conn, "r", range(10)))
    conn.flush()
    proxy.cut()
    with pytest.raises(mzconnector.ConnectionClosed):
        conn.receive(timeout=5)
    assert conn.state is S.DISCONNECTED
    conn.reconnect()
    assert conn.state is S.CONNECTED
    conn.submit_many(recs(conn, "r", range(10, 20)))
    conn.flush()
    conn.close()
    assert sorted(processed.seqs("r")) == list(range(20))


# -- what a reconnection re-establishes, and what it ends ----------------------------------------


@pytest.mark.parametrize("client", ["blocking", "trio"])
def test_subscriptions_are_made_again_and_queries_in_flight_end_naming_themselves(
    client: str, start_server: StartServer, proxies: Callable[[int], Proxy]
) -> None:
    server = start_server(CONVERSATIONS)
    proxy = proxies(server.port)
    options = dict(timeout=5, auto_reconnect=True, reconnect_max_delay=0.05)
    # The workflow replies once, then holds the query until the map "gates" has its topic.
    question = {"topic": "held", "count": 2}
    if client == "blocking":
        conn = mzconnector.connect("127.0.0.1", proxy.port, **options)
        sub = conn.subscribe("alerts")
        conn.submit(b"emit:1:60")
        assert sub.receive(timeout=5).value == 60.0
        replies = conn.query("stream", question, timeout=10)
        assert next(replies).n == 0  # in flight now
        proxy.cut()
        with pytest.raises(mzconnector.ConnectionLost) as info:
            next(replies)
        assert "query 'stream' was in flight when the connection was lost" in str(info.value)
        conn.submit(b"emit:2:70")
        assert [sub.receive(timeout=5).value for _ in range(2)] == [70.0, 70.0]
        conn.close()
        return

    async def main() -> None:
        async with await mzconnector.connect_async("127.0.0.1", proxy.port, **options) as conn:
            sub = await conn.subscribe("alerts")
            conn.submit(b"emit:1:60")
            await conn.flush()
            assert (await sub.receive(timeout=5)).value == 60.0
            replies = conn.query("stream", question, timeout=10)
            assert (await replies.__anext__()).n == 0  # in flight now
            proxy.cut()
            with pytest.raises(mzconnector.ConnectionLost, match="query 'stream' was in flight"):
                await replies.__anext__()
            conn.submit(b"emit:2:70")
            await conn.flush()
            assert [(await sub.receive(timeout=5)).value for _ in range(2)] == [70.0, 70.0]

    anyio.run(main, backend="trio")


def test_a_server_back_with_other_types_is_a_clear_error(
    start_server: StartServer, processed: Log, tmp_path: Path
) -> None:
    first = start_server(LOG_WORKFLOW)
    changed = tmp_path / "changed.toml"
    changed.write_text(
        (WORKFLOWS / "rel_log.toml").read_text().replace('seq = "int"', 'seq = "str"')
    )
    (tmp_path / "rel_log.py").write_text((WORKFLOWS / "rel_log.py").read_text())
    states = States()
    conn = mzconnector.connect(
        "127.0.0.1", first.port, timeout=5, auto_reconnect=True, reconnect_max_delay=0.05,
        on_state_change=states,
    )  # fmt: skip
    first.proc.kill()
    first.proc.wait()
    second = PinnedServer(str(changed), first.port)
    try:
        states.wait_for(S.DISCONNECTED)
        with pytest.raises(mzconnector.SchemaChanged) as info:
            conn.flush()
        assert info.value.changes == ["Rec.seq changed from int to str"]
        assert "record types changed while reconnecting: Rec.seq changed from int to str" in str(
            info.value
        )
        conn.close()
    finally:
        second.stop()


# -- keepalive ----------------------------------------------------------------------------------


@pytest.mark.parametrize("client", ["blocking", "asyncio"])
def test_keepalive_notices_a_frozen_server(
    client: str, start_server: StartServer, proxies: Callable[[int], Proxy]
) -> None:
    server = start_server()
    proxy = proxies(server.port)
    options = dict(timeout=5, keepalive=0.1, keepalive_misses=2)
    if client == "blocking":
        conn = mzconnector.connect("127.0.0.1", proxy.port, **options)
        conn.mim()
        proxy.frozen = True
        error, took = returns_within(10, lambda: conn.receive())  # no timeout: no traffic
        assert isinstance(error, mzconnector.ConnectionLost), repr(error)
        assert "no answer from the server to 2 pings, 0.1 s apart" in str(error)
        assert took < 2
        assert conn.state is S.DISCONNECTED
        conn.close()
        return

    async def main() -> None:
        conn = await mzconnector.connect_async("127.0.0.1", proxy.port, **options)
        await conn.mim()
        proxy.frozen = True
        with pytest.raises(mzconnector.ConnectionLost, match=r"to 2 pings, 0\.1 s apart"):
            await asyncio.wait_for(conn.receive(), 5)
        await conn.aclose()

    asyncio.run(main())


def test_keepalive_reconnects_past_a_frozen_link(
    start_server: StartServer, proxies: Callable[[int], Proxy]
) -> None:
    server = start_server()
    proxy = proxies(server.port)
    states = States()
    conn = mzconnector.connect(
        "127.0.0.1", proxy.port, timeout=5, keepalive=0.1, keepalive_misses=2,
        auto_reconnect=True, reconnect_max_delay=0.05, on_state_change=states,
    )  # fmt: skip
    proxy.frozen = True  # the links there are now dead; new ones are fine
    states.wait_for(S.RECONNECTING)
    proxy.frozen = False
    states.wait_for(S.CONNECTED, 2)
    conn.submit(b"alive")
    assert conn.receive(timeout=5) == b"alive"
    conn.close()


def frozen_raw_client(port: int) -> Callable[[], None]:
    """A client that asks for keepalive, is welcomed, then never sends a byte again (it reads
    nothing either, as a frozen process): it answers no ping. Returns what closes it."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    protocol = mzconnector.Protocol(mzconnector.Role.CLIENT)
    hello = mzconnector.Hello(
        mzconnector.PROTOCOL_VERSION, name="frozen", metadata={"token": "secret"}, keepalive=0.2
    )
    sock.sendall(protocol.send(hello))
    while (event := protocol.next_event()) is mzconnector.NEED_DATA:
        protocol.receive_data(sock.recv(1 << 16))
    assert isinstance(event, mzconnector.Welcome), event
    assert event.keepalive == 0.2  # the server pings it
    return sock.close


def stopped_client_process(port: int) -> Callable[[], None]:
    """A real client process with keepalive on, connected, then stopped with SIGSTOP."""
    code = (
        "import sys, mzconnector\n"
        f"conn = mzconnector.connect('127.0.0.1', {port}, name='frozen', keepalive=0.2,\n"
        "    metadata={'token': 'secret'})\n"
        "print('connected', flush=True)\n"
        "sys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    assert proc.stdout.readline() == "connected\n"
    proc.send_signal(signal.SIGSTOP)

    def end() -> None:
        proc.kill()  # a stopped process is killed all the same
        proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            assert pipe is not None
            pipe.close()

    return end


@pytest.mark.parametrize("freeze", [frozen_raw_client, stopped_client_process])
def test_the_server_ends_a_frozen_client_and_frees_its_slot(
    freeze: Callable[[int], Callable[[], None]], start_server: StartServer, tmp_path: Path
) -> None:
    """The server pings a client that asked for keepalive; after keepalive_misses unanswered
    pings it ends the connection, tells the workflow (connection control), and the slot of a
    full server is free for a new client."""
    config = write_config(
        tmp_path, "max_connections = 1\nkeepalive = 0.2\nkeepalive_misses = 2", control=True
    )
    server = start_server(str(config))
    end = freeze(server.port)
    try:
        with pytest.raises(mzconnector.ConnectionRefused, match=r"limit \(1\)"):
            mzconnector.connect("127.0.0.1", server.port, metadata={"token": "secret"})

        def admitted() -> mzconnector.Connection | None:
            try:
                return mzconnector.connect("127.0.0.1", server.port, metadata={"token": "secret"})
            except mzconnector.ConnectionLimitReached:
                return None

        # Given up 3 to 4 intervals after the last thing heard (a busy VM may take longer).
        took = time.monotonic()
        with wait_for(admitted, what="a free slot") as conn:
            took = time.monotonic() - took
            mim = wait_for(lambda: (m := conn.mim())["Ended"] and m, what="the workflow told")
            assert (mim["Ended"], mim["Last Ended"]) == (1, "frozen")
            assert mim["Connected Clients"] == 1  # the new client only
        assert took < 5
    finally:
        end()
    _, log = server.stop()
    assert "no answer to 2 pings, 0.2 s apart; closing" in log


# -- tokens -------------------------------------------------------------------------------------


def auth_workflow(tmp_path: Path, table: str) -> str:
    toml = tmp_path / "auth.toml"
    toml.write_text(
        "[workflow]\nname = 'auth'\n[connector]\naccepted_types = ['bytes']\n"
        "input_routes = ['back']\noutput_routes = { bytes = 'in' }\n"
        f"{table}\n"
        "[[processors]]\nname = 'who'\nentry = 'who.py:who'\nroutes = ['in']\n"
    )
    (tmp_path / "who.py").write_text(
        "def who(record, ctx):\n    ctx.route('back', repr(ctx.connection.user).encode())\n"
    )
    return str(toml)


def test_tokens_from_the_file_name_the_user_and_never_show(
    start_server: StartServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = start_server(
        auth_workflow(tmp_path, f"[connector.auth.tokens]\nalice = '{TOKEN}'\n"),
        "--log-level",
        "DEBUG",
    )
    outputs: list[str] = []
    with mzconnector.connect("127.0.0.1", server.port, token=TOKEN) as conn:
        conn.submit(b"who")
        assert conn.receive(timeout=5) == b"'alice'"
        outputs += [repr(conn), str(conn), repr(conn._dialer), repr(conn._dialer._hello)]
    for wrong in ("tok-wrong", "", None):
        with pytest.raises(mzconnector.AuthenticationFailed) as info:
            mzconnector.connect("127.0.0.1", server.port, token=wrong)
        assert str(info.value).endswith("refused the connection: authentication failed")
        assert isinstance(info.value, mzconnector.ConnectionRefused)
        outputs += [str(info.value), repr(info.value)]
    outputs += [server.stop()[1], server.banner, *capsys.readouterr()]
    for text in outputs:
        assert TOKEN not in text, text


def test_a_token_from_the_environment_serves_both_sides(
    start_server: StartServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MZCONNECTOR_AUTH_TOKEN", TOKEN)
    server = start_server(auth_workflow(tmp_path, ""))  # no [connector.auth]: the variable
    with mzconnector.connect("127.0.0.1", server.port) as conn:  # no token=: the variable
        conn.submit(b"who")
        assert conn.receive(timeout=5) == b"''"  # one shared token: no name
    monkeypatch.delenv("MZCONNECTOR_AUTH_TOKEN")
    with pytest.raises(mzconnector.AuthenticationFailed):
        mzconnector.connect("127.0.0.1", server.port)
    _, log = server.stop()
    assert TOKEN not in log


# -- errors that keep what the server said --------------------------------------------------------


def test_errors_from_the_server_keep_its_message_as_raw_and_show_it(
    start_server: StartServer, tmp_path: Path
) -> None:
    """``err.raw`` is the decoded frame the server sent; ``repr(err)`` shows the class and the
    server's words. Errors of this side have no ``raw``."""
    server = start_server(auth_workflow(tmp_path, f"[connector.auth]\ntoken = '{TOKEN}'\n"))
    with pytest.raises(mzconnector.AuthenticationFailed) as refused:
        mzconnector.connect("127.0.0.1", server.port, token="tok-wrong")
    assert refused.value.raw == mzconnector.Refuse("auth", "authentication failed")
    assert repr(refused.value).startswith("AuthenticationFailed('127.0.0.1:")
    assert repr(refused.value).endswith(
        "refused the connection: authentication failed', "
        "raw=Refuse(code='auth', reason='authentication failed'))"
    )

    echo = start_server(str(WORKFLOWS / "example.toml"))
    with mzconnector.connect("127.0.0.1", echo.port, timeout=5) as conn:
        conn.submit(conn.udrs.Subscriber(msisdn="1", balance="one"))  # the server checks
        with pytest.raises(mzconnector.RecordRefused) as records:
            conn.flush()
        error = mzconnector.RecordError(0, "Subscriber", "balance", "expected int, got str 'one'")
        assert records.value.raw == mzconnector.Refused([error], 0)
        assert repr(records.value) == (
            'RecordRefused("1 record(s) were refused: record #0 (Subscriber.balance): '
            "expected int, got str 'one'\", raw=Refused(errors=[RecordError(index=0, "
            "type='Subscriber', field='balance', message=\"expected int, got str 'one'\")], "
            "omitted=0))"
        )
        # A client that breaks the protocol (a frame that is not msgpack): the server says
        # so in an Error frame and closes; the next call raises ConnectionClosed with it.
        conn._link[0].send(struct.pack(">I", 3) + b"\xc1\xc1\xc1")
        with pytest.raises(mzconnector.ConnectionClosed) as closed:
            conn.mim()  # a call that waits for the server's answer
    raw = closed.value.raw
    assert isinstance(raw, mzconnector.Error), repr(raw)
    assert raw.message.startswith("malformed frame")
    assert str(closed.value) == f"the server reported an error: {raw.message}"
    assert repr(closed.value) == f"ConnectionClosed({str(closed.value)!r}, raw={raw!r})"
    assert 'raw=Error(message="malformed frame: MessagePack data is malformed' in repr(closed.value)
    local = mzconnector.NotAccepted("nothing from the server")
    assert (local.raw, repr(local)) == (None, "NotAccepted('nothing from the server')")
