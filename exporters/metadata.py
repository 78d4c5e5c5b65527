"""What every export records about itself, in one place for every backend and the runtime.

ONNX exports write it to ``moorize_export.json`` beside the graph; TorchScript and ``.pt2``
files carry the same fields as an extra file inside the archive. The file's name, format and
version are the runtime's (``moorize.runtime.format``), which reads it.
"""

from __future__ import annotations

from ..runtime.format import EXPORT_FORMAT, EXPORT_VERSION, META_FILE  # noqa: F401  (the format the runtime reads)
from ..version import __version__


def common_metadata(backend: str, kind: str, model_type: str, tasks: list[str], labels, inputs: list[str],
                    outputs: list[str], with_past: bool) -> dict:
    """The fields every export shares, whatever its backend: format and version first."""
    return {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_VERSION,
        "moorize_version": __version__,
        "backend": backend,
        "kind": kind,
        "model_type": model_type,
        "tasks": {t: i for i, t in enumerate(tasks)},
        "labels": labels,
        "inputs": inputs,
        "outputs": outputs,
        "with_past": with_past,
    }
