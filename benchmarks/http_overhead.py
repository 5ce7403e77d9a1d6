"""What the HTTP listener costs the connector: push throughput of a server with ``--http-port``
whose status page a headless Chromium watches (it polls ``api/status`` once a second), against
the same server without HTTP, in the same run, in turn.

    python benchmarks/http_overhead.py                  # 201 runs of 200,000 records each
    python benchmarks/http_overhead.py --runs 51 --records 1000000 --scrape 1

Both servers run ``benchmarks/workflows/count.toml`` (every record counted by a processor) as
the README starts a server; one client pushes ``submit_many`` + ``flush`` and then asks the
processor for its count, so a run ends when every record has been processed. Runs are short
and alternate between the servers, because throughput on a shared 2-core VM drifts by 2x
within seconds: pairs of runs a tenth of a second apart see the same drift. ``--scrape S``
also GETs ``/metrics`` every S seconds during the runs (a Prometheus at its most eager). The
browser is Debian's chromium with chromium-driver, driven by Selenium (pip install selenium).
Prints medians and the ratio; writes every run to ``benchmarks/results/http_overhead.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness.py beside this file

from bench import cpu_seconds
from harness import BENCH, WORKFLOWS, ServerProcess, _readline

import mzconnector

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def start(http: bool) -> tuple[ServerProcess, str | None]:
    argv = [sys.executable, "-m", "mzserver", str(WORKFLOWS / "count.toml"), "--port", "0"]
    argv += ["--log-level", "WARNING"]
    if http:
        argv += ["--http-port", "0"]
    server = ServerProcess(argv, name="with HTTP" if http else "without HTTP")
    url = None
    if http:
        line = _readline(server.proc, 10)
        if "status page" not in line:
            server.stop()
            raise RuntimeError(f"no HTTP line from the server: {line!r}")
        url = line.split()[-1]
    return server, url


def open_browser(url: str, profile: str) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1280,900"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    driver.get(url)
    WebDriverWait(driver, 20).until(
        lambda d: (
            d.execute_script("return document.getElementById('readiness').textContent") == "ready"
        )
    )
    return driver


def count(conn: mzconnector.Connection) -> int:
    conn.submit(conn.udrs.Rec(i=-1, s="", f=0.0))
    return int(conn.receive(timeout=120).i)


def push(conn: mzconnector.Connection, records: list[Any], pid: int) -> tuple[float, float]:
    """Records/s of one push, until the processor has counted every record; and the server's
    CPU nanoseconds per record meanwhile (everything it did: the push, and HTTP requests)."""
    before = count(conn)
    cpu = cpu_seconds(pid)
    began = time.perf_counter()
    conn.submit_many(records)
    conn.flush()
    after = count(conn)
    elapsed = time.perf_counter() - began
    cpu = cpu_seconds(pid) - cpu
    if after - before != len(records):
        raise RuntimeError(f"counted {after - before} of {len(records)}")
    return len(records) / elapsed, cpu * 1e9 / len(records)


def request_cost(url: str, pid: int, n: int = 300) -> float:
    """Server CPU microseconds per GET of ``url`` (each on a new connection: an upper bound
    for a browser, which keeps its connection)."""
    cpu = cpu_seconds(pid)
    for _ in range(n):
        with urllib.request.urlopen(url, timeout=10) as answer:
            answer.read()
    return (cpu_seconds(pid) - cpu) * 1e6 / n


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of a process onto ``cpus``."""
    for task in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(task), cpus)


class Scraper(threading.Thread):
    """GETs ``/metrics`` every ``period`` seconds until stopped."""

    def __init__(self, url: str, period: float) -> None:
        super().__init__(daemon=True)
        self.url, self.period = url + "metrics", period
        self.stopped = threading.Event()
        self.scrapes = 0

    def run(self) -> None:
        while not self.stopped.wait(self.period):
            with urllib.request.urlopen(self.url, timeout=10) as answer:
                answer.read()
            self.scrapes += 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=201)
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--scrape", type=float, help="also GET /metrics every this many seconds")
    parser.add_argument(
        "--no-pin",
        action="store_true",
        help="leave CPU placement to the system (default: both servers on the last CPU, "
        "this client and the browser on the others, so that neither server shares a CPU "
        "with the browser more than the other)",
    )
    parser.add_argument("--json", default=str(BENCH / "results" / "http_overhead.json"))
    args = parser.parse_args()

    load_before = os.getloadavg()
    cpus = sorted(os.sched_getaffinity(0))
    pinned = not args.no_pin and len(cpus) > 1
    if pinned:  # before the servers and the browser start: they inherit it
        os.sched_setaffinity(0, set(cpus[:-1]))
    plain, _ = start(http=False)
    watched, url = start(http=True)
    assert url is not None
    if pinned:
        for server in (plain, watched):
            pin(server.pid, {cpus[-1]})
    rates: dict[str, list[float]] = {"without": [], "with": []}
    cpu: dict[str, list[float]] = {"without": [], "with": []}
    pids = {"without": plain.pid, "with": watched.pid}
    scraper = None
    with tempfile.TemporaryDirectory(prefix="mzbench-chromium-") as profile:
        browser = open_browser(url, profile)
        try:
            if args.scrape:
                scraper = Scraper(url, args.scrape)
                scraper.start()
            conns = {
                "without": mzconnector.connect(plain.host, plain.port, timeout=120),
                "with": mzconnector.connect(watched.host, watched.port, timeout=120),
            }
            records = [
                conns["with"].udrs.Rec(i=i, s="abcdefgh", f=i * 0.5) for i in range(args.records)
            ]
            plain_records = [conns["without"].udrs.Rec(i=r.i, s=r.s, f=r.f) for r in records]
            batch = {"without": plain_records, "with": records}
            for run in range(args.runs + 1):  # run 0 warms up
                order = ("without", "with") if run % 2 else ("with", "without")
                for side in order:
                    some = batch[side] if run else batch[side][: args.records // 5]
                    rate, ns = push(conns[side], some, pids[side])
                    if run:
                        rates[side].append(rate)
                        cpu[side].append(ns)
                        print(
                            f"run {run}: {side} HTTP {rate / 1e6:.2f} M records/s, "
                            f"server {ns:.0f} ns CPU a record",
                            flush=True,
                        )
            shown = browser.execute_script("return document.getElementById('total-in').textContent")
            # What one poll of the page and one scrape cost the server, measured directly.
            costs = {
                path: request_cost(url + path, watched.pid) for path in ("api/status", "metrics")
            }
            for conn in conns.values():
                conn.close()
        finally:
            if scraper is not None:
                scraper.stopped.set()
            browser.quit()
            plain.stop()
            watched.stop()

    load_after = os.getloadavg()
    without, with_ = (statistics.median(rates[k]) for k in ("without", "with"))
    ratio = with_ / without
    # Runs next to each other in time see the same noise: the ratio within each run, too.
    paired = statistics.median(w / o for w, o in zip(rates["with"], rates["without"]))
    cpu_without, cpu_with = (statistics.median(cpu[k]) for k in ("without", "with"))
    print()
    print(f"push, {args.records:,} records a run, median of {args.runs} runs:")
    print(f"  without HTTP:                          {without / 1e6:.2f} M records/s")
    print(f"  with HTTP, a browser watching the page: {with_ / 1e6:.2f} M records/s")
    print(f"  ratio {ratio:.3f} ({(1 - ratio) * 100:.1f}% lost)")
    print(f"  median of each run's ratio {paired:.3f}")
    print(
        f"  server CPU a record: {cpu_without:.0f} ns without HTTP, {cpu_with:.0f} ns with "
        f"(ratio {cpu_with / cpu_without:.3f})"
    )
    print(
        f"  server CPU a request: {costs['api/status']:.0f} us a page poll (api/status, once "
        f"a second), {costs['metrics']:.0f} us a /metrics scrape"
    )
    print(f"  the page last showed {shown} records in")
    if pinned:
        print(f"  servers on CPU {cpus[-1]}, this client and the browser on CPU {cpus[:-1]}")
    print(f"  load average {load_before[0]:.2f} at the start, {load_after[0]:.2f} at the end")
    if scraper is not None:
        print(f"  /metrics scraped {scraper.scrapes} times (every {args.scrape} s)")
    result = {
        "records_per_run": args.records,
        "runs": rates,
        "median_without_http": without,
        "median_with_http": with_,
        "ratio": ratio,
        "median_of_run_ratios": paired,
        "server_cpu_ns_per_record": cpu,
        "median_server_cpu_ns_per_record": {"without": cpu_without, "with": cpu_with},
        "scrape_period": args.scrape,
        "scrapes": scraper.scrapes if scraper else 0,
        "page_total_in": shown,
        "server_cpu_us_per_request": costs,
        "load_average": [load_before[0], load_after[0]],
        "pinned": pinned,
        "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
