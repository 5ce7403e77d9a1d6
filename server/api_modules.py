"""API modules: Python source the server ships to every client at connect.

The server never runs an API module; it checks that the source compiles, that ``__all__`` (when
present) is a literal list of names the module defines, and ships the text. The client executes
it in a fresh module namespace (see ``mzconnector``), so a client on another Python minor version
works. Where an entry names an importable module instead of a file, its source file is shipped.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

from mzconnector import API_PROVIDED, ApiModule

from .errors import ConfigError


def load_api_module(ref: str, base_dir: Path, *, source: str, key: str) -> ApiModule:
    """Read and check one API module: a path (relative to ``base_dir``) or a module name."""
    path = _resolve(ref, base_dir, source=source, key=key)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(source, key, f"cannot read API module {str(path)!r}: {exc}") from None
    try:
        tree = ast.parse(text, filename=str(path))
    except SyntaxError as exc:
        raise ConfigError(
            source, key, f"API module {str(path)!r} does not compile: {exc}"
        ) from None
    _check_all(tree, path, source=source, key=key)
    return ApiModule(name=path.stem, source=text)


def exported_names(module: ApiModule) -> list[str]:
    """The names a module will expose, read from its source (its ``__all__``, or else its
    public top-level definitions), so that clashes between modules are found at start-up."""
    tree = ast.parse(module.source)
    declared = _literal_all(tree)
    if declared is not None:
        return declared
    return [
        n for n in _defined(tree, imports=False) if not n.startswith("_") and n not in API_PROVIDED
    ]


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


def _literal_all(tree: ast.Module) -> list[str] | None:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            value = ast.literal_eval(node.value)
            return list(value)
    return None


def _check_all(tree: ast.Module, path: Path, *, source: str, key: str) -> None:
    try:
        declared = _literal_all(tree)
    except ValueError:
        raise ConfigError(
            source, key, f"{path.name}: __all__ must be a literal list of names"
        ) from None
    if declared is None:
        return
    if not all(isinstance(n, str) for n in declared):
        raise ConfigError(source, key, f"{path.name}: __all__ must list names (strings)")
    missing = [n for n in declared if n not in _defined(tree, imports=True)]
    if missing:
        raise ConfigError(
            source, key, f"{path.name}: __all__ lists {missing}, which the module does not define"
        )


def _defined(tree: ast.Module, *, imports: bool) -> list[str]:
    names: list[str] = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.append(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                names.extend(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
        elif imports and isinstance(node, (ast.Import, ast.ImportFrom)):
            names.extend((a.asname or a.name).split(".")[0] for a in node.names)
    return names
