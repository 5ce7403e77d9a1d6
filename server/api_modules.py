"""API modules: Python source the server ships to every client at connect.

The server never runs an API module; it checks that the source compiles and that what it
exports follows the rule both sides apply (``mzconnector.api_exports``), and ships the text.
The client executes it in a fresh module namespace (see ``mzconnector``), so a client on
another Python minor version works. Where an entry names an importable module instead of a
file, its source file is shipped.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from mzconnector import ApiModule, MZConnectorError, api_exports

from .errors import ConfigError


def load_api_module(ref: str, base_dir: Path, *, source: str, key: str) -> ApiModule:
    """Read and check one API module: a path (relative to ``base_dir``) or a module name."""
    path = _resolve(ref, base_dir, source=source, key=key)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(source, key, f"cannot read API module {str(path)!r}: {exc}") from None
    try:
        api_exports(text, path.name)  # parses it: nothing of it runs here
    except SyntaxError as exc:
        raise ConfigError(
            source, key, f"API module {str(path)!r} does not compile: {exc}"
        ) from None
    except MZConnectorError as exc:
        raise ConfigError(source, key, str(exc)) from None
    return ApiModule(name=path.stem, source=text)


def _resolve(ref: str, base_dir: Path, *, source: str, key: str) -> Path:
    if ref.endswith(".py") or "/" in ref or "\\" in ref:
        path = (base_dir / ref).resolve()
        if not path.is_file():
            raise ConfigError(source, key, f"API module file {str(path)!r} does not exist")
        return path
    try:
        spec = importlib.util.find_spec(ref)
    except (ImportError, ValueError) as exc:
        raise ConfigError(source, key, f"cannot find API module {ref!r}: {exc}") from None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        raise ConfigError(source, key, f"cannot find the source of API module {ref!r}")
    return Path(spec.origin)
