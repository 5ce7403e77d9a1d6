"""Record types: the schema builder (``build_record_types``, ``parse_type``) and ``RecordCodec``."""

from __future__ import annotations

import datetime
from typing import Any

import msgspec
import pytest

from mzconnector import Pickled, RecordCodec, SchemaError, build_record_types, parse_type

UTC = datetime.timezone.utc
CEST = datetime.timezone(datetime.timedelta(hours=2))

RICH_SCHEMA = {
    "Event": {
        "id": "int",
        "amount": "float",
        "label": "str",
        "ok": "bool",
        "payload": "bytes",
        "at": "datetime",
        "tags": "list[str]",
        "counts": "dict[str, int]",
        "note": "str | None",
        "address": "Address",
        "history": "list[Address]",
        "lookup": "dict[str, list[Address | None]]",
        "matrix": "list[list[float]]",
        "maybe_address": "Address | None",
    },
    "Address": {"street": "str", "zip": "str | None"},
}


@pytest.fixture(scope="module")
def codec() -> RecordCodec:
    return RecordCodec(RICH_SCHEMA)


def make_event(codec: RecordCodec, **changes: Any) -> Any:
    Event, Address = codec.types["Event"], codec.types["Address"]
    fields: dict[str, Any] = {
        "id": 2**62,
        "amount": -1.25e-300,
        "label": "räksmörgås ✓",
        "ok": False,
        "payload": b"\x00\xff\x00",
        "at": datetime.datetime(2024, 2, 29, 23, 59, 59, 999999, tzinfo=UTC),
        "tags": ["a", "", "b"],
        "counts": {"x": -1, "": 0},
        "address": Address(street="Main St 1", zip="12345"),
        "history": [Address(street="Old 2"), Address(street="Older 3", zip=None)],
        "lookup": {"k": [None, Address(street="S", zip="Z")], "empty": []},
        "matrix": [[1.5, -0.0], [], [float("inf")]],
    }
    fields.update(changes)
    return Event(**fields)


def round_trip(codec: RecordCodec, items: list[Any], names: list[str] | None = None) -> list[Any]:
    decoder = codec.decoder(names or [*codec.types, "bytes"], pickled=True)
    return decoder.decode(msgspec.msgpack.encode(items))


# -- parse_type --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("int", int),
        ("float", float),
        ("str", str),
        ("bool", bool),
        ("bytes", bytes),
        ("datetime", datetime.datetime),
        ("list[int]", list[int]),
        ("list[list[str]]", list[list[str]]),
        ("dict[str, float]", dict[str, float]),
        ("dict[str,float]", dict[str, float]),
        ("  list[ int ]  ", list[int]),
        ("int | None", int | None),
        ("None | int", int | None),
        ("list[int | None]", list[int | None]),
        ("dict[str, list[bytes]] | None", dict[str, list[bytes]] | None),
    ],
)
def test_parse_type(text: str, expected: Any) -> None:
    assert parse_type(text, {}) == expected


def test_parse_type_record_names() -> None:
    class Sub(msgspec.Struct):
        pass

    assert parse_type("list[Sub | None]", {"Sub": Sub}) == list[Sub | None]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("Integer", "unknown type 'Integer' in 'Integer'"),
        ("List[int]", "unknown type 'List'"),
        ("list[int", r"expected '\]', found 'the end'"),
        ("list int", r"expected '\['"),
        ("dict[int, str]", "dictionary keys must be str"),
        ("dict[str]", r"expected ','"),
        ("int | str", r"only 'T \| None' unions are supported"),
        ("int | None | None", r"only 'T \| None' unions are supported"),
        ("int int", "unexpected 'int'"),
        ("", "expected a type name"),
        ("list[]", "expected a type name"),
        ("int?", "cannot read type 'int\\?'"),
    ],
)
def test_parse_type_errors(text: str, message: str) -> None:
    with pytest.raises(SchemaError, match=message):
        parse_type(text, {})


# -- build_record_types ------------------------------------------------------------------------


def test_builds_classes_in_schema_order(codec: RecordCodec) -> None:
    assert list(codec.types) == ["Event", "Address"]
    Event = codec.types["Event"]
    assert Event.__name__ == "Event"
    assert Event.__module__ == "mzconnector.udrs"
    assert Event.__struct_fields__ == tuple(RICH_SCHEMA["Event"])
    assert "id: int" in Event.__doc__
    assert "lookup: dict[str, list[Address | None]]" in Event.__doc__


def test_optional_fields_default_to_none_others_are_required(codec: RecordCodec) -> None:
    Address = codec.types["Address"]
    assert Address(street="x").zip is None
    with pytest.raises(TypeError, match="street"):
        Address(zip="1")
    with pytest.raises(TypeError):
        Address("positional")  # records are built with keyword arguments


def test_records_compare_by_value(codec: RecordCodec) -> None:
    assert make_event(codec) == make_event(codec)
    assert make_event(codec) != make_event(codec, id=1)


def test_all_field_types_round_trip_exactly(codec: RecordCodec) -> None:
    event = make_event(codec)
    [back] = round_trip(codec, [event])
    assert back == event
    assert type(back) is codec.types["Event"]
    assert type(back.address) is codec.types["Address"]
    assert type(back.history[1]) is codec.types["Address"]
    assert back.lookup["k"][0] is None
    assert type(back.payload) is bytes
    assert type(back.ok) is bool
    assert type(back.amount) is float
    assert back.id == 2**62
    assert back.at == event.at
    assert back.at.tzinfo is not None
    assert back.at.utcoffset() == datetime.timedelta(0)
    assert back.matrix[0][1] == 0.0
    assert str(back.matrix[0][1]) == "-0.0"
    assert back.label == "räksmörgås ✓"
    assert back.note is None
    assert back.maybe_address is None


def test_optional_values_round_trip(codec: RecordCodec) -> None:
    Address = codec.types["Address"]
    event = make_event(codec, note="n", maybe_address=Address(street="here", zip=None))
    assert round_trip(codec, [event]) == [event]


def test_other_timezones_keep_the_instant(codec: RecordCodec) -> None:
    """The wire carries an instant (msgpack timestamp): a +02:00 time comes back as the same
    instant (equal), timezone-aware, expressed in UTC."""
    at = datetime.datetime(2024, 6, 1, 12, 0, tzinfo=CEST)
    [back] = round_trip(codec, [make_event(codec, at=at)])
    assert back.at == at
    assert back.at.tzinfo is not None
    assert back.at.astimezone(CEST) == at


def test_naive_datetime_stays_naive(codec: RecordCodec) -> None:
    at = datetime.datetime(2024, 6, 1, 12, 0, 0, 123456)
    [back] = round_trip(codec, [make_event(codec, at=at)])
    assert back.at == at
    assert back.at.tzinfo is None


def test_mixed_batch_with_bytes_and_pickled(codec: RecordCodec) -> None:
    items = [make_event(codec), b"raw", codec.types["Address"](street="x"), Pickled(b"\x80\x04N.")]
    back = round_trip(codec, items)
    assert back == items
    assert [type(x) for x in back] == [type(x) for x in items]


def test_decoder_validates(codec: RecordCodec) -> None:
    bad = msgspec.msgpack.encode([["Address", 5, None]])
    with pytest.raises(msgspec.ValidationError):
        codec.decoder(["Address"]).decode(bad)


def test_decoder_is_strict_about_bool_and_int(codec: RecordCodec) -> None:
    Address = codec.types["Address"]
    with pytest.raises(msgspec.ValidationError):
        codec.decoder(["Event"]).decode(msgspec.msgpack.encode([make_event(codec, id=True)]))
    with pytest.raises(msgspec.ValidationError):
        codec.decoder(["Address"]).decode(msgspec.msgpack.encode([Address(street=b"bytes")]))


def test_decoder_admits_only_named_types(codec: RecordCodec) -> None:
    address = codec.types["Address"](street="x")
    with pytest.raises(msgspec.ValidationError):
        codec.decoder(["Event"]).decode(msgspec.msgpack.encode([address]))
    with pytest.raises(msgspec.ValidationError):
        codec.decoder(["Event"]).decode(msgspec.msgpack.encode([b"raw"]))
    with pytest.raises(ValueError, match="at least one type"):
        codec.decoder([])


def test_int_is_accepted_as_float(codec: RecordCodec) -> None:
    [back] = round_trip(codec, [make_event(codec, amount=3)])
    assert back.amount == 3.0
    assert type(back.amount) is float


def test_empty_record_type() -> None:
    codec = RecordCodec({"Ping": {}})
    ping = codec.types["Ping"]()
    assert round_trip(codec, [ping, ping]) == [ping, ping]


def test_two_codecs_of_one_schema_agree() -> None:
    """Client and server build their classes separately from the same schema."""
    server, client = RecordCodec(RICH_SCHEMA), RecordCodec(RICH_SCHEMA)
    sent = make_event(server)
    [received] = round_trip(client, [sent])
    assert type(received) is client.types["Event"]
    assert type(received.address) is client.types["Address"]
    assert received == make_event(client)
    assert msgspec.msgpack.encode(received) == msgspec.msgpack.encode(sent)


# -- schema errors name the type and the field -------------------------------------------------


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ({"A": {"x": "Foo"}}, r"A\.x: unknown type 'Foo' in 'Foo'"),
        ({"A": {"x": "list[Foo | None]"}}, r"A\.x: unknown type 'Foo' in 'list\[Foo \| None\]'"),
        ({"A": {"ok": "int", "x": "dict[int, str]"}}, r"A\.x: .*dictionary keys must be str"),
        ({"A": {"x": "int | str"}}, r"A\.x: .*only 'T \| None' unions"),
        ({"A": {"x": "list[int"}}, r"A\.x: .*expected '\]'"),
        ({"A": {"1x": "int"}}, r"A\.1x: not a valid field name"),
        ({"A": {"class": "int"}}, r"A\.class: not a valid field name"),
        ({"A": {"_hidden": "int"}}, r"A\._hidden: not a valid field name"),
        ({"A": {"has space": "int"}}, r"A\.has space: not a valid field name"),
        ({"1A": {"x": "int"}}, "'1A' cannot be a record type name"),
        ({"class": {"x": "int"}}, "'class' cannot be a record type name"),
        ({"int": {"x": "int"}}, "'int' cannot be a record type name"),
        ({"bytes": {"x": "int"}}, "'bytes' cannot be a record type name"),
        ({"list": {"x": "int"}}, "'list' cannot be a record type name"),
        ({"None": {"x": "int"}}, "'None' cannot be a record type name"),
        ({"datetime": {"x": "int"}}, "'datetime' cannot be a record type name"),
        ({"A-B": {"x": "int"}}, "'A-B' cannot be a record type name"),
    ],
)
def test_schema_errors(schema: dict[str, dict[str, str]], message: str) -> None:
    with pytest.raises(SchemaError, match=message):
        build_record_types(schema)


def test_schema_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="unknown type"):
        build_record_types({"A": {"x": "Nope"}})


@pytest.mark.parametrize(
    ("schema", "cycle"),
    [
        ({"A": {"next": "A | None"}}, "A.next -> A"),
        ({"A": {"b": "B"}, "B": {"a": "list[A]"}}, "A.b -> B.a -> A"),
        ({"X": {"a": "A"}, "A": {"b": "B"}, "B": {"c": "dict[str, A]"}}, "A.b -> B.c -> A"),
    ],
)
def test_cycles_are_refused_naming_the_types(schema: dict[str, dict[str, str]], cycle: str) -> None:
    with pytest.raises(SchemaError, match=f"cycle: {cycle}"):
        build_record_types(schema)


def test_cycle_error_names_the_fields() -> None:
    with pytest.raises(SchemaError) as info:
        build_record_types({"A": {"b": "B"}, "B": {"back": "list[A]"}})
    assert "A.b" in str(info.value)
    assert "B.back" in str(info.value)


def test_reserved_pickled_tag_is_refused() -> None:
    with pytest.raises(SchemaError, match="__pickled__"):
        RecordCodec({"__pickled__": {"data": "bytes"}}).decoder(
            ["__pickled__", "bytes"], pickled=True
        )


def test_nesting_order_does_not_matter() -> None:
    types = build_record_types({"Outer": {"inner": "Inner"}, "Inner": {"v": "int"}})
    assert list(types) == ["Outer", "Inner"]
    outer = types["Outer"](inner=types["Inner"](v=1))
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(outer), type=types["Outer"]) == outer


# -- RecordCodec.explain -------------------------------------------------------------------------


def explain(
    codec: RecordCodec, item: Any, accepted: list[str] | None = None
) -> tuple[str, str | None, str]:
    return codec.explain(
        msgspec.msgpack.encode(item), accepted if accepted is not None else ["Event"]
    )


def test_explain_names_type_and_field(codec: RecordCodec) -> None:
    name, field, problem = explain(codec, make_event(codec, label=5))
    assert (name, field) == ("Event", "label")
    assert problem == "expected str, got int 5"


def test_explain_follows_a_nested_problem_down_to_its_field(codec: RecordCodec) -> None:
    Address = codec.types["Address"]
    name, field, problem = explain(
        codec, make_event(codec, history=[Address(street="ok"), Address(street=1)])
    )
    assert (name, field, problem) == ("Event", "history[1].street", "expected str, got int 1")


def test_explain_names_the_key_of_a_bad_dict_value_and_the_optional_type(
    codec: RecordCodec,
) -> None:
    Address = codec.types["Address"]
    lookup = {"k": [None, Address(street="S")], "bad": [Address(street="S"), 7]}
    name, field, problem = explain(codec, make_event(codec, lookup=lookup))
    assert (name, field, problem) == (
        "Event",
        "lookup['bad'][1]",
        "expected Address | None, got int 7",
    )
    name, field, problem = explain(codec, make_event(codec, counts={"a": 1, "b": "high"}))
    assert (name, field, problem) == ("Event", "counts['b']", "expected int, got str 'high'")


def test_explain_says_bad_utf8_in_its_own_words(codec: RecordCodec) -> None:
    good = msgspec.msgpack.encode(make_event(codec, label="\u00e9t\u00e9"))
    bad = good.replace("\u00e9t\u00e9".encode(), b"\xff\xfe\xfd\xfc\xfb")
    assert len(bad) == len(good)
    assert codec.explain(bad, ["Event"]) == ("Event", "label", "a string is not valid UTF-8")


def test_explain_wrong_datetime(codec: RecordCodec) -> None:
    assert explain(codec, make_event(codec, at="yesterday"))[:2] == ("Event", "at")


def test_explain_bool_for_int(codec: RecordCodec) -> None:
    assert explain(codec, make_event(codec, id=False)) == (
        "Event",
        "id",
        "expected int, got bool False",
    )


def test_explain_missing_field(codec: RecordCodec) -> None:
    assert explain(codec, ["Address"], ["Address"]) == ("Address", "street", "missing")


def test_explain_too_many_fields(codec: RecordCodec) -> None:
    assert explain(codec, ["Address", "s", None, "extra"], ["Address"]) == (
        "Address",
        None,
        "3 fields given, 2 declared",
    )


def test_explain_unknown_type(codec: RecordCodec) -> None:
    assert explain(codec, ["Nope", 1, 2]) == ("Nope", None, "unknown record type 'Nope'")


def test_explain_type_not_accepted(codec: RecordCodec) -> None:
    item = codec.types["Address"](street="s")
    assert explain(codec, item) == (
        "Address",
        None,
        "records of type 'Address' are not accepted by this connector",
    )


def test_explain_bytes_not_accepted(codec: RecordCodec) -> None:
    assert explain(codec, b"raw") == ("bytes", None, "bytes are not accepted by this connector")


@pytest.mark.parametrize("item", [5, "text", {"a": 1}, [], [1, 2]])
def test_explain_not_a_record(codec: RecordCodec, item: Any) -> None:
    name, field, problem = explain(codec, item)
    assert (name, field) == ("?", None)
    assert problem.startswith("not a record")


def test_explain_malformed(codec: RecordCodec) -> None:
    name, field, problem = codec.explain(b"\xc1", ["Event"])
    assert (name, field) == ("?", None)
    assert problem.startswith("malformed record")
