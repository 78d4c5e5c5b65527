"""Hugging Face directory helpers: the files that travel with a model, and the model class of a config."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt", ".onnx", ".onnx_data")


def copy_aux_files(src: Path, dest: Path) -> list[str]:
    """Copy config, tokenizer and generation files (every top-level non-weight file)."""
    copied = []
    for f in sorted(src.iterdir()):
        if not f.is_file() or f.name.endswith(WEIGHT_SUFFIXES) or f.name.endswith(".index.json"):
            continue
        shutil.copy2(f, dest / f.name)
        copied.append(f.name)
    return copied


def model_class(config):
    """The transformers class named in config.architectures (AutoModel mapping as fallback)."""
    return _model_class(config)


def _model_class(config):
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModel._model_mapping[type(config)]


EXPERT_TENSORS = ("gate_up_proj", "up_proj", "down_proj")  # the 3-D tensors of transformers' experts modules


def is_experts_module(module) -> bool:
    """A module implementing transformers' experts interface (its flags say how to apply its 3-D tensors)."""
    return hasattr(module, "is_transposed") and hasattr(module, "has_gate")


def checkpoint_name(module_path: str, prefix: str, names) -> str | None:
    """The spelling of a module path (or state-dict key) that ``names`` uses, if any.

    Checkpoints of the same architecture differ by the base model prefix: BERT's
    ``encoder.layer.0`` may be stored as ``bert.encoder.layer.0`` and vice versa.
    """
    spellings = [module_path]
    if prefix and module_path.startswith(prefix + "."):
        spellings.append(module_path[len(prefix) + 1:])
    elif prefix:
        spellings.append(f"{prefix}.{module_path}")
    return next((s for s in spellings if s in names), None)


def module_paths(model, names) -> tuple[dict[str, str], list[str]]:
    """Where each of ``names`` (checkpoint spellings of module paths) is in ``model``: ({name: module path},
    the names found nowhere). The first module path whose spelling is the name wins."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    found: dict[str, str] = {}
    for path, _ in model.named_modules():
        name = checkpoint_name(path, prefix, names)
        if name is not None and name not in found:
            found[name] = path
    return found, [n for n in names if n not in found]


@contextlib.contextmanager
def quiet_progress():
    """transformers' own progress bars off for the block (and back as they were after it).

    Most of them obey transformers' switch; the GGUF reader calls tqdm directly, so its module's tqdm is
    swapped for a disabled one while the block runs.
    """
    import functools
    import importlib

    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        gguf_utils = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    except ImportError:
        gguf_utils = None
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is not None:
        gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        if bar is not None:
            gguf_utils.tqdm = bar
        if was:
            hf_logging.enable_progress_bar()
