"""The runtime that executes an ONNX export: what ``moorize run`` and ``moorize serve`` share.

``session`` (``MoOREOrtModel``: one ONNX Runtime session for every task, checked inputs, classify),
``generation`` (the KV-cache generation loop), ``sampling`` (greedy and nucleus choice of the next
token), ``limits`` (what the export's config allows), ``providers`` (CPU or CUDA, decided without
torch), ``format`` (the export directory's metadata file). No module here imports torch: a
deployment needs onnxruntime, numpy and (for text) a tokenizer only.
"""

from __future__ import annotations

__all__ = ["MoOREOrtModel", "default_providers"]


def __getattr__(name: str):
    if name == "MoOREOrtModel":
        from .session import MoOREOrtModel

        return MoOREOrtModel
    if name == "default_providers":
        from .providers import default_providers

        return default_providers
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
