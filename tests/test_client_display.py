"""How records and MIM values show in Jupyter: tables of values as a person reads them."""

from __future__ import annotations

import datetime
import re

import pytest

import mzconnector

UTC = datetime.timezone.utc
SCHEMA = {
    "Cell": {"name": "str"},
    "Usage": {
        "msisdn": "str",
        "count": "int",
        "amount": "float",
        "roaming": "bool",
        "payload": "bytes",
        "at": "datetime",
        "tags": "list[str]",
        "cell": "Cell",
        "note": "str | None",
    },
}


def cells(html: str) -> dict[str, str]:
    """Row header -> cell, from one of our tables (the HTML escapes undone for < > & ')."""
    rows = re.findall(r"<tr><th[^>]*>([^<]*)</th><td[^>]*>([^<]*)</td></tr>", html)
    unescape = {"&lt;": "<", "&gt;": ">", "&amp;": "&", "&#x27;": "'", "&quot;": '"'}
    out = {}
    for name, value in rows:
        for code, char in unescape.items():
            value = value.replace(code, char)
        out[name] = value
    return out


@pytest.fixture
def usage() -> object:
    types = mzconnector.build_record_types(SCHEMA)
    return types["Usage"](
        msisdn="46700000001",
        count=3,
        amount=1.5,
        roaming=False,
        payload=bytes(range(256)),
        at=datetime.datetime(2026, 11, 30, 12, 0, tzinfo=UTC),
        tags=["a", "b"],
        cell=types["Cell"](name="north"),
        note=None,
    )


def test_a_record_shows_its_values_as_a_person_reads_them(usage: object) -> None:
    assert cells(usage._repr_html_()) == {  # type: ignore[attr-defined]
        "msisdn": "46700000001",
        "count": "3",
        "amount": "1.5",
        "roaming": "False",
        "payload": r"b'\x00\x01\x02\x03\x04\x05\x06\x07\x08\t\n\x0b\x0c\r\x0e\x0f'... (256 bytes)",
        "at": "2026-11-30 12:00:00+00:00",
        "tags": "['a', 'b']",
        "cell": "Cell(name='north')",
        "note": "None",
    }


def test_short_bytes_show_whole() -> None:
    record = mzconnector.build_record_types({"Raw": {"data": "bytes"}})["Raw"](data=b"\x00raw")
    assert cells(record._repr_html_()) == {"data": r"b'\x00raw'"}  # type: ignore[attr-defined]


def test_the_mim_table_shows_values_as_a_person_reads_them() -> None:
    values = mzconnector.MimValues(
        {
            "Workflow Name": "echo",
            "Started": datetime.datetime(2026, 11, 30, 12, 0, tzinfo=UTC),
            "Uptime": 2.5,
            "Last MSISDN": "<b>46700000001</b>",
            "Last Balance": None,
        }
    )
    html = values._repr_html_()
    assert cells(html) == {
        "Workflow Name": "echo",
        "Started": "2026-11-30 12:00:00+00:00",
        "Uptime": "2.5",
        "Last MSISDN": "<b>46700000001</b>",
        "Last Balance": "None",
    }
    assert "<b>" not in html  # escaped
    assert repr(values).startswith("{'Workflow Name': 'echo'")  # plain text stays a dict
