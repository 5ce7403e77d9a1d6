"""The server in-process: ``serve`` in a nursery on 127.0.0.1 port 0, driven by raw trio sockets
speaking the sans-IO ``Protocol`` with hand-built frames (so that a client can send what the
real client never would)."""

from __future__ import annotations

import logging
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import pytest
import trio
import trio.testing

from mzconnector import (
    NEED_DATA,
    PROTOCOL_VERSION,
    Ack,
    Bye,
    Closed,
    Error,
    Flush,
    GetMim,
    Hello,
    Mim,
    Notice,
    Protocol,
    RecordCodec,
    RecordError,
    Records,
    Refused,
    Role,
    Welcome,
)
from mzserver import Config, Server, serve

SCHEMA = {
    "Subscriber": {"msisdn": "str", "balance": "int"},
    "Account": {"id": "int", "owner": "Subscriber | None"},
}


def make_config(
    processor: Callable[..., Any],
    *,
    tables: dict[str, Any] | None = None,
    source: str = "inproc.toml",
    **connector: Any,
) -> Config:
    """A workflow: Subscriber records go to ``processor`` on route "in"; "back" is the input
    route. ``tables`` replace or add whole tables (``mim``, ``http``, ...)."""
    return Config.from_dict(
        {
            "workflow": {"name": "inproc"},
            "connector": {
                "host": "127.0.0.1",
                "port": 0,
                "accepted_types": ["Subscriber", "bytes"],
                "input_routes": ["back"],
                "output_routes": {"Subscriber": "in", "bytes": "in"},
                "delivery_timeout": 5.0,
                **connector,
            },
            "mim": {"Last Balance": "int", "Last Client": "str"},
            "types": SCHEMA,
            "processors": [{"name": "proc", "entry": processor, "routes": ["in"]}],
            **(tables or {}),
        },
        source=source,
    )


class Collector:
    """A processor: remembers each record and the connection it came from, sends it back."""

    def __init__(self) -> None:
        self.records: list[Any] = []
        self.clients: list[str | None] = []

    def __call__(self, record: Any, ctx: Any) -> None:
        self.records.append(record)
        self.clients.append(ctx.connection.name if ctx.connection else None)
        if not isinstance(record, bytes):
            ctx.mim["Last Balance"] = record.balance
        ctx.route("back", record)


class Harness:
    """A running server and the raw clients connected to it (closed at the end)."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.clients: list[RawClient] = []

    async def connect(self, name: str = "raw") -> RawClient:
        client = await RawClient.connect(self.server.port, name)
        self.clients.append(client)
        return client

    def statistics(self) -> dict[str, Any]:
        return self.server.statistics()


@asynccontextmanager
async def running(config: Config) -> AsyncIterator[Harness]:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            harness = Harness(await nursery.start(serve, config))
            try:
                yield harness
            finally:
                for client in harness.clients:
                    await client.aclose()
                nursery.cancel_scope.cancel()


class RawClient:
    """A client built from a trio socket and the sans-IO protocol, nothing else."""

    def __init__(self, stream: trio.SocketStream, welcome: Welcome, protocol: Protocol) -> None:
        self.stream = stream
        self.welcome = welcome
        self.protocol = protocol
        codec = RecordCodec(welcome.schema)
        self.types = codec.types
        self.decoder = codec.decoder([*welcome.schema, "bytes"], pickled=True)

    @classmethod
    async def connect(cls, port: int, name: str = "raw") -> RawClient:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        protocol = Protocol(Role.CLIENT)
        await stream.send_all(protocol.send(Hello(PROTOCOL_VERSION, name=name)))
        event = await cls._next(stream, protocol)
        assert isinstance(event, Welcome), event
        return cls(stream, event, protocol)

    @staticmethod
    async def _next(stream: trio.SocketStream, protocol: Protocol) -> Any:
        with trio.fail_after(5):
            while (event := protocol.next_event()) is NEED_DATA:
                protocol.receive_data(await stream.receive_some(1 << 16))
        return event

    async def send(self, *messages: Any) -> None:
        await self.stream.send_all(b"".join(bytes(self.protocol.send(m)) for m in messages))

    async def next_event(self) -> Any:
        return await self._next(self.stream, self.protocol)

    async def events_until(
        self, kind: type | None = None, *, records: int = 0
    ) -> tuple[list[Any], list[Any]]:
        """Events until the first ``kind`` (if given) has arrived and at least ``records``
        records; returns (the events other than Records, the records decoded)."""
        others: list[Any] = []
        received: list[Any] = []
        while (
            not (kind is None or any(isinstance(e, kind) for e in others))
            or len(received) < records
        ):
            event = await self.next_event()
            if isinstance(event, Records):
                received.extend(self.decoder.decode(event.items))
            else:
                others.append(event)
                if isinstance(event, Closed):
                    break
        return others, received

    async def mim(self) -> dict[str, Any]:
        await self.send(GetMim())
        others, _ = await self.events_until(Mim)
        return others[-1].values

    async def aclose(self) -> None:
        await self.stream.aclose()


def wire(records: list[Any]) -> list[Any]:
    """Records as plain data (server and client build their own record classes)."""
    return [msgspec.to_builtins(r) for r in records]


def batch(items: list[Any]) -> Records:
    """A hand-built Records message: records, bytes, or plain lists standing for records."""
    return Records(msgspec.Raw(msgspec.msgpack.encode(items)))


# -- refused records ---------------------------------------------------------------------------


async def test_wrong_field_type_is_refused_the_rest_of_the_batch_goes_through() -> None:
    collector = Collector()
    async with running(make_config(collector)) as h:
        client = await h.connect("notebook")
        Sub = client.types["Subscriber"]
        good1, good2 = Sub(msisdn="4670", balance=1), Sub(msisdn="4672", balance=3)
        await client.send(batch([good1, ["Subscriber", "4671", "two"], good2]), Flush())

        others, echoed = await client.events_until(Ack, records=2)
        assert others == [
            Refused([RecordError(1, "Subscriber", "balance", "expected int, got str 'two'")]),
            Ack(3),
        ]
        assert echoed == [good1, good2]
        assert wire(collector.records) == wire([good1, good2])
        assert collector.clients == ["notebook", "notebook"]

        # The connection is still up, and the index counts every record of the connection.
        await client.send(batch([["Subscriber", 4673, 4], good1]), Flush())
        others, echoed = await client.events_until(Ack, records=1)
        assert others == [
            Refused([RecordError(3, "Subscriber", "msisdn", "expected str, got int 4673")]),
            Ack(5),
        ]
        assert echoed == [good1]

        values = await client.mim()
        assert values["Records In"] == 3
        assert values["Records Refused"] == 2
        assert values["Connected Clients"] == 1
        # The server is still up for others.
        other = await h.connect()
        await other.send(batch([good2]), Flush())
        _, echoed = await other.events_until(Ack, records=1)
        assert wire(echoed) == wire([good2])


@pytest.mark.parametrize(
    ("item", "error"),
    [
        pytest.param(
            ["Nope", 1, 2], RecordError(1, "Nope", None, "unknown record type 'Nope'"), id="unknown"
        ),
        pytest.param(
            ["Account", 1, None],
            RecordError(
                1, "Account", None, "records of type 'Account' are not accepted by this connector"
            ),
            id="declared-not-accepted",
        ),
        pytest.param(
            ["Subscriber", "x"], RecordError(1, "Subscriber", "balance", "missing"), id="missing"
        ),
        pytest.param(
            ["Subscriber", "x", 1, 2],
            RecordError(1, "Subscriber", None, "3 fields given, 2 declared"),
            id="extra-field",
        ),
        pytest.param(42, RecordError(1, "?", None, "not a record: int 42"), id="not-a-record"),
    ],
)
async def test_bad_items_are_refused_with_a_clear_message(item: Any, error: RecordError) -> None:
    collector = Collector()
    async with running(make_config(collector)) as h:
        client = await h.connect()
        good = client.types["Subscriber"](msisdn="1", balance=1)
        await client.send(batch([good, item, b"raw"]), Flush())
        others, echoed = await client.events_until(Ack, records=2)
        assert others == [Refused([error]), Ack(3)]
        assert echoed == [good, b"raw"]
        assert wire(collector.records) == wire([good, b"raw"])
        values = await client.mim()
        assert (values["Records In"], values["Records Refused"]) == (2, 1)


async def test_bytes_refused_when_not_accepted() -> None:
    collector = Collector()
    config = make_config(
        collector, accepted_types=["Subscriber"], output_routes={"Subscriber": "in"}
    )
    async with running(config) as h:
        client = await h.connect()
        assert client.welcome.accepted == ["Subscriber"]
        await client.send(batch([b"raw"]), Flush())
        others, _ = await client.events_until(Ack)
        assert others == [
            Refused([RecordError(0, "bytes", None, "bytes are not accepted by this connector")]),
            Ack(1),
        ]
        assert collector.records == []


async def test_malformed_batch_closes_only_that_connection() -> None:
    collector = Collector()
    async with running(make_config(collector)) as h:
        bystander = await h.connect()
        client = await h.connect()
        await client.send(Records(msgspec.Raw(b"\x05")))  # an int, not a list of records
        others, _ = await client.events_until(Closed)
        assert isinstance(others[0], Error)
        assert others[0].message == "malformed frame: a batch of records must be an array"
        await bystander.send(batch([b"still here"]), Flush())
        _, echoed = await bystander.events_until(Ack, records=1)
        assert echoed == [b"still here"]


async def test_garbage_instead_of_hello_gets_an_error_and_server_goes_on() -> None:
    async with running(make_config(Collector())) as h:
        async with await trio.open_tcp_stream("127.0.0.1", h.server.port) as stream:
            await stream.send_all(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40))
            protocol = Protocol(Role.CLIENT)
            protocol.send(Hello(PROTOCOL_VERSION))  # so that it expects the server's answer
            event = await RawClient._next(stream, protocol)
            assert event == Error("a TLS handshake arrived, but this server does not use TLS")
            assert await RawClient._next(stream, protocol) == Closed()
        client = await h.connect()
        assert client.welcome.workflow == "inproc"


# -- flush, MIM --------------------------------------------------------------------------------


async def test_flush_acks_count_every_record_taken() -> None:
    collector = Collector()
    async with running(make_config(collector)) as h:
        client = await h.connect()
        echoed: list[Any] = []

        async def ack() -> Ack:
            others, received = await client.events_until(Ack)
            echoed.extend(received)
            assert len(others) == 1
            return others[0]

        await client.send(Flush())
        assert await ack() == Ack(0)
        await client.send(batch([b"a", b"b"]), batch([]), batch([b"c", b"d", b"e"]), Flush())
        assert await ack() == Ack(5)
        assert h.statistics()["Records In"] == 5  # taken: counted before the Ack
        await client.send(Flush())
        assert await ack() == Ack(5)
        await client.send(batch([b"f"]), Flush(), Flush())
        assert await ack() == Ack(6)
        assert await ack() == Ack(6)
        while len(echoed) < 6:
            echoed.extend((await client.events_until(records=1))[1])
        assert echoed == [b"a", b"b", b"c", b"d", b"e", b"f"]
        assert collector.records == echoed


async def test_get_mim_values() -> None:
    collector = Collector()
    async with running(make_config(collector)) as h:
        client = await h.connect()
        values = await client.mim()
        for name in [
            "Workflow Name",
            "Connected Clients",
            "Records In",
            "Bytes In",
            "Records Out",
            "Bytes Out",
            "Records Refused",
            "Undeliverable Records",
            "Processor Errors",
            "Uptime",
            "Last Balance",
            "Last Client",
        ]:
            assert name in values
        assert values["Workflow Name"] == "inproc"
        assert values["Connected Clients"] == 1
        assert values["Records In"] == 0
        assert values["Last Balance"] is None  # assigned MIM: None until set
        assert values["Last Client"] is None
        assert values["Bytes In"] > 0  # the hello and the GetMim
        assert values["Uptime"] >= 0

        Sub = client.types["Subscriber"]
        await client.send(batch([Sub(msisdn="1", balance=42), b"xyz"]))
        await client.events_until(records=2)
        values = await client.mim()
        assert values["Records In"] == 2
        assert values["Records Out"] == 2
        assert values["Last Balance"] == 42
        assert values["Bytes Out"] > 0
        later = h.statistics()  # the same values, but for the time and the Mim reply itself
        assert values == {**later, "Uptime": values["Uptime"], "Bytes Out": values["Bytes Out"]}


async def test_processor_errors_are_counted_and_the_workflow_goes_on() -> None:
    def fragile(record: Any, ctx: Any) -> None:
        if record == b"boom":
            raise RuntimeError("boom")
        ctx.route("back", record)

    async with running(make_config(fragile)) as h:
        client = await h.connect()
        await client.send(batch([b"a", b"boom", b"b"]), batch([b"boom", b"c"]))
        _, echoed = await client.events_until(records=3)
        assert echoed == [b"a", b"b", b"c"]
        values = await client.mim()
        assert values["Processor Errors"] == 2
        assert values["Records In"] == 5


async def test_async_processor_and_connection_info() -> None:
    async def slow_echo(record: Any, ctx: Any) -> None:
        await trio.lowlevel.checkpoint()
        ctx.mim["Last Client"] = f"{ctx.connection.name}#{ctx.connection.id}"
        ctx.route("back", record)

    async with running(make_config(slow_echo)) as h:
        client = await h.connect("nb")
        await client.send(batch([b"1", b"2"]))
        _, echoed = await client.events_until(records=2)
        assert echoed == [b"1", b"2"]
        assert (await client.mim())["Last Client"] == f"nb#{client.welcome.connection_id}"


async def test_broadcast_reaches_every_client() -> None:
    async with running(make_config(Collector())) as h:
        first = await h.connect("first")
        second = await h.connect("second")
        assert (await second.mim())["Connected Clients"] == 2
        await first.send(batch([b"to all"]))
        assert (await first.events_until(records=1))[1] == [b"to all"]
        assert (await second.events_until(records=1))[1] == [b"to all"]


# -- nothing dropped silently --------------------------------------------------------------------


async def test_records_for_a_gone_connection_are_counted_undeliverable() -> None:
    """Nothing is dropped silently: records for a connection that has closed are counted."""
    kept: list[tuple[Any, int]] = []

    def keep_until_asked(record: Any, ctx: Any) -> None:
        if record == b"release":
            for item, origin in kept:
                ctx.route("back", item, connection=origin)
            ctx.route("back", b"released")
        else:
            kept.append((record, ctx.connection.id))

    async with running(make_config(keep_until_asked)) as h:
        leaver = await h.connect("leaver")
        await leaver.send(batch([b"a", b"b", b"c"]), Flush())
        assert (await leaver.events_until(Ack))[0] == [Ack(3)]
        await leaver.send(Bye("done"))
        assert (await leaver.events_until(Closed))[0] == [Closed()]

        # The server forgets a connection before it closes the socket: the leaver is gone.
        stayer = await h.connect("stayer")
        assert (await stayer.mim())["Connected Clients"] == 1
        await stayer.send(batch([b"release"]))
        _, received = await stayer.events_until(records=1)
        assert received == [b"released"]  # not the leaver's records
        values = await stayer.mim()
        assert values["Undeliverable Records"] == 3
        assert values["Records Out"] == 1


async def test_records_for_a_vanished_client_are_counted_undeliverable() -> None:
    """A client that resets its connection while the workflow works on its record: what the
    workflow sends back to it is counted, not lost silently."""
    gate, started = trio.Event(), trio.Event()

    async def held(record: Any, ctx: Any) -> None:
        started.set()
        await gate.wait()
        ctx.route("back", b"reply")

    try:
        async with running(make_config(held)) as h:
            client = await RawClient.connect(h.server.port)
            await client.send(batch([b"x"]))
            await started.wait()
            linger = struct.pack("ii", 1, 0)  # close with a reset
            client.stream.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_LINGER, linger)
            await client.aclose()
            gate.set()
            await trio.testing.wait_all_tasks_blocked()
            stats = h.statistics()
            assert stats["Records In"] == 1
            assert (stats["Records Out"], stats["Undeliverable Records"]) == (0, 1)
            assert stats["Connected Clients"] == 0
    finally:
        gate.set()


async def test_unpicklable_objects_are_counted_undeliverable() -> None:
    def odd(record: Any, ctx: Any) -> None:
        ctx.route("back", (i for i in range(3)))  # a generator cannot be pickled
        ctx.route("back", {"plain": record})

    async with running(make_config(odd)) as h:
        client = await h.connect()
        await client.send(batch([b"x"]))
        _, received = await client.events_until(records=1)
        assert len(received) == 1
        assert type(received[0]).__name__ == "Pickled"
        values = await client.mim()
        assert values["Undeliverable Records"] == 1
        assert values["Records Out"] == 1


async def test_flush_then_bye_closes_quietly(caplog: pytest.LogCaptureFixture) -> None:
    """Replies the server owes a client that said Bye (here an Ack and MIM values) are sent or
    dropped quietly: no 'connection failed' error."""
    async with running(make_config(Collector())) as h:
        client = await h.connect()
        with caplog.at_level(logging.WARNING, logger="mzserver"):
            await client.send(batch([b"a"]), Flush(), GetMim(), Bye("bye"))
            with trio.fail_after(5):  # read (and ignore) whatever comes until the server closes
                while await client.stream.receive_some(1 << 16):
                    pass
            await trio.testing.wait_all_tasks_blocked()
        failures = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert failures == []


# -- graceful stop -----------------------------------------------------------------------------


async def test_graceful_stop_delivers_then_says_bye() -> None:
    gate = trio.Event()
    started = trio.Event()
    processed: list[Any] = []

    async def held(record: Any, ctx: Any) -> None:
        started.set()
        await gate.wait()
        processed.append(record)
        ctx.route("back", record)

    items = [b"r%d" % i for i in range(5)]
    try:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                server: Server = await nursery.start(serve, make_config(held))
                h = Harness(server)
                client = await h.connect("sender")
                idle = await h.connect("idle")
                assert (await idle.mim())["Connected Clients"] == 2
                await client.send(batch(items), Flush())
                await started.wait()  # the batch is taken: its first record is being processed
                assert processed == []

                server.stop()
                await trio.testing.wait_all_tasks_blocked()
                # No new connections while stopping.
                with pytest.raises(OSError):  # noqa: PT011 - refused or reset, by timing
                    await h.connect()
                gate.set()

                others, received = await client.events_until(Closed)
                assert received == items  # what the workflow produced, before the goodbye
                assert others == [Ack(5), Bye("the server is shutting down"), Closed()]
                others, received = await idle.events_until(Closed)
                assert received == items  # broadcast: the idle client gets them too
                assert others == [Bye("the server is shutting down"), Closed()]
                await server.wait_stopped()
                for c in h.clients:
                    await c.aclose()
    finally:
        gate.set()  # never leave a processor waiting (a failed test must not hang)
    assert processed == items
    assert server.statistics()["Connected Clients"] == 0


async def test_stop_with_no_clients_returns() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve, make_config(Collector()))
            server.stop()
            await server.wait_stopped()


async def test_notice_when_a_client_does_not_read() -> None:
    """A client that reads nothing has its records counted undeliverable, and is told so."""

    def flood(record: Any, ctx: Any) -> None:
        for i in range(40):
            ctx.route("back", b"%d" % i + b"x" * 65536)  # 2.6 MB for each record

    config = make_config(flood, outbox_size=1, delivery_timeout=0.2)
    async with running(config) as h:
        client = await h.connect()
        await client.send(*[batch([b"go"]) for _ in range(10)])  # 26 MB, in 10 batches
        # The client reads nothing until the server has given up on some records.
        with trio.fail_after(10):
            while h.statistics()["Undeliverable Records"] == 0:  # noqa: ASYNC110 - a counter
                await trio.sleep(0.02)
        notices: list[Notice] = []
        received = 0
        with trio.fail_after(10):
            while not notices:
                event = await client.next_event()
                if isinstance(event, Records):
                    received += len(client.decoder.decode(event.items))
                elif isinstance(event, Notice):
                    notices.append(event)
        assert notices[0].dropped > 0
        assert (
            notices[0].message
            == f"{notices[0].dropped} record(s) for this client were undeliverable"
        )
        assert received + h.statistics()["Undeliverable Records"] <= 10 * 40


async def run_with_stuck_processor(
    stop: Callable[[Server, trio.CancelScope], None], **connector: Any
) -> float | None:
    """Start a server whose processor waits on a gate, get a record into the processor, call
    ``stop``, and return how long ``serve`` took to return (None: not within 3 s). The gate is
    then opened, so that a server that does not stop cannot hang the test."""
    gate, started, done = trio.Event(), trio.Event(), trio.Event()

    async def stuck(record: Any, ctx: Any) -> None:
        started.set()
        await gate.wait()

    async def run(task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with scope:
                await serve(make_config(stuck, **connector), task_status=task_status)
        finally:
            done.set()

    scope = trio.CancelScope()
    elapsed: float | None = None
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(run)
            client = await RawClient.connect(server.port)
            try:
                await client.send(batch([b"stuck"]))
                await started.wait()
                t0 = trio.current_time()
                stop(server, scope)
                with trio.move_on_after(3):
                    await done.wait()
                    elapsed = trio.current_time() - t0
            finally:
                gate.set()
                await client.aclose()
    return elapsed


async def test_cancelling_serve_is_immediate_even_with_a_busy_processor() -> None:
    elapsed = await run_with_stuck_processor(lambda server, scope: scope.cancel())
    assert elapsed is not None
    assert elapsed < 1.0


async def test_graceful_stop_gives_up_after_shutdown_timeout() -> None:
    elapsed = await run_with_stuck_processor(
        lambda server, scope: server.stop(), shutdown_timeout=0.3
    )
    assert elapsed is not None
    assert 0.3 <= elapsed < 2.0
