"""Where torch and transformers differ across the supported range, the one place that knows.

The range is pyproject.toml's: torch >= 2.9.1, transformers >= 5.3. CI tests it at the minimums, in
its pinned environment and on the newest torch (docs/GUARANTEES.md, "Supported versions"). Each function names the
versions that need its other path, so a path can be dropped once the minimum passes them.
"""

from __future__ import annotations

import inspect
import re

import torch


def version_tuple(text: str) -> tuple[int, ...]:
    """'2.11.0+cu130' -> (2, 11, 0): the release numbers only (local builds and pre-releases dropped)."""
    return tuple(int(n) for n in re.findall(r"\d+", text.split("+")[0])[:3])


TORCH = version_tuple(torch.__version__)


def export_program(module: torch.nn.Module, args: tuple, dynamic_shapes):
    """torch.export.export of an export graph, strict first.

    A violated constraint that torch can name a fix for (a dim's bound the model's code sets, as
    M2M100's sinusoidal table caps the decoder's positions) is retried with the dims it suggests:
    the bound lives only in the trace, the ONNX graph keeps symbolic dims.

    torch 2.10 to 2.12 cannot prove ``min(12*s, 24*s) == 12*s`` for the sequence dim (a stride check
    in the reshape of transformers' ``repeat_kv`` on a transposed key) and raise a constraint
    violation for a graph without a cache. There the trace is redone with such guards deferred to
    runtime asserts (this one holds for every length; ONNX keeps none). 2.9 and 2.13+ trace
    strictly, so any other violation still surfaces.

    torch 2.9 writes the input guards of a ``*past`` signature with names its own guard function
    cannot resolve (``NameError: L`` when the ONNX exporter runs it); those guards only repeat
    the dynamic-shape spec, so they are dropped there.
    """
    from torch.export.dynamic_shapes import refine_dynamic_shapes_from_suggested_fixes
    from torch.fx.experimental.symbolic_shapes import ConstraintViolationError

    violations = (ConstraintViolationError, torch._dynamo.exc.UserError)
    try:
        program = torch.export.export(module, args, dynamic_shapes=dynamic_shapes)
    except violations as e:
        if "Constraints violated" not in str(e):
            raise
        try:  # a bound the model's code sets (a position table's size): narrow the dims to it, as torch suggests
            program = torch.export.export(module, args, dynamic_shapes=refine_dynamic_shapes_from_suggested_fixes(
                _suggested_fixes(str(e)), dynamic_shapes))
        except (*violations, ValueError):  # no fix torch can name (ValueError: none it can parse)
            program = torch.export.export(module, args, dynamic_shapes=dynamic_shapes,
                                          prefer_deferred_runtime_asserts_over_guards=True)
    if TORCH[:2] == (2, 9):
        program._guards_code = []
    return program


def _suggested_fixes(message: str) -> str:
    """The "Suggested fixes:" block of a constraint violation, alone (torch's parser reads nothing else), when
    every fix is a bound: one that fixes a dim to a constant would trace a graph that takes one length only."""
    lines = message.splitlines()
    at = next((i for i, line in enumerate(lines) if line.strip() == "Suggested fixes:"), None)
    if at is None:
        raise ValueError("no suggested fixes")
    fixes = []
    for line in lines[at + 1:]:
        if " = " not in line:
            break
        if not line.split(" = ", 1)[1].startswith("Dim("):  # a constant or another dim's multiple: not a bound
            raise ValueError(f"a fix that is not a bound: {line.strip()}")
        fixes.append(line)
    return "\n".join(["Suggested fixes:", *fixes])


def cache_keyword(model) -> str:
    """The name of the forward's KV-cache argument, and of the output that returns it: ``cache`` from
    transformers 5.2x on (where ``past_key_values`` is deprecated, to be removed in 5.40), ``past_key_values``
    before. Read from the forward's signature, so it follows whichever transformers is installed."""
    forward = type(getattr(model, "_orig_mod", model)).forward
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def text_config(config):
    """The decoder's own config: a vision-language or other composite config nests it (``text_config``)."""
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def dynamic_cache(pairs: list[tuple[torch.Tensor, torch.Tensor]], config):
    """A transformers DynamicCache holding (keys, values) per layer, as every 5.x release builds one.

    Every layer keeps every position, its sliding-window layers too: their attention masks apply the window
    (transformers builds a sliding mask from the config whatever the cache holds), and the cache stays one
    dynamic length for all layers, which torch.export can trace (a sliding layer's cache, trimmed to its
    window, ties the past length to the window in guards it cannot prove)."""
    from transformers import DynamicCache

    text = text_config(config)
    types = getattr(text, "layer_types", None) or ()
    sliding = any("sliding" in str(t) for t in types) or getattr(text, "sliding_window", None) is not None
    return DynamicCache(ddp_cache_data=pairs, config=None if sliding else config)
