"""The export directory's own description, ``moorize_export.json``: its name, format and version, and
the checked read the runtime starts from. The exporters write it (``moorize.exporters.metadata``)."""

from __future__ import annotations

from pathlib import Path

from ..errors import MoorizeError
from ..io.jsonfiles import read_versioned_json

META_FILE = "moorize_export.json"
EXPORT_FORMAT = "moorize.export"
EXPORT_VERSION = 1


def read_export_meta(directory: Path) -> dict:
    path = directory / META_FILE
    if directory.is_file():
        raise MoorizeError(f"{directory} is a file: give the export directory (moorize export --onnx DIR)")
    if not directory.is_dir():
        raise MoorizeError(f"export directory {directory} does not exist")
    if not path.is_file():
        raise MoorizeError(f"{directory} is not a moorize export: {META_FILE} is missing")
    return read_versioned_json(path, EXPORT_FORMAT, EXPORT_VERSION, "moorize export")
