"""Connecting: the arguments ``connect`` and ``connect_async`` check, the one handshake both
clients share, what each refusal raises, and API modules that cannot run on the client."""

from __future__ import annotations

import contextlib
import inspect
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

import mzconnector
from mzconnector import (
    DEFAULT_MAX_FRAME_SIZE,
    NEED_DATA,
    PROTOCOL_VERSION,
    Error,
    GetMim,
    Hello,
    Mim,
    Protocol,
    Records,
    Refuse,
    Role,
    Welcome,
)
from tests.conftest import ROOT, ServerProcess
from tests.test_client_async import BACKENDS, run_async, within

StartServer = Callable[..., ServerProcess]

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


# -- one handshake, the same answers from both clients ---------------------------------------------


class FakeServer:
    """A listening socket on 127.0.0.1 whose ``script`` talks to each client (in a thread): the
    server's side of a handshake, built with the sans-IO protocol, without a workflow."""

    def __init__(self, script: Callable[[socket.socket], None]) -> None:
        self.script = script
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:  # closed: the test is over
                return
            with sock:
                sock.settimeout(30)
                try:
                    self.script(sock)
                except OSError:
                    pass

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept (close alone may not)
        self.listener.close()
        self.thread.join(30)


@pytest.fixture
def fake_server() -> Iterator[Callable[[Callable[[socket.socket], None]], FakeServer]]:
    started: list[FakeServer] = []

    def start(script: Callable[[socket.socket], None]) -> FakeServer:
        server = FakeServer(script)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


def read_hello(sock: socket.socket, protocol: Protocol) -> Hello:
    while (event := protocol.next_event()) is NEED_DATA:
        protocol.receive_data(sock.recv(1 << 16))
    assert isinstance(event, Hello)
    return event


def until_closed(sock: socket.socket) -> None:
    """Read until the client closes (a client that says goodbye waits for the server to close:
    the Bye is enough here)."""
    while data := sock.recv(1 << 16):
        if b"client closed" in data:
            return


SCHEMA = {"Sub": {"msisdn": "str"}}


def welcome(**changes: Any) -> Welcome:
    fields: dict[str, Any] = {
        "protocol": PROTOCOL_VERSION,
        "connection_id": 1,
        "workflow": "fake",
        "schema": SCHEMA,
        "accepted": ["Sub"],
        "api": [],
        "max_frame_size": DEFAULT_MAX_FRAME_SIZE,
    }
    fields.update(changes)
    return Welcome(**fields)


def answer(*messages: Any) -> Callable[[socket.socket], None]:
    """Read the hello, answer with ``messages`` in one write, then wait for the client to go."""

    def script(sock: socket.socket) -> None:
        protocol = Protocol(Role.SERVER)
        read_hello(sock, protocol)
        sock.sendall(b"".join(bytes(protocol.send(m)) for m in messages))
        until_closed(sock)

    return script


def send_raw(data: bytes) -> Callable[[socket.socket], None]:
    def script(sock: socket.socket) -> None:
        sock.recv(1 << 16)
        sock.sendall(data)

    return script


def close_at_once(sock: socket.socket) -> None:
    sock.recv(1 << 16)


def say_nothing(sock: socket.socket) -> None:
    until_closed(sock)


CLIENTS = ["blocking", *BACKENDS]


def connect_error(
    client: str, port: int, monkeypatch: pytest.MonkeyPatch, **kwargs: Any
) -> mzconnector.ConnectError:
    """What connecting with ``client`` (the blocking client, or the async one on a backend)
    raises."""
    kwargs.setdefault("timeout", 5)
    if client == "blocking":
        with pytest.raises(mzconnector.ConnectError) as info:
            mzconnector.connect("127.0.0.1", port, **kwargs)
        return info.value

    async def main() -> mzconnector.ConnectError:
        with pytest.raises(mzconnector.ConnectError) as info:
            await mzconnector.connect_async("127.0.0.1", port, **kwargs)
        return info.value

    return run_async(client, main, monkeypatch)  # type: ignore[no-any-return]


REFUSALS = [
    ("limit", mzconnector.ConnectionLimitReached),
    ("protocol", mzconnector.HelloRefused),
    ("shutdown", mzconnector.ServerShuttingDown),
    ("something new", mzconnector.ConnectionRefused),
]


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize(("code", "kind"), REFUSALS)
def test_each_refusal_has_its_own_error(
    client: str,
    code: str,
    kind: type[Exception],
    fake_server: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = fake_server(answer(Refuse(code, f"because {code}")))
    error = connect_error(client, server.port, monkeypatch)
    assert type(error) is kind
    assert isinstance(error, mzconnector.ConnectionRefused)
    assert str(error) == f"127.0.0.1:{server.port} refused the connection: because {code}"


@pytest.mark.parametrize("client", CLIENTS)
def test_a_rejection_is_the_workflows_answer(
    client: str, fake_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = fake_server(answer(Refuse("rejected", "not today")))
    error = connect_error(client, server.port, monkeypatch)
    assert type(error) is mzconnector.ConnectionRejected
    assert error.reason == "not today"  # type: ignore[attr-defined]


HANDSHAKE_FAILURES = [
    (send_raw(b"HTTP/1.1 400 Bad Request\r\n\r\n"), "{where} is not an mzconnector server ("),
    (answer(Error("no such thing")), "{where} reported an error: no such thing"),
    (
        close_at_once,
        "{where} closed the connection during the handshake "
        "(is it a TLS server? then connect with tls=True)",
    ),
    (
        answer(welcome(protocol=PROTOCOL_VERSION + 1)),
        f"{{where}} speaks protocol {PROTOCOL_VERSION + 1}; this client speaks {PROTOCOL_VERSION}",
    ),
]


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize(("script", "message"), HANDSHAKE_FAILURES)
def test_handshake_failures_are_the_same_connect_errors_in_both_clients(
    client: str,
    script: Callable[[socket.socket], None],
    message: str,
    fake_server: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = fake_server(script)
    error = connect_error(client, server.port, monkeypatch)
    assert type(error) is mzconnector.ConnectError
    assert str(error).startswith(message.format(where=f"127.0.0.1:{server.port}"))


@pytest.mark.parametrize("client", CLIENTS)
def test_a_server_that_says_nothing_is_a_timeout_of_the_handshake(
    client: str, fake_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = fake_server(say_nothing)
    start = time.monotonic()
    error = connect_error(client, server.port, monkeypatch, timeout=0.3)
    assert 0.3 <= time.monotonic() - start < 5
    assert str(error) == (
        f"no answer from 127.0.0.1:{server.port} within 0.3 s (is it a TLS server? try tls=True)"
    )


@pytest.mark.parametrize("client", CLIENTS)
def test_nothing_listening_is_the_same_connect_error_in_both_clients(
    client: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening
        error = connect_error(client, port, monkeypatch)
    assert type(error) is mzconnector.ConnectError
    assert str(error).startswith(f"cannot connect to 127.0.0.1:{port}: ")
    assert str(error).endswith(" (is the server running?)")


RECORD = ["Sub", "46700000001"]


def records_right_after_the_welcome() -> Callable[[socket.socket], None]:
    batch = Records(msgspec.Raw(msgspec.msgpack.encode([RECORD])))
    return answer(welcome(), batch)


def test_records_that_arrive_with_the_welcome_are_received(fake_server: Any) -> None:
    server = fake_server(records_right_after_the_welcome())
    with mzconnector.connect("127.0.0.1", server.port, timeout=5) as conn:
        assert conn.receive(timeout=2) == conn.udrs.Sub(msisdn="46700000001")


@pytest.mark.parametrize("backend", BACKENDS)
def test_async_records_that_arrive_with_the_welcome_are_received(
    backend: str, fake_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = fake_server(records_right_after_the_welcome())

    async def main() -> None:
        async with await mzconnector.connect_async("127.0.0.1", server.port, timeout=5) as conn:
            assert await within(backend, 2, conn.receive()) == conn.udrs.Sub(msisdn="46700000001")

    run_async(backend, main, monkeypatch)


# -- refusals from a real server -------------------------------------------------------------------


def echo_workflow(
    tmp_path: Path, *, changes: dict[str, str] | None = None, api: dict[str, str] | None = None
) -> Path:
    """The built-in echo workflow with ``changes`` (old text -> new) and, when given, ``api``
    (file name -> source) as its API modules."""
    text = (ROOT / "server" / "default" / "echo.toml").read_text()
    text = text.replace('"echo.py:echo"', '"mzserver.default.echo:echo"')
    for old, new in (changes or {}).items():
        assert old in text
        text = text.replace(old, new)
    if api is not None:
        for filename, source in api.items():
            (tmp_path / filename).write_text(source)
        modules = ", ".join(f'"{filename}"' for filename in api)
        text = text.replace('modules = ["mzapi.demo"]', f"modules = [{modules}]")
    path = tmp_path / "workflow.toml"
    path.write_text(text)
    return path


def test_metadata_nested_too_deeply_is_a_refused_hello(echo_server: ServerProcess) -> None:
    metadata: dict[str, Any] = {}
    for _ in range(40):  # the server takes 32 levels by default
        metadata = {"deeper": metadata}
    with pytest.raises(mzconnector.HelloRefused, match="nested more than 32 levels"):
        mzconnector.connect(echo_server.host, echo_server.port, timeout=10, metadata=metadata)


def test_one_connection_at_a_time_is_a_connection_limit(
    start_server: StartServer, tmp_path: Path
) -> None:
    one = {"allow_multiple_connections = true": "allow_multiple_connections = false"}
    server = start_server(str(echo_workflow(tmp_path, changes=one)))
    with (
        mzconnector.connect(server.host, server.port, timeout=10),
        pytest.raises(mzconnector.ConnectionLimitReached, match="one connection at a time"),
    ):
        mzconnector.connect(server.host, server.port, timeout=10)


# -- API modules that cannot run on the client -----------------------------------------------------

NEEDS_A_MISSING_PACKAGE = '''"""Tools that need a package the client lacks."""

import mzconnector_test_no_such_package.sub


def tool():
    return 1
'''

RAISES_AT_IMPORT = '''"""A module whose top level fails on the client."""

SETTINGS = {}
LIMIT = SETTINGS["limit"]
'''

API_FAILURES = [
    (
        {"tools.py": NEEDS_A_MISSING_PACKAGE},
        "tools",
        "API module 'tools' needs 'mzconnector_test_no_such_package', which is not installed here",
    ),
    (
        {"fine.py": "def fine():\n    return 1\n", "broken.py": RAISES_AT_IMPORT},
        "broken",
        "API module 'broken' cannot run here: KeyError: 'limit'",
    ),
]


def connected_clients(port: int) -> int:
    """'Connected Clients', asked with the bare protocol (which does not run API modules)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        protocol = Protocol(Role.CLIENT)

        def next_event() -> Any:
            while (event := protocol.next_event()) is NEED_DATA:
                protocol.receive_data(sock.recv(1 << 16))
            return event

        sock.sendall(protocol.send(Hello(PROTOCOL_VERSION, name="counter")))
        assert isinstance(next_event(), Welcome)
        sock.sendall(protocol.send(GetMim()))
        while not isinstance(event := next_event(), Mim):
            pass
        return int(event.values["Connected Clients"])


def only_the_counter_is_connected(port: int) -> None:
    deadline = time.monotonic() + 10
    while connected_clients(port) != 1:  # the server sees the client's close a moment later
        assert time.monotonic() < deadline, "the failed connection is still open"


@pytest.mark.parametrize(("api", "module", "message"), API_FAILURES)
def test_an_api_module_that_cannot_run_closes_the_connection(
    api: dict[str, str],
    module: str,
    message: str,
    start_server: StartServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = start_server(str(echo_workflow(tmp_path, api=api)))
    opened: list[socket.socket] = []
    create_connection = socket.create_connection

    def record(*args: Any, **kwargs: Any) -> socket.socket:
        opened.append(create_connection(*args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(socket, "create_connection", record)
    threads = set(threading.enumerate())
    with pytest.raises(mzconnector.ApiModuleError) as info:
        mzconnector.connect(server.host, server.port, timeout=10)
    assert str(info.value) == message
    assert info.value.module == module
    assert isinstance(info.value, mzconnector.ConnectError)
    [sock] = opened
    assert sock.fileno() == -1  # closed
    assert set(threading.enumerate()) == threads  # no reader or linger thread left behind
    monkeypatch.undo()
    only_the_counter_is_connected(server.port)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("api", "module", "message"), API_FAILURES)
def test_async_an_api_module_that_cannot_run_closes_the_connection(
    backend: str,
    api: dict[str, str],
    module: str,
    message: str,
    start_server: StartServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = start_server(str(echo_workflow(tmp_path, api=api)))

    async def main() -> None:
        with pytest.raises(mzconnector.ApiModuleError) as info:
            await mzconnector.connect_async(server.host, server.port, timeout=10)
        assert str(info.value) == message
        assert info.value.module == module

    run_async(backend, main, monkeypatch)
    only_the_counter_is_connected(server.port)


# -- the README says what the code does ------------------------------------------------------------


def client_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## The client: one file")
    return text[start : text.index("\n## ", start + 1)]


def test_the_readme_names_every_connect_error_and_argument() -> None:
    section = client_section()
    for name in mzconnector.__all__:
        value = getattr(mzconnector, name)
        if isinstance(value, type) and issubclass(
            value, (mzconnector.ConnectError, mzconnector.ConnectionClosed)
        ):
            assert f"`{name}`" in section, name
    row = next(line for line in section.splitlines() if line.startswith("| `connect("))
    for name in list(inspect.signature(mzconnector.connect).parameters)[2:]:  # after host, port
        assert f" {name}=" in row, name
        assert f"`{name}" in section, name  # and what it does


@pytest.mark.parametrize("client", CLIENTS)
def test_metadata_that_cannot_be_encoded_is_an_error_before_connecting(
    client: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    metadata = {"team": "analytics", "since": {"year": 2**64}}
    message = r"metadata\['since'\]\['year'\] cannot be encoded: int out of range"
    if client == "blocking":
        with pytest.raises(ValueError, match=message):
            mzconnector.connect("127.0.0.1", 9, timeout=1, metadata=metadata)
        return

    async def main() -> None:
        with pytest.raises(ValueError, match=message):
            await mzconnector.connect_async("127.0.0.1", 9, timeout=1, metadata=metadata)

    run_async(client, main, monkeypatch)
