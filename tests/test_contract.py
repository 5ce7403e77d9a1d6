"""What the server takes from the client file is declared there: ``__all__`` (the notebook's
API) and ``__protocol__`` (the protocol core the server speaks through). A name the server
uses that neither list holds is a contract nobody wrote down."""

from __future__ import annotations

import ast

import mzconnector
from tests.conftest import ROOT


def names_the_server_uses() -> dict[str, list[str]]:
    """Name -> the server files that take it from ``mzconnector``."""
    used: dict[str, list[str]] = {}
    for path in sorted((ROOT / "server").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module == "mzconnector":
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.Import):
                assert all(a.name != "mzconnector" for a in node.names), (
                    f"{path.name}: import names from mzconnector, so that this test sees them"
                )
            for name in names:
                used.setdefault(name, []).append(path.name)
    return used


def test_the_server_uses_only_declared_names() -> None:
    declared = set(mzconnector.__all__) | set(mzconnector.__protocol__)
    undeclared = {n: files for n, files in names_the_server_uses().items() if n not in declared}
    assert undeclared == {}


def test_every_declared_name_exists_once() -> None:
    for names in (mzconnector.__all__, mzconnector.__protocol__):
        assert len(names) == len(set(names))
        assert [n for n in names if not hasattr(mzconnector, n)] == []
    assert not set(mzconnector.__all__) & set(mzconnector.__protocol__)


def test_the_test_sees_the_server_s_imports() -> None:
    used = names_the_server_uses()
    assert "session.py" in used.get("Protocol", [])
