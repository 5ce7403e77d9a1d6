"""DataFrames as column batches (``submit_frame``, ``receive_frame``, ``ctx.route_frame``) and
batch processors (``batch = true`` and ``batch = "frame"``), end to end with
``tests/workflows/frames.toml``: Row goes to an ordinary echo, Item to a batch processor given
lists, Rich to one given DataFrames; each batch processor sends back what it got and then a
``Call`` saying how it was called."""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from typing import Any

import msgspec
import pytest

import mzconnector
from tests.conftest import WORKFLOWS, ServerProcess
from tests.test_end_to_end import wait_for_mim

pd = pytest.importorskip("pandas")
np = pytest.importorskip("numpy")

StartServer = Callable[..., ServerProcess]
UTC = datetime.timezone.utc


@pytest.fixture
def server(start_server: StartServer) -> ServerProcess:
    return start_server(str(WORKFLOWS / "frames.toml"))


def connect(server: ServerProcess, **kwargs: Any) -> mzconnector.Connection:
    return mzconnector.connect("127.0.0.1", server.port, timeout=10, **kwargs)


def rows(n: int, start: int = 0, *, strings: Any = object) -> Any:
    """A DataFrame of ``n`` Row/Item rows: i, s, f and the optional ``maybe``."""
    ints = np.arange(start, start + n, dtype=np.int64)
    return pd.DataFrame(
        {
            "i": ints,
            "s": pd.Series([f"s{i}" for i in ints], dtype=strings),
            "f": ints * 0.5,
            "maybe": pd.array([None if i % 3 == 0 else int(i) for i in ints], dtype="Int64"),
        }
    )


def rich(df: Any, *, b: bool = True, raw: bytes = b"r", tags: list[str] | None = None) -> Any:
    """``df`` (rows of a Row) with the other fields of a Rich: every field kind once."""
    n = len(df)
    return df.assign(
        b=b,
        at=pd.Timestamp("2026-01-01"),
        note=None,
        ratio=None,
        flag=None,
        when=None,
        raw=raw,
        tags=[["t"] if tags is None else tags] * n,
        extra=[{}] * n,
        cell=None,
    )


def receive_all(conn: mzconnector.Connection, n: int) -> Any:
    """``n`` rows with ``receive_frame``, however many calls that takes."""
    parts = []
    got = 0
    deadline = time.monotonic() + 10
    while got < n:
        part = conn.receive_frame(n - got, timeout=1)
        if time.monotonic() > deadline:
            raise AssertionError(f"received {got} of {n} rows")
        if len(part):
            parts.append(part)
            got += len(part)
    return pd.concat(parts, ignore_index=True)


# -- checked before anything is sent ----------------------------------------------------------


def bad_frames() -> list[tuple[str, Any, list[str]]]:
    """(what is wrong, DataFrame, words the error must have)."""
    good = rows(5)
    wrong_dtype = good.assign(i=pd.Series([0, 1, "two", 3, 4], dtype=object))
    float_in_int = good.assign(i=[0.0, 1.0, 2.5, 3.0, 4.0])
    none_in_str = good.assign(s=pd.Series(["a", "b", "c", None, "e"], dtype=object))
    nan_in_float = good.assign(f=[0.0, 1.0, 2.0, 3.0, float("nan")])
    na_in_int = good.assign(i=pd.array([0, 1, None, 3, 4], dtype="Int64"))
    labelled = good.set_axis(["a", "b", "c", "d", "e"]).assign(
        s=pd.Series([1, 2, 3, 4, 5], index=["a", "b", "c", "d", "e"], dtype=object)
    )
    return [
        ("a str in an int column", wrong_dtype, ["row 2", "column 'i'", "expected int"]),
        ("a fraction in an int column", float_in_int, ["row 2", "column 'i'", "expected int"]),
        ("None in a str field", none_in_str, ["row 3", "column 's'", "got None"]),
        ("NaN in a float field", nan_in_float, ["row 4", "column 'f'", "got None"]),
        ("NA in an int field", na_in_int, ["row 2", "column 'i'", "got None"]),
        ("the row's label, not its position", labelled, ["row 'a'", "column 's'", "expected str"]),
        ("a missing column", good.drop(columns=["f"]), ["Row needs a column", "f"]),
        ("a column that is no field", good.assign(extra=1), ["'extra'", "not fields of Row"]),
    ]


@pytest.mark.parametrize(("what", "df", "words"), bad_frames(), ids=[b[0] for b in bad_frames()])
def test_a_frame_that_does_not_fit_is_refused_before_anything_is_sent(
    server: ServerProcess, what: str, df: Any, words: list[str]
) -> None:
    with connect(server) as conn:
        with pytest.raises(ValueError, match=r".") as caught:
            conn.submit_frame(df, "Row")
        for word in words:
            assert word in str(caught.value), (what, str(caught.value))
        assert conn._unacknowledged() == []
        conn.flush()
        assert conn.mim()["Records In"] == 0  # nothing was sent
        # The connection goes on: a good frame after it arrives whole.
        conn.submit_frame(rows(3), "Row")
        conn.flush()
        assert [r.i for r in (conn.receive(timeout=5) for _ in range(3))] == [0, 1, 2]


def test_a_type_the_connector_does_not_accept(server: ServerProcess) -> None:
    with connect(server) as conn:
        with pytest.raises(mzconnector.NotAccepted):
            conn.submit_frame(rows(2).assign(processor="x"), "Call")
        with pytest.raises(mzconnector.NotAccepted, match=r"'Nope'.*Nothing was sent"):
            conn.submit_frame(rows(2), "Nope")


def test_frame_columns_names_the_first_bad_row_of_many() -> None:
    types = mzconnector.build_record_types({"Row": {"i": "int", "s": "str"}})
    df = pd.DataFrame({"i": np.arange(100_000), "s": ["x"] * 100_000})
    df.loc[70_000, "s"] = None
    df.loc[90_000, "s"] = None
    with pytest.raises(ValueError, match=r"row 70000, column 's': expected str, got None"):
        mzconnector.frame_columns(df, types["Row"])


# -- an ordinary processor gets records -------------------------------------------------------


@pytest.mark.parametrize("strings", [object, "str"], ids=["objects", "pandas-str"])
def test_an_ordinary_processor_gets_records_of_a_frame(server: ServerProcess, strings: Any) -> None:
    df = rows(2500, strings=strings)
    with connect(server) as conn:
        assert conn.submit_frame(df, "Row") == 2500
        conn.flush()
        got = [conn.receive(timeout=5) for _ in range(2500)]
        assert all(type(r) is conn.udrs.Row for r in got)
        assert [r.i for r in got] == list(range(2500))
        assert got[1] == conn.udrs.Row(i=1, s="s1", f=0.5, maybe=1)
        assert got[3].maybe is None
        assert conn.mim()["Records In"] == 2500


def test_frames_and_records_keep_their_order(server: ServerProcess) -> None:
    """Records submitted before a frame go first; frames go in the order submitted."""
    with connect(server, batch_size=100) as conn:
        Row = conn.udrs.Row
        conn.submit(Row(i=-3, s="", f=0.0, maybe=None))
        conn.submit_frame(rows(1000), "Row")
        conn.submit(Row(i=-2, s="", f=0.0, maybe=None))
        conn.submit_frame(rows(1000, 1000), "Row")
        conn.submit_many([Row(i=i, s="", f=0.0, maybe=None) for i in range(2000, 2500)])
        conn.flush()
        got = [conn.receive(timeout=5).i for _ in range(2502)]
        assert got == [-3, *range(1000), -2, *range(1000, 2500)]


# -- receive_frame ----------------------------------------------------------------------------


def test_receive_frame_gives_the_rows_back_column_wise(server: ServerProcess) -> None:
    df = rows(20_000, strings="str")
    with connect(server) as conn:
        assert conn.receive_frame(timeout=0.05).empty  # nothing yet: an empty DataFrame
        conn.submit_frame(df, "Row")
        conn.flush()
        back = receive_all(conn, 20_000)
        assert list(back.columns) == ["i", "s", "f", "maybe"]
        assert back["i"].dtype == np.int64
        assert back["f"].dtype == np.float64
        assert back["maybe"].dtype == "Int64"
        assert pd.api.types.is_string_dtype(back["s"])
        pd.testing.assert_frame_equal(back, df, check_dtype=False)
        assert back["maybe"].isna().sum() == df["maybe"].isna().sum()


def test_receive_frame_takes_at_most_max_records(server: ServerProcess) -> None:
    with connect(server) as conn:
        conn.submit_frame(rows(50), "Row")
        conn.flush()
        wait_for_mim(conn, "Records Out", 50)
        first = conn.receive_frame(20, timeout=5)
        assert first["i"].tolist() == list(range(20))
        rest = receive_all(conn, 30)
        assert rest["i"].tolist() == list(range(20, 50))


def test_receive_frame_of_several_types_has_a_type_column(server: ServerProcess) -> None:
    """The list batch processor sends back its Items, then a Call."""
    with connect(server) as conn:
        conn.submit_frame(rows(10), "Item")
        conn.flush()
        wait_for_mim(conn, "Records Out", 11)
        back = conn.receive_frame(timeout=5)
        assert back["_type"].tolist() == ["Item"] * 10 + ["Call"]
        assert back["i"].iloc[:10].tolist() == list(range(10))


def test_route_frame_to_the_client_and_receive_frame(server: ServerProcess) -> None:
    """A frame processor sends its DataFrame back with ctx.route_frame; every dtype of the
    Rich type comes back as it went."""
    n = 300
    at = pd.Series(pd.date_range("2026-01-01", periods=n, freq="s", tz="UTC"))
    df = pd.DataFrame(
        {
            "i": np.arange(n),
            "s": [f"ü{i}" for i in range(n)],
            "f": np.arange(n) / 4,
            "b": np.arange(n) % 2 == 0,
            "at": at,
            "maybe": pd.array([None if i % 2 else i for i in range(n)], dtype="Int64"),
            "note": [None if i % 5 == 0 else f"n{i}" for i in range(n)],
            "ratio": [None if i % 7 == 0 else i / 3 for i in range(n)],
            "flag": pd.array([None if i % 4 == 0 else bool(i % 3) for i in range(n)], "boolean"),
            "when": [
                None if i % 2 else datetime.datetime(2026, 1, 2, tzinfo=UTC) for i in range(n)
            ],
            "raw": [bytes([i % 256]) * 3 for i in range(n)],
            "tags": [["a", str(i)] for i in range(n)],
            "extra": [{"k": i} for i in range(n)],
            "cell": [None if i % 2 else {"name": "c", "lat": 1.5} for i in range(n)],
        }
    )
    with connect(server) as conn:
        conn.submit_frame(df, "Rich")
        conn.flush()
        wait_for_mim(conn, "Records Out", n + 1)
        back = conn.receive_frame(timeout=5)
        rich = back[back["_type"] == "Rich"].reset_index(drop=True)
        call = back[back["_type"] == "Call"]
        assert call["processor"].tolist() == ["riches"]
        assert call["kind"].tolist() == ["DataFrame"]
        assert call["frame_type"].tolist() == ["Rich"]
        assert call["rows"].tolist() == [n]
        assert rich["i"].tolist() == list(range(n))
        assert rich["s"].tolist() == df["s"].tolist()
        assert rich["b"].tolist() == df["b"].tolist()
        assert rich["at"].tolist() == df["at"].tolist()
        assert rich["maybe"].isna().tolist() == df["maybe"].isna().tolist()
        assert rich["note"].isna().tolist() == df["note"].isna().tolist()
        assert rich["raw"].tolist() == df["raw"].tolist()
        assert rich["tags"].tolist() == df["tags"].tolist()
        assert rich["extra"].tolist() == df["extra"].tolist()
        assert rich["cell"].iloc[0] == conn.udrs.Cell(name="c", lat=1.5)
        assert rich["cell"].iloc[1] is None or pd.isna(rich["cell"].iloc[1])


# -- batch processors -------------------------------------------------------------------------


def calls_and_items(conn: mzconnector.Connection, n: int) -> tuple[list[Any], list[Any]]:
    """Receive until ``n`` items of the pushed type came back; (calls, items)."""
    calls: list[Any] = []
    items: list[Any] = []
    while len(items) < n:
        record = conn.receive(timeout=5)
        (calls if type(record) is conn.udrs.Call else items).append(record)
    while True:  # the Call after the last batch
        try:
            record = conn.receive(timeout=0.5)
        except mzconnector.Timeout:
            return calls, items
        assert type(record) is conn.udrs.Call
        calls.append(record)


def test_a_list_batch_processor_is_called_once_per_batch(server: ServerProcess) -> None:
    with connect(server) as conn:
        Item = conn.udrs.Item
        conn.submit_many([Item(i=i, s="x", f=0.0, maybe=None) for i in range(100)])
        conn.flush()
        conn.submit_frame(rows(50, 100), "Item")  # a column batch: records for a list
        conn.flush()
        calls, items = calls_and_items(conn, 150)
        assert [r.i for r in items] == list(range(150))  # in order
        assert sum(c.rows for c in calls) == 150
        assert len(calls) < 150  # batches, not records
        assert {c.kind for c in calls} == {"list"}
        assert (calls[-1].rows, calls[-1].first) == (50, 100)
        assert conn.mim()["Processor Errors"] == 0


def test_a_frame_batch_processor_gets_dataframes(server: ServerProcess) -> None:
    """A frame's column batch stays columnar; records pushed one by one come as a DataFrame
    of the run of records of one type."""
    with connect(server) as conn:
        df = rich(rows(40))
        conn.submit_frame(df, "Rich")
        conn.flush()
        calls, items = calls_and_items(conn, 40)
        assert [r.i for r in items] == list(range(40))
        assert [(c.kind, c.rows, c.first, c.frame_type) for c in calls] == [
            ("DataFrame", 40, 0, "Rich")
        ]
        record = items[0]
        conn.submit(record)
        conn.flush()
        calls, items = calls_and_items(conn, 1)
        assert items == [record]
        assert [(c.kind, c.rows, c.frame_type) for c in calls] == [("DataFrame", 1, "Rich")]


def test_a_failing_batch_counts_once_and_is_logged(server: ServerProcess) -> None:
    with connect(server) as conn:
        Item = conn.udrs.Item
        conn.submit_many([Item(i=i, s="x", f=0.0, maybe=None) for i in (5, -1, 7)])
        conn.flush()
        wait_for_mim(conn, "Processor Errors", 1)
        # The workflow goes on: the next batch is processed.
        conn.submit(Item(i=8, s="y", f=0.0, maybe=None))
        conn.flush()
        _, items = calls_and_items(conn, 1)
        assert [r.i for r in items] == [8]
        bad = rows(3).assign(i=[1, -1, 2])
        conn.submit_frame(rich(bad, b=False, raw=b"", tags=[]), "Rich")
        conn.flush()
        values = wait_for_mim(conn, "Processor Errors", 2)
        assert values["Records In"] == 7
    _, log = server.stop()
    assert "processor 'items' failed on a batch from route 'items'" in log
    assert "ValueError: a record with i == -1" in log
    assert "3 record(s), the first:" in log  # the failing batch
    assert "processor 'riches' failed on a batch from route 'riches'" in log
    assert "a DataFrame of 3 row(s)" in log


# -- the async client -------------------------------------------------------------------------


async def test_the_async_client_submits_and_receives_frames(server: ServerProcess) -> None:
    conn = await mzconnector.connect_async("127.0.0.1", server.port, timeout=10)
    try:
        with pytest.raises(ValueError, match=r"row 1, column 's'"):
            await conn.submit_frame(rows(2).assign(s=pd.Series(["a", None], dtype=object)), "Row")
        assert await conn.submit_frame(rows(3000, strings="str"), "Row") == 3000
        await conn.flush()
        parts = []
        got = 0
        while got < 3000:
            part = await conn.receive_frame(3000 - got, timeout=5)
            assert len(part)
            parts.append(part)
            got += len(part)
        back = pd.concat(parts, ignore_index=True)
        assert back["i"].tolist() == list(range(3000))
        assert back["s"].tolist() == [f"s{i}" for i in range(3000)]
    finally:
        await conn.aclose()


# -- checked again on receipt -----------------------------------------------------------------


def columns_message(rows: int, **columns: tuple[str, bytes, bytes, bytes]) -> mzconnector.Columns:
    """A ``Columns`` message of Row, each column (kind, data, offsets, valid)."""
    return mzconnector.Columns(
        "Row",
        rows,
        [
            mzconnector.Column(name, kind, memoryview(data), memoryview(offsets), memoryview(valid))
            for name, (kind, data, offsets, valid) in columns.items()
        ],
    )


def good_columns(rows: int, valid_i: bytes = b"") -> dict[str, tuple[str, bytes, bytes, bytes]]:
    strings = [f"s{r}".encode() for r in range(rows)]
    offsets = np.cumsum([0] + [len(s) for s in strings]).astype("<i4").tobytes()
    return {
        "i": ("int", np.arange(rows, dtype="<i8").tobytes(), b"", valid_i),
        "s": ("str", b"".join(strings), offsets, b""),
        "f": ("float", np.zeros(rows, "<f8").tobytes(), b"", b""),
    }


def test_decode_checks_a_batch_against_its_type() -> None:
    types = mzconnector.build_record_types({"Row": {"i": "int", "s": "str", "f": "float"}})
    batch, bad = mzconnector.ColumnBatch.decode(columns_message(4, **good_columns(4)), types)
    assert bad == []
    assert [r.i for r in batch.records()] == [0, 1, 2, 3]
    _, bad = mzconnector.ColumnBatch.decode(
        columns_message(4, **good_columns(4, b"\x01\x01\x00\x00")), types
    )
    assert bad == [(2, "i", "expected int, got None"), (3, "i", "expected int, got None")]
    wrong_kind = {
        **good_columns(2),
        "i": ("str", b"ab", b"\x00\x00\x00\x00\x01\x00\x00\x00\x02\x00\x00\x00", b""),
    }
    with pytest.raises(
        mzconnector.FieldMismatch, match="kind 'str' cannot hold a field of type int"
    ):
        mzconnector.ColumnBatch.decode(columns_message(2, **wrong_kind), types)
    missing = good_columns(2)
    del missing["f"]
    with pytest.raises(mzconnector.FieldMismatch, match="missing"):
        mzconnector.ColumnBatch.decode(columns_message(2, **missing), types)
    with pytest.raises(mzconnector.FieldMismatch, match="not accepted"):
        mzconnector.ColumnBatch.decode(columns_message(2, **good_columns(2)), types, ["Other"])


def send_columns(conn: mzconnector.Connection, message: mzconnector.Columns) -> None:
    """What ``submit_frame`` sends, without its checks: as a client that does not check."""
    with conn._send_lock:
        conn._send_buffer()
        ledger = conn._ledger
        frame = mzconnector.encode_frame(msgspec.structs.replace(message, first=ledger.sent + 1))
        ledger.sent += message.rows
        ledger.unacked.append((ledger.sent, list(range(message.rows)), None))
        conn._protocol.send_columns([frame])
        conn._transport.send(frame)


def test_the_server_refuses_the_bad_rows_of_a_batch_and_takes_the_others(
    server: ServerProcess,
) -> None:
    with connect(server) as conn:
        send_columns(conn, columns_message(5, **good_columns(5, b"\x01\x01\x00\x01\x01")))
        with pytest.raises(mzconnector.RecordRefused) as caught:
            conn.flush()
        [error] = caught.value.errors
        assert (error.index, error.type, error.field) == (2, "Row", "i")
        assert "got None" in error.message
        assert [conn.receive(timeout=5).i for _ in range(4)] == [0, 1, 3, 4]
        values = conn.mim()
        assert (values["Records In"], values["Records Refused"]) == (4, 1)


def test_a_resent_column_batch_is_taken_once(server: ServerProcess) -> None:
    """Column batches carry the number of their first row in the client's session, as record
    batches do: rows the server took before (a resend after a reconnection) are dropped,
    also from a batch it took only partly."""
    with connect(server) as conn:
        prepared = mzconnector.frame_columns(rows(7), conn.udrs.Row)
        frames = [
            prepared.frame(0, 5, 1),  # rows 0-4, numbered 1-5
            prepared.frame(2, 7, 3),  # rows 2-6: 2-4 taken before, 5 and 6 new
            prepared.frame(0, 3, 1),  # every row taken before
        ]
        with conn._send_lock:
            conn._ledger.sent = 7
            conn._protocol.send_columns(frames)
            for frame in frames:
                conn._transport.send(frame)
        conn.flush()
        assert [conn.receive(timeout=5).i for _ in range(7)] == list(range(7))
        assert conn.mim()["Records In"] == 7  # (after the flush: a row taken twice would show)


def test_the_server_refuses_a_batch_no_row_of_which_fits(server: ServerProcess) -> None:
    with connect(server) as conn:
        wrong = {**good_columns(3), "f": ("int", np.zeros(3, "<i8").tobytes(), b"", b"")}
        send_columns(conn, columns_message(3, **wrong))
        with pytest.raises(mzconnector.RecordRefused) as caught:
            conn.flush()
        assert caught.value.errors[0].field == "f"
        assert len(caught.value.errors) + caught.value.omitted == 3
        assert conn.mim()["Records In"] == 0


def test_decoded_buffers_have_their_own_length() -> None:
    """Whatever msgspec's version (0.18.6 gives decoded memoryviews the whole message's
    shape), the buffers of a received Columns message are as long as what was sent."""
    message = columns_message(3, **good_columns(3, b"\x01\x00\x01"))
    frame = mzconnector.encode_frame(message)
    decoded = mzconnector._message_decoder.decode(memoryview(frame)[4:])
    mzconnector.recast_columns(decoded)
    for sent, got in zip(message.columns, decoded.columns):
        for part in ("data", "offsets", "valid"):
            assert len(getattr(got, part)) == len(getattr(sent, part))
            assert bytes(getattr(got, part)[1:]) == bytes(getattr(sent, part)[1:])
