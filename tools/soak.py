"""Soak test: N clients for M minutes against a real server, with random disconnects; then
check that every acknowledged record was processed exactly once.

    python tools/soak.py --clients 8 --minutes 30
    python tools/soak.py --clients 4 --seconds 5          # a short run (tests/test_soak.py)

What it does (loopback only, everything in a temporary directory):

- starts ``python -m mzserver`` on 127.0.0.1 (any free port) with a workflow whose processor
  (``process`` below) appends a "client seq" line to a log file for every record;
- runs N client processes. Each opens sessions (one connection each, the session's name is the
  records' ``client``), submits numbered records in chunks, flushes at random points and ends
  each session at random: ``close()`` (with or without a flush first), or by killing its
  socket under the client (``shutdown``) and reading ``ConnectionClosed.unacknowledged``.
  Each client keeps a journal: what it is about to submit, what ``flush()`` acknowledged,
  how the session ended. The parent also kills client processes at random (SIGKILL, often in
  the middle of a batch) and starts new ones in their place;
- at the end, stops the clients, stops the server gracefully (SIGTERM), and compares the
  journals with the processed log. Violations: a record processed twice; a record processed
  that was never submitted; an acknowledged record not processed; a record of a session
  closed cleanly not processed; a client whose ``unacknowledged`` was wrong; a client that
  failed or hung; a server that failed, logged an error or did not stop cleanly.

Prints a summary; exits 0 when there is no violation, 1 otherwise. It stops by itself:
clients stop at the deadline, and everything is killed at the deadline plus a grace period.

The module is also the workflow's processor module (the server imports it for ``process``):
keep its top level free of side effects.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

ROOT = Path(__file__).resolve().parent.parent
GRACE = 60.0  # seconds after the deadline before everything is killed

WORKFLOW = """\
# Written by tools/soak.py.
[workflow]
name = "soak"

[connector]
host = "127.0.0.1"
port = 0
max_connections = 0
accepted_types = ["Rec"]
shutdown_timeout = 30.0

[connector.output_routes]
Rec = "in"

[types.Rec]
client = "str"
seq = "int"

[[processors]]
name = "log"
entry = "{entry}:process"
routes = ["in"]
"""

# -- the processor (runs in the server) ----------------------------------------------------------

_log: TextIO | None = None
_seen = 0


def process(record: Any, ctx: Any) -> None:
    """Append "client seq" to the file named by SOAK_LOG, at once (line buffered). With
    SOAK_DROP_EVERY=K (fault injection, to show the checks catch a loss), every K-th record is
    silently not logged."""
    global _log, _seen
    if _log is None:
        _log = open(os.environ["SOAK_LOG"], "a", buffering=1, encoding="utf-8")  # noqa: SIM115
    _seen += 1
    drop = int(os.environ.get("SOAK_DROP_EVERY", "0"))
    if drop and _seen % drop == 0:
        return
    _log.write(f"{record.client} {record.seq}\n")


# -- a client process ----------------------------------------------------------------------------


def worker(args: argparse.Namespace) -> int:
    """One client process: sessions until the deadline, everything journaled."""
    import mzconnector

    rng = random.Random(args.seed)
    journal = open(args.journal, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
    deadline = time.time() + args.run_for
    pace = 1.0 / args.rate if args.rate else 0.0
    number = 0
    while time.time() < deadline:
        session = f"{args.name}.{number}"
        number += 1
        conn = mzconnector.connect("127.0.0.1", args.port, timeout=30, name=session)
        Rec = conn.udrs.Rec
        journal.write(f"S {session}\n")
        submitted = acked = 0
        while True:
            chunk = rng.randint(1, args.max_chunk)
            journal.write(f"I {session} {submitted + chunk}\n")  # before: a kill may follow
            conn.submit_many(
                Rec(client=session, seq=i) for i in range(submitted, submitted + chunk)
            )
            submitted += chunk
            if pace:
                time.sleep(chunk * pace)  # the client's pace: not a wait for anything
            roll = rng.random()
            if time.time() >= deadline or roll < 0.03:  # a clean end
                if time.time() >= deadline or rng.random() < 0.5:
                    conn.flush()
                    acked = submitted
                    journal.write(f"A {session} {acked}\n")
                conn.close()
                journal.write(f"C {session}\n")
                break
            if roll < 0.06:  # kill the socket under the client, then see what it reports
                journal.write(f"K {session}\n")
                try:
                    conn._transport.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                try:
                    conn.flush()
                except mzconnector.ConnectionClosed as exc:
                    seqs = [r.seq for r in exc.unacknowledged]
                    start = seqs[0] if seqs else submitted
                    if seqs != list(range(start, submitted)) or start < acked:
                        journal.write(
                            f"V {session} unacknowledged is {_ranges(seqs)}, expected a suffix "
                            f"of {acked}..{submitted - 1}\n"
                        )
                    journal.write(f"U {session} {start}\n")
                else:
                    journal.write(f"V {session} flush() succeeded on a killed socket\n")
                conn.close()
                break
            if roll < 0.5:
                conn.flush()
                acked = submitted
                journal.write(f"A {session} {acked}\n")
    journal.write("E\n")
    return 0


def _ranges(seqs: list[int]) -> str:
    if not seqs:
        return "empty"
    return f"{len(seqs)} records {seqs[0]}..{seqs[-1]}"


# -- the parent ----------------------------------------------------------------------------------


@dataclass
class Session:
    intended: int = 0  # records 0..intended-1 may have been submitted
    acked: int = 0  # records 0..acked-1 were acknowledged by flush()
    clean: bool = False  # ended by close()
    killed_socket: bool = False
    unacked_from: int | None = None  # first record ConnectionClosed.unacknowledged listed


@dataclass
class Stats:
    sessions: int = 0
    process_kills: int = 0
    socket_kills: int = 0
    clean_closes: int = 0
    workers: int = 0
    violations: list[str] = field(default_factory=list)


class Server:
    def __init__(self, toml: Path, env: dict[str, str], stderr: Path) -> None:
        self.stderr_path = stderr
        self._stderr = stderr.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mzserver", str(toml), "--port", "0", "--log-level", "WARNING"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env=env,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            self.proc.kill()
            raise SystemExit(f"soak: the server did not start: {line!r}; see {stderr}")
        self.port = int(line.strip().rsplit(":", 1)[1])

    def stop(self, timeout: float) -> int | None:
        """SIGTERM; the exit code, or None if it had to be killed."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            code: int | None = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            code = None
        self._stderr.close()
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return code


def start_worker(
    index: int, generation: int, port: int, run_for: float, work: Path, args: argparse.Namespace
) -> tuple[subprocess.Popen[bytes], Path]:
    name = f"c{index}g{generation}"
    journal = work / f"journal-{name}.txt"
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        "--name",
        name,
        "--port",
        str(port),
        "--journal",
        str(journal),
        "--run-for",
        str(run_for),
        "--seed",
        str(args.seed * 1_000_003 + index * 1009 + generation),
        "--rate",
        str(args.rate),
        "--max-chunk",
        str(args.max_chunk),
    ]
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": path}), journal


def read_journal(path: Path, sessions: dict[str, Session], stats: Stats) -> bool:
    """Fold a client's journal into ``sessions``; True if the client reached its end."""
    ended = False
    if not path.exists():
        return False
    for line in path.read_text(encoding="utf-8").splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "E":
            ended = True
            continue
        name, _, value = rest.partition(" ")
        if kind == "S":
            sessions[name] = Session()
            stats.sessions += 1
        elif kind == "I":
            sessions[name].intended = int(value)
        elif kind == "A":
            sessions[name].acked = int(value)
        elif kind == "C":
            sessions[name].clean = True
            stats.clean_closes += 1
        elif kind == "K":
            sessions[name].killed_socket = True
            stats.socket_kills += 1
        elif kind == "U":
            sessions[name].unacked_from = int(value)
        elif kind == "V":
            stats.violations.append(f"client {name}: {value}")
    return ended


def check(log: Path, sessions: dict[str, Session], stats: Stats) -> dict[str, int]:
    counts: collections.Counter[tuple[str, int]] = collections.Counter()
    if log.exists():
        with log.open(encoding="utf-8") as f:
            for line in f:
                client, seq = line.split()
                counts[(client, int(seq))] += 1
    processed: dict[str, set[int]] = collections.defaultdict(set)
    for (client, seq), n in counts.items():
        processed[client].add(seq)
        if n > 1:
            stats.violations.append(f"record {client}#{seq} processed {n} times")
    unacked_unprocessed = acked_total = 0
    for name in sorted(set(processed) - set(sessions)):
        stats.violations.append(f"records of {name}, a session no client started, processed")
    for name, session in sessions.items():
        seen = processed.get(name, set())
        extra = {s for s in seen if s >= session.intended}
        if extra:
            stats.violations.append(f"{name}: {len(extra)} record(s) processed, never submitted")
        lost = set(range(session.acked)) - seen
        if lost:
            stats.violations.append(
                f"{name}: {len(lost)} acknowledged record(s) not processed (first #{min(lost)})"
            )
        missing = set(range(session.intended)) - seen
        if session.clean and missing:
            stats.violations.append(
                f"{name}: {len(missing)} record(s) of a cleanly closed session not processed "
                f"(first #{min(missing)})"
            )
        if session.unacked_from is not None and missing - set(
            range(session.unacked_from, session.intended)
        ):
            stats.violations.append(
                f"{name}: record(s) not processed and not reported unacknowledged"
            )
        acked_total += session.acked
        if not session.clean:
            unacked_unprocessed += len(missing)
    return {
        "processed": sum(counts.values()),
        "acknowledged": acked_total,
        "submitted": sum(s.intended for s in sessions.values()),
        "unacknowledged, not processed": unacked_unprocessed,
    }


def run(args: argparse.Namespace) -> int:
    duration = args.seconds if args.seconds is not None else args.minutes * 60
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="mzsoak-"))
    toml = work / "soak.toml"
    toml.write_text(WORKFLOW.format(entry=Path(__file__).resolve()))
    log = work / "processed.log"
    env = {**os.environ, "SOAK_LOG": str(log), "PYTHONUNBUFFERED": "1"}
    if args.inject_loss:
        env["SOAK_DROP_EVERY"] = str(args.inject_loss)
    server = Server(toml, env, work / "server.log")
    stats = Stats()
    started = time.monotonic()
    deadline = started + duration
    hard_deadline = deadline + GRACE
    print(
        f"soak: {args.clients} clients for {duration:g} s against 127.0.0.1:{server.port} "
        f"(work directory {work})",
        flush=True,
    )
    workers: dict[int, tuple[subprocess.Popen[bytes], Path]] = {}
    journals: list[Path] = []
    generations = [0] * args.clients

    def spawn(index: int) -> None:
        remaining = max(0.5, deadline - time.monotonic())
        proc, journal = start_worker(index, generations[index], server.port, remaining, work, args)
        generations[index] += 1
        workers[index] = (proc, journal)
        journals.append(journal)
        stats.workers += 1

    try:
        for index in range(args.clients):
            spawn(index)
        # Kill a client process now and then (SIGKILL: mid-batch, no goodbye), start another.
        while time.monotonic() < deadline - 1.0:
            time.sleep(min(rng.expovariate(1 / args.kill_every), deadline - time.monotonic()))
            if time.monotonic() >= deadline - 1.0:
                break
            index = rng.randrange(args.clients)
            proc, _ = workers[index]
            if proc.poll() is None:
                proc.kill()
                proc.wait()
                stats.process_kills += 1
            elif proc.returncode != 0:
                stats.violations.append(f"client c{index} exited with {proc.returncode}")
            spawn(index)
        # Let the clients finish by themselves.
        for index, (proc, _) in workers.items():
            try:
                code = proc.wait(max(0.1, hard_deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                stats.violations.append(f"client c{index} did not stop by itself (hung?)")
                continue
            if code != 0:
                stats.violations.append(f"client c{index} exited with {code}")
    finally:
        for proc, _ in workers.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        code = server.stop(timeout=max(10.0, hard_deadline - time.monotonic()))

    if code != 0:
        stats.violations.append(f"the server exited with {code} (None: killed, it did not stop)")
    server_log = server.stderr_path.read_text(encoding="utf-8", errors="replace")
    errors = [line for line in server_log.splitlines() if " ERROR " in line or "Traceback" in line]
    if errors:
        stats.violations.append(f"the server logged {len(errors)} error(s); first: {errors[0]}")

    sessions: dict[str, Session] = {}
    for journal in journals:
        read_journal(journal, sessions, stats)
    totals = check(log, sessions, stats)
    elapsed = time.monotonic() - started
    print(
        f"soak: {elapsed:.1f} s; {stats.workers} client processes ({stats.process_kills} killed), "
        f"{stats.sessions} sessions ({stats.clean_closes} closed, {stats.socket_kills} sockets "
        "killed)"
    )
    print("soak: records: " + ", ".join(f"{v} {k}" for k, v in totals.items()))
    if stats.violations:
        print(f"soak: FAILED, {len(stats.violations)} violation(s):")
        for violation in stats.violations[:50]:
            print(f"  - {violation}")
        print(f"soak: kept {work} (journals, processed.log, server.log)")
        return 1
    print("soak: OK: every acknowledged record was processed exactly once")
    if not args.keep:
        for path in work.iterdir():
            path.unlink()
        work.rmdir()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=4, help="client processes (default 4)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float, default=1.0, help="how long (default 1)")
    length.add_argument("--seconds", type=float, help="how long, in seconds")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    parser.add_argument(
        "--rate", type=float, default=5000.0, help="records/s per client (0: as fast as it can)"
    )
    parser.add_argument("--max-chunk", type=int, default=500, help="records per submit_many")
    parser.add_argument(
        "--kill-every", type=float, default=2.0, help="mean seconds between client process kills"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--inject-loss",
        type=int,
        default=0,
        metavar="K",
        help="fault injection: the processor silently skips every K-th record (to see it fail)",
    )
    # A client process (started by the parent).
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--name", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--journal", help=argparse.SUPPRESS)
    parser.add_argument("--run-for", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.clients < 1:
        parser.error("--clients must be at least 1")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
