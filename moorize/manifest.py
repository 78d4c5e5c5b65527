"""moorize's own JSON files (moorize.json, adapter_config.json, moorize_export.json): one reader.

Each carries ``format`` and ``format_version``; readers refuse a file they do not
know rather than misread it (docs/FORMAT.md, "Versioning"). No torch import here, so
the ONNX Runtime serving path stays light.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import MoorizeError


def read_versioned_json(path: Path, fmt: str, version: int, what: str) -> dict:
    """One of moorize's JSON files (moorize.json, adapter_config.json, moorize_export.json), its
    ``format`` and ``format_version`` checked: readers refuse what they do not know."""
    try:
        meta = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MoorizeError(f"{path} is unreadable: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise MoorizeError(f"{path} is not a {what}")
    if meta.get("format_version") != version:
        raise MoorizeError(f"{path} has format version {meta.get('format_version')}; this moorize reads {what} "
                           f"version {version}")
    return meta
