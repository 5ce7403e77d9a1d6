"""Shared fixtures: a real server process started the way the README starts it, and the
paths of the test workflows."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = Path(__file__).resolve().parent / "workflows"


class ServerProcess:
    """``python -m mzserver [toml] --port 0`` in a subprocess; knows its port."""

    def __init__(self, *args: str, cwd: Path = ROOT) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed by stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mzserver", *args, "--port", "0", "--log-level", "WARNING"],
            cwd=cwd,
            stdout=subprocess.PIPE,
            # A file, not a pipe: a server that logs a lot must never block on a full pipe.
            stderr=self._log,
            text=True,
            env=env,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if "listening on" not in line and "worker running" not in line:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"server did not start: {line!r} {self.log()!r}")
        self.banner = line.strip()
        self.host, self.port = "", 0  # a worker listens nowhere
        if "listening on" in line:
            self.host, port = line.strip().rsplit(" ", 1)[1].rsplit(":", 1)
            self.port = int(port)

    def log(self) -> str:
        """What the server has logged so far."""
        self._log.flush()
        self._log.seek(0)
        return self._log.read()

    def stop(self, timeout: float = 20) -> tuple[int, str]:
        """SIGTERM, then the exit code and what the server logged."""
        if self._log.closed:  # stopped before
            return self.proc.returncode, self._final_log
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
        self._final_log = self.log()
        self._log.close()
        return self.proc.returncode, self._final_log


@pytest.fixture
def start_server() -> Iterator[Callable[..., ServerProcess]]:
    """Start servers with ``start_server(*args)``; every one is stopped after the test."""
    started: list[ServerProcess] = []

    def start(*args: str) -> ServerProcess:
        server = ServerProcess(*args)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def echo_server(start_server: Callable[..., ServerProcess]) -> ServerProcess:
    """The built-in default workflow, started as the README says."""
    return start_server()
