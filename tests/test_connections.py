"""Connections: limits, connection control, per-connection routing and TLS, against a real
server process and the real client."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trustme

import mzconnector
from tests.conftest import ROOT, WORKFLOWS, ServerProcess

PROCESSORS = WORKFLOWS / "conn_workflow.py"


def write_config(
    tmp_path: Path,
    connector: str = "",
    tls: str = "",
    control: bool = False,
    name: str = "workflow",
) -> Path:
    """A workflow TOML: Subscriber echo, with extra [connector] lines and an optional TLS table."""
    requests = ""
    if control:
        connector += '\nconnection_control = true\nconnection_request_route = "requests"\n'
        connector += "connection_request_timeout = 1.0\n"
        requests = f"""
[[processors]]
name = "gatekeeper"
entry = "{PROCESSORS}:gatekeeper"
routes = ["requests"]
"""
    text = f"""
[workflow]
name = "connections"

[connector]
accepted_types = ["Subscriber"]
input_routes = ["back"]
{connector}

[connector.output_routes]
Subscriber = "in"

{tls}

[mim]
"Last Subject" = "str"
"Last Request" = "str"
"Ended" = "int"
"Last Ended" = "str"

[types.Subscriber]
msisdn = "str"
balance = "int"

[[processors]]
name = "echo"
entry = "{PROCESSORS}:echo"
routes = ["in"]

[[processors]]
name = "branch"
entry = "{PROCESSORS}:branch"
routes = ["test_branch"]
{requests}
"""
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


def refused_start(path: Path) -> subprocess.CompletedProcess[str]:
    """``python -m mzserver path`` that must refuse to start (exit 2)."""
    result = subprocess.run(
        [sys.executable, "-m", "mzserver", str(path), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert result.returncode == 2, result.stderr
    return result


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Poll ``predicate`` (an observation of another process) until it is truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met within the timeout")
        time.sleep(0.01)


def sub(conn: mzconnector.Connection, msisdn: str, balance: int = 1) -> Any:
    return conn.udrs.Subscriber(msisdn=msisdn, balance=balance)


# -- limits -------------------------------------------------------------------------------------


def test_one_connection_at_a_time(
    start_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = start_server(str(write_config(tmp_path, "allow_multiple_connections = false")))
    with mzconnector.connect(server.host, server.port) as first:
        with pytest.raises(mzconnector.ConnectionRefused, match="one connection at a time"):
            mzconnector.connect(server.host, server.port)
        first.submit(sub(first, "a"))
        assert first.receive(timeout=5).msisdn == "a"  # the first is undisturbed
    with mzconnector.connect(server.host, server.port) as again:  # at once after close
        assert again.mim()["Connected Clients"] == 1


def test_max_connections(start_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    server = start_server(str(write_config(tmp_path, "max_connections = 2")))
    a = mzconnector.connect(server.host, server.port)
    b = mzconnector.connect(server.host, server.port)
    for _ in range(3):  # refused clients never count against the limit
        with pytest.raises(mzconnector.ConnectionRefused, match=r"limit \(2\)"):
            mzconnector.connect(server.host, server.port)
    a.close()
    c = mzconnector.connect(server.host, server.port)  # a closed one frees its place
    mim = c.mim()
    assert mim["Connected Clients"] == 2
    assert mim["Connections Refused"] == 3
    b.close()
    c.close()


def test_max_connections_zero_means_no_limit(
    start_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = start_server(str(write_config(tmp_path, "max_connections = 0")))
    conns = [mzconnector.connect(server.host, server.port) for _ in range(5)]
    assert conns[-1].mim()["Connected Clients"] == 5
    for conn in conns:
        conn.close()


@pytest.mark.parametrize("value", ["-1", "100000", '"ten"'])
def test_max_connections_out_of_range(tmp_path: Path, value: str) -> None:
    path = write_config(tmp_path, f"max_connections = {value}")
    result = refused_start(path)
    assert "connector.max_connections" in result.stderr
    assert str(path) in result.stderr


# -- connection control -------------------------------------------------------------------------


def test_connection_control(start_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    server = start_server(str(write_config(tmp_path, control=True)))
    with pytest.raises(mzconnector.ConnectionRejected) as rejected:
        mzconnector.connect(server.host, server.port, name="mallory", metadata={"token": "guess"})
    assert rejected.value.reason == "bad token for mallory"
    with pytest.raises(mzconnector.ConnectionRejected, match=r"no decision within 1\.0 s"):
        mzconnector.connect(server.host, server.port, name="quiet", metadata={"token": "silent"})
    with mzconnector.connect(
        server.host, server.port, name="alice", metadata={"token": "secret", "team": "a"}
    ) as conn:
        mim = conn.mim()
        conn_id, name, peer, metadata = mim["Last Request"].split("|")
        assert int(conn_id) == conn.connection_id
        assert name == "alice"
        assert peer.startswith("127.0.0.1:")
        assert metadata == "[('team', 'a'), ('token', 'secret')]"
        assert mim["Connections Refused"] == 2
        assert mim["Ended"] is None  # rejected connections never opened
        conn.submit(sub(conn, "x"))
        assert conn.receive(timeout=5).msisdn == "x"
    with mzconnector.connect(
        server.host, server.port, name="bob", metadata={"token": "secret"}
    ) as c:
        mim = wait_for(lambda: (m := c.mim())["Ended"] == 1 and m)
        assert mim["Last Ended"] == "alice"  # the workflow was told alice left


def test_rejected_client_gets_nothing(
    start_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """Before acceptance the server sends nothing: no schema, no API, no records."""
    import socket

    server = start_server(str(write_config(tmp_path, control=True)))
    protocol = mzconnector.Protocol(mzconnector.Role.CLIENT)
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(protocol.send(mzconnector.Hello(1, name="eve", metadata={"token": "no"})))
        events = []
        while not events or not isinstance(events[-1], (mzconnector.Refuse, mzconnector.Closed)):
            protocol.receive_data(sock.recv(65536))
            events.extend(protocol.events())
    assert [type(e) for e in events] == [mzconnector.Refuse]
    assert events[0].code == "rejected"


# -- per-connection routing ---------------------------------------------------------------------


def test_per_connection_routing(start_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    server = start_server(str(write_config(tmp_path, "per_connection_routing = true")))
    with (
        mzconnector.connect(server.host, server.port) as a,
        mzconnector.connect(server.host, server.port) as b,
    ):
        a.submit(sub(a, "from-a"))
        b.submit(sub(b, "from-b"))
        assert a.receive(timeout=5).msisdn == "from-a"
        assert b.receive(timeout=5).msisdn == "from-b"
        a.flush()
        b.flush()
        assert a.receive_many(timeout=0.2) == []  # nobody got the other's record
        assert b.receive_many(timeout=0.2) == []

        # A record naming a connection that has gone is counted, not lost silently.
        before = a.mim()["Undeliverable Records"]
        a.submit(sub(a, "gone"))
        a.flush()
        assert wait_for(lambda: a.mim()["Undeliverable Records"] == before + 1)

        # The workflow moves a's Subscribers to the test branch; b is untouched.
        a.submit(sub(a, "switch", 5))
        assert a.receive(timeout=5).balance == 5  # the switch record itself took the old route
        a.submit(sub(a, "one", 5))
        b.submit(sub(b, "two", 5))
        assert a.receive(timeout=5).balance == -1
        assert b.receive(timeout=5).balance == 5
        a.submit(sub(a, "restore", 5))
        assert a.receive(timeout=5).balance == -1
        a.submit(sub(a, "three", 5))
        assert a.receive(timeout=5).balance == 5


def test_broadcast_without_per_connection_routing(
    start_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = start_server(str(write_config(tmp_path)))
    with (
        mzconnector.connect(server.host, server.port) as a,
        mzconnector.connect(server.host, server.port) as b,
    ):
        a.submit(sub(a, "hello"))
        assert a.receive(timeout=5).msisdn == "hello"
        assert b.receive(timeout=5).msisdn == "hello"


# -- TLS ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_files(tmp_path: Path, ca: trustme.CA) -> dict[str, Path]:
    files = {
        "ca": tmp_path / "ca.pem",
        "cert": tmp_path / "server.pem",
        "key": tmp_path / "server.key",
        "client": tmp_path / "client.pem",
        "other_client": tmp_path / "other.pem",
        "other_ca": tmp_path / "other_ca.pem",
    }
    ca.cert_pem.write_to_path(str(files["ca"]))
    server_cert = ca.issue_cert("localhost")  # connecting as 127.0.0.1 is a wrong host name
    server_cert.cert_chain_pems[0].write_to_path(str(files["cert"]))
    server_cert.private_key_pem.write_to_path(str(files["key"]))
    client = ca.issue_cert("alice@example.com", common_name="alice")
    client.private_key_and_cert_chain_pem.write_to_path(str(files["client"]))
    other = trustme.CA()
    other.cert_pem.write_to_path(str(files["other_ca"]))
    other.issue_cert(
        "mallory@example.com", common_name="mallory"
    ).private_key_and_cert_chain_pem.write_to_path(str(files["other_client"]))
    return files


def tls_table(files: dict[str, Path], require_client_auth: bool = False) -> str:
    return f"""
[connector.tls]
enabled = true
certfile = "{files["cert"]}"
keyfile = "{files["key"]}"
cafile = "{files["ca"]}"
require_client_auth = {str(require_client_auth).lower()}
"""


def test_tls_round_trip(
    start_server: Callable[..., ServerProcess], tmp_path: Path, tls_files: dict[str, Path]
) -> None:
    server = start_server(str(write_config(tmp_path, tls=tls_table(tls_files))))
    with mzconnector.connect(
        "localhost", server.port, tls=True, cafile=str(tls_files["ca"])
    ) as conn:
        records = [sub(conn, str(i), i) for i in range(20_000)]
        conn.submit_many(records)
        conn.flush()
        got: list[Any] = []
        while len(got) < len(records):
            got.extend(conn.receive_many(timeout=5))
        assert got == records
    # an SSLContext works too
    context = ssl.create_default_context(cafile=str(tls_files["ca"]))
    with mzconnector.connect("localhost", server.port, tls=context) as conn:
        assert conn.mim()["Workflow Name"] == "connections"


def test_tls_errors(
    start_server: Callable[..., ServerProcess], tmp_path: Path, tls_files: dict[str, Path]
) -> None:
    server = start_server(str(write_config(tmp_path, tls=tls_table(tls_files))))
    plain = start_server(str(write_config(tmp_path, name="plain")))
    with pytest.raises(mzconnector.ConnectError, match="cannot be verified"):
        mzconnector.connect("localhost", server.port, tls=True)  # unknown CA (system store)
    with pytest.raises(mzconnector.ConnectError, match="cannot be verified"):
        mzconnector.connect("localhost", server.port, tls=True, cafile=str(tls_files["other_ca"]))
    with pytest.raises(mzconnector.ConnectError, match="not valid for the host name"):
        mzconnector.connect("127.0.0.1", server.port, tls=True, cafile=str(tls_files["ca"]))
    with pytest.raises(mzconnector.ConnectError, match="TLS"):
        mzconnector.connect(server.host, server.port, timeout=5)  # plaintext client, TLS server
    with pytest.raises(mzconnector.ConnectError, match="does not seem to speak TLS"):
        mzconnector.connect(plain.host, plain.port, tls=True, cafile=str(tls_files["ca"]))
    # ... and the server goes on serving
    with mzconnector.connect(
        "localhost", server.port, tls=True, cafile=str(tls_files["ca"])
    ) as conn:
        conn.submit(sub(conn, "still here"))
        assert conn.receive(timeout=5).msisdn == "still here"


def test_tls_server_hostname_and_the_system_trust_store(
    start_server: Callable[..., ServerProcess],
    tmp_path: Path,
    tls_files: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A server reached by IP whose certificate names "localhost": ``server_hostname`` says
    which name to check. ``tls=True`` without ``cafile`` trusts the system's store: a CA
    outside it fails verification, and the same CA put in the store (SSL_CERT_FILE, which
    OpenSSL reads for the default paths) is trusted."""
    server = start_server(str(write_config(tmp_path, tls=tls_table(tls_files))))
    ca = str(tls_files["ca"])
    with mzconnector.connect(
        "127.0.0.1", server.port, tls=True, cafile=ca, server_hostname="localhost"
    ) as conn:
        assert conn.mim()["Workflow Name"] == "connections"

    async def by_ip() -> str:
        conn = await mzconnector.connect_async(
            "127.0.0.1", server.port, tls=True, cafile=ca, server_hostname="localhost"
        )
        async with conn:
            return str((await conn.mim())["Workflow Name"])

    assert asyncio.run(by_ip()) == "connections"

    def blocking() -> Any:
        return mzconnector.connect("127.0.0.1", server.port, tls=True, cafile=ca)

    def from_asyncio() -> Any:
        return asyncio.run(mzconnector.connect_async("127.0.0.1", server.port, tls=True, cafile=ca))

    for by_ip_unnamed in (blocking, from_asyncio):
        with pytest.raises(mzconnector.ConnectError) as info:
            by_ip_unnamed()
        message = str(info.value)
        assert "not valid for the host name you connected to" in message, message
        assert "'127.0.0.1'" in message, message
        assert "server_hostname=" in message, message  # what to do about it
    with pytest.raises(mzconnector.ConnectError) as info:
        mzconnector.connect("127.0.0.1", server.port, tls=True, server_hostname="localhost")
    assert "the server's certificate cannot be verified" in str(info.value)
    monkeypatch.setenv("SSL_CERT_FILE", ca)  # the system store, as OpenSSL finds it
    with mzconnector.connect("127.0.0.1", server.port, tls=True, server_hostname="localhost"):
        pass
    with pytest.raises(ValueError, match="server_hostname= given with tls=False"):
        mzconnector.connect("127.0.0.1", server.port, server_hostname="localhost")


def test_tls_client_certificates(
    start_server: Callable[..., ServerProcess], tmp_path: Path, tls_files: dict[str, Path]
) -> None:
    server = start_server(
        str(
            write_config(tmp_path, tls=tls_table(tls_files, require_client_auth=True), control=True)
        )
    )
    ca = str(tls_files["ca"])
    with pytest.raises(mzconnector.ConnectError, match="client certificate"):
        mzconnector.connect(
            "localhost", server.port, tls=True, cafile=ca, metadata={"token": "secret"}
        )
    with pytest.raises(mzconnector.ConnectError, match="client certificate"):
        mzconnector.connect(
            "localhost",
            server.port,
            tls=True,
            cafile=ca,
            certfile=str(tls_files["other_client"]),
            metadata={"token": "secret"},
        )
    with mzconnector.connect(
        "localhost",
        server.port,
        tls=True,
        cafile=ca,
        certfile=str(tls_files["client"]),
        metadata={"token": "secret"},
    ) as conn:
        assert "CN=alice" in conn.mim()["Last Subject"]  # the workflow saw the certificate
        conn.submit(sub(conn, "authenticated"))
        assert conn.receive(timeout=5).msisdn == "authenticated"


def test_tls_unreadable_key_is_a_config_error(tmp_path: Path, tls_files: dict[str, Path]) -> None:
    tls_files["key"].unlink()
    path = write_config(tmp_path, tls=tls_table(tls_files))
    result = refused_start(path)
    assert "connector.tls.keyfile" in result.stderr
    assert str(tls_files["key"]) in result.stderr
