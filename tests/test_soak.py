"""tools/soak.py, briefly: a few seconds of clients that flush, close, lose their sockets and
get killed must end with every acknowledged record processed exactly once; and the checks
must notice a workflow that loses records."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

SOAK = ROOT / "tools" / "soak.py"


def soak(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SOAK), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,  # the script stops by itself; this only keeps a bug from hanging the tests
    )


def summary(stdout: str) -> dict[str, int]:
    """The counts of the summary line, e.g. {"killed": 3, "sockets killed": 9, ...}."""
    match = re.search(
        r"(\d+) client processes \((\d+) killed\), (\d+) sessions "
        r"\((\d+) closed, (\d+) sockets killed\)",
        stdout,
    )
    assert match, stdout
    keys = ["processes", "killed", "sessions", "closed", "sockets killed"]
    return dict(zip(keys, map(int, match.groups())))


@pytest.mark.slow
def test_a_short_soak_loses_nothing() -> None:
    result = soak("--clients", "4", "--seconds", "5", "--kill-every", "0.5")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "soak: OK: every acknowledged record was processed exactly once" in result.stdout
    counts = summary(result.stdout)
    # The run did what it is for: processes killed, sockets killed, sessions closed.
    assert counts["killed"] >= 1
    assert counts["sockets killed"] >= 1
    assert counts["closed"] >= 1
    processed = re.search(r"records: (\d+) processed, (\d+) acknowledged", result.stdout)
    assert processed is not None
    assert int(processed.group(2)) > 1000


@pytest.mark.slow
def test_the_soak_notices_a_workflow_that_loses_records() -> None:
    result = soak("--clients", "2", "--seconds", "2", "--inject-loss", "500")
    kept = re.search(r"soak: kept (\S+)", result.stdout)
    if kept:
        shutil.rmtree(Path(kept.group(1)))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "soak: FAILED" in result.stdout
    assert "acknowledged record(s) not processed" in result.stdout
