"""moorize's own JSON files (moorize.json, adapter_config.json, moorize_export.json): one reader.

Each carries ``format`` and ``format_version``; readers refuse a file they do not
know rather than misread it (docs/FORMAT.md, "Versioning"). No torch import here, so
the ONNX Runtime serving path stays light.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from ..errors import MoorizeError


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


MAX_RECORD_CHARS = 16 << 20  # one JSONL line or CSV field: far beyond any --max-length, bounded in memory


def jsonl_records(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) of every non-blank line; invalid JSON is an error naming file:line.

    Lines are read with a bound (``MAX_RECORD_CHARS``): a huge line is refused without being held.
    """
    with open(path, encoding="utf-8") as fh:
        lineno = 0
        while True:
            line = fh.readline(MAX_RECORD_CHARS + 1)
            if not line:
                return
            lineno += 1
            if len(line) > MAX_RECORD_CHARS:
                raise MoorizeError(f"{path}:{lineno}: line longer than {MAX_RECORD_CHARS >> 20} MiB characters; "
                                   "split the example or shorten it")
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise MoorizeError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            except RecursionError:
                raise MoorizeError(f"{path}:{lineno}: invalid JSON (nested too deeply)") from None
