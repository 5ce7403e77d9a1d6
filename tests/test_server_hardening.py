"""Nothing a processor does breaks a client, every end of a connection is told, one slow client
never holds up the others, and input that is legal but extreme costs bounded time and memory.
In-process servers (``serve`` in a nursery) and raw sans-IO clients, as in test_server.py."""

from __future__ import annotations

import logging
import socket
import struct
import time
from typing import Any

import msgspec
import pytest
import trio
import trio.testing

from mzconnector import (
    MAX_BATCH_RECORDS,
    NEED_DATA,
    PROTOCOL_VERSION,
    Ack,
    Error,
    Flush,
    Hello,
    Notice,
    Protocol,
    Records,
    Refused,
    Role,
    Welcome,
    encode_frame,
)
from mzserver import Config, ConnectionEnded, ConnectionRequest
from tests.test_server import Collector, RawClient, batch, make_config, running, wire

# -- nothing a processor does breaks a client --------------------------------------------------


async def test_a_routed_record_that_does_not_match_its_type_is_a_processor_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def proc(record: Any, ctx: Any) -> None:
        ctx.route("back", ctx.udrs.Subscriber(msisdn=5, balance="x"))  # the class does not check
        ctx.route("back", record)

    async with running(make_config(proc)) as h:
        client = await h.connect()
        bystander = await h.connect("bystander")
        good = client.types["Subscriber"](msisdn="4670", balance=1)
        with caplog.at_level(logging.ERROR, logger="mzserver"):
            await client.send(batch([good, b"raw"]), Flush())
            others, received = await client.events_until(Ack, records=2)
        assert others == [Ack(2)]
        assert received == [good, b"raw"]  # the bad ones are left out, the rest arrives
        _, seen = await bystander.events_until(records=2)
        assert wire(seen) == wire([good, b"raw"])
        assert h.statistics()["Processor Errors"] == 2
        [first, _] = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert "processor 'proc' routed a Subscriber to route 'back'" in first
        assert "Subscriber.msisdn: expected str, got int 5" in first
        # Both clients are still connected and served.
        await client.send(batch([good]), Flush())
        others, received = await client.events_until(Ack, records=1)
        assert (others, received) == ([Ack(3)], [good])


# -- every end of a connection is told ---------------------------------------------------------


async def test_a_connection_reset_after_the_handshake_still_ends_it_for_the_workflow() -> None:
    events: list[Any] = []
    ended = trio.Event()

    def gate(event: Any, ctx: Any) -> None:
        events.append(event)
        if isinstance(event, ConnectionRequest):
            ctx.accept(event)
        elif isinstance(event, ConnectionEnded):
            ended.set()

    config = Config.from_dict(
        {
            "connector": {
                "port": 0,
                "accepted_types": ["bytes"],
                "output_routes": {"bytes": "in"},
                "connection_control": True,
                "connection_request_route": "control",
            },
            "processors": [
                {"name": "gate", "entry": gate, "routes": ["control"]},
                {"name": "sink", "entry": lambda r, c: None, "routes": ["in"]},
            ],
        }
    )
    async with running(config) as h:
        client = await RawClient.connect(h.server.port)
        # SO_LINGER 0: close() resets the connection (RST) instead of a clean FIN.
        client.stream.socket.setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
        )
        client.stream.socket.close()
        with trio.fail_after(5):
            await ended.wait()
        assert [type(e) for e in events] == [ConnectionRequest, ConnectionEnded]
        assert events[1].id == events[0].id
        assert events[1].reason.startswith("the connection was lost")


# -- one slow client never holds up the others ---------------------------------------------------


async def test_one_client_that_never_reads_does_not_slow_the_others() -> None:
    """Before: every broadcast waited delivery_timeout for the stalled client, so each round
    trip of a live client took exactly that long. Now the stalled client is waited for once;
    after that its records are counted undeliverable at once, until it reads again."""
    timeout = 2.0
    config = make_config(Collector(), outbox_size=2, delivery_timeout=timeout)
    async with running(config) as h:
        live = await h.connect("live")
        stalled = await h.connect("stalled")  # never reads, until the end
        chunk = b"x" * 65536
        # Fill what the stalled client's socket and outbox hold, until it is given up on.
        with trio.fail_after(30):
            while h.statistics()["Undeliverable Records"] == 0:
                await live.send(batch([chunk] * 8))
                await live.events_until(records=8)
        given_up = h.statistics()["Undeliverable Records"]
        slowest = 0.0
        for i in range(20):
            started = time.monotonic()
            await live.send(batch([b"ping %d" % i]))
            _, received = await live.events_until(records=1)
            slowest = max(slowest, time.monotonic() - started)
            assert received == [b"ping %d" % i]
        assert slowest < timeout / 2, slowest
        # Each ping for the stalled client was counted at once.
        assert h.statistics()["Undeliverable Records"] == given_up + 20
        # Once it reads, it is told what it missed, and served again.
        with trio.fail_after(10):
            others, _ = await stalled.events_until(Notice)
        assert others[-1].dropped == h.statistics()["Undeliverable Records"]
        await live.send(batch([b"after"]))
        received = []
        while b"after" not in received:
            _, more = await stalled.events_until(records=1)
            received += more
        assert set(received) == {chunk, b"after"}  # what was queued for it, then the new one


# -- legal but extreme input ---------------------------------------------------------------------


@pytest.mark.parametrize("busy", [False, True], ids=["idle", "busy"])
async def test_an_object_larger_than_a_frame_is_counted_undeliverable(
    caplog: pytest.LogCaptureFixture, busy: bool
) -> None:
    """Before: a processor that was busy crashed the server; an idle one closed the sender's
    connection with a traceback."""

    async def proc(record: Any, ctx: Any) -> None:
        if busy:
            await trio.sleep(0.01)  # the next batch waits in the inbox: the processor's task
        ctx.route("back", b"x" * 100_000)  # bytes over the frame size
        ctx.route("back", {"big": "y" * 100_000})  # an object pickled over the frame size
        ctx.route("back", record)

    config = make_config(proc, max_frame_size=65536)
    async with running(config) as h:
        client = await h.connect()
        with caplog.at_level(logging.ERROR, logger="mzserver"):
            await client.send(batch([b"a"]), batch([b"b"]), Flush())
            others, received = await client.events_until(Ack, records=2)
        assert received == [b"a", b"b"]
        assert others == [Ack(2)]
        assert h.statistics()["Undeliverable Records"] == 4
        messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(messages) == 4
        assert "a bytes of 100005 bytes on route 'back' does not fit in a frame" in messages[0]
        assert "max_frame_size is 65536 bytes" in messages[0]
        assert "a pickled object of" in messages[1]
        assert not any(r.exc_info for r in caplog.records)


async def test_a_batch_of_many_bad_records_gets_a_bounded_report() -> None:
    """Before: one legal frame of 4,000,000 invalid records grew the server by ~929 MB, blocked
    it for 7.6 s and made a Refused frame too large to send. Now a batch holds at most
    MAX_BATCH_RECORDS records, the report describes the first 100 and counts the rest, and
    other connections are served meanwhile."""
    collector = Collector()
    async with running(make_config(collector, per_connection_routing=True)) as h:
        attacker = await h.connect("attacker")
        bystander = await h.connect("bystander")
        bad = msgspec.msgpack.encode([["Subscriber", 1, 2]] * (MAX_BATCH_RECORDS - 1) + [b"ok"])
        await attacker.send(Records(msgspec.Raw(bad)), Flush())
        await bystander.send(batch([b"ping"]))
        _, received = await bystander.events_until(records=1)
        assert received == [b"ping"]
        others, received = await attacker.events_until(Ack, records=1)
        [refused, ack] = others
        assert isinstance(refused, Refused)
        assert len(refused.errors) == 100
        assert refused.omitted == MAX_BATCH_RECORDS - 1 - 100
        assert refused.errors[0].message == "expected str, got int 1"
        assert len(encode_frame(refused)) < 20_000
        assert ack == Ack(MAX_BATCH_RECORDS)
        assert received == [b"ok"]
        assert h.statistics()["Records Refused"] == MAX_BATCH_RECORDS - 1
        # One more record than a batch may hold is a protocol error, refused from its header.
        too_many = msgspec.msgpack.encode([b""] * (MAX_BATCH_RECORDS + 1))
        await attacker.send(Records(msgspec.Raw(too_many)))
        others, _ = await attacker.events_until(Error)
        assert others[-1] == Error(
            f"a batch of {MAX_BATCH_RECORDS + 1} records exceeds the maximum of "
            f"{MAX_BATCH_RECORDS} a batch"
        )


async def test_a_client_that_sends_error_and_more_is_one_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with running(make_config(Collector())) as h:
        client = await h.connect()
        with caplog.at_level(logging.DEBUG, logger="mzserver"):
            data = bytes(client.protocol.send(Error("the client gave up")))
            data += bytes(encode_frame(Flush())) + bytes(encode_frame(batch([b"late"])))
            await client.stream.send_all(data)
            with trio.fail_after(5):
                while await client.stream.receive_some(1 << 16):
                    pass
            await trio.testing.wait_all_tasks_blocked()
        assert not any(r.exc_info for r in caplog.records)
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert warnings == [f"connection 1 from {client_peer(client)} reported an error: "
                            "the client gave up"]  # fmt: skip


def client_peer(client: RawClient) -> str:
    host, port = client.stream.socket.getsockname()[:2]
    return f"{host}:{port}"


async def test_frames_that_come_with_the_hello_are_taken_at_once() -> None:
    """Before: frames in the same packet as the Hello waited until more bytes arrived."""
    collector = Collector()
    async with running(make_config(collector)) as h:
        stream = await trio.open_tcp_stream("127.0.0.1", h.server.port)
        protocol = Protocol(Role.CLIENT)
        hello = bytes(protocol.send(Hello(PROTOCOL_VERSION, name="eager")))
        # Written by hand: a client's protocol would not send before the Welcome.
        await stream.send_all(
            hello + bytes(encode_frame(batch([b"early"]))) + bytes(encode_frame(Flush()))
        )
        events: list[Any] = []
        with trio.fail_after(5):
            while not any(isinstance(e, Ack) for e in events):
                while (event := protocol.next_event()) is NEED_DATA:
                    protocol.receive_data(await stream.receive_some(1 << 16))
                events.append(event)
        assert [type(e) for e in events] == [Welcome, Records, Ack]
        assert collector.records == [b"early"]
        await stream.aclose()


async def test_what_a_processor_fans_out_is_handed_on_in_bounded_pieces() -> None:
    """Before: 400 triggers in one batch, each routed to 1 MB, grew the server by ~380 MB:
    everything a processor routed was held until its batch was done."""
    routed = 0
    held: list[int] = []  # at each record the downstream processor gets: routed, not yet had

    def fan_out(record: Any, ctx: Any) -> None:
        nonlocal routed
        ctx.route("mid", b"x" * (1 << 20))
        routed += 1

    def downstream(record: Any, ctx: Any) -> None:
        held.append(routed - len(held))

    config = Config.from_dict(
        {
            "connector": {"port": 0, "accepted_types": ["bytes"], "output_routes": {"bytes": "in"}},
            "processors": [
                {"name": "fan_out", "entry": fan_out, "routes": ["in"]},
                {"name": "downstream", "entry": downstream, "routes": ["mid"]},
            ],
        }
    )
    async with running(config) as h:
        client = await h.connect()
        await client.send(batch([b"go"] * 40), Flush())
        await client.events_until(Ack)
        with trio.fail_after(5):
            while len(held) < 40:  # noqa: ASYNC110 - the downstream processor's own count
                await trio.sleep(0.01)
    assert max(held) <= 1  # each MiB is handed on right after the record that routed it


async def test_a_record_keeps_its_client_through_a_second_processor() -> None:
    """Before: ``connection=`` was lost when a record passed through a second processor."""
    ids: dict[str, int] = {}

    def first(record: Any, ctx: Any) -> None:
        if record == b"hello":
            ids[ctx.connection.name] = ctx.connection.id
            return
        ctx.route("mid", record, connection=ids["receiver"])

    def second(record: Any, ctx: Any) -> None:
        ctx.route("back", record + b" via second")

    config = Config.from_dict(
        {
            "connector": {
                "port": 0,
                "accepted_types": ["bytes"],
                "input_routes": ["back"],
                "output_routes": {"bytes": "in"},
                "per_connection_routing": True,
            },
            "processors": [
                {"name": "first", "entry": first, "routes": ["in"]},
                {"name": "second", "entry": second, "routes": ["mid"]},
            ],
        }
    )
    async with running(config) as h:
        sender = await h.connect("sender")
        receiver = await h.connect("receiver")
        await receiver.send(batch([b"hello"]), Flush())
        await receiver.events_until(Ack)
        await sender.send(batch([b"for you"]), Flush())
        _, received = await sender.events_until(Ack)
        assert received == []
        _, received = await receiver.events_until(records=1)
        assert received == [b"for you via second"]
