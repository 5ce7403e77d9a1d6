"""Loading a workflow's processors: ``path/to/file.py:function`` (relative to the TOML) or
``package.module:function``.

A processor file is imported under a name of its own (``mzworkflow_...``), and the folder it
sits in is searched for the modules it imports: ``import helpers`` finds ``helpers.py`` (or a
package ``helpers/``) beside it. That folder is searched last, after everything on
``sys.path``, so a file there never shadows the standard library or an installed package, and
``sys.path`` itself is left alone.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import re
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import cloudpickle

from .errors import ConfigError


def load_entry(entry: str, base_dir: Path, source: str, key: str) -> Callable[..., Any]:
    """The function an ``entry`` names; a ``ConfigError`` (at ``key``) says why not."""
    target, sep, attr = entry.rpartition(":")
    if not sep or not target or not attr:
        raise ConfigError(source, key, f"{entry!r} is not 'file.py:function' or 'module:function'")
    try:
        if target.endswith(".py") or "/" in target:
            path = (base_dir / target).resolve()
            if not path.is_file():
                raise ConfigError(source, key, f"processor file {str(path)!r} does not exist")
            module = _import_file(path)
        else:
            module = importlib.import_module(target)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(
            source, key, f"cannot import {target!r}: {type(exc).__name__}: {exc}"
        ) from None
    function = getattr(module, attr, None)
    if not callable(function):
        raise ConfigError(source, key, f"{target!r} has no function {attr!r}")
    return function


def _import_file(path: Path) -> ModuleType:
    name = "mzworkflow_" + re.sub(r"\W", "_", str(path.with_suffix("")).lstrip("/"))
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    folders = _WorkflowFolders.install()
    folders.add(path.parent)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    # Objects of classes defined in a workflow's files reach clients that cannot import them.
    for loaded in [module, *folders.loaded()]:
        cloudpickle.register_pickle_by_value(loaded)
    return module


class _WorkflowFolders(importlib.abc.MetaPathFinder):
    """Finds top-level modules in the folders of loaded processor files, after every other
    finder has had its turn."""

    _instance: _WorkflowFolders | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.folders: list[str] = []
        self.found: set[str] = set()

    @classmethod
    def install(cls) -> _WorkflowFolders:
        with cls._lock:
            if cls._instance is None or cls._instance not in sys.meta_path:
                cls._instance = cls()
                sys.meta_path.append(cls._instance)
            return cls._instance

    def add(self, folder: Path) -> None:
        if str(folder) not in self.folders:
            self.folders.append(str(folder))
            importlib.invalidate_caches()

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if path is not None:  # a submodule: its package knows where it is
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, self.folders)
        if spec is not None:
            self.found.add(fullname)
        return spec

    def loaded(self) -> list[ModuleType]:
        """The modules this finder found that are imported now."""
        return [sys.modules[name] for name in sorted(self.found) if name in sys.modules]
