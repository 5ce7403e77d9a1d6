"""Processor of the reliability workflows (rel_log.toml, rel_flood.toml, rel_storm.toml).

``Rec`` records are appended to the file named by the environment variable ``MZ_REL_LOG`` as
"client seq" lines, each written to the file at once (line buffered), so that a test can
compare what clients had acknowledged with what the workflow processed, even after the server
is killed. A ``Rec`` with a negative ``seq`` makes the processor raise (nothing is written).

``bytes`` records are commands: ``b"flood:COUNT:SIZE"`` sends COUNT records of SIZE bytes back
to the sender; anything else is echoed back.
"""

from __future__ import annotations

import os
from typing import Any, TextIO

_log: TextIO | None = None


def _file() -> TextIO:
    global _log
    if _log is None:
        _log = open(os.environ["MZ_REL_LOG"], "a", buffering=1, encoding="utf-8")  # noqa: SIM115
    return _log


def log(record: Any, ctx: Any) -> None:
    if isinstance(record, bytes):
        if record.startswith(b"flood:"):
            _, count, size = record.split(b":")
            for i in range(int(count)):
                ctx.route("back", b"%08d" % i + bytes(int(size) - 8))
        else:
            ctx.route("back", record)
        return
    if record.seq < 0:
        raise ValueError(f"negative seq {record.seq}")
    _file().write(f"{record.client} {record.seq}\n")
