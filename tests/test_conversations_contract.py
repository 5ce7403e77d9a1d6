"""Promises of the conversations contract (issue 11) that tests/test_conversations.py leaves
untested, end to end against a real server: ``ctx.query``, what a cancel does on the server,
``ack="none"``, ``durable_limit``, the matcher's forms, ``[queries.*]`` errors, the blocking
client's maps, closing a subscription another thread iterates, and ``conn.queries`` for tab
completion.

The server runs tests/workflows/conversations.toml plus what these tests need (the processors
``whoami``, ``persist``, ``chore`` and ``relay`` of conversations.py, and a record type with a
``bool`` and a ``datetime``), written to a temporary TOML.
"""

from __future__ import annotations

import datetime
import rlcompleter
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

import mzconnector
from mzserver import ConfigError, load_config
from mzserver.kv import KvError, KvStore
from tests.conftest import WORKFLOWS, ServerProcess
from tests.test_conversations import TOML, StartServer, connect, wait_for

UTC = datetime.timezone.utc

EXTRA = """
[types.Event]
name = "str"
active = "bool"
level = "int"
at = "datetime"

[queries.whoami]
route = "whoami"
request = "Question"
reply = "Reply"

[queries.persist]
route = "persist"
request = "Question"
reply = "Reply"

[queries.chore]
route = "chores"
request = "Question"
reply = "Reply"

[[processors]]
name = "whoami"
entry = "conversations.py:whoami"
routes = ["whoami"]

[[processors]]
name = "persist"
entry = "conversations.py:persist"
routes = ["persist"]

[[processors]]
name = "chore"
entry = "conversations.py:chore"
routes = ["chores"]

[[processors]]
name = "relay"
entry = "conversations.py:relay"
routes = ["events"]
"""


def contract_toml(folder: Path, durable_limit: int | None = 5, extra: str = EXTRA) -> Path:
    """conversations.toml with ``extra`` added, ``Event`` records accepted (on to ``echo``
    through ``relay``), and ``[connector] durable_limit`` set (None: left to its default)."""
    text = TOML.read_text() + extra
    limit = "" if durable_limit is None else f"durable_limit = {durable_limit}"
    for old, new in [
        ('"conversations.py:', f'"{WORKFLOWS}/conversations.py:'),
        ('accepted_types = ["Reading", "bytes"]', 'accepted_types = ["Reading", "Event", "bytes"]'),
        ('bytes = "commands"', 'bytes = "commands"\nEvent = "events"'),
        ("durable_limit = 1000", limit),
    ]:
        assert old in text
        text = text.replace(old, new)
    path = folder / "contract.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The contract workflow, with ``durable_limit = 5``: one server for the module (a start
    costs a second), so each test uses names of its own and reads MIM counters as deltas."""
    process = ServerProcess(str(contract_toml(tmp_path_factory.mktemp("contract"))))
    yield process
    process.stop()


def mim(conn: mzconnector.Connection, name: str) -> Any:
    return conn.mim()[name]


def counter(conn: mzconnector.Connection, name: str) -> Callable[[], int]:
    """A MIM counter, read through ``conn`` as its change since this call."""
    start = mim(conn, name)
    return lambda: int(mim(conn, name)) - start


# -- queries: ctx.query ------------------------------------------------------------------------


def test_ctx_query_names_the_query_its_id_and_the_asking_connection(
    server: ServerProcess,
) -> None:
    with connect(server, name="first") as one, connect(server, name="second") as two:
        for conn in (one, two, one):
            replies = conn.query("whoami", {"topic": "", "count": 0})
            [call_id] = conn._calls  # the id this client gave the query
            reply = next(replies)
            assert reply.n == conn.connection_id
            name = "first" if conn is one else "second"
            assert reply.text == f"{call_id}|whoami|{conn.connection_id}|{name}"
            assert list(replies) == []
        assert one.connection_id != two.connection_id


# -- queries: cancelling -----------------------------------------------------------------------


def test_replies_made_after_the_cancel_are_dropped_by_the_server(server: ServerProcess) -> None:
    """``persist`` replies once, is cancelled while it waits (shielded), then replies twice
    more and completes: none of that reaches the client, which still listens for the id."""
    with connect(server) as conn:
        call = mzconnector._Call(999, "persist")
        conn._calls[999] = call  # kept: a reply the server sent would land here
        request = msgspec.Raw(msgspec.msgpack.encode(["Question", "late", 3]))
        conn._send_message(mzconnector.Query(999, "persist", request))
        conn._wait(lambda: bool(call.replies), 10, lambda: mzconnector.Timeout("no reply"))
        assert [(r.n, r.text) for r in call.replies] == [(0, "late")]
        conn._send_message(mzconnector.CancelQuery(999))
        conn.kv("gates")["late"] = True  # handled after the cancel: same connection, in order
        events = conn.kv("events")
        wait_for(lambda: "late" in events, "the processor's end")
        assert events["late"] == "answered after the cancel (ctx.cancelled=True)"
        # The replies it made would have been sent before the map's answer above.
        assert [(r.n, r.text) for r in call.replies] == [(0, "late")]
        assert (call.done, call.error) == (False, None)
        assert conn.query_one("ask", {"topic": "dict", "count": 1}).n == 1


def test_a_request_still_queued_when_cancelled_is_never_processed(server: ServerProcess) -> None:
    with connect(server) as conn:
        gates, events = conn.kv("gates"), conn.kv("events")
        busy = conn.query("stream", {"topic": "busy", "count": 2})
        assert next(busy).n == 0  # ``stream`` now waits for its gate: the next request queues
        gates["queued"] = True  # were it processed, it would not wait
        queued = conn.query("stream", {"topic": "queued", "count": 1}, timeout=10)
        queued.close()  # never iterated: cancelled when collected, told with the next message
        del queued
        gates["busy"] = True
        assert [r.n for r in busy] == [1]
        gates["after"] = True
        # The processor answers in order: when this is answered, the queued one was handled.
        assert [r.n for r in conn.query("stream", {"topic": "after", "count": 1}, timeout=10)] == [
            0
        ]
        assert events.get("queued") is None
        assert (events["busy"], events["after"]) == ("completed", "completed")


def test_a_sync_processor_runs_to_its_end_and_its_late_replies_are_dropped(
    server: ServerProcess, tmp_path: Path
) -> None:
    """``chore`` blocks the server until the test lets it go, after the client gave up: the
    cancel cannot reach it, it answers in full, and the client drops what comes."""
    with connect(server) as conn:
        replies = conn.query("chore", {"topic": str(tmp_path), "count": 3}, timeout=0.2)
        wait_for((tmp_path / "started").exists, "the processor's start")
        with pytest.raises(mzconnector.Timeout, match=r"query 'chore': no answer within 0\.2 s"):
            next(replies)  # the cancel goes out now, while the processor runs
        (tmp_path / "go").touch()
        events = conn.kv("events")
        assert events["chore"] == "ran to its end (ctx.cancelled=False)"
        assert conn._calls == {}
        assert [r.text for r in conn.query("ask", {"topic": "count", "count": 2})] == [
            "part 0",
            "ask",
        ]
        assert conn.receive_many(timeout=0.2) == []


# -- subscriptions: ack="none" ---------------------------------------------------------------


def test_ack_none_is_paced_only_by_the_connection_and_leaves_nothing_unacknowledged(
    server: ServerProcess,
) -> None:
    with connect(server) as conn:
        unacknowledged = counter(conn, "Unacknowledged Records")
        records_out = counter(conn, "Records Out")
        sub = conn.subscribe("alerts", {"value": 81}, ack="none", max_pending=2)
        conn.submit(b"emit:5:81")
        conn.flush()
        got = [sub.receive(timeout=5) for _ in range(5)]  # never held at max_pending
        assert [r.sensor for r in got] == [f"s{i}" for i in range(5)]
        with pytest.raises(mzconnector.SubscriptionError, match=r"acknowledges by itself"):
            sub.ack(got[0])
        with pytest.raises(mzconnector.SubscriptionError, match=r"acknowledges by itself"):
            sub.ack_all(got[-1])
        conn.submit(b"emit:3:81")  # delivered to the client, never handed to the notebook
        conn.flush()
        wait_for(lambda: records_out() >= 8, "the second delivery")
        sub.close()  # closed with three records delivered and never handed out
        assert conn.query_one("ask", {"topic": "dict", "count": 1}).n == 1
        assert unacknowledged() == 0


# -- subscriptions: durable_limit ------------------------------------------------------------


def test_a_stopped_subscription_past_durable_limit_drops_the_oldest_and_counts_them(
    server: ServerProcess,
) -> None:
    with connect(server) as conn:
        undeliverable = counter(conn, "Undeliverable Records")
        sub = conn.subscribe("alerts", {"value": 82})
        sub.stop()
        conn.submit(b"emit:8:82")
        conn.flush()
        wait_for(lambda: undeliverable() == 3, "the drop")
        sub.start()
        assert [sub.receive(timeout=5).sensor for _ in range(5)] == [f"s{i}" for i in range(3, 8)]
        assert sub.dropped == 3
        with pytest.raises(mzconnector.Timeout):
            sub.receive(timeout=0)
        assert undeliverable() == 3


def test_a_durable_past_durable_limit_while_away_keeps_the_newest(server: ServerProcess) -> None:
    with connect(server, client_id="erin") as conn:
        conn.subscribe("alerts", {"value": 83}, durable="d")
    with connect(server) as other:
        undeliverable = counter(other, "Undeliverable Records")
        other.submit(b"emit:8:83")
        other.flush()
        wait_for(lambda: undeliverable() == 3, "the drop")
    with connect(server, client_id="erin") as conn:
        sub = conn.subscribe("alerts", {"value": 83}, durable="d")
        assert [sub.receive(timeout=5).sensor for _ in range(5)] == [f"s{i}" for i in range(3, 8)]
        assert sub.dropped == 3  # told with the first delivery after it came back
        with pytest.raises(mzconnector.Timeout):
            sub.receive(timeout=0)


def test_a_stopped_durable_past_durable_limit_drops_the_oldest(server: ServerProcess) -> None:
    with connect(server, client_id="fay") as conn:
        undeliverable = counter(conn, "Undeliverable Records")
        sub = conn.subscribe("alerts", {"value": 84}, durable="d", ack="client")
        sub.stop()
        conn.submit(b"emit:7:84")
        conn.flush()
        wait_for(lambda: undeliverable() == 2, "the drop")
        sub.start()
        got = [sub.receive(timeout=5) for _ in range(5)]
        assert [r.sensor for r in got] == [f"s{i}" for i in range(2, 7)]
        assert sub.dropped == 2
        sub.ack_all(got[-1])


def test_durable_limit_is_100000_by_default(start_server: StartServer, tmp_path: Path) -> None:
    toml = contract_toml(tmp_path, durable_limit=None)
    assert load_config(toml).connector.durable_limit == 100_000
    server = start_server(str(toml))
    with connect(server, client_id="gus") as conn:
        conn.subscribe("alerts", durable="all")
    with connect(server) as conn:
        conn.submit(b"emit:100002:85")
        conn.flush()
        wait_for(lambda: mim(conn, "Undeliverable Records") == 2, "the drop", timeout=20)
    with connect(server, client_id="gus") as conn:
        sub = conn.subscribe("alerts", durable="all")
        assert sub.receive(timeout=10).sensor == "s2"  # the two oldest went


# -- subscriptions: the matcher's forms ------------------------------------------------------


def test_matcher_values_are_converted_and_double_equals_compares_booleans(
    server: ServerProcess,
) -> None:
    with connect(server) as conn:
        Event = conn.udrs.Event
        new_year = datetime.datetime(2024, 1, 1, tzinfo=UTC)
        matchers: dict[str, dict[str, Any]] = {
            "true": {"active": {"==": True}},
            "present": {"active": True},
            "false": {"active": {"==": False}},
            "absent": {"active": False},  # a bool field is never None
            "level as text": {"level": "3"},
            "same instant": {"at": "2024-01-01T01:00:00+01:00"},
            "name ==": {"name": {"==": "b"}},
            "all of": {"level": 3, "active": {"==": True}},
        }
        subs = {what: conn.subscribe("echo", matcher) for what, matcher in matchers.items()}
        conn.submit_many(
            [
                Event(name="a", active=True, level=3, at=new_year),
                Event(name="b", active=False, level=3, at=new_year.replace(month=6)),
                Event(name="c", active=True, level=1, at=new_year),
            ]
        )
        conn.flush()
        expected = {
            "true": "ac",
            "present": "abc",
            "false": "b",
            "absent": "",
            "level as text": "ab",
            "same instant": "ac",
            "name ==": "b",
            "all of": "a",
        }
        for what, names in expected.items():
            sub = subs[what]
            got = "".join(sub.receive(timeout=5).name for _ in names)
            # One batch, one delivery: whatever else matched would be here already.
            with pytest.raises(mzconnector.Timeout):
                sub.receive(timeout=0)
            assert got == names, what


def test_a_matcher_value_the_field_cannot_hold_is_refused(server: ServerProcess) -> None:
    """Equality is the only comparison: ``{">": 2}`` is a value an int field cannot hold."""
    with connect(server) as conn:
        with pytest.raises(mzconnector.SubscriptionError) as info:
            conn.subscribe("echo", {"level": "three"})
        assert str(info.value) == "'three' cannot match field 'level' (Event.level is int)"
        with pytest.raises(mzconnector.SubscriptionError) as info:
            conn.subscribe("echo", {"level": {">": 2}})
        assert str(info.value) == "{'>': 2} cannot match field 'level' (Event.level is int)"
        with pytest.raises(mzconnector.SubscriptionError) as info:
            conn.subscribe("echo", {"at": "yesterday"})
        assert str(info.value) == "'yesterday' cannot match field 'at' (Event.at is datetime)"


# -- [queries.*] errors ------------------------------------------------------------------------

QUERY = """
[queries.{name}]
route = "{route}"
request = "{request}"
reply = "Reply"
{more}
"""


@pytest.mark.parametrize(
    ("table", "key", "problem"),
    [
        (
            {"request": "Nope"},
            "queries.odd.request",
            "unknown record type 'Nope' (declared: Place, Reading, Question, Reply, Event)",
        ),
        ({"route": "nowhere"}, "queries.odd.route", "no processor consumes route 'nowhere'"),
        (
            {"more": 'colour = "red"'},
            "queries.odd.colour",
            "unknown key (known keys: route, request, reply)",
        ),
    ],
)
def test_query_tables_that_cannot_be_used_are_config_errors(
    tmp_path: Path, table: dict[str, str], key: str, problem: str
) -> None:
    fields = {"name": "odd", "route": "questions", "request": "Question", "more": ""} | table
    toml = contract_toml(tmp_path, extra=EXTRA + QUERY.format(**fields))
    with pytest.raises(ConfigError) as info:
        load_config(toml)
    assert (info.value.key, info.value.problem) == (key, problem)
    assert str(info.value) == f"{toml}: {key}: {problem}"


# -- key-value maps: the blocking client -------------------------------------------------------


def test_a_map_removes_lists_its_items_and_keeps_datetimes(server: ServerProcess) -> None:
    when = datetime.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    with connect(server) as a, connect(server) as b:
        m = a.kv("contract")
        event = a.udrs.Event(name="e", active=True, level=2, at=when)
        m["when"] = when
        m[7] = [1, "two", None]
        m["event"] = event
        m.set("nested", {"at": [when], "n": 1.5})
        m["local"] = datetime.datetime(2024, 5, 6, 9, 8, 9, tzinfo=datetime.timezone(
            datetime.timedelta(hours=2)))  # fmt: skip
        items = dict(b.kv("contract").items())
        assert items == {
            "when": when,
            7: [1, "two", None],
            "event": b.udrs.Event(name="e", active=True, level=2, at=when),
            "nested": {"at": [when], "n": 1.5},
            "local": datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC),  # the same instant
        }
        assert type(items["event"]) is b.udrs.Event
        assert items["event"].at == when
        assert b.kv("contract").remove("when") is True
        assert a.kv("contract").remove("when") is False
        assert 7 in m
        assert m.remove(7) is True
        assert sorted(m.keys()) == ["event", "local", "nested"]
        assert len(b.kv("contract")) == 3
        with pytest.raises(mzconnector.KvError, match="without a timezone"):
            m["naive"] = datetime.datetime(2024, 5, 6)  # it would come back as a string
        with pytest.raises(mzconnector.KvError, match=r"\[0\].*without a timezone"):
            m["naive"] = [datetime.datetime(2024, 5, 6)]
        assert "naive" not in m
    # A processor's map (ctx.kv) says the same.
    processors_map = KvStore(load_config(TOML).codec).map("contract")
    with pytest.raises(KvError, match=r"\['at'\].*without a timezone"):
        processors_map["naive"] = {"at": datetime.datetime(2024, 5, 6)}
    processors_map["aware"] = {"at": when}
    assert processors_map["aware"] == {"at": when}


# -- closing a subscription another thread iterates -------------------------------------------


def test_close_ends_an_iteration_running_in_another_thread(server: ServerProcess) -> None:
    with connect(server) as conn:
        sub = conn.subscribe("alerts", {"value": 86})
        seen: list[Any] = []
        first = threading.Event()

        def iterate() -> None:
            for record in sub:
                seen.append(record)
                first.set()

        thread = threading.Thread(target=iterate, daemon=True)
        thread.start()
        conn.submit(b"emit:1:86")
        conn.flush()
        assert first.wait(10)
        # It waits for the next record, reading the socket itself.
        wait_for(lambda: conn._turn.reader is mzconnector._Reader.CALLER, "the iteration's read")
        sub.close()
        thread.join(10)
        assert not thread.is_alive()
        assert [r.sensor for r in seen] == ["s0"]
        assert conn.query_one("ask", {"topic": "dict", "count": 1}).n == 1


# -- conn.queries: tab completion --------------------------------------------------------------


def test_conn_queries_completes_names_as_attributes(server: ServerProcess) -> None:
    with connect(server) as conn:
        queries = conn.queries
        assert dir(queries) == ["ask", "chore", "persist", "stream", "whoami"]
        assert "whoami" in queries
        assert len(queries) == 5
        assert queries.whoami is queries["whoami"]
        assert (queries.whoami.request, queries.whoami.reply) == (
            conn.udrs.Question,
            conn.udrs.Reply,
        )
        completer = rlcompleter.Completer({"queries": queries})
        assert completer.complete("queries.wh", 0) == "queries.whoami("
        assert completer.complete("queries.wh", 1) is None
        with pytest.raises(AttributeError) as info:
            queries.nope  # noqa: B018
        assert str(info.value) == (
            "queries has no 'nope'; it has: ask, stream, whoami, persist, chore"
        )
        assert queries.whoami({"topic": "", "count": 0}, timeout=10).__next__().n == (
            conn.connection_id
        )
