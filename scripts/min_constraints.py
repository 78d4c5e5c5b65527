"""Print a pip constraints file that pins every declared minimum of pyproject.toml (``name>=X`` becomes
``name==X``): the runtime dependencies and the ``examples`` extra (PEFT). The minimum-versions CI job
installs through it, so what pyproject promises is what that job tests.

    python scripts/min_constraints.py > min.txt && pip install -c min.txt -e '.[test]'
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def minimums(pyproject: Path = PYPROJECT) -> dict[str, str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    out = {}
    for req in project["dependencies"] + project["optional-dependencies"]["examples"]:
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][A-Za-z0-9.]*)\s*(,.*)?", req.strip())
        if not m:
            sys.exit(f"min_constraints: {req!r} has no '>=' lower bound to pin")
        out[m.group(1).lower()] = m.group(2)
    return out


if __name__ == "__main__":
    print("\n".join(f"{name}=={version}" for name, version in minimums().items()))
