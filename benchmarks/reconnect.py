"""Staying connected, measured: how soon a client with ``auto_reconnect`` works again after its
server is restarted, and what keepalive costs a push. Each figure is a median of several runs;
these machines are shared and noisy, so compare against the reference measured in the same run.

    python benchmarks/reconnect.py [--quick] [--max-delay 0.5,2] [--runs N]

- ``restart``: the server (``workflows/count.toml``) is killed with SIGKILL, the client sees
  its link break and starts reconnecting, and the server is started again on the same port.
  Timed: from the moment the new server listens (its ``listening on`` line) to the end of the
  client's first successful call (``conn.mim()``, made at that moment: calls made while
  reconnecting wait). The client waits between attempts with exponential backoff, at most
  ``reconnect_max_delay`` (jittered in its upper half), so the target is under 1 s plus that
  backoff. Also shown: from the kill to that call (it includes the server's start-up).
- ``keepalive``: records pushed (``submit_many`` + ``flush``, until the count processor has
  counted them all) on connections with keepalive off and on (15 s, and a short 0.5 s), the
  runs of each alternating so that all see the same noise; medians and their ratio to off.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from typing import Any

from harness import WORKFLOWS, ServerProcess, mz_server

import mzconnector

TOML = WORKFLOWS / "count.toml"


def pinned_server(port: int) -> ServerProcess:
    """The count workflow on a given port (a restart on the same port)."""
    argv = [sys.executable, "-m", "mzserver", str(TOML), "--port", str(port)]
    return ServerProcess([*argv, "--log-level", "WARNING"], name=f"mzserver on {port}")


class States:
    """An ``on_state_change`` that lets the bench wait for a state."""

    def __init__(self) -> None:
        self.seen: list[mzconnector.ConnectionState] = []
        self.changed = threading.Condition()

    def __call__(self, conn: Any, state: mzconnector.ConnectionState) -> None:
        with self.changed:
            self.seen.append(state)
            self.changed.notify_all()

    def wait_for(self, state: mzconnector.ConnectionState, count: int) -> None:
        with self.changed:
            if not self.changed.wait_for(lambda: self.seen.count(state) >= count, 30):
                raise RuntimeError(f"no {state.name} within 30 s: {self.seen}")


def restart(max_delay: float, down: float, runs: int) -> dict[str, Any]:
    """Kill and restart the server ``runs`` times under one client, ``down`` seconds after
    the client started reconnecting (0: at once); seconds per run."""
    server = mz_server(TOML)
    port = server.port
    states = States()
    conn = mzconnector.connect(
        "127.0.0.1",
        port,
        timeout=10,
        auto_reconnect=True,
        reconnect_max_delay=max_delay,
        on_state_change=states,
    )
    to_call: list[float] = []
    from_kill: list[float] = []
    try:
        conn.mim()
        for run in range(1, runs + 1):
            killed = time.perf_counter()
            server.proc.kill()
            server.stop()
            states.wait_for(mzconnector.ConnectionState.RECONNECTING, run)
            time.sleep(down)  # the server stays away this long: the backoff grows
            server = pinned_server(port)
            listening = time.perf_counter()
            conn.mim(timeout=30)  # waits while the client reconnects
            done = time.perf_counter()
            to_call.append(done - listening)
            from_kill.append(done - killed)
    finally:
        conn.close()
        server.stop()
    return {
        "max_delay": max_delay,
        "down": down,
        "restart_to_first_call": statistics.median(to_call),
        "restart_to_first_call_max": max(to_call),
        "kill_to_first_call": statistics.median(from_kill),
        "target": 1.0 + max_delay,
        "runs": to_call,
    }


def push_rate(conn: mzconnector.Connection, records: list[Any]) -> float:
    """Records per second into the count processor: pushed, flushed, and counted (its answer
    to a query record comes after every record sent before it has been counted)."""
    ask = conn.udrs.Rec(i=-1, s="", f=0.0)
    conn.submit(ask)
    before = conn.receive(timeout=60).i
    started = time.perf_counter()
    conn.submit_many(records)
    conn.flush()
    conn.submit(ask)
    counted = conn.receive(timeout=60).i
    elapsed = time.perf_counter() - started
    if counted != before + len(records):
        raise RuntimeError(f"counted {counted - before} of {len(records)} records")
    return len(records) / elapsed


def keepalive(n: int, runs: int) -> dict[str, Any]:
    cases = {"off": 0.0, "15s": 15.0, "0.5s": 0.5}
    with mz_server(TOML) as server:
        conns = {
            case: mzconnector.connect("127.0.0.1", server.port, timeout=30, keepalive=interval)
            for case, interval in cases.items()
        }
        try:
            # Each connection's own record classes (conn.udrs), the same values.
            records = {
                case: [conn.udrs.Rec(i=i, s=f"r{i}", f=i / 2) for i in range(n)]
                for case, conn in conns.items()
            }
            rates: dict[str, list[float]] = {case: [] for case in cases}
            for case, conn in conns.items():
                push_rate(conn, records[case][: n // 4])  # warm up
            for run in range(runs):
                order = list(cases) if run % 2 == 0 else list(reversed(cases))
                for case in order:
                    rates[case].append(push_rate(conns[case], records[case]))
        finally:
            for conn in conns.values():
                conn.close()
    medians = {case: statistics.median(values) for case, values in rates.items()}
    result: dict[str, Any] = {f"records_per_s_keepalive_{c}": m for c, m in medians.items()}
    for case in ("15s", "0.5s"):
        result[f"ratio_keepalive_{case}_to_off"] = medians[case] / medians["off"]
    result["runs"] = rates
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter runs")
    parser.add_argument("--runs", type=int, help="runs per figure (default 7; --quick 3)")
    parser.add_argument(
        "--down",
        default="0,4",
        help="seconds the server stays away before its restart, comma-separated (default 0,4:"
        " at once, and once the backoff has grown to its maximum)",
    )
    parser.add_argument(
        "--max-delay",
        default="0.5,2",
        help="reconnect_max_delay values to measure, comma-separated (default 0.5,2)",
    )
    args = parser.parse_args(argv)
    runs = args.runs or (3 if args.quick else 7)
    n = 100_000 if args.quick else 300_000
    print(f"restart -> first call ({runs} runs each; medians, seconds):")
    for down in args.down.split(","):
        for value in args.max_delay.split(","):
            r = restart(float(value), float(down), runs)
            verdict = "met" if r["restart_to_first_call"] < r["target"] else "MISSED"
            print(
                f"  down {r['down']:<3} s  reconnect_max_delay={r['max_delay']:<4}"
                f"  from listening: "
                f"{r['restart_to_first_call']:.3f} (max {r['restart_to_first_call_max']:.3f})"
                f"  from the kill: {r['kill_to_first_call']:.3f}"
                f"  target < {r['target']:.1f}: {verdict}"
            )
    print(f"push with keepalive ({runs} alternating runs of {n:,} records; medians):")
    k = keepalive(n, runs)
    for name, value in k.items():
        if name.startswith("records"):
            print(f"  {name:<34} {value:,.0f}")
        elif name.startswith("ratio"):
            print(f"  {name:<34} {value:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
