"""Conversations with the workflow, end to end against a real server (``python -m mzserver``
on tests/workflows/conversations.toml): queries with streamed replies, subscriptions with
matchers, acks, durables and taps, and shared key-value maps."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

import mzconnector
from tests.conftest import ROOT, WORKFLOWS, ServerProcess

TOML = WORKFLOWS / "conversations.toml"
StartServer = Callable[..., ServerProcess]


@pytest.fixture
def server(start_server: StartServer) -> ServerProcess:
    return start_server(str(TOML))


def connect(server: ServerProcess, **kwargs: Any) -> mzconnector.Connection:
    return mzconnector.connect("127.0.0.1", server.port, timeout=10, **kwargs)


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"not within {timeout} s: {what}")


def drain(sub: mzconnector.Subscription, quiet: float = 0.3) -> list[Any]:
    """What a subscription receives until it has been quiet for ``quiet`` seconds."""
    out = []
    while True:
        try:
            out.append(sub.receive(timeout=quiet))
        except mzconnector.Timeout:
            return out


# -- queries -------------------------------------------------------------------------------------


def test_a_query_streams_its_replies_while_the_processor_still_works(
    server: ServerProcess,
) -> None:
    with connect(server) as conn:
        replies = conn.query("stream", {"topic": "slow", "count": 3})
        first = next(replies)  # the processor now waits for its gate: it is still working
        assert (first.n, first.text) == (0, "slow")
        assert conn.kv("events")["slow"] == "started"
        conn.kv("gates")["slow"] = True
        assert [r.n for r in replies] == [1, 2]
        assert conn.kv("events")["slow"] == "completed"


def test_query_answers_partial_complete_empty_and_error(server: ServerProcess) -> None:
    with connect(server) as conn:
        Question = conn.udrs.Question
        replies = list(conn.query("ask", Question(topic="count", count=3)))
        assert [(r.n, r.text) for r in replies] == [(0, "part 0"), (1, "part 1"), (2, "ask")]
        assert list(conn.query("ask", {"topic": "none", "count": 0})) == []
        assert list(conn.query("ask", {"topic": "silent", "count": 0})) == []  # ends empty
        assert conn.query_one("ask", {"topic": "dict", "count": 7}) == conn.udrs.Reply(
            n=7, text="from a dict"
        )
        with pytest.raises(mzconnector.QueryError) as info:
            conn.query_one("ask", {"topic": "error", "count": 12})
        error = info.value
        assert (error.code, error.template, error.parameters) == (
            "out-of-range",
            "count {0} is more than {1}",
            [12, 10],
        )
        assert error.message == str(error) == "count 12 is more than 10"
        with pytest.raises(mzconnector.QueryError, match="gave 3 replies, not one") as info:
            conn.query_one("ask", {"topic": "count", "count": 3})
        assert info.value.code == "not-one"
        with pytest.raises(mzconnector.QueryError) as info:
            conn.query_one("ask", {"topic": "boom", "count": 1})
        assert info.value.code == "processor-error"
        assert "no topic 'boom'" in info.value.message
        assert conn.mim()["Processor Errors"] == 1


def test_query_schemas_are_enforced_at_both_ends(server: ServerProcess) -> None:
    with connect(server) as conn:
        with pytest.raises(mzconnector.QueryError) as info:  # nothing is sent
            conn.query("ask", {"topic": 5, "count": 1})
        assert info.value.code == "bad-request"
        assert info.value.message == (
            "the request does not match Question.topic: expected str, got int 5"
        )
        with pytest.raises(mzconnector.QueryError, match="not a field of Question"):
            conn.query("ask", {"topic": "x", "count": 1, "colour": "red"})
        with pytest.raises(mzconnector.QueryError, match=r"Question\.count: missing"):
            conn.query("ask", {"topic": "x"})
        with pytest.raises(mzconnector.QueryError) as info:
            conn.query("nope", {})
        assert info.value.code == "unknown-query"
        assert info.value.message == "no query nope (queries: ask, stream)"
        # A reply that does not match the reply type: the client gets an error naming it.
        with pytest.raises(mzconnector.QueryError) as info:
            conn.query_one("ask", {"topic": "bad", "count": 1})
        assert info.value.code == "bad-reply"
        assert info.value.message == (
            "the reply's field n does not match Reply: expected int, got str 'one'"
        )
        # The server refuses what this client never sends: a request built by hand.
        call = mzconnector._Call(999, "ask")
        conn._calls[999] = call
        request = msgspec.Raw(msgspec.msgpack.encode(["Question", 5, 1]))
        conn._send_message(mzconnector.Query(999, "ask", request))
        with pytest.raises(mzconnector.QueryError) as info:
            list(conn._replies(call, time.monotonic() + 5, 5))
        assert info.value.code == "bad-request"
        assert info.value.message == (
            "the request does not match Question.topic: expected str, got int 5"
        )


def test_queries_list_their_types(server: ServerProcess) -> None:
    with connect(server) as conn:
        assert sorted(conn.queries) == ["ask", "stream"]
        ask = conn.queries.ask
        assert (ask.request, ask.reply) == (conn.udrs.Question, conn.udrs.Reply)
        assert "topic: str, count: int" in ask.__doc__
        assert "n: int, text: str" in ask.__doc__
        assert [r.n for r in ask({"topic": "count", "count": 2})] == [0, 1]


def test_many_queries_interleave_with_each_other_and_with_pushes(server: ServerProcess) -> None:
    with connect(server) as conn:
        long = conn.query("stream", {"topic": "long", "count": 2})
        assert next(long).n == 0  # in flight, waiting for its gate
        sub = conn.subscribe("echo")
        conn.submit(conn.udrs.Reading(sensor="meanwhile", value=1.0))
        assert conn.query_one("ask", {"topic": "dict", "count": 1}).n == 1
        conn.flush()
        assert sub.receive(timeout=5).sensor == "meanwhile"
        short = [r.text for r in conn.query("ask", {"topic": "count", "count": 2})]
        assert short == ["part 0", "ask"]
        conn.kv("gates")["long"] = True
        assert [r.n for r in long] == [1]


def test_closing_the_iterator_cancels_the_query(server: ServerProcess) -> None:
    with connect(server) as conn:
        replies = conn.query("stream", {"topic": "closed", "count": 5})
        next(replies)
        replies.close()
        events = conn.kv("events")
        wait_for(lambda: events.get("closed", "").startswith("cancelled"), "the cancel")
        assert events["closed"] == "cancelled (ctx.cancelled=True)"


def test_a_timeout_cancels_the_query(server: ServerProcess) -> None:
    with connect(server) as conn:
        started = time.monotonic()
        with pytest.raises(mzconnector.Timeout, match=r"query 'stream': no answer within 0\.3 s"):
            list(conn.query("stream", {"topic": "late", "count": 5}, timeout=0.3))
        assert time.monotonic() - started < 5
        events = conn.kv("events")
        wait_for(lambda: events.get("late", "").startswith("cancelled"), "the cancel")
        # The connection goes on.
        assert conn.query_one("ask", {"topic": "dict", "count": 2}).n == 2


def test_the_async_client_asks_the_same_way(server: ServerProcess) -> None:
    async def main() -> None:
        conn = await mzconnector.connect_async("127.0.0.1", server.port, timeout=10)
        async with conn:
            replies = [r.n async for r in conn.query("ask", {"topic": "count", "count": 3})]
            assert replies == [0, 1, 2]
            assert (await conn.query_one("ask", {"topic": "dict", "count": 4})).n == 4
            with pytest.raises(mzconnector.QueryError, match="more than 10"):
                await conn.query_one("ask", {"topic": "error", "count": 11})
            stream = conn.query("stream", {"topic": "async", "count": 3})
            async for reply in stream:
                assert reply.n == 0
                break
            await stream.aclose()  # type: ignore[attr-defined]
            events = conn.kv("events")
            for _ in range(500):
                if (await events.get("async", "")).startswith("cancelled"):
                    break
                await anyio.sleep(0.01)
            assert await events.get("async") == "cancelled (ctx.cancelled=True)"

    for backend in ("asyncio", "trio"):
        anyio.run(main, backend=backend)


# -- subscriptions ----------------------------------------------------------------------------


def test_a_matcher_picks_records_by_dotted_paths_and_presence(server: ServerProcess) -> None:
    with connect(server) as conn:
        Reading, Place = conn.udrs.Reading, conn.udrs.Place
        in_lund = conn.subscribe("echo", {"place.city": "Lund"})
        placed = conn.subscribe("echo", {"place": True, "value": 2})
        unplaced = conn.subscribe("echo", {"place": False})
        readings = [
            Reading(sensor="a", value=1.0, place=Place(city="Lund")),
            Reading(sensor="b", value=2.0, place=Place(city="Malmö")),
            Reading(sensor="c", value=2.0),
        ]
        conn.submit_many(readings)
        conn.flush()
        assert [r.sensor for r in drain(in_lund)] == ["a"]
        assert [r.sensor for r in drain(placed)] == ["b"]
        assert [r.sensor for r in drain(unplaced)] == ["c"]
        # A connection with a subscription on a route gets that route only through them.
        assert conn.receive_many(timeout=0.3) == []


def test_a_matcher_is_checked_against_the_declared_types(server: ServerProcess) -> None:
    with connect(server) as conn:
        with pytest.raises(mzconnector.SubscriptionError, match="no record type has a field 'x'"):
            conn.subscribe("echo", {"x": 1})
        with pytest.raises(mzconnector.SubscriptionError, match=r"place\.city"):
            conn.subscribe("echo", {"place.city": 5})
        with pytest.raises(mzconnector.SubscriptionError, match="cannot be subscribed to"):
            conn.subscribe("readings")
        with pytest.raises(mzconnector.SubscriptionError, match="cannot be tapped"):
            conn.subscribe("echo", tap=True)
        with pytest.raises(mzconnector.SubscriptionError, match="ack must be one of"):
            conn.subscribe("echo", ack="sometimes")
        with pytest.raises(mzconnector.SubscriptionError, match="connect with client_id"):
            conn.subscribe("echo", durable="mine")
        # None of that broke anything.
        sub = conn.subscribe("echo")
        conn.submit(conn.udrs.Reading(sensor="ok", value=0.0))
        assert sub.receive(timeout=5).sensor == "ok"


def test_connections_without_a_subscription_keep_the_broadcast(server: ServerProcess) -> None:
    with connect(server) as plain, connect(server) as subscriber:
        subscriber.subscribe("echo", {"value": 99.0})
        plain.submit(plain.udrs.Reading(sensor="x", value=1.0))
        plain.flush()
        assert plain.receive(timeout=5).sensor == "x"
        assert subscriber.receive_many(timeout=0.3) == []


def test_client_acks_hold_delivery_at_max_pending(server: ServerProcess) -> None:
    with connect(server) as conn:
        sub = conn.subscribe("alerts", ack="client", max_pending=3)
        conn.submit(b"emit:7:60")
        conn.flush()
        first = [sub.receive(timeout=5) for _ in range(3)]
        with pytest.raises(mzconnector.Timeout):
            sub.receive(timeout=0.3)  # three unacknowledged: the server holds the rest
        sub.ack(first[0])
        fourth = sub.receive(timeout=5)
        with pytest.raises(mzconnector.Timeout):
            sub.receive(timeout=0.3)
        sub.ack_all(fourth)  # everything up to it, the 2nd and 3rd included
        rest = [sub.receive(timeout=5) for _ in range(3)]
        assert [r.sensor for r in [*first, fourth, *rest]] == [f"s{i}" for i in range(7)]
        with pytest.raises(mzconnector.SubscriptionError, match="not one this subscription"):
            sub.ack(first[0])
    # Delivered and never acknowledged when the connection closed: counted.
    with connect(server) as conn:
        assert conn.mim()["Unacknowledged Records"] == 3


def test_stop_holds_records_and_start_delivers_them(server: ServerProcess) -> None:
    with connect(server) as conn:
        sub = conn.subscribe("alerts")
        sub.stop()
        conn.submit(b"emit:4:70")
        conn.flush()
        with pytest.raises(mzconnector.Timeout):
            sub.receive(timeout=0.3)
        sub.start()
        assert [r.sensor for r in drain(sub)] == ["s0", "s1", "s2", "s3"]
        sub.close()
        with pytest.raises(mzconnector.SubscriptionError, match="closed"):
            sub.receive(timeout=1)
        assert list(sub) == []  # iteration of a closed subscription ends
        # Closed: the route comes through receive() again.
        conn.submit(b"emit:1:70")
        assert conn.receive(timeout=5).sensor == "s0"


def test_a_durable_collects_while_its_client_is_away(server: ServerProcess) -> None:
    with connect(server, client_id="carol") as conn:
        sub = conn.subscribe("alerts", {"value": 55}, durable="d", ack="client")
        conn.submit(b"emit:3:55")
        conn.flush()
        first = sub.receive(timeout=5)
        sub.ack(first)
        assert sub.receive(timeout=5).sensor == "s1"  # delivered, never acknowledged
    with connect(server) as other:
        other.submit(b"emit:2:55")  # while carol is away
        other.flush()
    with connect(server, client_id="carol") as conn:
        sub = conn.subscribe("alerts", {"value": 55}, durable="d", ack="client")
        # What was never acknowledged first, then what came while she was away, in order.
        assert [r.sensor for r in drain(sub)] == ["s1", "s2", "s0", "s1"]
        with (
            connect(server, client_id="carol") as intruder,
            pytest.raises(mzconnector.SubscriptionError, match="already in use"),
        ):
            intruder.subscribe("alerts", durable="d")


def test_a_shared_durable_spreads_its_records_over_its_clients(server: ServerProcess) -> None:
    with connect(server, client_id="w1") as w1, connect(server, client_id="w2") as w2:
        s1 = w1.subscribe("alerts", {"value": 66}, durable="jobs", type="shared", ack="client")
        s2 = w2.subscribe("alerts", {"value": 66}, durable="jobs", type="shared", ack="client")
        w1.submit(b"emit:10:66")
        w1.flush()
        got1, got2 = drain(s1), drain(s2)
        assert got1
        assert got2
        assert sorted(r.sensor for r in got1 + got2) == sorted(f"s{i}" for i in range(10))


def test_a_last_value_durable_keeps_the_newest_record_per_key(server: ServerProcess) -> None:
    with connect(server, client_id="dave") as conn:
        sub = conn.subscribe("echo", durable="lv", type="last-value", key="sensor")
        sub.stop()
        Reading = conn.udrs.Reading
        conn.submit_many([Reading(sensor=s, value=float(v)) for v in range(3) for s in ("a", "b")])
        conn.flush()
        sub.start()
        assert [(r.sensor, r.value) for r in drain(sub)] == [("a", 2.0), ("b", 2.0)]
        with pytest.raises(mzconnector.SubscriptionError, match="needs key='field'"):
            conn.subscribe("echo", durable="lv2", type="last-value")


def test_a_tap_that_falls_behind_never_slows_the_workflow(server: ServerProcess) -> None:
    """A tap on the internal route ``readings`` that takes one record at a time: it holds at
    most durable_limit (1000) records and drops the oldest it did not get to look at, yet every
    reading is processed."""
    with connect(server) as tapper, connect(server) as pusher:
        tap = tapper.subscribe("readings", {"value": 1.0}, tap=True, ack="client", max_pending=1)
        Reading = pusher.udrs.Reading
        count = 5000
        pusher.submit_many([Reading(sensor=f"p{i}", value=1.0) for i in range(count)])
        pusher.flush()
        latest = pusher.kv("latest")
        wait_for(lambda: latest.get(f"p{count - 1}") == 1.0, "every reading processed")
        # It fell behind: it dropped what it could not look at, in order, and said so.
        received = []
        while True:
            try:
                received.append(tap.receive(timeout=0.5))
            except mzconnector.Timeout:
                break
            tap.ack(received[-1])
        numbers = [int(r.sensor[1:]) for r in received]
        assert numbers == sorted(numbers)
        assert numbers[-1] == count - 1
        assert tap.dropped > 0
        assert len(received) + tap.dropped == count


# -- key-value maps --------------------------------------------------------------------------


def test_a_map_is_shared_by_connections_and_processors(server: ServerProcess) -> None:
    with connect(server) as a, connect(server) as b:
        settings = a.kv("settings")
        settings["threshold"] = 50
        settings.set("home", a.udrs.Place(city="Lund"))
        assert b.kv("settings")["threshold"] == 50
        assert b.kv("settings").get("home") == b.udrs.Place(city="Lund")
        assert "threshold" in b.kv("settings")
        assert len(b.kv("settings")) == 2
        assert sorted(b.kv("settings").keys()) == ["home", "threshold"]
        del b.kv("settings")["threshold"]
        with pytest.raises(KeyError):
            settings["threshold"]
        with pytest.raises(KeyError):
            del settings["threshold"]
        assert settings.get("threshold", "gone") == "gone"
        assert a.kv("other").items() == []  # maps are separate by name
        # What processors write, clients read.
        a.submit(a.udrs.Reading(sensor="k1", value=3.5))
        a.flush()
        assert wait_for(lambda: b.kv("latest").get("k1"), "the processor's write") == 3.5
        with pytest.raises(mzconnector.KvError, match="a string or an integer"):
            settings[1.5] = 1
        with pytest.raises(mzconnector.KvError, match="cannot store"):
            settings["x"] = object()


def test_maps_in_a_file_survive_a_kill(tmp_path: Path) -> None:
    toml = tmp_path / "kv.toml"
    text = TOML.read_text().replace('"conversations.py:', f'"{WORKFLOWS}/conversations.py:')
    toml.write_text(text + '\n[kv]\npath = "state.db"\n')
    for round_ in range(2):
        proc = subprocess.Popen(
            [sys.executable, "-m", "mzserver", str(toml), "--port", "0", "--log-level", "ERROR"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            port = int(proc.stdout.readline().rsplit(":", 1)[1])
            with mzconnector.connect("127.0.0.1", port) as conn:
                store = conn.kv("store")
                if round_ == 0:
                    store["kept"] = {"n": [1, 2], "when": "now"}
                    conn.kv("other")[7] = b"bytes"
                else:
                    assert store["kept"] == {"n": [1, 2], "when": "now"}
                    assert conn.kv("other")[7] == b"bytes"
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()  # type: ignore[union-attr]


def test_the_async_client_subscribes_and_shares_maps(server: ServerProcess) -> None:
    async def main() -> None:
        conn = await mzconnector.connect_async("127.0.0.1", server.port, timeout=10)
        async with conn:
            sub = await conn.subscribe("alerts", ack="client", max_pending=2)
            conn.submit(b"emit:3:80")
            await conn.flush()
            got = [await sub.receive(timeout=5) for _ in range(2)]
            with pytest.raises(mzconnector.Timeout):
                await sub.receive(timeout=0.3)
            await sub.ack_all(got[-1])
            assert (await sub.receive(timeout=5)).sensor == "s2"
            await sub.stop()
            await sub.start()
            await sub.close()
            store = conn.kv("async")
            await store.set("k", [1, None])
            assert await store.get("k") == [1, None]
            assert await store.contains("k")
            assert await store.length() == 1
            assert await store.remove("k")

    for backend in ("asyncio", "trio"):
        anyio.run(main, backend=backend)
