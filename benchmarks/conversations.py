"""Conversations, measured: queries per second on one connection, and what a tap costs the
workflow it watches. Each figure is a median of several runs, beside a reference measured in
the same run on the same server (these machines are shared and noisy: compare ratios).

    python benchmarks/conversations.py [--quick]

- ``query``: ``query_one`` one at a time (a round trip each), and the same queries in flight
  together (``query`` all, then read every reply); the reference is a record's round trip
  through an echo processor (``submit`` + ``receive``) on the same connection.
- ``tap``: records pushed (``submit_many`` + ``flush``, until the workflow has counted them)
  into a counting processor whose route is tapped by another connection, against the same
  push with nobody tapping. Two taps: one whose matcher takes every record, one that takes
  none (the cost of looking).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

from harness import WORKFLOWS, mz_server

import mzconnector

TOML = WORKFLOWS / "conversations.toml"
ECHO = WORKFLOWS / "echo.toml"


def timed(function: Any) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def queries(port: int, echo_port: int, n: int, runs: int) -> dict[str, Any]:
    with (
        mzconnector.connect("127.0.0.1", port) as conn,
        mzconnector.connect("127.0.0.1", echo_port) as echo,
    ):
        request = conn.udrs.Rec(i=1, s="question", f=1.5)
        record = echo.udrs.Rec(i=1, s="question", f=1.5)

        def one_at_a_time() -> None:
            for _ in range(n):
                conn.query_one("echo", request)

        def in_flight() -> None:
            pending = [conn.query("echo", request) for _ in range(n)]
            for replies in pending:
                assert len(list(replies)) == 1

        def round_trips() -> None:
            for _ in range(n):
                echo.submit(record)
                echo.receive(timeout=10)

        one_at_a_time()  # warm up
        round_trips()
        results: dict[str, list[float]] = {"sequential": [], "in_flight": [], "round_trip": []}
        for _ in range(runs):
            results["sequential"].append(n / timed(one_at_a_time))
            results["in_flight"].append(n / timed(in_flight))
            results["round_trip"].append(n / timed(round_trips))
    medians = {k: statistics.median(v) for k, v in results.items()}
    return {
        "queries_per_s_one_at_a_time": medians["sequential"],
        "queries_per_s_in_flight": medians["in_flight"],
        "record_round_trips_per_s": medians["round_trip"],
        "ratio_one_at_a_time_to_round_trip": medians["sequential"] / medians["round_trip"],
    }


def push_rate(conn: mzconnector.Connection, records: list[Any]) -> float:
    """Records per second into the counting processor: pushed, flushed, and counted."""
    ask = conn.udrs.Rec(i=0, s="", f=0.0)
    before = conn.query_one("count", ask).i
    started = time.perf_counter()
    conn.submit_many(records)
    conn.flush()
    while conn.query_one("count", ask).i < before + len(records):
        pass
    return len(records) / (time.perf_counter() - started)


def tap(port: int, n: int, runs: int) -> dict[str, Any]:
    with (
        mzconnector.connect("127.0.0.1", port) as pusher,
        mzconnector.connect("127.0.0.1", port) as tapper,
    ):
        records = [pusher.udrs.Rec(i=i, s=f"r{i}", f=i / 2) for i in range(n)]
        push_rate(pusher, records)  # warm up
        cases = {"untapped": None, "tap_every_record": {}, "tap_matching_none": {"i": -1}}
        rates: dict[str, list[float]] = {case: [] for case in cases}
        for _ in range(runs):
            for case, matcher in cases.items():
                sub = None
                if matcher is not None:
                    sub = tapper.subscribe("in", matcher, tap=True, ack="none")
                rates[case].append(push_rate(pusher, records))
                if sub is not None:
                    sub.close()
    medians = {case: statistics.median(values) for case, values in rates.items()}
    return {
        "records_per_s_untapped": medians["untapped"],
        "records_per_s_tap_every_record": medians["tap_every_record"],
        "records_per_s_tap_matching_none": medians["tap_matching_none"],
        "tap_every_record_cost": 1 - medians["tap_every_record"] / medians["untapped"],
        "tap_matching_none_cost": 1 - medians["tap_matching_none"] / medians["untapped"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter runs")
    args = parser.parse_args(argv)
    runs, n_queries, n_push = (3, 1000, 100_000) if args.quick else (5, 5000, 500_000)
    with mz_server(TOML) as server, mz_server(ECHO) as echo:
        result = queries(server.port, echo.port, n_queries, runs)
        result.update(tap(server.port, n_push, runs))
    width = max(map(len, result))
    for name, value in result.items():
        shown = f"{value:.1%}" if "cost" in name or "ratio" in name else f"{value:,.0f}"
        print(f"{name:<{width}}  {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
