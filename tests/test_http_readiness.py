"""Readiness over loopback: /readyz while starting, while a processor says the workflow is
unhealthy, and during a graceful stop; the TCP probe port open exactly while ready; and the
command line's ``--http-port``."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
import trio

from mzconnector import Ack, Flush
from mzserver.connector import Connector
from mzserver.engines import LocalEngine
from mzserver.health import Health, Phase
from mzserver.http import HttpServer
from mzserver.mim import AssignedMims, MimTable
from mzserver.observe import Observed
from mzserver.workflow import Workflow
from tests.conftest import ROOT
from tests.httputil import get, http_config, serving
from tests.test_server import RawClient, batch


async def probe_is_open(port: int) -> bool:
    """Whether a TCP connection to the probe port is accepted (and closed by the server), or
    refused (False)."""
    with trio.socket.socket() as sock:
        try:
            await sock.connect(("127.0.0.1", port))
        except ConnectionRefusedError:
            return False
        with trio.fail_after(5):
            assert await sock.recv(1) == b""  # the server closed it at once
    return True


def gatekeeper(record: Any, ctx: Any) -> None:
    """A negative balance says the feed behind this workflow is down; a positive one, back."""
    if record.balance < 0:
        ctx.set_unhealthy(f"the balance feed is down ({record.msisdn})")
    else:
        ctx.set_healthy()
    ctx.route("back", record)


async def send_balance(client: RawClient, balance: int) -> None:
    Sub = client.types["Subscriber"]
    await client.send(batch([Sub(msisdn="feed", balance=balance)]), Flush())
    await client.events_until(Ack, records=1)


async def test_a_processor_makes_the_server_unready_and_ready_again() -> None:
    async with serving(http_config(gatekeeper, tcp_probe_port=0)) as server:
        url, probe = server.http_url, server.probe_port
        assert probe is not None
        assert await probe_is_open(probe)
        client = await RawClient.connect(server.port)

        await send_balance(client, -1)
        readyz = await get(url + "readyz")
        assert readyz.status == 503
        assert readyz.text == "not ready: processor 'proc' says: the balance feed is down (feed)\n"
        assert (await get(url + "healthz")).status == 200  # alive all the same
        await trio.testing.wait_all_tasks_blocked()  # the probe task has closed its port
        assert not await probe_is_open(probe)

        await send_balance(client, 5)
        assert ((await get(url + "readyz")).status, server.health.ready) == (200, True)
        await trio.testing.wait_all_tasks_blocked()
        assert await probe_is_open(probe)  # the same port again
        await client.aclose()


async def test_readiness_says_stopping_during_a_graceful_stop_and_the_probe_closes() -> None:
    entered, release = trio.Event(), trio.Event()

    async def busy(record: Any, ctx: Any) -> None:
        entered.set()
        await release.wait()

    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            __import__("mzserver").serve, http_config(busy, tcp_probe_port=0)
        )
        client = await RawClient.connect(server.port)
        Sub = client.types["Subscriber"]
        await client.send(batch([Sub(msisdn="1", balance=1)]))
        await entered.wait()
        server.stop()  # waits for the record being processed
        await trio.testing.wait_all_tasks_blocked()
        readyz = await get(server.http_url + "readyz")
        assert readyz.status == 503
        assert readyz.text == "not ready: stopping: a graceful stop is under way\n"
        assert (await get(server.http_url + "healthz")).status == 200
        assert not await probe_is_open(server.probe_port)
        release.set()
        with trio.fail_after(10):
            await server.wait_stopped()
        await client.aclose()
    http_port = int(server.http_url.rsplit(":", 1)[1].rstrip("/"))
    with trio.socket.socket() as sock, pytest.raises(ConnectionRefusedError):
        await sock.connect(("127.0.0.1", http_port))  # the HTTP listener stopped with the server


async def test_readyz_says_starting_until_the_workflow_runs() -> None:
    # The parts serve() builds, with the HTTP listener alone running: the server is starting.
    config = http_config()
    mim = MimTable(config.workflow, AssignedMims(config.mim, config.mim_declared))
    engine = LocalEngine(config, mim)
    connector = Connector(config, engine, mim)
    health = Health()
    workflow = Workflow(config, engine.routes, mim, connector, engine.kv, health=health)
    http = HttpServer(config.http, Observed(config, mim, engine, workflow, connector, health))
    await http.open()
    async with trio.open_nursery() as nursery:
        await nursery.start(http.serve)
        starting = await get(http.url + "readyz")
        health.set_phase(Phase.READY)
        ready = await get(http.url + "readyz")
        http.stop()
    assert starting.status == 503
    assert starting.text == (
        "not ready: starting: the workflow and the connector are not running yet\n"
    )
    assert ready.status == 200


def test_health_lists_every_processor_that_says_unhealthy_in_order() -> None:
    health = Health()
    health.set_phase(Phase.READY)
    health.declare_unhealthy("a", "disk full")
    health.declare_unhealthy("b", "upstream gone")
    health.declare_unhealthy("a", "disk still full")  # a new reason goes last
    assert not health.ready
    assert health.reasons() == [
        "processor 'b' says: upstream gone",
        "processor 'a' says: disk still full",
    ]
    health.declare_healthy("b")
    health.declare_healthy("a")
    assert health.ready


def test_the_command_line_serves_http_on_the_port_it_prints() -> None:
    with subprocess.Popen(
        [sys.executable, "-m", "mzserver", "--port", "0", "--http-port", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            first = proc.stdout.readline()
            second = proc.stdout.readline()
            assert first.startswith("mzserver: workflow 'echo' listening on 127.0.0.1:")
            assert second.startswith("mzserver: status page and probes on http://127.0.0.1:")
            url = second.split()[-1]
            assert trio.run(get, url + "readyz").status == 200
        finally:
            proc.terminate()
            assert proc.wait(20) == 0


def test_the_command_line_says_when_the_http_port_is_taken() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "mzserver", "--port", "0", "--http-port", str(port)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert done.returncode == 2
    assert done.stderr.startswith(f"mzserver: HTTP: cannot listen on 127.0.0.1:{port}: ")


def test_health_says_the_engine_first_while_it_cannot_take_records() -> None:
    health = Health()
    health.set_phase(Phase.READY)
    health.declare_unhealthy("a", "disk full")
    health.set_engine(False, "NATS at nats://x:4222 is unreachable")
    assert not health.ready
    assert health.reasons() == [
        "engine: NATS at nats://x:4222 is unreachable",
        "processor 'a' says: disk full",
    ]
    health.declare_healthy("a")
    assert not health.ready
    health.set_engine(True)
    assert health.ready
