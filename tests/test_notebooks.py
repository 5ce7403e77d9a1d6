"""The notebooks, executed top to bottom in a real kernel against a real server, and the
client's behaviour in Jupyter: rich reprs, completion, help, DataFrames, Ctrl-C, a running
event loop, and the async client under asyncio and trio."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import inspect
import os
import pydoc
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import nbformat
import pandas as pd
import pytest
import tomli
import trustme
from jupyter_client.manager import KernelManager, start_new_kernel
from nbclient import NotebookClient

import mzconnector
from tests.conftest import ROOT, ServerProcess

NOTEBOOKS = ROOT / "notebooks"
# The command a notebook's first markdown cell names: `python -m mzserver [notebooks/x.toml]`.
COMMAND = re.compile(r"`python -m mzserver(?: (notebooks/[\w./-]+\.toml))?`")
# How a notebook finds its server: the variable the tests set, and a default address.
SERVER_VARIABLE = re.compile(r'os\.environ\.get\("MZCONNECTOR_SERVER", "([\w.]+):(\d+)"\)')
# What a cell should not show: a count, or a str's repr (a return value that is noise).
STRAY = re.compile(r"-?\d+|'.*'|\".*\"", re.DOTALL)


def kernel_env(server: ServerProcess | None = None) -> dict[str, str]:
    env = {**os.environ, "JUPYTER_PLATFORM_DIRS": "1", "PYDEVD_DISABLE_FILE_VALIDATION": "1"}
    env.pop("MZCONNECTOR_SERVER", None)
    if server is not None:
        env["MZCONNECTOR_SERVER"] = f"{server.host}:{server.port}"
    return env


def server_args(book: Any) -> list[str] | None:
    """What to start for a notebook: the arguments of the command its first markdown cell
    names, or None when it names none (it needs nothing running)."""
    first = next(cell for cell in book.cells if cell.cell_type == "markdown")
    match = COMMAND.search(first.source)
    if match is None:
        return None
    return [match.group(1)] if match.group(1) else []


# -- the notebooks --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.stem)
def test_notebook_runs(path: Path, start_server: Callable[..., ServerProcess]) -> None:
    book = nbformat.read(path, as_version=4)
    nbformat.validate(book)
    code = [cell for cell in book.cells if cell.cell_type == "code"]
    assert code, "a notebook without code"
    for cell in code:
        assert not cell.outputs, "commit notebooks with their outputs cleared"
        assert cell.execution_count is None, "commit notebooks with their outputs cleared"
    args = server_args(book)
    server = None if args is None else start_server(*args)
    client = NotebookClient(
        book,
        timeout=60,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    client.execute(env=kernel_env(server))  # raises CellExecutionError on any cell error
    for cell in code:
        for output in cell.outputs:
            text = output.get("text", "")
            # Without ipywidgets, tqdm.auto warns once and draws a text bar instead.
            text = text.replace("TqdmWarning: IProgress not found", "")
            assert "Warning" not in text, f"a cell warned: {text}"
            shown = output.get("data", {}).get("text/plain", "")
            if output.output_type == "execute_result":
                assert not STRAY.fullmatch(shown), (
                    f"a cell shows a stray return value, {shown!r} (end it with ';'):\n"
                    f"{cell.source}"
                )


def test_notebooks_name_their_workflow() -> None:
    """The first markdown cell of each notebook names its command, or says it needs none; a
    workflow it names exists."""
    for path in NOTEBOOKS.glob("*.ipynb"):
        book = nbformat.read(path, as_version=4)
        args = server_args(book)
        if args is None:
            first = next(cell for cell in book.cells if cell.cell_type == "markdown")
            assert "needs nothing running" in first.source, path.name
        for toml in args or []:
            assert (ROOT / toml).is_file(), f"{path.name} names {toml}, which does not exist"


def test_notebooks_default_to_their_own_workflows_port() -> None:
    """A notebook that needs a server reads MZCONNECTOR_SERVER (the tests set it) and defaults
    to the address its workflow listens on (the one its README names); no two of these
    workflows need the same port, so a person can run them side by side."""
    ports: dict[int, str] = {}
    readme = (NOTEBOOKS / "README.md").read_text().splitlines()
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        book = nbformat.read(path, as_version=4)
        args = server_args(book)
        if args is None:
            continue
        code = "\n".join(cell.source for cell in book.cells if cell.cell_type == "code")
        match = SERVER_VARIABLE.search(code)
        assert match, f"{path.name} does not read MZCONNECTOR_SERVER"
        toml = ROOT / (args[0] if args else "server/default/echo.toml")
        connector = tomli.loads(toml.read_text())["connector"]
        assert (match[1], int(match[2])) == (connector["host"], connector["port"]), path.name
        address = f"{match[1]}:{match[2]}"
        assert address in first_markdown(book), path.name
        assert any(path.name in line and address in line for line in readme), path.name
        assert connector["port"] not in ports, f"{path.name} and {ports[connector['port']]}"
        ports[connector["port"]] = path.name


def first_markdown(book: Any) -> str:
    return str(next(cell for cell in book.cells if cell.cell_type == "markdown").source)


# -- the client in a real kernel: completion and Ctrl-C ----------------------------------------


@pytest.fixture
def kernel(echo_server: ServerProcess) -> Iterator[Any]:
    """A python3 kernel (this interpreter) with ``conn`` connected to the echo server."""
    km, kc = start_new_kernel(kernel_name="python3", env=kernel_env(echo_server))
    try:
        reply = kc.execute_interactive(
            f"import os, sys, mzconnector\nassert sys.executable == {sys.executable!r}\n"
            "host, _, port = os.environ['MZCONNECTOR_SERVER'].rpartition(':')\n"
            "conn = mzconnector.connect(host, int(port))",
            timeout=30,
        )
        assert reply["content"]["status"] == "ok", reply["content"]
        yield km, kc
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_tab_completion_and_ctrl_c_in_a_kernel(kernel: tuple[KernelManager, Any]) -> None:
    km, kc = kernel
    for text, expected in (
        ("conn.udrs.", {"Subscriber"}),
        ("conn.api.", {"double", "round_trip", "top_up"}),
    ):
        reply = kc.complete(text, len(text), reply=True, timeout=30)["content"]
        matches = {m.rsplit(".", 1)[-1] for m in reply["matches"]}
        assert expected <= matches, (text, reply["matches"])

    # Ctrl-C (a kernel interrupt) during receive(): the cell ends with KeyboardInterrupt at once.
    # (stop_on_error=False: the kernel would abort the requests that follow the interrupted one
    # if they arrive before it has finished handling the interruption.)
    msg_id = kc.execute("print('receiving', flush=True)\nconn.receive()", stop_on_error=False)
    while True:  # the cell runs: it printed, and is about to block in receive()
        msg = kc.get_iopub_msg(timeout=30)
        if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "stream":
            assert msg["content"]["text"] == "receiving\n"
            break
    start = time.monotonic()
    km.interrupt_kernel()
    reply = kc.get_shell_msg(timeout=30)
    assert time.monotonic() - start < 5
    assert reply["parent_header"]["msg_id"] == msg_id
    assert reply["content"]["status"] == "error"
    assert reply["content"]["ename"] == "KeyboardInterrupt"
    # ... and the connection still works.
    reply = kc.execute_interactive(
        "conn.submit(conn.udrs.Subscriber(msisdn='after', balance=1))\n"
        "assert conn.receive(timeout=10).msisdn == 'after'\n"
        "conn.close()",
        timeout=30,
    )
    assert reply["content"]["status"] == "ok", reply["content"]


INTERRUPTED_SCRIPT = """
import sys
import mzconnector

conn = mzconnector.connect("127.0.0.1", int(sys.argv[1]), timeout=10)
try:
    print("receiving", flush=True)
    conn.receive()
except KeyboardInterrupt:
    print("interrupted", flush=True)
conn.submit(conn.udrs.Subscriber(msisdn="after", balance=1))
print(conn.receive(timeout=10).msisdn, flush=True)
conn.close()
print("closed", conn.closed, flush=True)
"""


def wait_until_sleeping(pid: int, timeout: float = 10) -> None:
    """Until the process's main thread sleeps in the kernel (blocked on a lock)."""
    stat = Path(f"/proc/{pid}/task/{pid}/stat")
    if not stat.exists():
        pytest.skip("needs /proc to see that the process is blocked")
    deadline = time.monotonic() + timeout
    while stat.read_text().rsplit(")", 1)[1].split()[0] != "S":
        assert time.monotonic() < deadline, "the process never blocked"
        time.sleep(0.001)  # polls an observable state; no signal is sent before it holds


def test_receive_is_interrupted_by_sigint(echo_server: ServerProcess) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", INTERRUPTED_SCRIPT, str(echo_server.port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "receiving\n"
        wait_until_sleeping(proc.pid)
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert proc.stdout.readline() == "interrupted\n"
        assert time.monotonic() - start < 2
        # Line by line: communicate() would miss what readline() has buffered already.
        assert proc.stdout.readline() == "after\n"
        assert proc.stdout.readline() == "closed True\n"
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate()
    assert not err


# -- rich display, completion and help, in process -----------------------------------------------


@pytest.fixture
def conn(echo_server: ServerProcess) -> Iterator[mzconnector.Connection]:
    with mzconnector.connect(echo_server.host, echo_server.port, timeout=10) as conn:
        yield conn


def test_records_and_mim_show_as_tables(conn: mzconnector.Connection) -> None:
    record = conn.udrs.Subscriber(msisdn="<b>46700000001</b>", balance=10)
    assert repr(record) == "Subscriber(msisdn='<b>46700000001</b>', balance=10)"
    html = record._repr_html_()
    assert html.startswith("<table>")
    assert "Subscriber" in html
    assert "msisdn" in html
    assert "balance" in html
    assert "10" in html
    assert "<b>" not in html
    assert "&lt;b&gt;" in html
    conn.submit(record)
    assert conn.receive(timeout=10)._repr_html_() == html
    mim = conn.mim()
    assert isinstance(mim, dict)
    assert mim["Last Balance"] == 10
    html = mim._repr_html_()
    assert html.startswith("<table>")
    assert "Last Balance" in html
    assert "Last MSISDN" in html
    assert "&lt;b&gt;" in html
    assert "Workflow Name" in repr(mim)  # plain text: a dict


def test_dir_lists_record_types_and_api(conn: mzconnector.Connection) -> None:
    assert dir(conn.udrs) == ["Subscriber"]
    assert dir(conn.api) == ["double", "round_trip", "top_up"]
    assert "double" in repr(conn.api)
    assert "Subscriber" in repr(conn.udrs)


def test_help_on_an_api_function(conn: mzconnector.Connection) -> None:
    function = conn.api.top_up
    assert list(inspect.signature(function).parameters) == ["msisdn", "amount"]
    assert "Submit a ``Subscriber``" in (inspect.getdoc(function) or "")
    text = pydoc.render_doc(conn.api.double, renderer=pydoc.plaintext)
    assert "double(x: 'float') -> 'float'" in text
    assert "Return twice ``x``" in text
    assert inspect.getsource(conn.api.double).startswith("def double(x: float) -> float:")
    assert "Record type Subscriber: msisdn: str, balance: int" in pydoc.render_doc(
        conn.udrs.Subscriber, renderer=pydoc.plaintext
    )


def test_submit_many_progress_bar(
    conn: mzconnector.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    records = [conn.udrs.Subscriber(msisdn=str(i), balance=i) for i in range(3000)]
    assert conn.submit_many(records, progress=True) == 3000
    conn.flush()
    assert "3000/3000" in capsys.readouterr().err
    assert [conn.receive(timeout=10) for _ in records] == records


def test_optional_imports_stay_optional() -> None:
    code = (
        "import sys, mzconnector\n"
        "loaded = {'pandas', 'anyio', 'tqdm', 'trio', 'matplotlib'} & set(sys.modules)\n"
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# -- pandas helpers -----------------------------------------------------------------------------

SCHEMA = {
    "Cell": {"name": "str", "lat": "float"},
    "Usage": {
        "msisdn": "str",
        "count": "int",
        "amount": "float",
        "roaming": "bool",
        "payload": "bytes",
        "at": "datetime",
        "tags": "list[str]",
        "extra": "dict[str, int]",
        "cell": "Cell",
        "note": "str | None",
        "score": "int | None",
    },
}


@pytest.fixture
def types_() -> dict[str, Any]:
    return mzconnector.build_record_types(SCHEMA)


def usages(types_: dict[str, Any], n: int = 3) -> list[Any]:
    at = datetime.datetime(2024, 5, 1, 12, 0, tzinfo=datetime.timezone.utc)
    return [
        types_["Usage"](
            msisdn=f"4670000000{i}",
            count=i,
            amount=i * 1.5,
            roaming=i % 2 == 0,
            payload=bytes([i]),
            at=at + datetime.timedelta(minutes=i),
            tags=["a"] * i,
            extra={"k": i},
            cell=types_["Cell"](name=f"c{i}", lat=59.0 + i),
            note=None if i % 2 else f"note {i}",
            score=None if i == 1 else i,
        )
        for i in range(n)
    ]


def test_dataframe_round_trip(types_: dict[str, Any]) -> None:
    records = usages(types_)
    df = mzconnector.to_dataframe(records)
    assert list(df.columns) == list(SCHEMA["Usage"])
    assert len(df) == 3
    assert df["count"].tolist() == [0, 1, 2]
    assert str(df["at"].dtype).startswith("datetime64")
    assert df["score"].isna().tolist() == [False, True, False]  # a float column with NaN
    assert mzconnector.from_dataframe(df, types_["Usage"]) == records
    # Rows built by pandas operations come back too.
    again = pd.concat([df, df], ignore_index=True)
    assert mzconnector.from_dataframe(again, types_["Usage"]) == records + records


def test_dataframe_of_several_types(types_: dict[str, Any]) -> None:
    cell = types_["Cell"](name="x", lat=1.0)
    records = [*usages(types_, 1), cell]
    df = mzconnector.to_dataframe(records)
    assert list(df.columns)[:2] == ["_type", "msisdn"]
    assert "lat" in df.columns
    assert df["_type"].tolist() == ["Usage", "Cell"]
    cells = df[df["_type"] == "Cell"][["_type", "name", "lat"]]
    assert mzconnector.from_dataframe(cells, types_["Cell"]) == [cell]
    with pytest.raises(ValueError, match="other types than Cell: Usage"):
        mzconnector.from_dataframe(df[["_type", "name", "lat"]], types_["Cell"])


def test_dataframe_edges(types_: dict[str, Any]) -> None:
    Cell = types_["Cell"]
    assert mzconnector.to_dataframe([]).empty
    assert mzconnector.from_dataframe(pd.DataFrame({"name": [], "lat": []}), Cell) == []
    df = pd.DataFrame({"name": ["a", "b"], "lat": [1, 2]}, index=[10, 20])
    assert mzconnector.from_dataframe(df, Cell) == [
        Cell(name="a", lat=1.0),
        Cell(name="b", lat=2.0),
    ]
    with pytest.raises(TypeError, match="item 1 is a bytes"):
        mzconnector.to_dataframe([Cell(name="a", lat=1.0), b"raw"])
    with pytest.raises(
        ValueError, match=r"'size' are not fields of Cell \(its fields: name, lat\)"
    ):
        mzconnector.from_dataframe(df.assign(size=1), Cell)
    with pytest.raises(ValueError, match="needs a column for each of: lat"):
        mzconnector.from_dataframe(df[["name"]], Cell)
    with pytest.raises(ValueError, match=r"^row 20, column 'lat': expected float, got str 'far'$"):
        mzconnector.from_dataframe(df.assign(lat=[1.0, "far"]), Cell)
    usage = mzconnector.to_dataframe(usages(types_, 1)).assign(count=1.5)
    with pytest.raises(ValueError, match=r"^row 0, column 'count': expected int, got float 1.5$"):
        mzconnector.from_dataframe(usage, types_["Usage"])
    with pytest.raises(TypeError, match="needs a record type"):
        mzconnector.from_dataframe(df, "Cell")  # type: ignore[arg-type]


def test_dataframe_helpers_without_pandas(
    types_: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match="need pandas"):
        mzconnector.to_dataframe(usages(types_, 1))


def test_dataframe_through_a_workflow(conn: mzconnector.Connection) -> None:
    df = pd.DataFrame({"msisdn": [f"4670{i:07d}" for i in range(500)], "balance": range(500)})
    records = mzconnector.from_dataframe(df, conn.udrs.Subscriber)
    conn.submit_many(records)
    back = mzconnector.to_dataframe([conn.receive(timeout=10) for _ in records])
    pd.testing.assert_frame_equal(back, df)


# -- the blocking client inside a running event loop --------------------------------------------


def test_blocking_client_inside_a_running_asyncio_loop(echo_server: ServerProcess) -> None:
    async def main() -> Any:
        loop = asyncio.get_running_loop()
        ran: list[str] = []
        loop.call_soon(ran.append, "callback")
        with mzconnector.connect(echo_server.host, echo_server.port, timeout=10) as conn:
            conn.submit(conn.udrs.Subscriber(msisdn="46700000001", balance=5))
            echoed = conn.receive(timeout=10)
            mim = conn.mim()
            assert conn.api.round_trip("46700000002", 6).balance == 6
        assert asyncio.get_running_loop() is loop
        await asyncio.sleep(0)  # one turn of the loop: the callback it held runs
        assert ran == ["callback"]
        return echoed, mim

    echoed, mim = asyncio.run(main())
    assert echoed.balance == 5
    assert mim["Last Balance"] == 5


# -- the async client ---------------------------------------------------------------------------

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


@pytest.mark.parametrize("backend", BACKENDS)
def test_async_client(
    backend: str, echo_server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        conn = await mzconnector.connect_async(echo_server.host, echo_server.port, name="async")
        async with conn:
            assert dir(conn.udrs) == ["Subscriber"]
            assert conn.api.double(21) == 42
            Subscriber = conn.udrs.Subscriber
            conn.submit(Subscriber(msisdn="46700000001", balance=1))
            conn.submit(b"bytes")
            await conn.flush()
            assert await conn.receive() == Subscriber(msisdn="46700000001", balance=1)
            assert await conn.receive() == b"bytes"
            with pytest.raises(mzconnector.NotAccepted):
                conn.submit("a str")
            # A long push while the workflow answers every record: nothing stalls.
            records = [Subscriber(msisdn=str(i), balance=i) for i in range(50_000)]
            assert await conn.submit_many(records) == len(records)
            await conn.flush()
            got: list[Any] = []
            while len(got) < len(records):
                got += await conn.receive_many()
            assert got == records
            assert (await conn.mim())["Last Balance"] == 49_999
            # API functions run against the async connection (its submit only buffers).
            conn.api.top_up("46700000009", 9)
            async for record in conn:
                assert record.balance == 9
                break
            # A cancelled wait leaves the connection usable.
            await give_up_after(backend, 0.05, conn.receive)
            conn.submit(Subscriber(msisdn="after", balance=2))
            assert (await conn.receive()).msisdn == "after"
        assert conn.closed
        with pytest.raises(mzconnector.ConnectionClosed):
            await conn.receive()
        await conn.aclose()  # twice is fine

    run_async(backend, main, monkeypatch)


async def give_up_after(backend: str, seconds: float, function: Callable[[], Any]) -> None:
    """Await ``function()`` and cancel it after ``seconds``, the way the backend does."""
    if backend == "asyncio-without-anyio":
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(function(), seconds)
    else:
        with anyio.move_on_after(seconds):
            await function()


@pytest.mark.parametrize("backend", BACKENDS)
def test_async_client_errors(
    backend: str,
    start_server: Callable[..., ServerProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = start_server()
    free = _free_port()

    async def main() -> None:
        with pytest.raises(mzconnector.ConnectError, match="is the server running"):
            await mzconnector.connect_async("127.0.0.1", free, timeout=5)
        conn = await mzconnector.connect_async(server.host, server.port, timeout=5)
        server.proc.send_signal(signal.SIGTERM)  # a graceful stop: the server says goodbye
        with pytest.raises(mzconnector.ConnectionClosed, match="shutting down"):
            await conn.receive()
        await conn.aclose()

    run_async(backend, main, monkeypatch)
    assert server.proc.wait(timeout=30) == 0


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def tls_server(start_server: Callable[..., ServerProcess], tmp_path: Path) -> ServerProcess:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    cert = ca.issue_cert("localhost")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "server.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    ca.issue_cert("alice").private_key_and_cert_chain_pem.write_to_path(
        str(tmp_path / "client.pem")
    )
    config = tmp_path / "tls.toml"
    config.write_text(
        """
[workflow]
name = "tls"

[connector]
accepted_types = ["Subscriber"]
input_routes = ["back"]
output_routes = { Subscriber = "in" }

[connector.tls]
enabled = true
certfile = "server.pem"
keyfile = "server.key"
cafile = "ca.pem"
require_client_auth = true

[mim]
"Last Balance" = "int"
"Last MSISDN" = "str"

[types.Subscriber]
msisdn = "str"
balance = "int"

[[processors]]
name = "echo"
entry = "mzserver.default.echo:echo"
routes = ["in"]
"""
    )
    server = start_server(str(config))
    server.tls_dir = tmp_path  # type: ignore[attr-defined]
    return server


@pytest.mark.parametrize("backend", BACKENDS)
def test_async_client_over_tls(
    backend: str, tls_server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    files: Path = tls_server.tls_dir  # type: ignore[attr-defined]
    ca, client = str(files / "ca.pem"), str(files / "client.pem")

    async def main() -> None:
        async with await mzconnector.connect_async(
            "localhost", tls_server.port, tls=True, cafile=ca, certfile=client
        ) as conn:
            conn.submit(conn.udrs.Subscriber(msisdn="46700000001", balance=3))
            assert (await conn.receive()).balance == 3
        with pytest.raises(mzconnector.ConnectError, match="cannot be verified"):
            await mzconnector.connect_async("localhost", tls_server.port, tls=True)
        with pytest.raises(mzconnector.ConnectError, match="TLS"):
            await mzconnector.connect_async("localhost", tls_server.port, tls=True, cafile=ca)

    run_async(backend, main, monkeypatch)
