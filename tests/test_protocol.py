"""The sans-IO protocol of ``mzconnector``: bytes in, events out; events in, bytes out.

No sockets here: two ``Protocol`` objects (a client and a server) exchange bytes directly.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mzconnector import (
    DEFAULT_MAX_FRAME_SIZE,
    MAGIC,
    MAX_BATCH_RECORDS,
    NEED_DATA,
    PROTOCOL_VERSION,
    Ack,
    Answer,
    ApiModule,
    Bye,
    CancelQuery,
    Closed,
    Error,
    Flush,
    GetMim,
    Hello,
    KvRequest,
    LocalProtocolError,
    Mim,
    Notice,
    Protocol,
    Query,
    QueryFailed,
    QueryInfo,
    QueryReply,
    RecordError,
    Records,
    Refuse,
    Refused,
    RemoteProtocolError,
    Role,
    State,
    SubAck,
    SubRecords,
    Subscribe,
    SubscriptionControl,
    Welcome,
    batch_length,
    encode_frame,
    encode_record_frames,
)

HEADER = struct.Struct(">I")


def welcome(**changes: Any) -> Welcome:
    fields: dict[str, Any] = {
        "protocol": PROTOCOL_VERSION,
        "connection_id": 7,
        "workflow": "test",
        "schema": {"Subscriber": {"msisdn": "str", "balance": "int"}},
        "accepted": ["Subscriber", "bytes"],
        "api": [ApiModule("demo", "def double(x):\n    return 2 * x\n")],
        "max_frame_size": 4096,
        "server": "unit",
    }
    fields.update(changes)
    return Welcome(**fields)


def records(items: list[Any]) -> Records:
    return Records(msgspec.Raw(msgspec.msgpack.encode(items)))


def feed_whole(protocol: Protocol, data: bytes) -> list[Any]:
    protocol.receive_data(data)
    return list(protocol.events())


def feed_bytewise(protocol: Protocol, data: bytes) -> list[Any]:
    """Feed one byte at a time; after each byte, take every event that is complete."""
    events: list[Any] = []
    for i in range(len(data)):
        protocol.receive_data(data[i : i + 1])
        while (event := protocol.next_event()) is not NEED_DATA:
            events.append(event)
    return events


FEEDERS = [pytest.param(feed_whole, id="whole"), pytest.param(feed_bytewise, id="bytewise")]


def raw_items(events: Iterable[Any]) -> list[Any]:
    return [msgspec.msgpack.decode(e.items) for e in events if isinstance(e, Records)]


def open_pair() -> tuple[Protocol, Protocol]:
    """A client and a server protocol that have completed the handshake."""
    client, server = Protocol(Role.CLIENT), Protocol(Role.SERVER)
    assert feed_whole(server, client.send(Hello(PROTOCOL_VERSION))) == [Hello(PROTOCOL_VERSION)]
    assert feed_whole(client, server.send(welcome())) == [welcome()]
    return client, server


# -- handshake -----------------------------------------------------------------------------------


@pytest.mark.parametrize("feed", FEEDERS)
def test_handshake_client_to_server(feed: Any) -> None:
    client, server = Protocol(Role.CLIENT), Protocol(Role.SERVER)
    hello = Hello(
        PROTOCOL_VERSION, name="notebook", metadata={"user": "ann", "n": [1, 2]}, client="t"
    )
    data = bytes(client.send(hello))
    assert data.startswith(MAGIC)
    assert client.state is State.WELCOME
    assert server.state is State.HELLO
    assert feed(server, data) == [hello]
    assert server.state is State.WELCOME
    assert server.next_event() is NEED_DATA


@pytest.mark.parametrize("feed", FEEDERS)
def test_handshake_server_to_client(feed: Any) -> None:
    client, server = Protocol(Role.CLIENT), Protocol(Role.SERVER)
    feed_whole(server, client.send(Hello(PROTOCOL_VERSION)))
    data = bytes(server.send(welcome()))
    assert not data.startswith(MAGIC)  # only the client sends the magic
    assert server.state is State.OPEN
    events = feed(client, data)
    assert events == [welcome()]
    assert events[0].api == [ApiModule("demo", "def double(x):\n    return 2 * x\n")]
    assert client.state is State.OPEN


@pytest.mark.parametrize("feed", FEEDERS)
def test_refuse_closes_the_handshake(feed: Any) -> None:
    client, server = Protocol(Role.CLIENT), Protocol(Role.SERVER)
    feed_whole(server, client.send(Hello(PROTOCOL_VERSION)))
    data = server.send(Refuse("limit", "the connection limit (1) is reached"))
    assert server.state is State.CLOSED
    assert feed(client, bytes(data)) == [Refuse("limit", "the connection limit (1) is reached")]
    assert client.state is State.CLOSED


@pytest.mark.parametrize("feed", FEEDERS)
def test_a_whole_conversation(feed: Any) -> None:
    """Everything an open connection carries, both ways, in one stream each."""
    client, server = open_pair()
    to_server = b"".join(
        [
            client.send(records([["Subscriber", "4670", 10], b"\x00raw"])),
            client.send(Flush()),
            client.send(GetMim()),
            client.send(records([["Subscriber", "4671", 11]])),
            client.send(Bye("client closed")),
        ]
    )
    events = feed(server, to_server)
    assert [type(e) for e in events] == [Records, Flush, GetMim, Records, Bye]
    assert raw_items(events) == [
        [["Subscriber", "4670", 10], b"\x00raw"],
        [["Subscriber", "4671", 11]],
    ]
    assert events[-1] == Bye("client closed")
    assert server.states[Role.CLIENT] is State.CLOSED  # the client's side is closed

    client2, server2 = open_pair()
    error = RecordError(1, "Subscriber", "balance", "Expected `int`, got `str`")
    to_client = b"".join(
        [
            server2.send(records([b"back"])),
            server2.send(Refused([error])),
            server2.send(Ack(3)),
            server2.send(Mim({"Records In": 2, "Workflow Name": "test", "Last Balance": None})),
            server2.send(Notice("2 record(s) for this client were undeliverable", 2)),
            server2.send(Bye("the server is shutting down")),
        ]
    )
    events = feed(client2, to_client)
    assert events[1:] == [
        Refused([error]),
        Ack(3),
        Mim({"Records In": 2, "Workflow Name": "test", "Last Balance": None}),
        Notice("2 record(s) for this client were undeliverable", 2),
        Bye("the server is shutting down"),
    ]
    assert raw_items(events) == [[b"back"]]
    assert client2.states[Role.SERVER] is State.CLOSED


@pytest.mark.parametrize("feed", FEEDERS)
def test_clean_end_of_stream_is_closed_event(feed: Any) -> None:
    client, server = open_pair()
    events = feed(server, bytes(client.send(Flush())))
    server.receive_data(b"")
    assert events == [Flush()]
    assert server.next_event() == Closed()
    assert server.states[Role.CLIENT] is State.CLOSED


def test_receive_data_after_end_of_stream_is_refused() -> None:
    _, server = open_pair()
    server.receive_data(b"")
    with pytest.raises(RuntimeError, match="after end of stream"):
        server.receive_data(b"more")


def test_large_stream_of_frames_keeps_order() -> None:
    """Many frames in one buffer (the buffer is compacted as it is consumed)."""
    client, server = open_pair()
    data = b"".join(client.send(records([["Subscriber", str(i), i]])) for i in range(5000))
    server.receive_data(data)
    got = [item[2] for batch in raw_items(server.events()) for item in batch]
    assert got == list(range(5000))
    assert server.next_event() is NEED_DATA


# -- limits and broken streams -----------------------------------------------------------------


def test_oversize_frame_is_rejected_from_its_length_prefix() -> None:
    """The declared length alone is enough to reject a frame: the body never has to arrive."""
    server = Protocol(Role.SERVER, max_frame_size=1024)
    feed_whole(server, bytes(Protocol(Role.CLIENT).send(Hello(PROTOCOL_VERSION))))
    server.receive_data(HEADER.pack(1025))
    with pytest.raises(
        RemoteProtocolError, match=r"frame of 1025 bytes exceeds the maximum frame size of 1024"
    ):
        server.next_event()


def test_frame_of_exactly_max_size_is_accepted() -> None:
    _, server = open_pair()
    payload = b"x" * 100
    frame = bytes(encode_frame(records([payload])))
    server.max_frame_size = len(frame) - 4
    assert raw_items(feed_whole(server, frame)) == [[payload]]


def test_default_max_frame_size_rejects_huge_prefix() -> None:
    _, server = open_pair()
    server.receive_data(HEADER.pack(DEFAULT_MAX_FRAME_SIZE + 1))
    with pytest.raises(RemoteProtocolError, match="exceeds the maximum frame size"):
        server.next_event()


def test_sending_an_oversize_frame_is_a_local_error() -> None:
    client, _ = open_pair()
    client.max_frame_size = 1024
    with pytest.raises(LocalProtocolError, match="exceeds the maximum of 1024"):
        client.send(records([b"x" * 2000]))
    # As in h11, a local protocol error is final: nothing more is sent on this connection.
    assert client.state is State.ERROR
    with pytest.raises(LocalProtocolError, match="in state error"):
        client.send(Flush())


@pytest.mark.parametrize("cut", [1, 3, 4, 5, -1])
def test_truncated_frame_at_eof_is_a_remote_error(cut: int) -> None:
    client, server = open_pair()
    frame = bytes(client.send(records([["Subscriber", "4670", 10]])))
    server.receive_data(frame[:cut])
    assert server.next_event() is NEED_DATA
    server.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="closed in the middle of a frame"):
        server.next_event()


def test_eof_before_hello_is_a_remote_error() -> None:
    server = Protocol(Role.SERVER)
    server.receive_data(MAGIC[:2])
    assert server.next_event() is NEED_DATA
    server.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="before the client said hello"):
        server.next_event()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        pytest.param(
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            r"not an mzconnector client \(first bytes b'G",
            id="http",
        ),
        pytest.param(
            b"MZX\x00" + bytes(20),
            r"not an mzconnector client \(first bytes b'MZX",
            id="wrong-magic",
        ),
        pytest.param(
            b"\x00\x00\x00\x05hello", "not an mzconnector client", id="frame-without-magic"
        ),
        pytest.param(
            b"Z", r"not an mzconnector client \(first bytes b'Z'\)", id="one-garbage-byte"
        ),
        pytest.param(
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32),
            "a TLS handshake arrived, but this server does not use TLS",
            id="tls-client-hello",
        ),
    ],
)
@pytest.mark.parametrize("feed", FEEDERS)
def test_garbage_before_hello_is_a_clear_remote_error(data: bytes, message: str, feed: Any) -> None:
    server = Protocol(Role.SERVER)
    with pytest.raises(RemoteProtocolError, match=message):
        feed(server, data)


def test_garbage_is_noticed_at_the_first_wrong_byte() -> None:
    """A stray client is told at once, without waiting for four bytes."""
    server = Protocol(Role.SERVER)
    server.receive_data(b"M")
    assert server.next_event() is NEED_DATA
    server.receive_data(b"Q")
    with pytest.raises(RemoteProtocolError, match="not an mzconnector client"):
        server.next_event()


def test_malformed_frame_body_is_a_remote_error() -> None:
    _, server = open_pair()
    body = msgspec.msgpack.encode(["NoSuchMessage", 1])
    server.receive_data(HEADER.pack(len(body)) + body)
    with pytest.raises(RemoteProtocolError, match="malformed frame"):
        server.next_event()


def test_hello_with_wrong_field_type_is_a_remote_error() -> None:
    server = Protocol(Role.SERVER)
    body = msgspec.msgpack.encode(["Hello", "one"])
    server.receive_data(MAGIC + HEADER.pack(len(body)) + body)
    with pytest.raises(
        RemoteProtocolError,
        match=r"^malformed frame: Hello\.protocol: expected int, got str 'one'$",
    ):
        server.next_event()


def test_deeply_nested_frame_is_a_remote_error() -> None:
    """Nesting is bounded: a deep frame (far below the maximum frame size) is the peer's
    error, not a RecursionError."""
    server = Protocol(Role.SERVER)
    nested = b"\x91" * 100_000 + b"\xc0"  # [[[...[None]...]]]
    body = b"\x94" + msgspec.msgpack.encode("Hello") + b"\x01\xa0\x81\xa1a" + nested
    server.receive_data(MAGIC + HEADER.pack(len(body)) + body)
    with pytest.raises(RemoteProtocolError):
        server.next_event()


# -- messages not allowed in a state -------------------------------------------------------------


def test_client_may_not_send_records_before_hello() -> None:
    client = Protocol(Role.CLIENT)
    with pytest.raises(
        LocalProtocolError,
        match=r"client may not send Records\b.*\bhello",
    ):
        client.send(records([b"x"]))
    assert client.state is State.ERROR


def test_client_may_not_send_records_before_welcome() -> None:
    client = Protocol(Role.CLIENT)
    client.send(Hello(PROTOCOL_VERSION))
    with pytest.raises(LocalProtocolError, match="in state welcome"):
        client.send(Flush())


def test_client_may_not_say_hello_twice() -> None:
    client, _ = open_pair()
    with pytest.raises(LocalProtocolError, match="client may not send Hello"):
        client.send(Hello(PROTOCOL_VERSION))


def test_server_may_not_send_ack_before_welcome() -> None:
    server = Protocol(Role.SERVER)
    feed_whole(server, client_hello())
    with pytest.raises(LocalProtocolError, match=r"server may not send Ack\b.*\bwelcome"):
        server.send(Ack(0))
    assert server.state is State.ERROR


def test_server_may_not_send_welcome_before_hello() -> None:
    with pytest.raises(LocalProtocolError, match="server may not send Welcome"):
        Protocol(Role.SERVER).send(welcome())


@pytest.mark.parametrize(
    "message", [Hello(PROTOCOL_VERSION), welcome(), Ack(1), Mim({}), Refused([]), Notice("x")]
)
def test_client_may_not_send_server_messages(message: Any) -> None:
    client, _ = open_pair()
    with pytest.raises(LocalProtocolError, match="client may not send"):
        client.send(message)


def test_server_receiving_records_before_hello_is_a_remote_error() -> None:
    server = Protocol(Role.SERVER)
    frame = bytes(encode_frame(records([b"x"])))
    with pytest.raises(
        RemoteProtocolError,
        match=r"client may not send Records\b.*\bhello",
    ):
        feed_whole(server, MAGIC + frame)


def test_client_receiving_ack_before_welcome_is_a_remote_error() -> None:
    client = Protocol(Role.CLIENT)
    client.send(Hello(PROTOCOL_VERSION))
    with pytest.raises(
        RemoteProtocolError,
        match=r"server may not send Ack\b.*\bwelcome",
    ):
        feed_whole(client, bytes(encode_frame(Ack(1))))


def test_nothing_after_bye() -> None:
    client, server = open_pair()
    data = client.send(Bye())
    assert client.state is State.CLOSED
    with pytest.raises(LocalProtocolError, match="in state closed"):
        client.send(Flush())
    with pytest.raises(
        RemoteProtocolError,
        match=r"client may not send Flush\b.*\bclosed",
    ):
        feed_whole(server, bytes(data) + bytes(encode_frame(Flush())))


@pytest.mark.parametrize("feed", FEEDERS)
def test_bye_closes_only_the_senders_side(feed: Any) -> None:
    """After the client's Bye, the server may still send what it owes, then its own Bye."""
    client, server = open_pair()
    data = bytes(client.send(records([b"last"]))) + bytes(client.send(Flush()))
    data += bytes(client.send(Bye("done")))
    assert [type(e) for e in feed(server, data)] == [Records, Flush, Bye]
    owed = bytes(server.send(records([b"echo"]))) + bytes(server.send(Ack(1)))
    owed += bytes(server.send(Bye("bye")))
    events = feed(client, owed)
    assert [type(e) for e in events] == [Records, Ack, Bye]
    assert events[1] == Ack(1)
    with pytest.raises(LocalProtocolError):
        server.send(Ack(1))  # after its own Bye, nothing more


def test_a_remote_protocol_error_is_final() -> None:
    client, server = open_pair()
    server.receive_data(bytes(encode_frame(Ack(1))))  # a server message, from the client
    with pytest.raises(RemoteProtocolError, match="client may not send Ack"):
        server.next_event()
    assert server.states[Role.CLIENT] is State.ERROR
    # Whatever arrives after it is never read: the client broke the protocol.
    server.receive_data(bytes(client.send(Flush())))
    with pytest.raises(RemoteProtocolError, match="already broke the protocol"):
        server.next_event()
    # The server may still say why it closes, and then nothing more.
    assert server.may_send(Error)
    server.send(Error("protocol error"))
    assert server.state is State.CLOSED
    assert server.states[Role.CLIENT] is State.ERROR  # an Error does not make it clean
    assert not server.may_send(Error)


def test_a_local_protocol_error_is_final() -> None:
    client, _ = open_pair()
    with pytest.raises(LocalProtocolError, match="client may not send Ack"):
        client.send(Ack(1))
    assert client.state is State.ERROR
    assert not client.may_send(Flush)
    with pytest.raises(LocalProtocolError, match="in state error"):
        client.send(Flush())


def test_frames_encoded_once_pass_the_table_too() -> None:
    """Records encoded once for many clients still pass each connection's table: nothing
    overtakes the Welcome."""
    frames = encode_record_frames([b"x"], 4096)
    server = Protocol(Role.SERVER)
    server.receive_data(client_hello())
    server.next_event()
    with pytest.raises(LocalProtocolError, match=r"server may not send Records.*welcome"):
        server.send_records(frames)
    server = Protocol(Role.SERVER)
    server.receive_data(client_hello())
    server.next_event()
    server.send(welcome())
    assert server.send_records(frames) is frames


def test_need_data_is_a_sentinel() -> None:
    assert repr(NEED_DATA) == "NEED_DATA"
    assert isinstance(NEED_DATA, type)
    assert Protocol(Role.SERVER).next_event() is NEED_DATA


def test_a_batch_over_the_record_limit_is_refused_from_its_header() -> None:
    _, server = open_pair()
    count = MAX_BATCH_RECORDS + 1
    # Nils: not records at all, yet the count is refused before any item is looked at.
    items = (
        b"\xdc" + count.to_bytes(2, "big") if count < 2**16 else b"\xdd" + count.to_bytes(4, "big")
    )
    frame = encode_frame(Records(msgspec.Raw(items + b"\xc0" * count)))
    with pytest.raises(RemoteProtocolError, match=f"batch of {count} records exceeds"):
        feed_whole(server, bytes(frame))


def test_a_batch_at_the_record_limit_is_taken_and_larger_ones_are_split() -> None:
    _, server = open_pair()
    items = [b""] * MAX_BATCH_RECORDS
    [event] = feed_whole(server, bytes(encode_frame(records(items))))
    assert len(msgspec.msgpack.decode(event.items)) == MAX_BATCH_RECORDS
    frames = encode_record_frames([b""] * (2 * MAX_BATCH_RECORDS + 1), DEFAULT_MAX_FRAME_SIZE)
    events = feed_whole(server, b"".join(map(bytes, frames)))
    assert [len(batch) for batch in raw_items(events)] == [MAX_BATCH_RECORDS] * 2 + [1]


@pytest.mark.parametrize("items", [b"\xc0", b"\x81\xa1a\x01", b"\x05"])
def test_a_batch_that_is_not_an_array_is_a_remote_error(items: bytes) -> None:
    _, server = open_pair()
    with pytest.raises(RemoteProtocolError, match="a batch of records must be an array"):
        feed_whole(server, bytes(encode_frame(Records(msgspec.Raw(items)))))


def test_bad_utf8_in_a_frame_is_said_in_our_words() -> None:
    server = Protocol(Role.SERVER)
    body = b"\x95\xa5Hello\x01\xa1\xff\x80\xa0"  # ["Hello", 1, "\xff", {}, ""]
    with pytest.raises(RemoteProtocolError, match=r"^malformed frame: a string is not valid UTF-8"):
        feed_whole(server, MAGIC + HEADER.pack(len(body)) + body)


# -- conversations: messages with ids, interleaved with pushes -------------------------------------

CLIENT_CONVERSATION = [
    Query(1, "ask", msgspec.Raw(msgspec.msgpack.encode(["Question", "x", 1]))),
    Subscribe(2, "alerts", {"home.city": "Lund"}, ack="client", max_pending=3),
    CancelQuery(1),
    SubscriptionControl(2, "stop"),
    SubAck(2, 7, through=True),
    KvRequest(3, "settings", "set", msgspec.Raw(b"\xa1k"), "", msgspec.Raw(b"\x05")),
]
SERVER_CONVERSATION = [
    QueryReply(1, msgspec.Raw(msgspec.msgpack.encode([["Reply", 1, "a"]]))),
    QueryFailed(1, "out-of-range", "count {0} is more than {1}", [12, 10]),
    Answer(2),
    SubRecords(2, 1, msgspec.Raw(msgspec.msgpack.encode([b"r"])), dropped=4),
    Answer(3, error="no such map"),
]


@pytest.mark.parametrize("feed", FEEDERS)
def test_conversations_interleave_with_pushes(feed: Any) -> None:
    client, server = open_pair()
    data = b""
    for message in CLIENT_CONVERSATION:
        data += bytes(client.send(records([b"push"]))) + bytes(client.send(message))
    events = feed(server, data)
    assert [e for e in events if not isinstance(e, Records)] == CLIENT_CONVERSATION
    assert len(events) == 2 * len(CLIENT_CONVERSATION)
    data = b"".join(bytes(server.send(m)) for m in SERVER_CONVERSATION)
    assert feed(client, data) == SERVER_CONVERSATION


@pytest.mark.parametrize("message", CLIENT_CONVERSATION, ids=lambda m: type(m).__name__)
def test_a_conversation_waits_for_the_welcome(message: Any) -> None:
    client = Protocol(Role.CLIENT)
    client.send(Hello(PROTOCOL_VERSION, client_id="alice"))
    with pytest.raises(LocalProtocolError, match="in state welcome"):
        client.send(message)
    server = Protocol(Role.SERVER)
    server.receive_data(MAGIC + bytes(encode_frame(Hello(PROTOCOL_VERSION))))
    assert server.next_event() == Hello(PROTOCOL_VERSION)
    with pytest.raises(RemoteProtocolError, match=f"client may not send {type(message).__name__}"):
        feed_whole(server, bytes(encode_frame(message)))


@pytest.mark.parametrize("message", SERVER_CONVERSATION, ids=lambda m: type(m).__name__)
def test_only_the_server_answers(message: Any) -> None:
    client, server = open_pair()
    with pytest.raises(LocalProtocolError, match=f"client may not send {type(message).__name__}"):
        client.send(message)
    with pytest.raises(LocalProtocolError, match="server may not send"):
        server.send(CLIENT_CONVERSATION[0])


def test_hello_and_welcome_carry_what_conversations_need() -> None:
    client, server = Protocol(Role.CLIENT), Protocol(Role.SERVER)
    hello = Hello(PROTOCOL_VERSION, name="n", client_id="alice")
    assert feed_whole(server, bytes(client.send(hello))) == [hello]
    answer = welcome(
        queries={"ask": QueryInfo("Question", "Reply")}, routes=["alerts"], taps=["raw"]
    )
    [got] = feed_whole(client, bytes(server.send(answer)))
    assert got.queries == {"ask": QueryInfo("Question", "Reply")}
    assert (got.routes, got.taps) == (["alerts"], ["raw"])


@pytest.mark.parametrize("count", [0, 1, 15, 16, 65535, 65536, 70000])
def test_batch_length_reads_the_header(count: int) -> None:
    assert batch_length(msgspec.msgpack.encode([None] * count)) == count


def test_batch_length_of_what_is_not_an_array() -> None:
    assert batch_length(msgspec.msgpack.encode({"a": 1})) == -1
    assert batch_length(b"") == -1


def test_server_may_report_an_error_before_hello() -> None:
    server = Protocol(Role.SERVER)
    data = server.send(Error("no hello within 10.0 s"))
    assert server.state is State.CLOSED
    client = Protocol(Role.CLIENT)
    client.send(Hello(PROTOCOL_VERSION))
    assert feed_whole(client, bytes(data)) == [Error("no hello within 10.0 s")]


def client_hello() -> bytes:
    return bytes(Protocol(Role.CLIENT).send(Hello(PROTOCOL_VERSION)))


# -- fuzzing: any bytes either decode or raise RemoteProtocolError --------------------------------

_FRAMES = [
    client_hello(),
    bytes(encode_frame(records([["Subscriber", "4670", 10], b"raw"]))),
    bytes(encode_frame(Flush())),
    bytes(encode_frame(GetMim())),
    bytes(encode_frame(Query(1, "ask", msgspec.Raw(msgspec.msgpack.encode(["Q", 1]))))),
    bytes(encode_frame(CancelQuery(1))),
    bytes(encode_frame(Subscribe(2, "alerts", {"a.b": 1}))),
    bytes(encode_frame(SubAck(2, 5, through=True))),
    bytes(encode_frame(KvRequest(3, "m", "get", msgspec.Raw(b"\xa1k")))),
    bytes(encode_frame(Bye())),
]


def _check_server_survives(chunks: list[bytes], eof: bool) -> None:
    server = Protocol(Role.SERVER, max_frame_size=4096)
    try:
        for chunk in chunks:
            server.receive_data(chunk)
            for event in server.events():
                assert isinstance(event, (Hello, Records, Flush, GetMim, Bye, Error, Closed))
        if eof:
            server.receive_data(b"")
            for event in server.events():
                assert isinstance(event, (Hello, Records, Flush, GetMim, Bye, Error, Closed))
    except RemoteProtocolError:
        pass


# Deep nesting has its own test above (``test_deeply_nested_frame_is_a_remote_error``).
@settings(max_examples=400, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=300), max_size=6), st.booleans())
def test_fuzz_any_bytes(chunks: list[bytes], eof: bool) -> None:
    _check_server_survives(chunks, eof)


@settings(max_examples=400, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.one_of(
            st.sampled_from(_FRAMES),
            st.binary(max_size=40).map(lambda b: HEADER.pack(len(b)) + b),
            st.binary(max_size=12),
        ),
        max_size=8,
    ),
    st.booleans(),
    st.integers(min_value=1, max_value=7),
)
def test_fuzz_frames_after_magic(parts: list[bytes], eof: bool, step: int) -> None:
    """Plausible streams (magic, well-formed and random frames), cut into chunks of ``step``."""
    data = MAGIC + b"".join(parts)
    chunks = [data[i : i + step] for i in range(0, len(data), step)]
    _check_server_survives(chunks, eof)


@settings(max_examples=300, derandomize=True)
@given(st.binary(max_size=300))
def test_fuzz_client_role(data: bytes) -> None:
    client = Protocol(Role.CLIENT, max_frame_size=4096)
    client.send(Hello(PROTOCOL_VERSION))
    client.receive_data(data)
    try:
        for event in client.events():
            assert not isinstance(event, (Hello, Flush, GetMim))
    except RemoteProtocolError:
        pass


# -- record frames -------------------------------------------------------------------------------


def test_encode_record_frames_one_frame_when_it_fits() -> None:
    items = [b"a" * 10, b"b" * 10]
    frames = encode_record_frames(items, 1024)
    assert len(frames) == 1
    _, server = open_pair()
    assert raw_items(feed_whole(server, bytes(frames[0]))) == [items]


def test_encode_record_frames_splits_large_batches() -> None:
    items = [bytes([i]) * 100 for i in range(50)]
    max_size = 1024
    frames = encode_record_frames(items, max_size)
    assert len(frames) > 1
    assert all(len(f) - 4 <= max_size for f in frames)
    _, server = open_pair()
    server.max_frame_size = max_size
    batches = raw_items(feed_whole(server, b"".join(bytes(f) for f in frames)))
    assert [item for batch in batches for item in batch] == items  # nothing lost, order kept


def test_encode_record_frames_one_oversize_item_is_a_local_error() -> None:
    with pytest.raises(
        LocalProtocolError,
        match=r"a bytes of \d+ bytes does not fit in a frame "
        r"\(the maximum frame size is 1024 bytes\)",
    ):
        encode_record_frames([b"small", b"x" * 2000, b"small"], 1024)


def test_encode_record_frames_one_item_alone() -> None:
    with pytest.raises(LocalProtocolError, match="does not fit in a frame"):
        encode_record_frames([b"x" * 2000], 1024)
