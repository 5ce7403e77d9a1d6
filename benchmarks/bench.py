"""The benchmark suite: the connector and a baseline, measured the same way in one run.

    python benchmarks/bench.py [--quick] [--json out.json] [--only NAME[,NAME...]]

Servers run as subprocesses (``python -m mzserver <toml> --port 0``; the baseline is
``baseline_server.py``, a trio server that only moves length-prefixed frames); clients run in
this process (and, for the many-clients job, in client subprocesses); loopback only. Each job
runs several times, connector and baseline in turn, and reports the median of the runs and the
ratio connector / baseline. Results go to a table on stdout and to JSON (default
``benchmarks/results/latest.json``). See benchmarks/README.md for what each job measures.

Jobs (``--only``): roundtrip, push, pipelined, api, manyclients, tls, bulk, frames, batch, rpc.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import ssl
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import trio
from flight_server import FlightPeer
from flight_server import available as flight_available
from frames_reference import from_dataframe_6f33ee1
from harness import (
    BENCH,
    HOST,
    ROOT,
    WORKFLOWS,
    Certificates,
    ServerFailed,
    ServerProcess,
    baseline_server,
    mz_server,
    percentile,
    raise_nofile,
    scratch_dir,
    summary,
    tls_workflow,
)
from rawclient import RawClient, frame
from rpc_services import RpcClient, available
from zmq_peer import Rec as ZmqRec
from zmq_peer import ZmqPeer
from zmq_peer import available as zmq_available

import mzconnector

JOBS = (
    "roundtrip",
    "push",
    "pipelined",
    "api",
    "manyclients",
    "tls",
    "bulk",
    "frames",
    "batch",
    "rpc",
)

PARAMS: dict[str, dict[str, Any]] = {
    "full": {
        "runs": 5,
        "roundtrip_n": 5000,
        "api_n": 3000,
        "push_n": 2_000_000,
        "pipelined_n": 1_000_000,
        "bulk_mib": 1024,
        "clients": 1000,
        "client_procs": 4,
        "clients_batch": 1024,
        "clients_rounds": 4,
        "tls_push_n": 1_000_000,
        "tls_pipelined_n": 500_000,
        "rpc_call_n": 2000,
        "rpc_push_n": 10_000,
        "rpc_batch_n": 200_000,
        "frames_n": 1_000_000,
    },
    "quick": {
        "runs": 3,
        "roundtrip_n": 1000,
        "api_n": 1000,
        "push_n": 1_000_000,
        "pipelined_n": 500_000,
        "bulk_mib": 256,
        "clients": 200,
        "client_procs": 4,
        "clients_batch": 1024,
        "clients_rounds": 10,
        "tls_push_n": 500_000,
        "tls_pipelined_n": 300_000,
        "rpc_call_n": 500,
        "rpc_push_n": 2000,
        "rpc_batch_n": 50_000,
        "frames_n": 1_000_000,
    },
}

BATCH = 8192  # mzconnector's default batch_size: the baseline sends frames of as many records
MIB = 1 << 20


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


def row(
    job: str,
    metric: str,
    unit: str,
    connector: list[float] | None,
    baseline: list[float] | None,
    *,
    baseline_name: str = "trio frame server",
    better: str = "higher",
    target: str = "",
    met: bool | None = None,
    note: str = "",
) -> dict[str, Any]:
    """One line of the table: medians of the runs of both sides, and their ratio."""
    c = summary(connector) if connector else None
    b = summary(baseline) if baseline else None
    ratio = c["median"] / b["median"] if c and b and b["median"] else None
    return {
        "job": job,
        "metric": metric,
        "unit": unit,
        "better": better,
        "connector": c,
        "baseline": b,
        "baseline_name": baseline_name,
        "ratio": ratio,
        "target": target,
        "met": met,
        "note": note,
    }


def unavailable(job: str, metric: str, why: str) -> dict[str, Any]:
    return {**row(job, metric, "", None, None), "note": why, "available": False}


def cpu_seconds(pid: int) -> float:
    """CPU time of a process so far, all its threads, user and system, in seconds: the sum of
    ``/proc/<pid>/task/*/schedstat`` (nanoseconds), else ``/proc/<pid>/stat`` (10 ms ticks)."""
    try:
        total = 0
        for task in os.listdir(f"/proc/{pid}/task"):
            with (
                contextlib.suppress(FileNotFoundError),
                open(f"/proc/{pid}/task/{task}/schedstat") as f,
            ):
                total += int(f.read().split()[0])
        return total / 1e9
    except OSError:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _per_record(server: float, clients: float, records: float) -> tuple[float, float]:
    """CPU seconds of (server, clients) for ``records`` records, as ns per record."""
    return server / max(1, records) * 1e9, clients / max(1, records) * 1e9


class Meter:
    """CPU seconds the server process and this (client) process spent while timed, and the
    operations (round trips, records, bytes) done meanwhile. On loopback, the kernel's TCP
    work for a send is counted to the sender."""

    def __init__(self) -> None:
        self.server = self.client = self.wall = 0.0
        self.ops = 0

    @contextlib.contextmanager
    def measure(self, server: ServerProcess, ops: int, on: bool = True) -> Iterator[None]:
        if not on:
            yield
            return
        s0, c0, w0 = cpu_seconds(server.pid), time.process_time(), time.perf_counter()
        try:
            yield
        finally:
            self.server += cpu_seconds(server.pid) - s0
            self.client += time.process_time() - c0
            self.wall += time.perf_counter() - w0
            self.ops += ops

    def as_dict(self) -> dict[str, float]:
        return {
            "server_cpu_s": self.server,
            "client_cpu_s": self.client,
            "wall_s": self.wall,
            "ops": self.ops,
        }


def cpu_note(mz: Meter, base: Meter | None, per: str, scale: float, unit: str) -> str:
    """CPU per operation on each side, connector (baseline), and how busy the server was."""

    def each(meter: Meter, side: str) -> float:
        return getattr(meter, side) / max(1, meter.ops) * scale

    parts = []
    for side in ("server", "client"):
        text = f"{side} {each(mz, side):,.{1 if scale > 1e6 else 0}f} {unit}"
        if base is not None and base.ops:
            text += f" (baseline {each(base, side):,.{1 if scale > 1e6 else 0}f})"
        parts.append(text)
    busy = mz.server / mz.wall if mz.wall else 0.0
    return f"CPU per {per}: {', '.join(parts)}; server busy {busy:.2f} cores"


# ---------------------------------------------------------------------------------------------
# The bench
# ---------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, params: dict[str, Any], log: Callable[[str], None]) -> None:
        self.p = params
        self.log = log
        self.results: dict[str, dict[str, Any]] = {}
        self._servers: dict[str, ServerProcess] = {}

    # -- shared servers ---------------------------------------------------------------------
    def server(self, key: str) -> ServerProcess:
        """The shared server ``key`` (started on first use): mz-count, mz-echo, base-sink,
        base-echo."""
        if key not in self._servers:
            kind, name = key.split("-")
            if kind == "mz":
                self._servers[key] = mz_server(WORKFLOWS / f"{name}.toml")
            else:
                self._servers[key] = baseline_server(name)
        server = self._servers[key]
        if not server.alive():
            raise ServerFailed(f"{server.name} exited: {server.stderr_text()[-800:]}")
        return server

    def close(self) -> None:
        for server in self._servers.values():
            server.stop()

    def run(self, job: str) -> None:
        self.log(f"== {job}")
        started = time.perf_counter()
        try:
            result = getattr(self, f"job_{job}")()
        except Exception as exc:  # one failed job must not lose the others
            result = {"rows": [unavailable(job, "(job failed)", f"{type(exc).__name__}: {exc}")]}
            self.log(f"   {job} failed: {type(exc).__name__}: {exc}")
        result["seconds"] = round(time.perf_counter() - started, 1)
        self.results[job] = result

    def _connect(self, key: str, **kwargs: Any) -> mzconnector.Connection:
        server = self.server(key)
        return mzconnector.connect(server.host, server.port, timeout=30, **kwargs)

    # -- 1. round trip ------------------------------------------------------------------------
    def job_roundtrip(self) -> dict[str, Any]:
        n, runs = self.p["roundtrip_n"], self.p["runs"]
        conn = self._connect("mz-echo")
        raw = RawClient(HOST, self.server("base-echo").port)
        # A plain socket speaking the protocol to the connector server: the server's share.
        bare = RawClient(HOST, self.server("mz-echo").port)
        bare.mz_handshake()
        rec = conn.udrs.Rec(i=1, s="abcdefgh", f=1.5)
        raw_frame = bytes(mzconnector.encode_record_frames([rec], 1 << 30)[0])
        zmq_why = zmq_available()
        zmq = zmq_server = None
        if not zmq_why:
            zmq_server = ServerProcess([sys.executable, str(BENCH / "zmq_peer.py")], name="zmq")
            zmq = ZmqPeer(zmq_server.host, zmq_server.port)
        zrec = ZmqRec(i=1, s="abcdefgh", f=1.5)

        def timed(call: Callable[[], Any]) -> list[float]:
            samples = []
            for _ in range(n):
                t = time.perf_counter()
                call()
                samples.append(time.perf_counter() - t)
            return samples

        def mz_call() -> None:
            conn.submit(rec)
            conn.receive(timeout=10)

        mz_runs: list[list[float]] = []
        base_runs: list[list[float]] = []
        bare_runs: list[list[float]] = []
        zmq_runs: list[list[float]] = []
        meter, bmeter = Meter(), Meter()
        try:
            for run in range(runs + 1):  # run 0 warms up
                with meter.measure(self.server("mz-echo"), n, on=bool(run)):
                    samples = timed(mz_call)
                with bmeter.measure(self.server("base-echo"), n, on=bool(run)):
                    base = timed(lambda: raw.round_trip(raw_frame))
                bare_samples = timed(lambda: bare.round_trip(raw_frame))
                zmq_samples = timed(lambda: zmq.round_trip(zrec)) if zmq is not None else []
                if run:
                    mz_runs.append(samples)
                    base_runs.append(base)
                    bare_runs.append(bare_samples)
                    zmq_runs.append(zmq_samples)
        finally:
            conn.close()
            raw.close()
            bare.close()
            if zmq is not None:
                zmq.close()
            if zmq_server is not None:
                zmq_server.stop()
        med = [statistics.median(s) * 1e6 for s in mz_runs]
        bmed = [statistics.median(s) * 1e6 for s in base_runs]
        p99 = [percentile(s, 0.99) * 1e6 for s in mz_runs]
        bp99 = [percentile(s, 0.99) * 1e6 for s in base_runs]
        bare_med = [statistics.median(s) * 1e6 for s in bare_runs]
        ratio = statistics.median(med) / statistics.median(bmed)
        gap = statistics.median(med) - statistics.median(bmed)
        server_part = statistics.median(bare_med) - statistics.median(bmed)
        rows = [
            row(
                "1 round trip",
                "median",
                "us",
                med,
                bmed,
                better="lower",
                target="<= 1.3x baseline, and below pyzmq's ratio",
                met=ratio <= 1.3,
                note=cpu_note(meter, bmeter, "round trip", 1e6, "µs"),
            ),
            row("1 round trip", "p99", "us", p99, bp99, better="lower"),
            row(
                "1 round trip",
                "median, plain socket -> connector server",
                "us",
                bare_med,
                bmed,
                better="lower",
                note=f"of the {gap:.0f} µs the connector adds, the server accounts for "
                f"{server_part:.0f} µs, the client library for "
                f"{gap - server_part:.0f} µs",
            ),
        ]
        if zmq is None:
            rows.append(unavailable("1 round trip", "pyzmq REQ/REP", zmq_why))
        else:
            zmed = [statistics.median(s) * 1e6 for s in zmq_runs]
            zratio = statistics.median(zmed) / statistics.median(bmed)
            rows.append(
                row(
                    "1 round trip",
                    "median, pyzmq REQ/REP (msgpack record) against the same baseline",
                    "us",
                    zmed,
                    bmed,
                    better="lower",
                    target=f"connector below pyzmq: {ratio:.2f}x vs {zratio:.2f}x",
                    met=ratio < zratio,
                )
            )
        return {
            "rows": rows,
            "samples_per_run": n,
            "cpu": {"connector": meter.as_dict(), "baseline": bmeter.as_dict()},
        }

    # -- 2. push ------------------------------------------------------------------------------
    def _query(self, conn: mzconnector.Connection) -> tuple[int, float]:
        """(records, payload bytes) the count processor has counted so far."""
        conn.submit(conn.udrs.Rec(i=-1, s="", f=0.0))
        answer = conn.receive(timeout=60)
        return answer.i, answer.f

    def job_push(self) -> dict[str, Any]:
        n, runs = self.p["push_n"], self.p["runs"]
        conn = self._connect("mz-count")
        raw = RawClient(HOST, self.server("base-sink").port)
        records, frames, singles = _workload(conn, n)
        wire = sum(map(len, frames))
        flushed, processed, base, base1 = [], [], [], []
        meter, bmeter = Meter(), Meter()
        try:
            for run in range(runs + 1):
                count = n if run else n // 5
                before = self._query(conn)[0]
                with meter.measure(self.server("mz-count"), count, on=bool(run)):
                    t = time.perf_counter()
                    conn.submit_many(records[:count])
                    conn.flush()
                    t_flush = time.perf_counter()
                    after = self._query(conn)[0]
                    t_done = time.perf_counter()
                if after - before != count:
                    raise RuntimeError(f"the processor counted {after - before} of {count} records")
                sent = frames if run else frames[: len(frames) // 5]
                with bmeter.measure(self.server("base-sink"), n, on=bool(run)):
                    t0 = time.perf_counter()
                    for f in sent:
                        raw.send(f)
                    got = raw.query()[0]
                    t1 = time.perf_counter()
                if got != len(sent):
                    raise RuntimeError(f"the baseline counted {got} of {len(sent)} frames")
                t2 = time.perf_counter()
                sent = singles if run else singles[: len(singles) // 5]
                for chunk in sent:
                    raw.send(chunk)
                got = raw.query()[0]
                t3 = time.perf_counter()
                if got != (n if run else len(sent) * BATCH):
                    raise RuntimeError(f"the baseline counted {got} single-record frames")
                if run:
                    flushed.append(n / (t_flush - t))
                    processed.append(n / (t_done - t))
                    base.append(n / (t1 - t0))
                    base1.append(n / (t3 - t2))
        finally:
            conn.close()
            raw.close()
        self.single_push = processed
        ok = statistics.median(processed) >= 1_000_000
        return {
            "rows": [
                row(
                    "2 push",
                    "records/s, counted by the processor",
                    "rec/s",
                    processed,
                    base,
                    target=">= 1,000,000/s",
                    met=ok,
                    note=cpu_note(meter, bmeter, "record", 1e9, "ns"),
                ),
                row(
                    "2 push",
                    "records/s, counted by the processor",
                    "rec/s",
                    processed,
                    base1,
                    baseline_name="trio, 1 record/frame",
                ),
                row("2 push", "records/s, until flush() returns", "rec/s", flushed, base),
            ],
            "records_per_run": n,
            "wire_bytes_per_record": wire / n,
            "cpu": {"connector": meter.as_dict(), "baseline": bmeter.as_dict()},
        }

    # -- 3. pipelined echo ------------------------------------------------------------------------
    def job_pipelined(self) -> dict[str, Any]:
        n, runs, job = self.p["pipelined_n"], self.p["runs"], "3 pipelined echo"
        conn = self._connect("mz-echo")
        raw = RawClient(HOST, self.server("base-echo").port)
        records, frames, singles = _workload(conn, n)
        mz, base, base1 = [], [], []
        meter, bmeter = Meter(), Meter()
        try:
            for run in range(runs + 1):
                count = n if run else n // 5
                with meter.measure(self.server("mz-echo"), count, on=bool(run)):
                    rate = self._pipelined_once(conn, records[:count])
                if run:
                    mz.append(rate)
                for chunks, results, single in ((frames, base, False), (singles, base1, True)):
                    sent = chunks if run else chunks[: len(chunks) // 5]
                    # frames to expect back: one per record, or one per chunk of records
                    expected = (n if run else len(sent) * BATCH) if single else len(sent)
                    with bmeter.measure(self.server("base-echo"), n, on=bool(run and not single)):
                        t = time.perf_counter()
                        counter = threading.Thread(target=raw.count_frames, args=(expected,))
                        counter.start()
                        for f in sent:
                            raw.send(f)
                        counter.join()
                    if run:
                        results.append(n / (time.perf_counter() - t))
        finally:
            conn.close()
            raw.close()
        ok = statistics.median(mz) >= 500_000
        rows = [
            row(
                job,
                "records/s through echo and back",
                "rec/s",
                mz,
                base,
                target=">= 500,000/s",
                met=ok,
                note=cpu_note(meter, bmeter, "record", 1e9, "ns"),
            )
        ]
        if base1:
            rows.append(
                row(
                    job,
                    "records/s through echo and back",
                    "rec/s",
                    mz,
                    base1,
                    baseline_name="trio, 1 record/frame",
                )
            )
        return {
            "rows": rows,
            "records_per_run": n,
            "cpu": {"connector": meter.as_dict(), "baseline": bmeter.as_dict()},
            "connector_runs": mz,
        }

    # -- 4. API call ------------------------------------------------------------------------------
    def job_api(self) -> dict[str, Any]:
        n, runs = self.p["api_n"], self.p["runs"]
        conn = self._connect("mz-echo")
        raw = RawClient(HOST, self.server("base-echo").port)
        rec = conn.udrs.Rec(i=1, s="abcdefgh", f=1.5)
        raw_frame = bytes(mzconnector.encode_record_frames([rec], 1 << 30)[0])
        call = conn.api.call
        mz, base = [], []
        try:
            for run in range(runs + 1):
                samples = []
                for _ in range(n):
                    t = time.perf_counter()
                    call(rec)
                    samples.append(time.perf_counter() - t)
                bsamples = []
                for _ in range(n):
                    t = time.perf_counter()
                    raw.round_trip(raw_frame)
                    bsamples.append(time.perf_counter() - t)
                if run:
                    mz.append(statistics.median(samples) * 1e6)
                    base.append(statistics.median(bsamples) * 1e6)
        finally:
            conn.close()
            raw.close()
        self.api_call = mz
        return {
            "rows": [
                row(
                    "4 API call",
                    "median (api.call: submit + receive)",
                    "us",
                    mz,
                    base,
                    better="lower",
                    note="baseline: one small frame echoed",
                )
            ]
        }

    # -- 5. many clients ---------------------------------------------------------------------------
    def job_manyclients(self) -> dict[str, Any]:
        clients, procs = self.p["clients"], self.p["client_procs"]
        batch, rounds = self.p["clients_batch"], self.p["clients_rounds"]
        raise_nofile(clients * 2 + 512)
        total = clients * batch * rounds
        rows = []
        out: dict[str, Any] = {"clients": clients, "processes": procs, "records_per_run": total}

        mz = self._many("mz", clients, procs, batch, rounds, single=True)
        base = self._many("raw", clients, procs, batch, rounds)
        out.update(connector=mz, baseline=base)
        agg = mz["rates"]
        one = statistics.median(mz["single_rates"])
        ratio = statistics.median(agg) / one
        rows.append(
            row(
                "5 many clients",
                f"aggregate records/s, {clients} clients",
                "rec/s",
                agg,
                base["rates"],
                target=">= 80% of one client",
                met=ratio >= 0.8,
                note=f"one client, same batches: {one:,.0f}/s "
                f"-> aggregate / one client = {ratio:.2f}; connect time "
                f"{mz['connect_s']:.1f} s",
            )
        )
        many_cpu, one_cpu = mz["cpu_ns"]["many"], mz["cpu_ns"]["one"]
        rows.append(
            row(
                "5 many clients",
                f"server CPU per record, {clients} clients (baseline: one client)",
                "ns",
                [many_cpu[0]],
                [one_cpu[0]],
                baseline_name="the connector, one client",
                better="lower",
                note=f"client processes' CPU per record: {many_cpu[1]:.0f} ns from "
                f"{procs} processes holding {clients} connections, {one_cpu[1]:.0f} ns from "
                "one; on this machine they share its cores with the server",
            )
        )
        rows.append(
            row(
                "5 many clients",
                f"server RSS, {clients} idle connections",
                "MB",
                [mz["idle_rss_kib"] / 1024],
                [base["idle_rss_kib"] / 1024],
                better="lower",
                target="< 100 MB",
                met=mz["idle_rss_kib"] / 1024 < 100,
                note=f"at start {mz['start_rss_kib'] / 1024:.1f} MB -> "
                f"{(mz['idle_rss_kib'] - mz['start_rss_kib']) / clients:.1f} KiB per "
                "connection",
            )
        )
        rows.append(
            row(
                "5 many clients",
                "server peak RSS (VmHWM) while pushing",
                "MB",
                [mz["peak_rss_kib"] / 1024],
                [base["peak_rss_kib"] / 1024],
                better="lower",
            )
        )
        out["rows"] = rows
        return out

    def _many(
        self, mode: str, clients: int, procs: int, batch: int, rounds: int, single: bool = False
    ) -> dict[str, Any]:
        """Start a fresh server and ``procs`` client processes holding ``clients`` connections
        between them; time ``runs`` pushes; read the server's memory. With ``single``, one
        more process holds one connection that pushes as many records in the same batches,
        on the same server, in turn with the many in each run (the one-client reference)."""
        runs = self.p["runs"]
        server = mz_server(WORKFLOWS / "count.toml") if mode == "mz" else baseline_server("sink")
        many: list[subprocess.Popen[str]] = []
        one: list[subprocess.Popen[str]] = []
        probe = None

        def spawn(count: int, rounds: int) -> subprocess.Popen[str]:
            argv = [sys.executable, str(BENCH / "manyclients.py"), mode, server.host]
            argv += [str(server.port), str(count), str(batch), str(rounds)]
            return subprocess.Popen(
                argv, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
            )

        cpu: dict[str, list[float]] = {"many": [0.0, 0.0, 0.0], "one": [0.0, 0.0, 0.0]}

        def push(children: list[subprocess.Popen[str]], expected: int) -> float:
            """Records/s of one push by ``children``; the CPU seconds the server and the
            client processes spent meanwhile are added to ``cpu`` (with the records)."""
            before = self._query(probe)[0] if probe else 0
            server_cpu = cpu_seconds(server.pid)
            clients_cpu = sum(cpu_seconds(child.pid) for child in children)
            t = time.perf_counter()
            for child in children:
                child.stdin.write("push\n")  # type: ignore[union-attr]
                child.stdin.flush()  # type: ignore[union-attr]
            pushed = 0
            for child in children:
                line = _child_line(child, 300)
                if not line.startswith("done"):
                    raise RuntimeError(f"a client process failed while pushing: {line!r}")
                pushed += int(line.split()[1])
            counted = (self._query(probe)[0] - before) if probe else pushed
            elapsed = time.perf_counter() - t
            if counted != expected:
                raise RuntimeError(f"{counted} of {expected} records counted")
            spent = cpu["many" if children is many else "one"]
            spent[0] += cpu_seconds(server.pid) - server_cpu
            spent[1] += sum(cpu_seconds(child.pid) for child in children) - clients_cpu
            spent[2] += expected
            return expected / elapsed

        try:
            time.sleep(0.3)
            start_rss = server.memory()["VmRSS"]
            if mode == "mz":
                probe = mzconnector.connect(server.host, server.port, timeout=30)
            t = time.perf_counter()
            share = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
            many = [spawn(count, rounds) for count in share]
            for child in many:
                line = _child_line(child, 300)
                if not line.startswith("ready"):
                    raise RuntimeError(f"a client process failed to connect: {line!r}")
            connect_s = time.perf_counter() - t
            time.sleep(1.0)
            idle_rss = server.memory()["VmRSS"]
            if single:
                one = [spawn(1, rounds * clients)]
                if not _child_line(one[0], 60).startswith("ready"):
                    raise RuntimeError("the one-client process failed to connect")
            expected = clients * batch * rounds
            rates, single_rates = [], []
            for _ in range(runs):
                rates.append(push(many, expected))
                if one:
                    single_rates.append(push(one, expected))
            return {
                "rates": rates,
                "single_rates": single_rates,
                "connect_s": connect_s,
                "start_rss_kib": start_rss,
                "idle_rss_kib": idle_rss,
                "peak_rss_kib": server.memory()["VmHWM"],
                # CPU ns per record: (server, client processes), pushing from many and from one
                "cpu_ns": {k: _per_record(*spent) for k, spent in cpu.items()},
            }
        finally:
            for child in many + one:
                with contextlib.suppress(OSError):
                    child.stdin.write("quit\n")  # type: ignore[union-attr]
                    child.stdin.close()  # type: ignore[union-attr]
            for child in many + one:
                try:
                    child.wait(60)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
            if probe is not None:
                probe.close()
            server.stop()

    # -- 6. TLS ------------------------------------------------------------------------------------
    def job_tls(self) -> dict[str, Any]:
        try:
            import trustme  # noqa: F401 - makes the certificates
        except ImportError:
            why = "not available: trustme is not installed (pip install trustme)"
            return {"available": False, "rows": [unavailable("6 TLS", "push, pipelined", why)]}
        with scratch_dir() as directory:
            certs = Certificates(directory)
            try:
                count_srv = mz_server(
                    tls_workflow(WORKFLOWS / "count.toml", certs, directory),
                    name="mzserver count (TLS)",
                )
            except ServerFailed as exc:
                why = f"not available: the server refused the TLS config ({exc})"
                return {"available": False, "rows": [unavailable("6 TLS", "push, pipelined", why)]}
            echo_srv = None
            try:
                try:
                    probe = mzconnector.connect(
                        count_srv.host, count_srv.port, timeout=10, tls=True, cafile=certs.cafile
                    )
                    probe.close()
                except mzconnector.MZConnectorError as exc:
                    why = f"not available: a TLS connection failed ({type(exc).__name__}: {exc})"
                    rows = [unavailable("6 TLS", "push, pipelined", why)]
                    return {"available": False, "rows": rows}
                echo_srv = mz_server(
                    tls_workflow(WORKFLOWS / "echo.toml", certs, directory),
                    name="mzserver echo (TLS)",
                )
                self._servers["tls-count"] = count_srv
                self._servers["tls-echo"] = echo_srv
                tls = {"tls": True, "cafile": certs.cafile}
                push_tls, push_plain = self._in_turn(
                    self._push_once, "tls-count", "mz-count", self.p["tls_push_n"], tls
                )
                pipe_tls, pipe_plain = self._in_turn(
                    self._pipelined_once, "tls-echo", "mz-echo", self.p["tls_pipelined_n"], tls
                )
                base_rows = self._baseline_tls(certs)
            finally:
                self._servers.pop("tls-count", None)
                self._servers.pop("tls-echo", None)
                count_srv.stop()
                if echo_srv is not None:
                    echo_srv.stop()
        return {
            "available": True,
            "rows": [
                row(
                    "6 TLS",
                    "push records/s, TLS vs plaintext",
                    "rec/s",
                    push_tls,
                    push_plain,
                    baseline_name="connector, plaintext",
                ),
                row(
                    "6 TLS",
                    "pipelined records/s, TLS vs plaintext",
                    "rec/s",
                    pipe_tls,
                    pipe_plain,
                    baseline_name="connector, plaintext",
                ),
                *base_rows,
            ],
        }

    def _in_turn(
        self,
        once: Callable[[mzconnector.Connection, list[Any]], float],
        tls_key: str,
        plain_key: str,
        n: int,
        tls: dict[str, Any],
    ) -> tuple[list[float], list[float]]:
        """``once`` over a TLS and a plaintext connection, in turn in every run: rates."""
        conns = [self._connect(tls_key, **tls), self._connect(plain_key)]
        try:
            records = [[c.udrs.Rec(i=i, s="abcdefgh", f=i * 0.5) for i in range(n)] for c in conns]
            rates: list[list[float]] = [[], []]
            for run in range(self.p["runs"] + 1):
                for side, conn in enumerate(conns):
                    rate = once(conn, records[side] if run else records[side][: n // 5])
                    if run:
                        rates[side].append(rate)
            return rates[0], rates[1]
        finally:
            for conn in conns:
                conn.close()

    def _push_once(self, conn: mzconnector.Connection, records: list[Any]) -> float:
        """Records/s of one push, until the count processor has counted them all."""
        before = self._query(conn)[0]
        t = time.perf_counter()
        conn.submit_many(records)
        conn.flush()
        after = self._query(conn)[0]
        elapsed = time.perf_counter() - t
        if after - before != len(records):
            raise RuntimeError(f"the processor counted {after - before} of {len(records)}")
        return len(records) / elapsed

    def _pipelined_once(self, conn: mzconnector.Connection, records: list[Any]) -> float:
        """Records/s of one pipelined echo: submit all while a thread receives them."""
        got = [0]

        def reader() -> None:
            while got[0] < len(records):
                batch = conn.receive_many(timeout=30)
                if not batch:
                    return
                got[0] += len(batch)

        t = time.perf_counter()
        thread = threading.Thread(target=reader)
        thread.start()
        conn.submit_many(records)
        conn.flush()
        thread.join()
        elapsed = time.perf_counter() - t
        if got[0] != len(records):
            raise RuntimeError(f"received {got[0]} of {len(records)} records")
        return len(records) / elapsed

    def _baseline_tls(self, certs: Certificates) -> list[dict[str, Any]]:
        """Push through the baseline frame server over TLS and plaintext: what TLS costs a
        trio server at all (trio.SSLStream), as a yardstick for the connector's TLS ratio."""
        n = self.p["tls_push_n"]
        codec = mzconnector.RecordCodec({"Rec": {"i": "int", "s": "str", "f": "float"}})
        records = [codec.types["Rec"](i=i, s="abcdefgh", f=i * 0.5) for i in range(n)]
        frames = [
            bytes(f)
            for i in range(0, n, BATCH)
            for f in mzconnector.encode_record_frames(records[i : i + BATCH], 1 << 30)
        ]
        context = ssl.create_default_context(cafile=certs.cafile)
        with baseline_server("sink", (certs.certfile, certs.keyfile)) as server:
            tls_client = RawClient(HOST, server.port, context)
            plain_client = RawClient(HOST, self.server("base-sink").port)
            rates: dict[str, list[float]] = {"tls": [], "plain": []}
            try:
                for run in range(self.p["runs"] + 1):
                    for name, client in (("tls", tls_client), ("plain", plain_client)):
                        t = time.perf_counter()
                        for f in frames:
                            client.send(f)
                        if client.query()[0] != len(frames):
                            raise RuntimeError("the baseline lost frames")
                        if run:
                            rates[name].append(n / (time.perf_counter() - t))
            finally:
                tls_client.close()
                plain_client.close()
        return [
            row(
                "6 TLS",
                "baseline push records/s, TLS vs plaintext",
                "rec/s",
                rates["tls"],
                rates["plain"],
                baseline_name="baseline, plaintext",
                note="the trio frame server alone: what TLS costs without the connector",
            )
        ]

    # -- 7. bulk bytes --------------------------------------------------------------------------
    def job_bulk(self) -> dict[str, Any]:
        count, runs = self.p["bulk_mib"], self.p["runs"]
        conn = self._connect("mz-count")
        raw = RawClient(HOST, self.server("base-sink").port)
        payload = os.urandom(MIB)
        raw_frame = frame(payload)
        mz, base = [], []
        meter, bmeter = Meter(), Meter()
        try:
            for run in range(runs + 1):
                k = count if run else max(8, count // 8)
                before = self._query(conn)[1]
                with meter.measure(self.server("mz-count"), k * MIB, on=bool(run)):
                    t = time.perf_counter()
                    for _ in range(k):
                        conn.submit(payload)
                    conn.flush()
                    after = self._query(conn)[1]
                    elapsed = time.perf_counter() - t
                if after - before != k * MIB:
                    raise RuntimeError(f"the processor counted {after - before} of {k * MIB} bytes")
                with bmeter.measure(self.server("base-sink"), k * MIB, on=bool(run)):
                    t = time.perf_counter()
                    for _ in range(k):
                        raw.send(raw_frame)
                    if raw.query() != (k, k * MIB):
                        raise RuntimeError("the baseline lost bytes")
                    belapsed = time.perf_counter() - t
                if run:
                    base.append(k * MIB / 1e6 / belapsed)
                    mz.append(k * MIB / 1e6 / elapsed)
        finally:
            conn.close()
            raw.close()
        return {
            "rows": [
                row(
                    "7 bulk bytes",
                    "MB/s of 1 MiB payloads, counted",
                    "MB/s",
                    mz,
                    base,
                    target=">= 500 MB/s",
                    met=statistics.median(mz) >= 500,
                    note=cpu_note(meter, bmeter, "MiB", MIB * 1e3, "ms"),
                )
            ],
            "payloads_per_run": count,
            "cpu": {"connector": meter.as_dict(), "baseline": bmeter.as_dict()},
        }

    # -- 8. DataFrames ---------------------------------------------------------------------------
    def job_frames(self) -> dict[str, Any]:
        n, runs, job = self.p["frames_n"], self.p["runs"], "8 DataFrames"
        frames = _frames(n)
        why = flight_available()
        flight_server = flight = None
        if not why:
            flight_server = ServerProcess(
                [sys.executable, str(BENCH / "flight_server.py")], name="flight"
            )
            flight = FlightPeer(flight_server.host, flight_server.port)
        keys = ("framecount", "count", "frameecho")
        conns = {key: self._connect(f"mz-{key}") for key in keys}
        rates: dict[str, list[float]] = {}
        meter = Meter()

        def add(name: str, value: float) -> None:
            rates.setdefault(name, []).append(value)

        try:
            for run in range(runs + 1):  # run 0 warms up, on a fifth of the rows
                for kind, whole in frames.items():
                    df = whole if run else whole.iloc[: n // 5]
                    rows = len(df)
                    results = {}
                    if flight is not None:
                        before = flight.count()
                        t = time.perf_counter()
                        flight.put(df)
                        got = flight.count() - before
                        results["flight"] = rows / (time.perf_counter() - t)
                        if got != rows:
                            raise RuntimeError(f"Flight counted {got} of {rows} rows")
                    with meter.measure(self.server("mz-framecount"), rows, on=bool(run)):
                        results["frame"] = self._frame_push(conns["framecount"], df)
                    results["ordinary"] = self._frame_push(conns["count"], df)
                    results["today"] = self._today_push(conns["count"], df)
                    results["echo"] = self._frame_echo(conns["frameecho"], df)
                    if run:
                        for name, value in results.items():
                            add(f"{name} {kind}", value)
        finally:
            for conn in conns.values():
                conn.close()
            if flight is not None:
                flight.close()
            if flight_server is not None:
                flight_server.stop()
        self.frame_server_ns = meter.server / max(1, meter.ops) * 1e9
        out_rows = []
        for kind, label in (("object", "str as Python objects"), ("str", "pandas' str dtype")):
            frame, ordinary = rates[f"frame {kind}"], rates[f"ordinary {kind}"]
            if flight is not None:
                ratio = statistics.median(frame) / statistics.median(rates[f"flight {kind}"])
                out_rows.append(
                    row(
                        job,
                        f"push rows/s to a batch processor, {label}",
                        "rec/s",
                        frame,
                        rates[f"flight {kind}"],
                        baseline_name="Arrow Flight do_put",
                        target=">= 0.5x Flight",
                        met=ratio >= 0.5,
                        note="submit_frame + flush + until the count processor (batch = "
                        '"frame") has counted every row; Flight: Table.from_pandas + do_put '
                        "to a server process that counts the rows",
                    )
                )
            else:
                out_rows.append(unavailable(job, f"push vs Flight, {label}", why))
            ratio = statistics.median(ordinary) / statistics.median(rates[f"today {kind}"])
            out_rows.append(
                row(
                    job,
                    f"push rows/s to an ordinary processor, {label}",
                    "rec/s",
                    ordinary,
                    rates[f"today {kind}"],
                    baseline_name="from_dataframe (6f33ee1) + submit_many",
                    target=">= 5x",
                    met=ratio >= 5,
                    note="submit_frame + flush + counted; the reference makes records with "
                    "from_dataframe as it was before column batches, then submit_many + flush",
                )
            )
            echo = rates[f"echo {kind}"]
            ratio = statistics.median(echo) / statistics.median(frame)
            out_rows.append(
                row(
                    job,
                    f"receive_frame rows/s, frame echo, {label}",
                    "rec/s",
                    echo,
                    frame,
                    baseline_name="the push above",
                    target=">= 0.5x the push",
                    met=ratio >= 0.5,
                    note="submit_frame in a thread while receive_frame takes the rows a "
                    "batch processor sends back with ctx.route_frame, until all are back",
                )
            )
        return {
            "rows": out_rows,
            "rows_per_run": n,
            "frame_push_server_ns_per_row": self.frame_server_ns,
            "cpu": {"frame push": meter.as_dict()},
        }

    def _frame_push(self, conn: mzconnector.Connection, df: Any) -> float:
        """Rows/s of ``submit_frame`` + ``flush`` until the count processor counted them."""
        return self._counted_rate(conn, len(df), lambda: conn.submit_frame(df, "Rec"))

    def _today_push(self, conn: mzconnector.Connection, df: Any) -> float:
        """The same, the way it was done before column batches."""
        return self._counted_rate(
            conn, len(df), lambda: conn.submit_many(from_dataframe_6f33ee1(df, conn.udrs.Rec))
        )

    def _counted_rate(
        self, conn: mzconnector.Connection, rows: int, push: Callable[[], Any]
    ) -> float:
        """Rows/s of ``push()`` + ``flush`` until the count processor has counted ``rows``."""
        before = self._query(conn)[0]
        t = time.perf_counter()
        push()
        conn.flush()
        after = self._query(conn)[0]
        elapsed = time.perf_counter() - t
        if after - before != rows:
            raise RuntimeError(f"the processor counted {after - before} of {rows} rows")
        return rows / elapsed

    def _frame_echo(self, conn: mzconnector.Connection, df: Any) -> float:
        """Rows/s of a DataFrame pushed (in a thread) to a processor that sends it back, and
        taken with ``receive_frame`` until every row is back."""
        rows = len(df)
        failed: list[BaseException] = []

        def push() -> None:
            try:
                conn.submit_frame(df, "Rec")
                conn.flush()
            except BaseException as exc:
                failed.append(exc)

        sender = threading.Thread(target=push)
        got = last = 0
        t = time.perf_counter()
        sender.start()
        while got < rows:
            part = conn.receive_frame(timeout=60)
            if part.empty:
                break
            got += len(part)
            last = int(part["i"].iat[-1])
        elapsed = time.perf_counter() - t
        sender.join()
        if failed:
            raise failed[0]
        if got != rows or last != int(df["i"].iat[-1]):
            raise RuntimeError(f"the echo sent back {got} of {rows} rows")
        return rows / elapsed

    # -- 9. batch processors ---------------------------------------------------------------------
    def job_batch(self) -> dict[str, Any]:
        n, runs, job = self.p["push_n"] // 2, self.p["runs"], "9 batch processors"
        conns = {key: self._connect(f"mz-{key}") for key in ("count", "batchcount")}
        # Each connection's own record class (udrs are per connection).
        records = {
            key: [conn.udrs.Rec(i=i, s="abcdefgh", f=i * 0.5) for i in range(n)]
            for key, conn in conns.items()
        }
        meters = {key: Meter() for key in conns}
        rates: dict[str, list[float]] = {key: [] for key in conns}
        try:
            for run in range(runs + 1):
                count = n if run else n // 5
                for key, conn in conns.items():
                    before = self._query(conn)[0]
                    with meters[key].measure(self.server(f"mz-{key}"), count, on=bool(run)):
                        t = time.perf_counter()
                        conn.submit_many(records[key][:count])
                        conn.flush()
                        after = self._query(conn)[0]
                        elapsed = time.perf_counter() - t
                    if after - before != count:
                        raise RuntimeError(f"{key} counted {after - before} of {count}")
                    if run:
                        rates[key].append(count / elapsed)
        finally:
            for conn in conns.values():
                conn.close()

        def ns(key: str) -> float:
            meter = meters[key]
            return meter.server / max(1, meter.ops) * 1e9

        ordinary, batch = ns("count"), ns("batchcount")
        frame = getattr(self, "frame_server_ns", None)
        out = [
            row(
                job,
                "server CPU per record, count as a batch processor (list)",
                "ns",
                [batch],
                [ordinary],
                better="lower",
                baseline_name="count, an ordinary processor",
                target="<= 0.25x",
                met=batch / ordinary <= 0.25,
                note="the push of job 2 (records, submit_many + flush) to count.toml and to "
                "batchcount.toml (batch = true), in turn in each run; server CPU from "
                "/proc while timed",
            ),
            row(
                job,
                "push records/s, count as a batch processor",
                "rec/s",
                rates["batchcount"],
                rates["count"],
                baseline_name="count, an ordinary processor",
            ),
        ]
        if frame is not None:
            out.append(
                row(
                    job,
                    "server CPU per row, count given DataFrames (frame push of job 8)",
                    "ns",
                    [frame],
                    [ordinary],
                    better="lower",
                    baseline_name="count, an ordinary processor",
                    target="<= 0.25x",
                    met=frame / ordinary <= 0.25,
                    note='submit_frame to framecount.toml (batch = "frame"), both string '
                    "kinds, against records to the ordinary count above",
                )
            )
        else:
            out.append(unavailable(job, "server CPU per row, frames", "run job frames first"))
        return {
            "rows": out,
            "records_per_run": n,
            "cpu": {k: m.as_dict() for k, m in meters.items()},
        }

    # -- RPC comparison --------------------------------------------------------------------------
    def job_rpc(self) -> dict[str, Any]:
        rows = []
        push_ref = getattr(self, "single_push", None)
        call_ref = getattr(self, "api_call", None)
        for kind in ("rpyc", "pyro5"):
            why = available(kind)
            if why:
                rows.append(unavailable(f"RPC {kind}", "push, call", why))
                continue
            with ServerProcess(
                [sys.executable, str(BENCH / "rpc_services.py"), kind], name=f"{kind} service"
            ) as server:
                client = RpcClient(kind, server.host, server.port)
                try:
                    per_call, batched, calls = self._rpc_runs(client)
                finally:
                    client.close()
            label = {"rpyc": "RPyC", "pyro5": "Pyro5"}[kind]
            rows += [
                row(
                    f"RPC {label}",
                    "push records/s, one call per record",
                    "rec/s",
                    push_ref,
                    per_call,
                    baseline_name=f"{label}: push(rec) per record",
                ),
                row(
                    f"RPC {label}",
                    f"push records/s, calls of {BATCH} records",
                    "rec/s",
                    push_ref,
                    batched,
                    baseline_name=f"{label}: push_many(tuple of {BATCH})",
                ),
                row(
                    f"RPC {label}",
                    "call round trip, median",
                    "us",
                    call_ref,
                    calls,
                    better="lower",
                    baseline_name=f"{label}: echo(rec)",
                    note="connector: api.call (job 4)",
                ),
            ]
        note = "" if push_ref and call_ref else "run jobs push and api for the connector column"
        return {"rows": rows, "note": note}

    def _rpc_runs(self, client: RpcClient) -> tuple[list[float], list[float], list[float]]:
        n_push, n_batch, n_call = self.p["rpc_push_n"], self.p["rpc_batch_n"], self.p["rpc_call_n"]
        rec = (1, "abcdefgh", 1.5)
        batch = tuple((i, "abcdefgh", i * 0.5) for i in range(BATCH))
        per_call, batched, calls = [], [], []
        for run in range(self.p["runs"] + 1):
            before = client.count()
            t = time.perf_counter()
            for _ in range(n_push):
                client.push(rec)
            done = client.count()
            elapsed = time.perf_counter() - t
            if done - before != n_push:
                raise RuntimeError(f"{client.kind} counted {done - before} of {n_push}")
            k = max(1, n_batch // BATCH)
            t = time.perf_counter()
            for _ in range(k):
                client.push_many(batch)
            client.count()
            belapsed = time.perf_counter() - t
            samples = []
            for _ in range(n_call):
                t = time.perf_counter()
                client.echo(rec)
                samples.append(time.perf_counter() - t)
            if run:
                per_call.append(n_push / elapsed)
                batched.append(k * BATCH / belapsed)
                calls.append(statistics.median(samples) * 1e6)
        return per_call, batched, calls


def _workload(conn: Any, n: int) -> tuple[list[Any], list[bytes], list[bytes]]:
    """``n`` 3-field records, and what the baseline sends for them: the very bytes the
    connector sends (batches of ``BATCH``), and one record per frame; encoded before the
    clock starts."""
    records = [conn.udrs.Rec(i=i, s="abcdefgh", f=i * 0.5) for i in range(n)]
    frames = [
        bytes(f)
        for i in range(0, n, BATCH)
        for f in mzconnector.encode_record_frames(records[i : i + BATCH], 1 << 30)
    ]
    return records, frames, _single_frames(records)


def _frames(n: int) -> dict[str, Any]:
    """The DataFrame of job 8, ``n`` rows of (int, str, float) as ``Rec`` has them, with its
    strings as Python objects and as pandas' default string dtype (Arrow-backed in pandas 3)."""
    import numpy as np
    import pandas as pd

    ints = np.arange(n, dtype=np.int64)
    strings = [f"{i:08d}" for i in range(n)]  # 8 characters, as job 2's "abcdefgh"
    # pandas 3's default string dtype is Arrow-backed; pandas 2 has it as StringDtype("pyarrow").
    arrow = "str" if int(pd.__version__.split(".")[0]) >= 3 else pd.StringDtype("pyarrow")
    return {
        "object": pd.DataFrame({"i": ints, "s": pd.Series(strings, dtype=object), "f": ints * 0.5}),
        "str": pd.DataFrame({"i": ints, "s": pd.Series(strings, dtype=arrow), "f": ints * 0.5}),
    }


def _single_frames(records: list[Any]) -> list[bytes]:
    """The records as the baseline's one-record frames (a ``Records`` message of one record
    each), joined in chunks of ``BATCH`` frames so that both baselines make as many sends."""
    return [
        b"".join(
            bytes(mzconnector.encode_record_frames([r], 1 << 30)[0]) for r in records[i : i + BATCH]
        )
        for i in range(0, len(records), BATCH)
    ]


def _child_line(child: subprocess.Popen[str], timeout: float) -> str:
    """The next stdout line of a client process, or "" after ``timeout`` seconds."""
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(child.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(timeout)
    return result[0].strip() if result else ""


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "rec/s":
        return f"{value / 1e6:.2f} M/s" if value >= 1e6 else f"{value / 1e3:.1f} k/s"
    if unit == "us":
        return f"{value:,.0f} µs" if value >= 1000 else f"{value:.1f} µs"
    if unit == "MB/s":
        return f"{value:,.0f} MB/s"
    if unit == "MB":
        return f"{value:.1f} MB"
    if unit == "ns":
        return f"{value:,.0f} ns"
    return f"{value:.3g}"


def table(results: dict[str, dict[str, Any]]) -> str:
    header = ("job", "metric", "connector", "baseline", "ratio", "vs", "target", "")
    lines = []
    for result in results.values():
        for r in result["rows"]:
            if r.get("available") is False:
                lines.append(
                    (r["job"], r["metric"], "not available", "", "", "", "", "(see notes)")
                )
                continue
            c, b = r["connector"], r["baseline"]
            status = "" if r["met"] is None else ("met" if r["met"] else "MISSED")
            ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-"
            lines.append(
                (
                    r["job"],
                    r["metric"],
                    fmt(c and c["median"], r["unit"]),
                    fmt(b and b["median"], r["unit"]),
                    ratio,
                    r["baseline_name"],
                    r["target"],
                    status,
                )
            )
    widths = [max(len(str(x[i])) for x in [header, *lines]) for i in range(len(header))]
    out = ["  ".join(str(x).ljust(w) for x, w in zip(header, widths)).rstrip()]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in lines]
    notes = [
        f"  {r['job']} / {r['metric']}: {r['note']}"
        for res in results.values()
        for r in res["rows"]
        if r.get("note")
    ]
    if notes:
        out += ["", "notes:", *notes]
    return "\n".join(out)


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10
            ).stdout.rstrip("\n")
        except (OSError, subprocess.SubprocessError):
            return ""

    return {
        "git_commit": git("rev-parse", "--short", "HEAD"),
        "git_modified_files": [
            line[3:]
            for line in git("status", "--porcelain").splitlines()
            if not line.startswith("??")
        ],
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "trio": trio.__version__,
        "msgspec": msgspec.__version__,
        "mzconnector": mzconnector.__version__,
        "load_average_at_start": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark the connector against a baseline.")
    parser.add_argument("--quick", action="store_true", help="smaller runs (about 2 minutes)")
    parser.add_argument(
        "--json",
        default=str(BENCH / "results" / "latest.json"),
        help="where to write the results (default: benchmarks/results/latest.json)",
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        help=f"run only these jobs (repeat or comma-separate): {', '.join(JOBS)}",
    )
    parser.add_argument("--runs", type=int, help="runs per job (default 5, quick 3)")
    args = parser.parse_args(argv)
    only = [j.strip() for spec in args.only for j in spec.split(",") if j.strip()]
    unknown = [j for j in only if j not in JOBS]
    if unknown:
        parser.error(f"unknown job(s) {unknown}; jobs: {', '.join(JOBS)}")
    params = dict(PARAMS["quick" if args.quick else "full"])
    if args.runs:
        params["runs"] = args.runs
    jobs = [j for j in JOBS if not only or j in only]

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    started = time.perf_counter()
    date = datetime.datetime.now(datetime.timezone.utc)
    info = machine()
    log(
        f"mzconnector bench ({'quick' if args.quick else 'full'}): {', '.join(jobs)}; "
        f"{info['cpus']} CPUs, load {info['load_average_at_start'][0]:.2f}"
    )
    bench = Bench(params, log)
    try:
        for job in jobs:
            bench.run(job)
    finally:
        bench.close()
    elapsed = time.perf_counter() - started
    print(table(bench.results))
    print(
        f"\n{'quick' if args.quick else 'full'} run, {params['runs']} runs per job, medians; "
        f"ratio = connector / baseline; {elapsed:.0f} s; {date:%Y-%m-%d %H:%M} UTC"
    )
    report = {
        "date": date.isoformat(timespec="seconds"),
        "command": " ".join(
            ["python", "benchmarks/bench.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "mode": "quick" if args.quick else "full",
        "seconds": round(elapsed, 1),
        "machine": info,
        "params": params,
        "load_average_at_end": os.getloadavg(),
        "results": bench.results,
    }
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
