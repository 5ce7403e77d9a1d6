"""Print pip constraints that pin every dependency of the project and its ``test`` extra to the
lowest version pyproject.toml allows (``name>=X`` -> ``name==X``), so that CI also runs the
suite against the oldest versions we claim to support."""

from __future__ import annotations

import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

BOUND = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*>=\s*([^,;\s]+)")


def main() -> int:
    project = tomllib.loads(Path(sys.argv[1]).read_text())["project"]
    requirements = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    pins: dict[str, str] = {}
    for requirement in requirements:
        match = BOUND.match(requirement)
        if match is None:
            print(f"no lower bound in {requirement!r}", file=sys.stderr)
            return 1
        name = re.sub(r"[-_.]+", "-", match.group(1)).lower()  # PEP 503: pytest_trio = pytest-trio
        if name != "mzconnector":  # our own extras, e.g. "mzconnector[notebook]"
            pins[name] = match.group(2)
    for name, version in sorted(pins.items()):
        print(f"{name}=={version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
