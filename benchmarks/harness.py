"""What the bench needs around the measurements: server subprocesses, memory readings,
statistics, TLS certificates and the file-descriptor limit."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
WORKFLOWS = BENCH / "workflows"
HOST = "127.0.0.1"


class ServerFailed(RuntimeError):
    """A server subprocess did not start; the message holds what it printed."""


class ServerProcess:
    """A server in a subprocess that prints ``... listening on HOST:PORT`` once it listens.

    Its stderr is drained by a thread (a server that logs a lot must never block on a full
    pipe); ``stderr_text()`` returns what it wrote.
    """

    def __init__(self, argv: Sequence[str], *, name: str, timeout: float = 30.0) -> None:
        self.name = name
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            list(argv),
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.pid = self.proc.pid
        self._err: list[str] = []
        self._drain = threading.Thread(target=self._read_stderr, daemon=True)
        self._drain.start()
        line = _readline(self.proc, timeout)
        if "listening on" not in line:
            self.stop()
            raise ServerFailed(
                f"{name} did not start (exit code {self.proc.returncode}): "
                f"{line.strip()!r} {self.stderr_text()[-800:]}".strip()
            )
        self.host, port = line.strip().rsplit(" ", 1)[1].rsplit(":", 1)
        self.port = int(port)

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if len(self._err) < 2000:
                self._err.append(line)

    def stderr_text(self) -> str:
        self._drain.join(timeout=0.5 if self.proc.poll() is not None else 0)
        return "".join(self._err)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def memory(self) -> dict[str, int]:
        """VmRSS and VmHWM (peak RSS) of the process, in KiB."""
        return vm_status(self.pid)

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._drain.join(timeout=2)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _readline(proc: subprocess.Popen[str], timeout: float) -> str:
    """The first stdout line of ``proc``, or "" if none comes within ``timeout``."""
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(timeout)
    return result[0] if result else ""


def mz_server(toml: str | Path, *, name: str | None = None) -> ServerProcess:
    """``python -m mzserver <toml> --port 0``, as the README starts it."""
    return ServerProcess(
        [sys.executable, "-m", "mzserver", str(toml), "--port", "0", "--log-level", "WARNING"],
        name=name or f"mzserver {Path(toml).name}",
    )


def baseline_server(mode: str, tls: tuple[str, str] | None = None) -> ServerProcess:
    argv = [sys.executable, str(BENCH / "baseline_server.py"), mode, "--port", "0"]
    if tls:
        argv += ["--tls", *tls]
    return ServerProcess(argv, name=f"baseline {mode}{' (TLS)' if tls else ''}")


def vm_status(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` of a process, in KiB, from ``/proc/<pid>/status``."""
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0])
    return values


def raise_nofile(wanted: int) -> int:
    """Raise the soft RLIMIT_NOFILE to ``wanted`` (at most the hard limit); the new limit.
    Child processes inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


# -- statistics -------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, nearest rank."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def summary(values: Sequence[float]) -> dict[str, Any]:
    """Median, min, max and every value of a series of per-run results."""
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "runs": list(values),
    }


class Stopwatch:
    def __enter__(self) -> Stopwatch:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.elapsed = time.perf_counter() - self.start


# -- TLS ----------------------------------------------------------------------------------------


class Certificates:
    """A throwaway CA and a server certificate for 127.0.0.1, made with trustme, as files."""

    def __init__(self, directory: Path) -> None:
        import trustme

        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        self.cafile = str(directory / "ca.pem")
        self.certfile = str(directory / "server.pem")
        self.keyfile = str(directory / "server.key")
        ca.cert_pem.write_to_path(self.cafile)
        cert.private_key_pem.write_to_path(self.keyfile)
        with open(self.certfile, "wb") as f:
            for blob in cert.cert_chain_pems:
                f.write(blob.bytes())


@contextlib.contextmanager
def scratch_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="mzbench-") as name:
        yield Path(name)


def tls_workflow(toml: Path, certs: Certificates, directory: Path) -> Path:
    """A copy of a bench workflow with ``[connector.tls]`` enabled, written to ``directory``;
    the processor and API files it names are made absolute so the copy works from there."""
    text = toml.read_text()
    for name in ("bench_processors.py", "bench_api.py"):
        text = text.replace(f'"{name}', f'"{WORKFLOWS / name}')
    text += (
        "\n[connector.tls]\n"
        "enabled = true\n"
        f'certfile = "{certs.certfile}"\n'
        f'keyfile = "{certs.keyfile}"\n'
    )
    path = directory / f"tls-{toml.name}"
    path.write_text(text)
    return path
