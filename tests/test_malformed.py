"""Malformed input against a live server: random and mutated frames, truncated frames, oversize
length prefixes, wrong protocol versions, garbage before the handshake, huge and deeply nested
records and metadata.

One server (``serve`` in the test's nursery, 127.0.0.1 port 0) takes every example of a test, so
that what one bad connection leaves behind (a leaked connection slot, a stuck task) shows in the
next. Hypothesis runs in a worker thread and hands each example to the trio loop with
``trio.from_thread.run``. Each bad connection talks like a client would (it sends the rest only
once a leading hello is answered), then half-closes and reads until the server closes. What the
server must answer is computed by a model: the sans-IO ``Protocol`` plus the connector's rules
(protocol version, metadata nesting, a batch must be a list). After every example a bystander,
connected all along, and a fresh client must still be served.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mzconnector import (
    DEFAULT_MAX_FRAME_SIZE,
    MAGIC,
    PROTOCOL_VERSION,
    Ack,
    Bye,
    Closed,
    Error,
    Flush,
    GetMim,
    Hello,
    Mim,
    Protocol,
    Records,
    Refuse,
    Refused,
    RemoteProtocolError,
    Role,
    Welcome,
    encode_frame,
)
from mzserver import Config, Server, serve

HEADER = struct.Struct(">I")
MAX_FRAME = 65536
MAX_NESTING = 6
HANDSHAKE_TIMEOUT = 5.0
#: At most the bystander, one bad connection and one fresh client are open at once: a slot
#: that a bad connection does not give back makes the next fresh client be refused.
MAX_CONNECTIONS = 3
SCHEMA = {
    "Item": {"n": "int", "tags": "list[str]"},
    "Grid": {"rows": "list[list[int]]"},
}
EXAMPLES = settings(
    max_examples=150,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def make_config(processor: Callable[..., Any], **connector: Any) -> Config:
    return Config.from_dict(
        {
            "workflow": {"name": "malformed"},
            "connector": {
                "host": "127.0.0.1",
                "port": 0,
                "accepted_types": ["Item", "Grid", "bytes"],
                "input_routes": ["back"],
                "output_routes": {"Item": "in", "Grid": "in", "bytes": "in"},
                "per_connection_routing": True,
                **connector,
            },
            "types": SCHEMA,
            "processors": [{"name": "collect", "entry": processor, "routes": ["in"]}],
        },
        source="malformed.toml",
    )


class Collector:
    """Keeps every record; sends pings (bytes starting with b"ping:") back to their sender."""

    def __init__(self) -> None:
        self.records: list[Any] = []

    def __call__(self, record: Any, ctx: Any) -> None:
        self.records.append(record)
        if isinstance(record, bytes) and record.startswith(b"ping:"):
            ctx.route("back", record)


# -- bytes on the wire ---------------------------------------------------------------------------


def frame(body: bytes) -> bytes:
    return HEADER.pack(len(body)) + body


def hello_bytes(protocol: int = PROTOCOL_VERSION, metadata: dict[str, Any] | None = None) -> bytes:
    return MAGIC + bytes(encode_frame(Hello(protocol, name="fuzz", metadata=metadata or {})))


def batch(items: list[Any]) -> bytes:
    """A Records frame of records written as plain data (["Item", n, tags]) or bytes."""
    return bytes(encode_frame(Records(msgspec.Raw(msgspec.msgpack.encode(items)))))


HELLO = hello_bytes(metadata={"team": "fuzz", "n": [1, 2.5, None]})
CONVERSATION = (
    HELLO
    + batch([["Item", 1, ["a", "b"]], b"raw", ["Grid", [[1, 2], [3]]]])
    + bytes(encode_frame(Flush()))
    + batch([["Item", 2, []]])
    + bytes(encode_frame(GetMim()))
    + bytes(encode_frame(Bye("done")))
)
_hello_decoder = msgspec.msgpack.Decoder(Hello)
_raw_list = msgspec.msgpack.Decoder(list[msgspec.Raw])


def hello_end(data: bytes) -> int | None:
    """Where a leading MAGIC + Hello frame ends (a client waits for the answer there)."""
    if data[:4] != MAGIC or len(data) < 8:
        return None
    (size,) = HEADER.unpack_from(data, 4)
    if size > MAX_FRAME or len(data) < 8 + size:
        return None
    try:
        _hello_decoder.decode(data[8 : 8 + size])
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
        return None
    return 8 + size


def depth(value: Any) -> int:
    """Container levels of a decoded value: a flat dict is 1."""
    if isinstance(value, dict):
        return 1 + max(map(depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(depth, value), default=0)
    return 0


_WELCOME = Welcome(PROTOCOL_VERSION, 1, "malformed", {}, [], [], MAX_FRAME)


def expected(data: bytes) -> str:
    """What the server must do with ``data`` followed by end of stream: "refuse" (a Refuse
    frame), "error" (an Error frame, last) or "closed" (a quiet close)."""
    server = Protocol(Role.SERVER, max_frame_size=MAX_FRAME)
    split = hello_end(data)
    welcomed = False
    try:
        if split is not None:
            server.receive_data(data[:split])
            hello = server.next_event()
            assert isinstance(hello, Hello)
            if hello.protocol != PROTOCOL_VERSION or depth(hello.metadata) > MAX_NESTING:
                return "refuse"
            server.send(_WELCOME)
            welcomed = True
            data = data[split:]
        if data:
            server.receive_data(data)
        server.receive_data(b"")
        for event in server.events():
            if isinstance(event, Records):
                try:
                    _raw_list.decode(event.items)
                except (msgspec.DecodeError, UnicodeDecodeError):
                    return "error"
            elif isinstance(event, (Bye, Closed)):
                # Leaving before the hello is an error, however many bytes of MAGIC came first.
                return "closed" if welcomed else "error"
    except RemoteProtocolError:
        return "error"
    raise AssertionError("unreachable: events() ends with Closed or raises")


# -- a live server -------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What a connection got: every event (Records, messages, and Closed at the end)."""

    events: list[Any] = field(default_factory=list)
    reset: bool = False

    @property
    def messages(self) -> list[Any]:
        return [e for e in self.events if not isinstance(e, (Records, Closed))]

    @property
    def closed(self) -> bool:
        return bool(self.events) and isinstance(self.events[-1], Closed)


async def converse(port: int, data: bytes, *, eof: bool = True, limit: float = 3.0) -> Outcome:
    """Send ``data`` as a client would (a leading hello first, the rest once it is welcomed),
    half-close (``eof``), and read until the server closes. Fails after ``limit`` s."""
    outcome = Outcome()
    split = hello_end(data)
    head, tail = (data, b"") if split is None else (data[:split], data[split:])
    reader = Protocol(Role.CLIENT, max_frame_size=DEFAULT_MAX_FRAME_SIZE)
    reader.send(Hello(PROTOCOL_VERSION))  # so that it expects the server's answer
    with trio.fail_after(limit):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            try:
                await stream.send_all(head)
                if split is None and eof:
                    await stream.send_eof()
                while True:
                    chunk = await stream.receive_some(1 << 16)
                    reader.receive_data(chunk)
                    for event in reader.events():  # the server's frames are always valid
                        outcome.events.append(event)
                        if isinstance(event, Welcome) and split is not None:
                            if tail:
                                await stream.send_all(tail)
                            if eof:
                                await stream.send_eof()
                    if not chunk:
                        return outcome
            except trio.BrokenResourceError:
                outcome.reset = True
                return outcome


def check(outcome: Outcome, expect: str, *, allow_reset: bool = False) -> None:
    """``allow_reset``: the client was still sending a body the server will not read, so the
    server's close may reset the connection (after its Error frame)."""
    messages = outcome.messages
    if outcome.reset:
        assert allow_reset, f"the connection was reset: {outcome.events}"
        outcome.events.append(Closed())
    assert outcome.closed, outcome.events
    if expect == "refuse":
        assert len(messages) == 1, messages
        assert isinstance(messages[0], Refuse), messages
        assert messages[0].code == "protocol"
        assert messages[0].reason
    elif expect == "error":
        assert messages, "no error frame"
        assert isinstance(messages[-1], Error), messages
        assert messages[-1].message
        assert not any(isinstance(m, (Refuse, Error)) for m in messages[:-1]), messages
    else:
        assert messages, "no welcome"
        assert isinstance(messages[0], Welcome), messages
        assert not any(isinstance(m, (Refuse, Error)) for m in messages), messages


class RawClient:
    """A well-behaved client: trio socket + sans-IO protocol."""

    def __init__(self, stream: trio.SocketStream, protocol: Protocol) -> None:
        self.stream = stream
        self.protocol = protocol

    @classmethod
    async def connect(cls, port: int) -> RawClient:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        client = cls(stream, Protocol(Role.CLIENT))
        await stream.send_all(client.protocol.send(Hello(PROTOCOL_VERSION, name="good")))
        event = await client.next_event()
        assert isinstance(event, Welcome), event
        return client

    async def next_event(self) -> Any:
        with trio.fail_after(5):
            while True:
                for event in self.protocol.events():
                    return event
                self.protocol.receive_data(await self.stream.receive_some(1 << 16))

    async def send(self, *messages: Any) -> None:
        await self.stream.send_all(b"".join(bytes(self.protocol.send(m)) for m in messages))

    async def ping(self, payload: bytes) -> None:
        """Send one record and a Flush; the record must come back and the Flush be acked."""
        await self.send(Records(msgspec.Raw(msgspec.msgpack.encode([payload]))), Flush())
        echoed: list[Any] = []
        acked = False
        while not (acked and echoed):
            event = await self.next_event()
            if isinstance(event, Records):
                echoed.extend(msgspec.msgpack.decode(event.items))
            else:
                assert isinstance(event, (Ack, Mim)), event
                acked = acked or isinstance(event, Ack)
        assert echoed == [payload]

    async def bye(self) -> None:
        await self.send(Bye("good bye"))
        while not isinstance(await self.next_event(), Closed):
            pass
        await self.stream.aclose()


@dataclass
class Live:
    server: Server
    collector: Collector
    bystander: RawClient
    pings: int = 0

    async def still_serving(self) -> None:
        """The bystander is served, a new client is welcomed and served, and no connection
        but the bystander's is left open."""
        self.pings += 1
        await self.bystander.ping(b"ping:bystander:%d" % self.pings)
        fresh = await RawClient.connect(self.server.port)
        await fresh.ping(b"ping:fresh:%d" % self.pings)
        await fresh.bye()
        assert self.server.statistics()["Connected Clients"] == 1

    async def probe(
        self, data: bytes, expect: str | None = None, allow_reset: bool = False, **kwargs: Any
    ) -> Outcome:
        outcome = await converse(self.server.port, data, **kwargs)
        check(outcome, expected(data) if expect is None else expect, allow_reset=allow_reset)
        await self.still_serving()
        return outcome

    def run(self, data: bytes, expect: str | None = None, **kwargs: Any) -> Outcome:
        """From the hypothesis thread: probe in the trio loop."""
        return trio.from_thread.run(lambda: self.probe(data, expect, **kwargs))


async def start_live(nursery: trio.Nursery, **connector: Any) -> Live:
    collector = Collector()
    config = make_config(
        collector,
        max_frame_size=MAX_FRAME,
        max_nesting=MAX_NESTING,
        handshake_timeout=HANDSHAKE_TIMEOUT,
        max_connections=MAX_CONNECTIONS,
        **connector,
    )
    server = await nursery.start(serve, config)
    return Live(server, collector, await RawClient.connect(server.port))


@pytest.fixture
async def live() -> AsyncIterator[Live]:
    async with trio.open_nursery() as nursery:
        state = await start_live(nursery)
        yield state
        await state.bystander.stream.aclose()
        nursery.cancel_scope.cancel()


async def in_thread(test: Callable[[], None]) -> None:
    """Run a hypothesis test (which calls ``Live.run``) in a worker thread."""
    await trio.to_thread.run_sync(test)


# -- the model itself ----------------------------------------------------------------------------


def test_the_model_knows_a_good_conversation_from_bad_ones() -> None:
    assert expected(CONVERSATION) == "closed"
    assert expected(CONVERSATION[:-3]) == "error"  # cut in the middle of the Bye frame
    assert expected(b"GET / HTTP/1.1\r\n") == "error"
    assert expected(hello_bytes(protocol=2)) == "refuse"


async def test_a_good_conversation_is_served(live: Live) -> None:
    outcome = await live.probe(CONVERSATION, "closed")
    messages = outcome.messages
    assert [type(m) for m in messages] == [Welcome, Ack, Mim]
    assert messages[1] == Ack(3)


# -- garbage, random and mutated frames -----------------------------------------------------------


def _not_magic(data: bytes) -> bool:
    return data[: len(MAGIC)] != MAGIC[: len(data)]


async def test_garbage_before_the_handshake(live: Live) -> None:
    @EXAMPLES
    @given(
        st.binary(min_size=1, max_size=300).filter(_not_magic),
        st.sampled_from([b"", HELLO, CONVERSATION]),
    )
    def garbage(junk: bytes, after: bytes) -> None:
        outcome = live.run(junk + after, "error")
        message = outcome.messages[-1].message
        assert "not an mzconnector client" in message or "TLS handshake" in message
        assert not any(isinstance(m, Welcome) for m in outcome.messages)

    await in_thread(garbage)


async def test_silence_and_stray_protocols_get_a_clear_error(live: Live) -> None:
    """Common strays (HTTP, TLS, SSH) and a client that closes before saying anything."""
    strays = {
        b"": "connection closed before the client said hello",
        b"MZ": "connection closed before the client said hello",
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n": "not an mzconnector client (first bytes b'GET ')",
        b"SSH-2.0-OpenSSH_9.6\r\n": "not an mzconnector client",
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03": "a TLS handshake arrived",
        MAGIC: "connection closed before the client said hello",
        MAGIC + b"\x00\x00": "connection closed in the middle of a frame",
    }
    for data, message in strays.items():
        outcome = await live.probe(data, "error")
        assert message in outcome.messages[-1].message, (data, outcome.messages)


async def test_a_frame_with_a_string_that_is_not_utf8_gets_an_error(live: Live) -> None:
    body = b"\x95\xa5Hello\x01\xa1\xff\x80\xa0"  # ["Hello", 1, "\xff", {}, ""]
    outcome = await live.probe(MAGIC + frame(body), "error")
    assert outcome.messages[-1].message == "malformed frame: a string is not valid UTF-8"


def _bad_utf8_batch() -> bytes:
    """A Records frame: an Item with a tag (in ``tags``) that is not UTF-8, then b"after"."""
    items = b"\x92" + b"\x93\xa4Item\x01\x91\xa1\xff" + msgspec.msgpack.encode(b"after")
    return bytes(encode_frame(Records(msgspec.Raw(items))))


async def test_a_record_with_a_string_that_is_not_utf8_is_refused(live: Live) -> None:
    data = HELLO + _bad_utf8_batch() + bytes(encode_frame(Flush()))
    outcome = await live.probe(data, "closed")
    [refused] = [m for m in outcome.messages if isinstance(m, Refused)]
    [error] = refused.errors
    assert (error.index, error.type, error.field) == (0, "Item", "tags[0]")
    assert error.message == "a string is not valid UTF-8"
    assert Ack(2) in outcome.messages
    assert b"after" in live.collector.records


async def test_a_record_refused_for_bad_utf8_names_its_type_and_field(live: Live) -> None:
    outcome = await live.probe(HELLO + _bad_utf8_batch() + bytes(encode_frame(Flush())), "closed")
    [refused] = [m for m in outcome.messages if isinstance(m, Refused)]
    assert [(e.index, e.type, e.field) for e in refused.errors] == [(0, "Item", "tags[0]")]


_names = st.sampled_from(
    ["Hello", "Welcome", "Refuse", "Records", "Flush", "Ack", "Refused", "GetMim", "Mim",
     "Notice", "Bye", "Error", "Pickled", "__pickled__", "Item", ""]
)  # fmt: skip
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8)
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=12,
)


def _message(tag: str, fields: list[Any]) -> bytes:
    return msgspec.msgpack.encode([tag, *fields])


_message_bodies = st.one_of(
    st.binary(max_size=60),
    st.builds(_message, _names, st.lists(_values, max_size=4)),
    st.lists(_values, max_size=4).map(lambda items: _message("Records", [items])),
)


async def test_random_frames(live: Live) -> None:
    """Well-framed messages of every kind (client and server ones, wrong fields, wrong
    states, random bytes), before the hello and after it."""

    @EXAMPLES
    @given(st.lists(_message_bodies, min_size=1, max_size=5), st.booleans())
    def random_frames(bodies: list[bytes], after_hello: bool) -> None:
        frames = b"".join(frame(b) for b in bodies)
        live.run((HELLO if after_hello else MAGIC) + frames)

    await in_thread(random_frames)


_mutation = st.one_of(
    st.tuples(st.just("replace"), st.integers(0, 1 << 16), st.integers(0, 255)),
    st.tuples(st.just("insert"), st.integers(0, 1 << 16), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), st.integers(0, 1 << 16), st.integers(1, 8)),
)


def mutate(data: bytes, mutations: list[tuple[Any, ...]]) -> bytes:
    out = bytearray(data)
    for kind, where, arg in mutations:
        at = where % (len(out) + 1)
        if kind == "replace" and at < len(out):
            out[at] = arg
        elif kind == "insert":
            out[at:at] = arg
        elif kind == "delete":
            del out[at : at + arg]
    return bytes(out)


async def test_mutated_conversations(live: Live) -> None:
    @EXAMPLES
    @given(st.lists(_mutation, min_size=1, max_size=4))
    def mutated(mutations: list[tuple[Any, ...]]) -> None:
        live.run(mutate(CONVERSATION, mutations))

    await in_thread(mutated)


async def test_truncated_conversations(live: Live) -> None:
    """A client that sends part of a conversation and leaves: cut mid-frame is an error (the
    half-closed connection still carries it); the records of every whole frame before the cut
    are taken and processed."""
    records = [b"cut:%d" % i for i in range(6)]
    conversation = HELLO + b"".join(batch([r]) for r in records)
    ends, end = [], len(HELLO)
    for r in records:
        end += len(batch([r]))
        ends.append(end)

    @EXAMPLES
    @given(st.integers(len(HELLO), len(conversation) - 1))
    def truncated(cut: int) -> None:
        before = len(live.collector.records)
        outcome = live.run(conversation[:cut])
        whole = sum(1 for e in ends if e <= cut)
        if cut in ends or cut == len(HELLO):
            assert not any(isinstance(m, Error) for m in outcome.messages)
        else:
            assert outcome.messages[-1] == Error("connection closed in the middle of a frame")
        # The bystander's ping went through the same processor after them: they are done.
        taken = [
            r for r in live.collector.records[before:] if isinstance(r, bytes) and r[:4] == b"cut:"
        ]
        assert taken == records[:whole]

    await in_thread(truncated)


# -- limits --------------------------------------------------------------------------------------


async def test_oversize_length_prefix_is_refused_before_the_body(live: Live) -> None:
    """The length prefix alone is enough: the server neither waits for the body nor for the
    handshake timeout (the client here keeps the connection open and sends nothing more)."""

    @EXAMPLES
    @given(
        st.integers(MAX_FRAME + 1, 2**32 - 1),
        st.booleans(),
        st.binary(max_size=64),
    )
    def oversize(size: int, after_hello: bool, partial_body: bytes) -> None:
        data = (HELLO if after_hello else MAGIC) + HEADER.pack(size) + partial_body
        outcome = live.run(data, "error", eof=False, limit=HANDSHAKE_TIMEOUT / 2)
        assert outcome.messages[-1] == Error(
            f"frame of {size} bytes exceeds the maximum frame size of {MAX_FRAME}"
        )

    await in_thread(oversize)


async def test_frame_of_exactly_the_maximum_size_is_taken(live: Live) -> None:
    overhead = len(batch([b"x" * 1000])) - 4 - 1000  # with a 2-byte length, as the record's
    record = b"x" * (MAX_FRAME - overhead)
    data = batch([record])
    assert len(data) - 4 == MAX_FRAME
    outcome = await live.probe(HELLO + data + bytes(encode_frame(Flush())), "closed")
    assert outcome.messages[1:] == [Ack(1)]
    assert record in live.collector.records
    big = batch([record + b"y"])
    outcome = await live.probe(HELLO + big, "error", allow_reset=True)
    assert outcome.messages[-1] == Error(
        f"frame of {MAX_FRAME + 1} bytes exceeds the maximum frame size of {MAX_FRAME}"
    )
    assert record + b"y" not in live.collector.records


async def test_wrong_protocol_versions_are_refused(live: Live) -> None:
    @EXAMPLES
    @given(st.integers(-(2**63), 2**64 - 1).filter(lambda v: v != PROTOCOL_VERSION))
    def version(v: int) -> None:
        outcome = live.run(hello_bytes(protocol=v) + batch([b"never taken"]), "refuse")
        assert outcome.messages == [
            Refuse(
                "protocol",
                f"this server speaks protocol {PROTOCOL_VERSION}; the client speaks {v}",
            )
        ]

    await in_thread(version)
    assert b"never taken" not in live.collector.records


def nest(levels: int, kinds: list[bool]) -> Any:
    """``levels`` containers deep, dict or list at each level as ``kinds`` says."""
    value: Any = "leaf"
    for i in range(levels):
        value = {"k": value} if kinds[i % len(kinds)] else [value]
    return value


async def test_metadata_nesting_limit(live: Live) -> None:
    @EXAMPLES
    @given(st.integers(0, 4 * MAX_NESTING), st.lists(st.booleans(), min_size=1, max_size=5))
    def nested(levels: int, kinds: list[bool]) -> None:
        metadata = {"m": nest(levels, kinds)}  # the metadata dict is a level itself
        outcome = live.run(hello_bytes(metadata=metadata))
        if levels + 1 <= MAX_NESTING:
            assert isinstance(outcome.messages[0], Welcome)
        else:
            assert outcome.messages == [
                Refuse("protocol", f"the metadata is nested more than {MAX_NESTING} levels deep")
            ]

    await in_thread(nested)


@pytest.mark.parametrize("levels", [2_000, 60_000])
async def test_metadata_nested_beyond_any_decoder_is_an_error(live: Live, levels: int) -> None:
    body = (
        b"\x94" + msgspec.msgpack.encode("Hello") + b"\x01\xa1x\x81\xa1m"
        + b"\x91" * levels + b"\xc0"
    )  # fmt: skip
    outcome = await live.probe(MAGIC + frame(body), "error")
    assert outcome.messages == [Error("malformed frame: nested too deeply")]


async def test_records_nest_only_as_their_types_do(live: Live) -> None:
    """A record nested deeper than its declared type is refused (naming the field), whatever
    the depth; nesting no decoder can follow closes the connection with a clear error."""
    for levels in [1, 3, 50, 500]:
        rows = nest(levels, [False])
        items = [["Grid", [[1]]], ["Grid", [rows]], ["Item", 1, [rows]], b"after"]
        outcome = await live.probe(HELLO + batch(items) + bytes(encode_frame(Flush())), "closed")
        refused = [m for m in outcome.messages if isinstance(m, Refused)]
        assert [(e.index, e.type, e.field) for e in refused[0].errors] == [
            (1, "Grid", "rows[0][0]"),
            (2, "Item", "tags[0]"),
        ], levels
        assert Ack(4) in outcome.messages
    deep = b"\x94\xa4Grid" + b"\x91" * 5_000 + b"\x01"
    outcome = await live.probe(HELLO + bytes(encode_frame(Records(msgspec.Raw(b"\x91" + deep)))))
    assert outcome.messages[-1] == Error("malformed frame: nested too deeply")


async def test_huge_batches_within_the_limit_are_taken(live: Live) -> None:
    items = [["Item", i, ["t"] * (i % 4)] for i in range(5000)]  # ~60 KB, 5000 records
    data = batch(items)
    assert len(data) <= MAX_FRAME
    before = len(live.collector.records)
    outcome = await live.probe(HELLO + data + bytes(encode_frame(Flush())), "closed")
    assert Ack(5000) in outcome.messages
    assert [r.n for r in live.collector.records[before : before + 5000]] == list(range(5000))


# -- the limits are configurable, with safe defaults ----------------------------------------------


def test_limits_have_safe_defaults() -> None:
    connector = make_config(Collector()).connector
    assert connector.max_frame_size == DEFAULT_MAX_FRAME_SIZE == 16 * 1024 * 1024
    assert connector.max_nesting == 32
    assert connector.handshake_timeout == 10.0


async def test_default_limits_are_enforced() -> None:
    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve, make_config(Collector()))
        over = DEFAULT_MAX_FRAME_SIZE + 1
        outcome = await converse(server.port, MAGIC + HEADER.pack(over), eof=False)
        assert outcome.messages == [
            Error(
                f"frame of {over} bytes exceeds the maximum frame size of {DEFAULT_MAX_FRAME_SIZE}"
            )
        ]
        outcome = await converse(server.port, hello_bytes(metadata={"m": nest(31, [True])}))
        assert isinstance(outcome.messages[0], Welcome)
        outcome = await converse(server.port, hello_bytes(metadata={"m": nest(32, [True])}))
        assert outcome.messages == [
            Refuse("protocol", "the metadata is nested more than 32 levels deep")
        ]
        nursery.cancel_scope.cancel()
