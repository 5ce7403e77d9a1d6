"""Security: the server never unpickles or evaluates what a client sends, and a connection limit
holds under a connect storm with a clear refusal for everyone it turns away.

(TLS with required client certificates is tested in test_connections.py.)
"""

from __future__ import annotations

import ast
import pickle
import resource
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

import mzconnector
from mzconnector import (
    MAGIC,
    NEED_DATA,
    PROTOCOL_VERSION,
    Ack,
    Closed,
    Error,
    Flush,
    Hello,
    Protocol,
    Records,
    Refused,
    Role,
    Welcome,
    encode_frame,
)
from tests.conftest import ROOT, WORKFLOWS, ServerProcess

StartServer = Callable[..., ServerProcess]
HEADER_SIZE = 4


class Exploit:
    """Unpickling this runs code: it writes ``marker`` (``how``: via exec, or a shell)."""

    def __init__(self, marker: Path, how: str) -> None:
        self.marker = marker
        self.how = how

    def __reduce__(self) -> tuple[Any, ...]:
        if self.how == "exec":
            return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))
        import os

        return (os.system, (f"touch '{self.marker}'",))


def exploits(tmp_path: Path, name: str) -> tuple[Path, list[bytes]]:
    """A marker path and pickles that create it when unpickled (protocol 2 and the newest)."""
    marker = tmp_path / f"{name}.pwned"
    payloads = [
        pickle.dumps(Exploit(marker, how), protocol=protocol)
        for how in ("exec", "shell")
        for protocol in (2, pickle.HIGHEST_PROTOCOL)
    ]
    return marker, payloads


def test_the_exploits_are_live(tmp_path: Path) -> None:
    """The pickles really run code when unpickled (in a throwaway process): the tests below
    would see their marker if anything unpickled them."""
    marker, payloads = exploits(tmp_path, "canary")
    for payload in payloads:
        script = "import pickle, sys; pickle.loads(bytes.fromhex(sys.argv[1]))"
        subprocess.run([sys.executable, "-c", script, payload.hex()], check=True)
        assert marker.exists()
        marker.unlink()


class RawSocket:
    def __init__(self, port: int, *, hello: Hello | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.settimeout(10)
        self.protocol = Protocol(Role.CLIENT)
        if hello is not None:
            self.sock.sendall(self.protocol.send(hello))
            assert isinstance(self.next_event(), Welcome)
        else:
            self.protocol.send(Hello(PROTOCOL_VERSION))  # so that it expects the answer

    def next_event(self) -> Any:
        while (event := self.protocol.next_event()) is NEED_DATA:
            self.protocol.receive_data(self.sock.recv(1 << 16))
        return event

    def events_until_closed(self) -> list[Any]:
        events = []
        while not isinstance(event := self.next_event(), Closed):
            events.append(event)
        self.sock.close()
        return events


def frame(body: bytes) -> bytes:
    return len(body).to_bytes(HEADER_SIZE, "big") + body


def test_a_pickle_in_a_bytes_record_is_only_bytes(
    echo_server: ServerProcess, tmp_path: Path
) -> None:
    """The echo workflow takes bytes: a pickle travels as bytes, to the processor and back,
    and nothing unpickles it, on the server or in the client."""
    marker, payloads = exploits(tmp_path, "record")
    with mzconnector.connect("127.0.0.1", echo_server.port, timeout=10) as conn:
        conn.submit_many(payloads)
        conn.flush()
        assert [conn.receive(timeout=10) for _ in payloads] == payloads
        assert conn.mim()["Records In"] == len(payloads)
    code, err = echo_server.stop()
    assert code == 0
    assert not marker.exists(), "a client's pickle was unpickled"
    assert "Traceback" not in err


def test_pickles_instead_of_messages_are_refused(
    echo_server: ServerProcess, tmp_path: Path
) -> None:
    """A frame whose body is a pickle, before and after the hello; a batch that is a pickle;
    a record tagged as the server's own pickled objects; a pickle and code in the metadata.
    Each is refused or taken as plain data; nothing runs; the server goes on."""
    marker, payloads = exploits(tmp_path, "frame")
    port = echo_server.port
    hello = Hello(PROTOCOL_VERSION, name="mallory")
    for payload in payloads:
        # A pickle where the hello should be (after the magic).
        raw = RawSocket(port)
        raw.sock.sendall(MAGIC + frame(payload))
        [error] = raw.events_until_closed()
        assert isinstance(error, Error)
        assert error.message.startswith("malformed frame")

        # A pickle as a message after the hello.
        raw = RawSocket(port, hello=hello)
        raw.sock.sendall(frame(payload))
        [error] = raw.events_until_closed()
        assert isinstance(error, Error)
        assert error.message.startswith("malformed frame")

        # A Records message whose batch is a pickle.
        raw = RawSocket(port, hello=hello)
        raw.sock.sendall(encode_frame(Records(msgspec.Raw(payload))))
        [error] = raw.events_until_closed()
        assert isinstance(error, Error)
        assert error.message.startswith("malformed")

        # A record in the wire form of the objects the server pickles for clients
        # (mzconnector.Pickled, tag "__pickled__"): clients unpickle those, a server must not.
        raw = RawSocket(port, hello=hello)
        items = msgspec.msgpack.encode([["__pickled__", payload], b"plain"])
        raw.sock.sendall(encode_frame(Records(msgspec.Raw(items))) + encode_frame(Flush()))
        events = []
        while not isinstance(event := raw.next_event(), Ack):
            events.append(event)
        raw.sock.close()
        assert event == Ack(2)
        [refused] = [e for e in events if isinstance(e, Refused)]
        [(index, kind, problem)] = [(e.index, e.type, e.message) for e in refused.errors]
        assert (index, kind) == (0, "__pickled__")
        assert "unknown record type" in problem
        echoed = [msgspec.msgpack.decode(e.items) for e in events if isinstance(e, Records)]
        assert echoed == [[b"plain"]]  # the other record went through, as bytes

    # A pickle and Python source in the hello's metadata are kept as data.
    code = f"__import__('os').system('touch {marker}')"
    raw = RawSocket(
        port,
        hello=Hello(PROTOCOL_VERSION, name=code, metadata={"p": payloads[0], "code": code}),
    )
    raw.sock.close()

    with mzconnector.connect("127.0.0.1", port, timeout=10) as conn:
        conn.submit(b"still serving")
        assert conn.receive(timeout=10) == b"still serving"
    code_, err = echo_server.stop()
    assert code_ == 0
    assert not marker.exists(), "a client's pickle was unpickled or its code evaluated"
    assert "Traceback" not in err


_UNPICKLERS = {"pickle", "cloudpickle", "marshal", "dill", "shelve"}
_EVALUATORS = {"eval", "exec", "compile", "__import__"}
#: What mzconnector offers the client to load the server's pickles: never for a server.
_CLIENT_ONLY = {"_decode_items", "UnloadableObject"}


def test_the_server_code_has_no_way_to_unpickle_or_evaluate() -> None:
    """Beside the behaviour above, the source: no module of the server calls an unpickler or
    eval/exec/compile, uses the client's loader of pickled objects, or builds a record decoder
    that admits pickled objects (``RecordCodec.decoder(..., pickled=True)``)."""
    found = []
    for path in sorted((ROOT / "server").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Call):
                func = node.func
                if isinstance(func, ast.Name) and func.id in _EVALUATORS:
                    found.append(f"{where}: {func.id}()")
                if (
                    isinstance(func, ast.Attribute)
                    and isinstance(func.value, ast.Name)
                    and func.value.id in _UNPICKLERS
                    and func.attr in ("load", "loads", "Unpickler")
                ):
                    found.append(f"{where}: {func.value.id}.{func.attr}()")
                for keyword in node.keywords:
                    constant = keyword.value
                    if keyword.arg == "pickled" and not (
                        isinstance(constant, ast.Constant) and constant.value is False
                    ):
                        found.append(f"{where}: a decoder with pickled=...")
            elif isinstance(node, ast.Name) and node.id in _CLIENT_ONLY:
                found.append(f"{where}: {node.id}")
            elif isinstance(node, ast.alias) and node.name.split(".")[-1] in _CLIENT_ONLY:
                found.append(f"{where}: imports {node.name}")
    assert found == [], found


# -- a connect storm -----------------------------------------------------------------------------


def raise_fd_limit(wanted: int) -> None:
    """Room for the storm's sockets, in this process and the server it starts."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        if target < wanted:
            pytest.skip(f"needs {wanted} open files, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


@pytest.fixture
def fd_limit() -> Any:
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    raise_fd_limit(4096)
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, before)


def test_the_connection_limit_holds_under_a_connect_storm(
    start_server: StartServer, fd_limit: None
) -> None:
    """500 clients connect at the same moment to a connector that takes 20: exactly 20 are
    welcomed, every other one gets ConnectionRefused naming the limit (no timeout, no reset),
    and the slots come back when the 20 leave."""
    limit, attempts = 20, 500
    server = start_server(str(WORKFLOWS / "rel_storm.toml"))
    start = threading.Barrier(attempts)
    leave = threading.Event()
    lock = threading.Lock()
    all_answered = threading.Event()
    results: list[Any] = [None] * attempts
    answered = 0

    def attempt(i: int) -> None:
        nonlocal answered
        start.wait()
        try:
            result: Any = mzconnector.connect("127.0.0.1", server.port, timeout=30, name=f"s{i}")
        except Exception as exc:
            result = exc
        results[i] = result
        with lock:
            answered += 1
            if answered == attempts:
                all_answered.set()
        if isinstance(result, mzconnector.Connection):
            leave.wait(60)  # hold the slot until every attempt has its answer
            result.close()

    threads = [threading.Thread(target=attempt, args=(i,), daemon=True) for i in range(attempts)]
    for thread in threads:
        thread.start()
    try:
        assert all_answered.wait(60), f"{attempts - answered} attempts got no answer"
        accepted = [r for r in results if isinstance(r, mzconnector.Connection)]
        refused = [r for r in results if not isinstance(r, mzconnector.Connection)]
        assert len(accepted) == limit
        assert len(refused) == attempts - limit
        for error in refused:
            assert isinstance(error, mzconnector.ConnectionRefused), repr(error)
            assert f"the connection limit ({limit}) is reached" in str(error)
        values = accepted[0].mim()
        assert values["Connected Clients"] == limit
        assert values["Connections Accepted"] == limit
        assert values["Connections Refused"] == attempts - limit
    finally:
        leave.set()
        for thread in threads:
            thread.join(30)
    assert not any(thread.is_alive() for thread in threads)
    deadline = time.monotonic() + 10
    with mzconnector.connect("127.0.0.1", server.port, timeout=10) as again:
        while again.mim()["Connected Clients"] != 1:
            assert time.monotonic() < deadline, "the slots did not come back"
            time.sleep(0.01)
