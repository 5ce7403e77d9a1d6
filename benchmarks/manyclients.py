"""A client process of the many-clients job: opens many connections, then pushes on command.

    python benchmarks/manyclients.py {mz|raw} HOST PORT CONNECTIONS BATCH ROUNDS

``mz`` connects with ``mzconnector.connect`` (``batch_size=BATCH``) to a count workflow;
``raw`` opens plain sockets to ``baseline_server.py sink``. Talks to the bench on its
stdin/stdout, one line each:

    -> ready <connections>         every connection is open (they are idle now)
    <- push                        each connection sends ROUNDS batches of BATCH records, in
                                   turn, then every connection flushes (raw: queries)
    -> done <records>              every connection's flush returned
    <- quit                        close everything and exit
"""

from __future__ import annotations

import sys

from harness import raise_nofile  # run as a script: its folder is on sys.path
from rawclient import RawClient

import mzconnector

SCHEMA = {"Rec": {"i": "int", "s": "str", "f": "float"}}


def main(mode: str, host: str, port: int, count: int, batch: int, rounds: int) -> None:
    raise_nofile(count + 256)
    if mode == "mz":
        conns = [
            mzconnector.connect(host, port, timeout=60, batch_size=batch, name=f"bench-{i}")
            for i in range(count)
        ]
        batches = [[c.udrs.Rec(i=1, s="abcdefgh", f=1.5)] * batch for c in conns]

        def push() -> int:
            for _ in range(rounds):
                for conn, records in zip(conns, batches):
                    conn.submit_many(records)
            for conn in conns:
                conn.flush()
            return count * rounds * batch

        def close() -> None:
            for conn in conns:
                conn.close()

    else:
        codec = mzconnector.RecordCodec(SCHEMA)
        rec = codec.types["Rec"](i=1, s="abcdefgh", f=1.5)
        (payload,) = mzconnector.encode_record_frames([rec] * batch, 1 << 30)
        payload = bytes(payload)
        socks = [RawClient(host, port) for _ in range(count)]

        def push() -> int:
            for _ in range(rounds):
                for sock in socks:
                    sock.send(payload)
            frames = sum(sock.query()[0] for sock in socks)
            return frames * batch

        def close() -> None:
            for sock in socks:
                sock.close()

    print(f"ready {count}", flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "push":
            print(f"done {push()}", flush=True)
        elif command == "quit":
            break
    close()


if __name__ == "__main__":
    mode, host, port, count, batch, rounds = sys.argv[1:7]
    main(mode, host, int(port), int(count), int(batch), int(rounds))
