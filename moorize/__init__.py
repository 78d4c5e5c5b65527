"""moorize: turn a pretrained Hugging Face checkpoint into a Mixture of Orthogonal Rank-one Experts.

The public API is re-exported here and imported on first use, so ``import moorize`` (and
``moorize --help``) stays light: torch and transformers load only when a function that
needs them is touched.

Stages, one subpackage each, imports flowing one way (tests/test_structure.py enforces it):
``io`` (files: safetensors, sources, the factored format, atomic outputs) ←
``conversion`` (targets, SVD, the convert pipeline) and ``model`` (the MoORE layer, routed
models, adapters, heads) ← ``training``; ``exporters`` build on ``model``; ``lora`` writes each task as a PEFT
LoRA adapter; ``runtime`` runs an export
(ONNX Runtime, no torch) for ``moorize run`` and ``serving``; ``cli`` sits on top.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .version import __version__

# public name -> module that defines it
_EXPORTS = {
    "MoorizeError": ".errors",
    "FactoredCheckpoint": ".io.factored", "LayerRecord": ".io.factored",
    "ConvertReport": ".conversion.pipeline", "convert": ".conversion.pipeline", "ConvertOptions": ".conversion.options",
    "MoOREConfig": ".model.layer", "MoORELinear": ".model.layer", "moore_layers": ".model.layer",
    "Router": ".model.routers", "register_router": ".model.routers",
    "load": ".model.routed", "merge": ".model.routed", "prepare_for_training": ".model.routed",
    "use_task": ".model.routed",
    "read_adapter": ".model.adapter", "save_adapter": ".model.adapter",
    "MoOREClassifier": ".model.heads", "TaskHeads": ".model.heads", "load_classifier": ".model.heads",
    "train": ".training.loop", "TrainReport": ".training.loop", "TrainOptions": ".training.options",
    "export_lora": ".lora.export", "LoraReport": ".lora.export", "LoraOptions": ".lora.options",
}
__all__ = [
    "__version__", "MoorizeError", "FactoredCheckpoint", "LayerRecord", "ConvertReport", "convert", "ConvertOptions",
    "MoOREConfig",
    "MoORELinear", "moore_layers", "Router", "register_router", "load", "merge", "prepare_for_training", "use_task", "read_adapter",
    "save_adapter", "MoOREClassifier", "TaskHeads", "load_classifier", "train", "TrainReport", "TrainOptions",
    "export_lora", "LoraReport", "LoraOptions",
]
assert set(__all__) == {"__version__", *_EXPORTS}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'moorize' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # what the lazy names are, for type checkers and IDEs
    from .conversion.options import ConvertOptions
    from .conversion.pipeline import ConvertReport, convert
    from .errors import MoorizeError
    from .io.factored import FactoredCheckpoint, LayerRecord
    from .lora.export import LoraReport, export_lora
    from .lora.options import LoraOptions
    from .model.adapter import read_adapter, save_adapter
    from .model.heads import MoOREClassifier, TaskHeads, load_classifier
    from .model.layer import MoOREConfig, MoORELinear, moore_layers
    from .model.routed import load, merge, prepare_for_training, use_task
    from .model.routers import Router, register_router
    from .training.loop import TrainReport, train
    from .training.options import TrainOptions
