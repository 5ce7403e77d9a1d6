"""The HTTP listener over loopback: /healthz, /metrics (parsed by prometheus_client's own
parser), the status data, the client file, the token, and the ``[http]`` table."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

import mzconnector
from mzconnector import Ack, Flush
from mzserver import BindError, ConfigError, serve
from mzserver.metrics import BUILTIN_METRICS
from mzserver.mim import BUILTIN_MIMS
from tests.httputil import get, http_config, serving
from tests.test_server import RawClient, batch

BUILTIN_FAMILIES = {
    "mzconnector_workflow_info": "gauge",
    "mzconnector_start_time_seconds": "gauge",
    "mzconnector_uptime_seconds": "gauge",
    "mzconnector_connections_open": "gauge",
    "mzconnector_connections_accepted": "counter",
    "mzconnector_connections_refused": "counter",
    "mzconnector_records_in": "counter",
    "mzconnector_received_bytes": "counter",
    "mzconnector_records_out": "counter",
    "mzconnector_sent_bytes": "counter",
    "mzconnector_records_refused": "counter",
    "mzconnector_records_undeliverable": "counter",
    "mzconnector_records_unacknowledged": "counter",
    "mzconnector_processor_errors": "counter",
}


def test_every_builtin_mim_has_a_metric() -> None:
    assert {"Workflow Name", *BUILTIN_METRICS} == set(BUILTIN_MIMS)


def metric_families(text: str) -> dict[str, Any]:
    return {family.name: family for family in text_string_to_metric_families(text)}


def value(families: dict[str, Any], sample: str, **labels: str) -> float:
    """The value of the one sample named ``sample`` whose labels include ``labels``."""
    found = [
        s.value
        for family in families.values()
        for s in family.samples
        if s.name == sample and labels.items() <= s.labels.items()
    ]
    assert len(found) == 1, (sample, labels, found)
    return found[0]


def counting(record: Any, ctx: Any) -> None:
    if record.balance < 0:
        raise ValueError("negative balance")
    ctx.mim["Last Balance"] = record.balance
    ctx.mim["Ratio"] = record.balance / 4
    ctx.mim["Last Client"] = ctx.connection.name
    ctx.route("back", record)


async def test_healthz_and_readyz_answer_200_once_the_server_is_ready() -> None:
    async with serving(http_config()) as server:
        assert server.http_url is not None
        assert server.http_url.startswith("http://127.0.0.1:")
        healthz = await get(server.http_url + "healthz")
        readyz = await get(server.http_url + "readyz")
        assert (healthz.status, healthz.text) == (200, "ok\n")
        assert (readyz.status, readyz.text) == (200, "ready\n")


async def test_metrics_count_what_went_through_in_prometheus_names() -> None:
    async with serving(http_config(counting)) as server:
        client = await RawClient.connect(server.port, "metrics-test")
        Sub = client.types["Subscriber"]
        good = [Sub(msisdn="4670", balance=b) for b in (8, 9, 12)]
        await client.send(batch([*good, Sub(msisdn="4679", balance=-1)]), Flush())
        await client.events_until(Ack, records=3)

        response = await get(server.http_url + "metrics")
        await client.aclose()

    assert response.status == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = metric_families(response.text)
    for name, kind in BUILTIN_FAMILIES.items():
        assert families[name].type == kind, name
        assert [s.labels["workflow"] for s in families[name].samples] == ["observed"], name
    w = {"workflow": "observed"}
    assert value(families, "mzconnector_records_in_total", **w) == 4
    assert value(families, "mzconnector_records_out_total", **w) == 3
    assert value(families, "mzconnector_processor_errors_total", **w) == 1
    assert value(families, "mzconnector_connections_open", **w) == 1
    assert value(families, "mzconnector_connections_accepted_total", **w) == 1
    assert value(families, "mzconnector_received_bytes_total", **w) > 0
    assert value(families, "mzconnector_uptime_seconds", **w) > 0
    assert value(families, "mzconnector_ready", **w) == 1
    # Per route: one batch of 4 in, 3 back; nothing left queued.
    assert value(families, "mzconnector_route_records_total", route="in", consumer="proc") == 4
    assert value(families, "mzconnector_route_batches_total", route="in") == 1
    assert value(families, "mzconnector_route_records_total", route="back") == 3
    assert value(families, "mzconnector_route_queue_depth", route="in") == 0
    # Per processor.
    assert value(families, "mzconnector_processor_records_total", processor="proc") == 4
    assert value(families, "mzconnector_processor_exceptions_total", processor="proc") == 1
    assert value(families, "mzconnector_processor_busy_seconds_total", processor="proc") >= 0
    # Assigned MIMs: the numeric ones as gauges (set ones only); a str is no metric.
    assert families["mzconnector_mim"].type == "gauge"
    assigned = {s.labels["name"]: s.value for s in families["mzconnector_mim"].samples}
    assert assigned == {"Last Balance": 12, "Ratio": 3.0}


async def test_queue_depth_counts_batches_waiting_for_a_busy_processor() -> None:
    release = trio.Event()
    entered = trio.Event()

    async def slow(record: Any, ctx: Any) -> None:
        entered.set()
        await release.wait()

    async with serving(http_config(slow)) as server:
        client = await RawClient.connect(server.port)
        Sub = client.types["Subscriber"]
        await client.send(batch([Sub(msisdn="1", balance=1)]))
        await entered.wait()
        other = await RawClient.connect(server.port)
        await other.send(batch([Sub(msisdn="2", balance=2)]), batch([Sub(msisdn="3", balance=3)]))
        await trio.testing.wait_all_tasks_blocked()  # the reader has taken both batches
        assert server.statistics()["Records In"] == 3
        families = metric_families((await get(server.http_url + "metrics")).text)
        assert value(families, "mzconnector_route_queue_depth", route="in") == 2
        release.set()
        await other.send(Flush())
        await other.events_until(Ack)
        families = metric_families((await get(server.http_url + "metrics")).text)
        assert value(families, "mzconnector_route_queue_depth", route="in") == 0
        await client.aclose()
        await other.aclose()


async def test_status_data_lists_routes_processors_clients_and_mims() -> None:
    async with serving(http_config(counting)) as server:
        client = await RawClient.connect(server.port, "notebook-7")
        Sub = client.types["Subscriber"]
        await client.send(batch([Sub(msisdn="4670", balance=8)]), Flush())
        await client.events_until(Ack, records=1)
        response = await get(server.http_url + "api/status")
        await client.aclose()
    assert response.status == 200
    assert response.headers["content-type"] == "application/json"
    status = msgspec.json.decode(response.body)
    assert status["workflow"] == "observed"
    assert (status["ready"], status["phase"], status["reasons"]) == (True, "ready", [])
    assert [(r["route"], r["consumer"], r["records"]) for r in status["routes"]] == [
        ("back", "connector", 1),
        ("in", "proc", 1),
    ]
    assert [(p["name"], p["records"], p["errors"]) for p in status["processors"]] == [
        ("proc", 1, 0)
    ]
    [c] = status["clients"]
    assert (c["name"], c["records_in"], c["records_out"], c["user"]) == ("notebook-7", 1, 1, "")
    assert c["peer"].startswith("127.0.0.1:")
    mims = {m["name"]: m for m in status["mim"]}
    assert mims["Last Balance"] == {
        "name": "Last Balance",
        "value": 8,
        "builtin": False,
        "type": "int",
    }
    assert mims["Records In"]["value"] == 1


async def test_the_page_and_everything_it_needs_come_from_the_server() -> None:
    async with serving(http_config()) as server:
        page = await get(server.http_url)
        css = await get(server.http_url + "status.css")
        js = await get(server.http_url + "status.js")
    assert page.status == css.status == js.status == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert css.headers["content-type"].startswith("text/css")
    assert js.headers["content-type"].startswith("text/javascript")
    # No CDN: every URL the page names is the server's own (relative).
    assert "http" not in page.text.replace("http-equiv", "")
    assert "//" not in page.text.replace("<!--", "")
    assert page.headers["content-security-policy"].startswith("default-src 'self'")


async def test_the_client_file_is_the_exact_file_the_server_speaks() -> None:
    async with serving(http_config()) as server:
        response = await get(server.http_url + "mzconnector.py")
    assert response.status == 200
    assert response.body == await trio.Path(mzconnector.__file__).read_bytes()
    assert response.headers["content-disposition"] == 'attachment; filename="mzconnector.py"'


async def test_unknown_paths_and_methods() -> None:
    async with serving(http_config()) as server:
        missing = await get(server.http_url + "nothing-here")
        post = await get(server.http_url + "metrics", method="POST")
        head = await get(server.http_url + "healthz", method="HEAD")
    assert (missing.status, missing.text) == (404, "not found\n")
    assert (post.status, post.headers["allow"]) == (405, "GET, HEAD")
    assert (head.status, head.body, head.headers["content-length"]) == (200, b"", "3")


@pytest.mark.parametrize("path", ["", "metrics", "api/status", "mzconnector.py", "status.js"])
async def test_a_token_protects_everything_but_the_probes(path: str) -> None:
    secret = "s3cret-token"
    async with serving(http_config(http={"token": secret})) as server:
        url = server.http_url + path
        without = await get(url)
        wrong = await get(url, token="guess")
        bearer = await get(url, token=secret)
        basic = await get(url, basic=secret)
        wrong_basic = await get(url, basic="guess")
        probes = [await get(server.http_url + p) for p in ("healthz", "readyz")]
    assert without.status == wrong.status == wrong_basic.status == 401
    assert secret not in without.text
    assert 'Bearer realm="mzconnector"' in without.headers["www-authenticate"]
    assert bearer.status == basic.status == 200
    assert [p.status for p in probes] == [200, 200]


async def test_no_http_port_no_listener() -> None:
    config = http_config().replace_http(port=None)
    assert config.http.port is None
    async with serving(config) as server:
        assert server.http_url is None


async def test_an_http_port_in_use_stops_the_server_before_it_starts() -> None:
    with trio.socket.socket() as taken:
        await taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with trio.fail_after(10), pytest.raises(BindError) as caught:
            await serve(http_config(http={"port": port}))
    assert str(caught.value).startswith(f"HTTP: cannot listen on 127.0.0.1:{port}: ")


@pytest.mark.parametrize(
    ("http", "connector", "message"),
    [
        ({"port": 70000}, {}, "http.port: expected an integer from 0 to 65535, got 70000"),
        ({"port": "80"}, {}, "http.port: expected an integer from 0 to 65535, got the string '80'"),
        ({"colour": 1}, {}, "http.colour: unknown key (known keys: host, port, token)"),
        ({"token": 5}, {}, "http.token: expected a string, got 5"),
        ({"port": 7777}, {"port": 7777}, "http.port: port 7777 is taken by connector.port"),
        (
            {},
            {"tcp_probe_port": -1},
            "connector.tcp_probe_port: expected an integer from 0 to 65535, got -1",
        ),
        (
            {"port": 9000},
            {"tcp_probe_port": 9000},
            "http.port: port 9000 is taken by connector.tcp_probe_port",
        ),
        (
            {},
            {"port": 7000, "tcp_probe_port": 7000},
            "connector.tcp_probe_port: port 7000 is taken by connector.port",
        ),
    ],
)
def test_the_http_table_is_checked_in_our_words(
    http: dict[str, Any], connector: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        http_config(http=http, **connector)
    assert str(caught.value) == f"observed.toml: {message}"


def test_distinct_hosts_may_share_a_port() -> None:
    config = http_config(http={"host": "127.0.0.2", "port": 7777}, port=7777)
    assert config.http.port == config.connector.port == 7777
