"""Profile one bench job with py-spy: the server process and the client process at once.

    python benchmarks/profile.py JOB [--seconds 8] [--rate 1000] [--wall] [--native] [--out DIR]
    python benchmarks/profile.py steps


JOB is one of roundtrip, api, push, pipelined, bulk. The server is started as the bench starts
it; a client subprocess runs the job in a loop for ``--seconds``; ``py-spy record`` samples
both. By default only samples holding the GIL are kept (``--gil``: where the CPU goes);
``--wall`` keeps every sample (where the time goes, waiting included). Writes the collapsed
stacks (``server.txt``, ``client.txt``: open them in speedscope or flamegraph.pl) to
``--out`` (default benchmarks/results/profile-JOB) and prints, per process, the functions with
the most samples, self and inclusive.

``steps`` needs no profiler: it runs the echo workflow's server in this process (``app.serve``)
and the baseline frame server, each with a trio ``Instrument``, and counts the trio task steps
and I/O waits (epoll calls) per round trip: each is a pass through trio's scheduler, which
costs microseconds in Python, so their count is the server's part of round-trip latency in
a number that does not depend on the noise of the machine.

Needs ``py-spy`` (pip install py-spy) and the right to ptrace the processes (root, or
``kernel.yama.ptrace_scope = 0``). Sampling slows both processes: read shares, not times.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from harness import BENCH, ROOT, WORKFLOWS, mz_server

import mzconnector

JOBS = {
    "roundtrip": "echo",
    "api": "echo",
    "push": "count",
    "pipelined": "echo",
    "bulk": "count",
}


def client(job: str, host: str, port: int, seconds: float) -> None:
    """The client side: run ``job`` in a loop for ``seconds``; print what it did."""
    conn = mzconnector.connect(host, port, timeout=30)
    Rec = conn.udrs.Rec
    rec = Rec(i=1, s="abcdefgh", f=1.5)
    records = [Rec(i=i, s="abcdefgh", f=i * 0.5) for i in range(200_000)]
    payload = b"x" * (1 << 20)
    print("ready", flush=True)
    done = 0
    end = time.monotonic() + seconds
    started = time.perf_counter()
    while time.monotonic() < end:
        if job == "roundtrip":
            for _ in range(100):
                conn.submit(rec)
                conn.receive(timeout=10)
            done += 100
        elif job == "api":
            for _ in range(100):
                conn.api.call(rec)
            done += 100
        elif job == "push":
            conn.submit_many(records)
            conn.flush()
            done += len(records)
        elif job == "bulk":
            for _ in range(64):
                conn.submit(payload)
            conn.flush()
            done += 64
        else:  # pipelined
            got = [0]

            def reader(got: list[int] = got) -> None:
                while got[0] < len(records):
                    got[0] += len(conn.receive_many(timeout=30) or [])

            thread = threading.Thread(target=reader)
            thread.start()
            conn.submit_many(records)
            thread.join()
            done += len(records)
    elapsed = time.perf_counter() - started
    print(
        f"{job}: {done} operations in {elapsed:.1f} s ({done / elapsed:,.0f}/s while sampled)",
        flush=True,
    )
    conn.close()


def steps(n: int = 2000) -> None:
    """Trio task steps and I/O waits per round trip, connector server and baseline server."""
    import functools

    import baseline_server
    import trio
    from rawclient import RawClient, frame

    from mzserver.app import serve
    from mzserver.config import load_config

    class Count(trio.abc.Instrument):
        def __init__(self) -> None:
            self.steps: collections.Counter[str] = collections.Counter()
            self.io = 0
            self.on = False

        def before_task_step(self, task: trio.lowlevel.Task) -> None:
            if self.on:
                self.steps[task.name.rsplit(".", 1)[-1]] += 1

        def before_io_wait(self, timeout: float) -> None:
            if self.on:
                self.io += 1

    def measure(start_server, round_trip_factory) -> Count:  # type: ignore[no-untyped-def]
        count = Count()

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                port = await start_server(nursery)
                done = trio.Event()
                token = trio.lowlevel.current_trio_token()

                def client() -> None:
                    try:
                        round_trip, close = round_trip_factory(port)
                        for _ in range(200):
                            round_trip()
                        count.on = True
                        for _ in range(n):
                            round_trip()
                        count.on = False
                        close()
                    finally:
                        trio.from_thread.run_sync(done.set, trio_token=token)

                threading.Thread(target=client, daemon=True).start()
                await done.wait()
                nursery.cancel_scope.cancel()

        trio.run(main, instruments=[count])
        return count

    async def start_connector(nursery: trio.Nursery) -> int:
        config = load_config(WORKFLOWS / "echo.toml").replace_connector(port=0)
        server = await nursery.start(serve, config)
        return server.port

    def connector_client(port: int):  # type: ignore[no-untyped-def]
        conn = mzconnector.connect("127.0.0.1", port, timeout=30)
        rec = conn.udrs.Rec(i=1, s="abcdefgh", f=1.5)

        def round_trip() -> None:
            conn.submit(rec)
            conn.receive(timeout=10)

        return round_trip, conn.close

    async def start_baseline(nursery: trio.Nursery) -> int:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, baseline_server.echo, 0, host="127.0.0.1")
        )
        return int(listeners[0].socket.getsockname()[1])

    def baseline_client(port: int):  # type: ignore[no-untyped-def]
        raw = RawClient("127.0.0.1", port)
        data = frame(b"x" * 24)
        return (lambda: raw.round_trip(data)), raw.close

    for name, start, factory in (
        ("connector server", start_connector, connector_client),
        ("baseline server", start_baseline, baseline_client),
    ):
        count = measure(start, factory)
        total = sum(count.steps.values()) / n
        print(f"{name}: {total:.2f} task steps and {count.io / n:.2f} I/O waits per round trip")
        for task, k in count.steps.most_common():
            print(f"    {k / n:5.2f}  {task}")


def summarize(path: Path, top: int) -> str:
    """The functions with the most samples in a collapsed-stack file, self and inclusive."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [
            re.sub(r":\d+\)$", ")", f)
            for f in stack.split(";")
            if not f.startswith(("process ", "thread "))
        ]
        if frames:
            own[frames[-1]] += n
        for name in set(frames):
            inclusive[name] += n
    out = [f"{path.name}: {total} samples", "  self:"]
    out += [f"    {100 * v / total:5.1f}%  {k}" for k, v in own.most_common(top)]
    out.append("  inclusive:")
    out += [f"    {100 * v / total:5.1f}%  {k}" for k, v in inclusive.most_common(top)]
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description="Profile a bench job with py-spy.")
    parser.add_argument("job", choices=[*sorted(JOBS), "steps"])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rate", type=int, default=1000, help="samples per second")
    parser.add_argument("--wall", action="store_true", help="keep idle samples too")
    parser.add_argument("--native", action="store_true", help="include C frames (py-spy --native)")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--client", nargs=3, metavar=("HOST", "PORT", "SECONDS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.client:
        client(args.job, args.client[0], int(args.client[1]), float(args.client[2]))
        return 0
    if args.job == "steps":
        steps()
        return 0
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        print("profile.py needs py-spy: pip install py-spy", file=sys.stderr)
        return 2
    out = args.out or BENCH / "results" / f"profile-{args.job}"
    out.mkdir(parents=True, exist_ok=True)
    flags = ["--rate", str(args.rate), "--format", "raw"]
    if not args.wall:
        flags.append("--gil")
    # --native must pause the process to unwind C stacks; without it, sample without pausing.
    flags.append("--native" if args.native else "--nonblocking")
    with mz_server(WORKFLOWS / f"{JOBS[args.job]}.toml") as server:
        proc = subprocess.Popen(
            [
                sys.executable,
                __file__,
                args.job,
                "--client",
                server.host,
                str(server.port),
                str(args.seconds + 3),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            proc.kill()
            print("the client did not start", file=sys.stderr)
            return 1
        time.sleep(1.0)  # past connect and warm-up
        spies = [
            subprocess.Popen(
                [
                    spy,
                    "record",
                    *flags,
                    "--duration",
                    str(int(args.seconds)),
                    "--pid",
                    str(pid),
                    "--output",
                    str(out / f"{name}.txt"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for name, pid in (("server", server.pid), ("client", proc.pid))
        ]
        for s in spies:
            _, err = s.communicate()
            if s.returncode:
                print(f"py-spy failed: {err.strip()[-500:]}", file=sys.stderr)
        print(proc.stdout.read().strip())
        proc.wait()
    for name in ("server", "client"):
        path = out / f"{name}.txt"
        if path.exists():
            print()
            print(summarize(path, args.top))
    print(f"\ncollapsed stacks in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
