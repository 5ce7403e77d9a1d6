"""The RPC comparison: the bench's push and call jobs as an RPyC or a Pyro5 service.

    python benchmarks/rpc_services.py {rpyc|pyro5}

prints ``rpc: <kind> listening on HOST:PORT`` and serves until killed. Both services have the
same methods: ``push(record)`` counts one record (a tuple ``(int, str, float)``),
``push_many(records)`` counts a batch (a tuple of such tuples), ``count()`` returns the number
counted so far, and ``echo(record)`` returns its argument (a call round trip).

The client side (``RpcClient``) is imported by bench.py. Both packages are optional (the
``bench`` extra); without them the bench reports the comparison as not available.
"""

from __future__ import annotations

import sys
import time
from typing import Any

Record = tuple[int, str, float]


class _Counter:
    records = 0


def serve_rpyc() -> None:
    import rpyc
    from rpyc.utils.server import ThreadedServer

    class BenchService(rpyc.Service):  # type: ignore[misc]
        def exposed_push(self, record: Record) -> None:
            _Counter.records += 1

        def exposed_push_many(self, records: tuple[Record, ...]) -> None:
            _Counter.records += len(records)

        def exposed_count(self) -> int:
            return _Counter.records

        def exposed_echo(self, record: Any) -> Any:
            return record

    server = ThreadedServer(BenchService, hostname="127.0.0.1", port=0)
    print(f"rpc: rpyc listening on {server.host}:{server.port}", flush=True)
    server.start()


def serve_pyro5() -> None:
    from Pyro5.api import Daemon, expose

    @expose
    class Bench:
        def push(self, record: Record) -> None:
            _Counter.records += 1

        def push_many(self, records: tuple[Record, ...]) -> None:
            _Counter.records += len(records)

        def count(self) -> int:
            return _Counter.records

        def echo(self, record: Any) -> Any:
            return record

    daemon = Daemon(host="127.0.0.1", port=0)
    daemon.register(Bench(), "bench")
    print(f"rpc: pyro5 listening on {daemon.locationStr}", flush=True)
    daemon.requestLoop()


class RpcClient:
    """A client of either service, with the same four calls."""

    def __init__(self, kind: str, host: str, port: int) -> None:
        self.kind = kind
        # RPyC's ThreadedServer reports its port before it listens: retry for a while.
        deadline = time.monotonic() + 10
        while True:
            try:
                root = self._connect(kind, host, port)
                break
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.push = root.push
        self.push_many = root.push_many
        self.count = root.count
        self.echo = root.echo

    def _connect(self, kind: str, host: str, port: int) -> Any:
        if kind == "rpyc":
            import rpyc

            self._conn = rpyc.connect(host, port)
            return self._conn.root
        from Pyro5.api import Proxy

        self._conn = Proxy(f"PYRO:bench@{host}:{port}")
        self._conn._pyroBind()
        return self._conn

    def close(self) -> None:
        if self.kind == "rpyc":
            self._conn.close()
        else:
            self._conn._pyroRelease()


def available(kind: str) -> str | None:
    """None if the package is installed, else why not."""
    try:
        __import__("rpyc" if kind == "rpyc" else "Pyro5.api")
    except ImportError as exc:
        return f"not installed ({exc.name}); pip install -e '.[bench]'"
    return None


if __name__ == "__main__":
    {"rpyc": serve_rpyc, "pyro5": serve_pyro5}[sys.argv[1]]()
