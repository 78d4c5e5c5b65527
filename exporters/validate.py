"""Validation after every export: the exported artefact against the PyTorch routed model, task by task.

The reference is the routed model as loaded (MoORELinear layers, float32), not the
export wrapper's op, so a wrong fold of the Householder chain or the task router is
caught. Decoders exported with a cache are checked on a prefill from an empty cache
and on one decoding step fed the reference's cache. Outputs are grouped for the
report (``present`` = every cache tensor).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import MoorizeError
from .graphs import ExportGraph, Routed, sample_inputs

FP32_ATOL = 1e-4
FP16_ATOL = 5e-2  # relative to the largest reference magnitude of each output (see default_atol)


def default_atol(dtype: str) -> float:
    return FP32_ATOL if dtype == "float32" else FP16_ATOL


@dataclass
class Validation:
    """Max abs difference per task and output group, and whether all stayed within ``atol``."""

    backend: str
    atol: float
    relative: bool  # fp16: differences are divided by the output's largest reference magnitude
    diffs: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def worst(self) -> float:
        return max((d for per in self.diffs.values() for d in per.values()), default=0.0)

    @property
    def ok(self) -> bool:
        return all(d <= self.atol for per in self.diffs.values() for d in per.values())  # NaN fails

    def lines(self) -> list[str]:
        kind = "max rel. difference" if self.relative else "max abs difference"
        out = [f"validation ({self.backend} vs PyTorch, {kind}, atol {self.atol:g}):"]
        for task, per in self.diffs.items():
            out.append(f"  task {task}: " + ", ".join(f"{k} {v:.2e}" for k, v in per.items()))
        return out

    def to_dict(self) -> dict:
        return {"backend": self.backend, "atol": self.atol, "relative": self.relative, "max_abs_diff": self.diffs}


def _group(name: str) -> str:
    return "present" if name.startswith("present.") else name


def validate(graph: ExportGraph, routed: Routed, tokenizer, run: Callable[[Sequence[torch.Tensor]], list],
             backend: str, atol: float, dtype: str = "float32") -> Validation:
    """Run the exported artefact (``run``: tensors in, arrays out) against the reference for every task."""
    from ..routed import use_task

    tdtype = getattr(torch, dtype)
    relative = dtype != "float32"
    report = Validation(backend, atol, relative)
    names = graph.output_names
    for t, task in enumerate(routed.tasks):
        per: dict[str, float] = {}
        args = sample_inputs(routed, tokenizer, graph.with_past, batch=3, seq=5)  # not the traced shapes
        args = (args[0], args[1], torch.full_like(args[2], t), *args[3:])
        steps = [args]
        if graph.with_past:
            steps.append(None)  # the decoding step, built from the prefill's reference cache
        for step in steps:
            if step is None:
                nxt = prev_logits[:, -1].argmax(-1, keepdim=True)
                step = (nxt, torch.ones(nxt.shape[0], args[1].shape[1] + 1, dtype=torch.long), args[2], *prev_cache)
            with torch.no_grad(), use_task(routed.model, step[2]):
                ref = graph(*step)
            ref = list(ref) if isinstance(ref, (tuple, list)) else [ref]
            feed = [x.to(tdtype) if x.is_floating_point() else x for x in step]
            got = run(feed)
            for name, r, g in zip(names, ref, got):
                g = torch.as_tensor(np.asarray(g)).float()
                if tuple(g.shape) != tuple(r.shape):
                    raise MoorizeError(f"{backend}: output {name} has shape {list(g.shape)}, PyTorch gives "
                                       f"{list(r.shape)}")
                d = float((g - r.float()).abs().max()) if r.numel() else 0.0
                if relative:
                    d /= max(float(r.abs().max()), 1e-6)
                per[_group(name)] = max(per.get(_group(name), 0.0), d) if d == d else float("nan")
            prev_logits, prev_cache = ref[0], ref[1:]
        report.diffs[task] = per
    if not report.ok:
        bad = [f"{task}/{k} {v:.2e}" for task, p in report.diffs.items() for k, v in p.items() if not v <= atol]
        raise MoorizeError(f"validation failed: {backend} differs from PyTorch by more than atol {atol:g} "
                           f"({', '.join(bad[:4])}); nothing was written")
    return report
