"""Which dimension of a MoORE layer's input holds the batch's rows: what routing by task needs to know.

Task routing gives each row of a batch its task's gates, and a layer finds the rows in its input's
first dimension: true of nearly every model, whose layers take [batch, sequence, features]. A few
take [sequence, batch, features] (FSMT; LED's and Longformer's attention projections; XLNet),
and sparse-MoE experts kept as one module per expert (Switch Transformers, NLLB-MoE) take a subset
of the batch's tokens, whose rows no shape can place. With one task none of this matters; with
several, a layer that routed the wrong dimension would mix tasks silently. So when a routed
model has several tasks it is probed once at load: a small forward (2 rows of 3 tokens, an
encoder-decoder's target of 5) records each layer's input shape, and a layer whose rows are its
second dimension is marked so (``MoORELinear.row_dim``). Expert modules are recognised by their
place (a module named ``experts`` that moorize does not route itself) and marked ``token_subset``:
they route a batch whose rows share one task, and refuse mixed rows in one line.
"""

from __future__ import annotations

import logging

import torch

from ..compat import text_config
from .routing import use_task

log = logging.getLogger(__name__)

ROWS, SOURCE, TARGET = 2, 3, 5  # distinct sizes, so no dimension is mistaken for another


def expert_module_layers(model) -> list[str]:
    """Module paths of the MoORE layers inside per-expert modules (``...experts.<expert>.<projection>``) that
    moorize's sparse-MoE routing (``moorize.model.experts``, 3-D expert tensors) does not drive."""
    from .experts import _ROUTED_CLASSES

    routed = tuple(_ROUTED_CLASSES.values())
    out = []
    for path in model.moore.layer_paths.values():
        parts = path.split(".")
        for i, part in enumerate(parts[:-1]):
            if part == "experts" and not isinstance(model.get_submodule(".".join(parts[: i + 1])), routed):
                out.append(path)
                break
    return out


def probe_inputs(model) -> dict | None:
    """Token inputs for the probe forward (None: the model does not take token ids; its rows stay first)."""
    if getattr(model, "main_input_name", "input_ids") != "input_ids":
        return None
    device = next(model.parameters()).device
    vocab = text_config(model.config).vocab_size
    ids = (torch.arange(ROWS * SOURCE, device=device).reshape(ROWS, SOURCE) % max(vocab - 3, 1)) + min(3, vocab - 1)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if model.config.is_encoder_decoder:
        inputs["decoder_input_ids"] = ids.new_full((ROWS, TARGET), int(ids[0, 0]))
    return inputs


def time_major_layers(model, skip: set[str]) -> list[str]:
    """Module paths of the layers whose input is [sequence, batch, ...], from one small forward (layers it does
    not reach, or a forward that fails, keep rows first: the probe never refuses a model)."""
    inputs = probe_inputs(model)
    if inputs is None:
        return []
    shapes: dict[str, tuple] = {}

    def record(path: str):
        def hook(module, args) -> None:  # returns None: the layer's inputs stay as they are
            shapes.setdefault(path, tuple(args[0].shape))
        return hook

    hooks = [model.get_submodule(path).register_forward_pre_hook(record(path))
             for path in model.moore.layer_paths.values() if path not in skip]
    try:
        with torch.no_grad(), use_task(model, torch.zeros(1, dtype=torch.long)):
            model(**inputs)
    except Exception as e:  # a model the generic inputs do not fit: the layers it reached are classified
        log.debug("row-layout probe of %s stopped: %s", model.config.model_type, e)
    finally:
        for hook in hooks:
            hook.remove()
        for path in model.moore.layer_paths.values():  # the probe's folded weights: a model's size, unused
            model.get_submodule(path).release_caches()
    # any length first (LED pads its input to a multiple of its attention window), then the rows
    return [path for path, shape in shapes.items() if len(shape) >= 3 and shape[0] != ROWS and shape[1] == ROWS]


def mark_row_layouts(model) -> None:
    """Mark the layers of a routed model with several tasks whose rows are not their input's first dimension."""
    if len(model.moore.config.tasks) < 2:
        return
    experts = expert_module_layers(model)
    for path in experts:
        model.get_submodule(path).token_subset = model.config.model_type
    for path in time_major_layers(model, set(experts)):
        model.get_submodule(path).row_dim = 1
