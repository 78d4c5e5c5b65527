"""Validation after every export: the exported artefact against the PyTorch routed model, task by task.

The reference is the routed model as loaded (MoORELinear layers, float32), not the
export wrapper's op, so a wrong fold of the Householder chain or the task router is
caught. Graphs exported with a cache (a decoder's, an encoder-decoder's decoder) are checked
on a prefill from an empty cache and on one decoding step fed the reference's cache. Outputs are grouped for the
report (``present`` = every cache tensor).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import MoorizeError
from .graphs import ExportGraph, Routed

# |got - ref| <= atol + rtol * max|ref| per output. Float32 rounding grows with the output's scale: on
# SmolLM2's logits (|max| ~30) PyTorch float32 itself is ~1e-4 off a float64 run, and ONNX Runtime likewise.
TOLERANCES = {"float32": (1e-4, 1e-5), "float16": (1e-3, 5e-2)}


def default_atol(dtype: str, atol: float | None = None) -> float:
    """The user's ``--atol`` when given, else the dtype's default."""
    return TOLERANCES[dtype][0] if atol is None else atol


@dataclass
class Validation:
    """Per task and output group: the max abs difference and the worst |diff| / tolerance (<= 1 passes).

    An output passes when max |got - ref| <= atol + rtol * max |ref|.
    """

    backend: str
    atol: float
    rtol: float
    dtype: str = "float32"
    diffs: dict[str, dict[str, float]] = field(default_factory=dict)
    ratios: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def worst(self) -> float:
        return max((d for per in self.diffs.values() for d in per.values()), default=0.0)

    @property
    def ok(self) -> bool:
        return all(q <= 1.0 for per in self.ratios.values() for q in per.values())  # NaN fails

    def tolerance(self) -> str:
        return f"atol {self.atol:g} + rtol {self.rtol:g}·max|ref|"

    def lines(self) -> list[str]:
        out = [f"validation ({self.backend} vs PyTorch, max abs difference; tolerance {self.tolerance()}):"]
        for task, per in self.diffs.items():
            out.append(f"  task {task}: " + ", ".join(f"{k} {v:.2e} ({self.ratios[task][k]:.2f} of tolerance)"
                                                      for k, v in per.items()))
        return out

    def to_dict(self) -> dict:
        return {"backend": self.backend, "atol": self.atol, "rtol": self.rtol, "dtype": self.dtype,
                "max_abs_diff": self.diffs, "worst_ratio": self.ratios}


def _group(name: str) -> str:
    return "present" if name.startswith("present.") else name


@dataclass
class References:
    """What the reference model gave, task by task: each step's inputs and outputs. Computed before the
    artefact is run, so the PyTorch model can be released first (its weights and the runtime's copy of
    them need not be resident together)."""

    output_names: list[str]
    input_names: list[str]
    steps: dict[str, list[tuple[list[torch.Tensor], list[torch.Tensor]]]] = field(default_factory=dict)


def references(graph: ExportGraph, routed: Routed, tokenizer) -> References:
    """The reference outputs for every task: a prefill (3 rows × 5 tokens, not the traced shapes) and,
    with a cache, one decoding step fed the prefill's reference cache (``graph.next_step``)."""
    from ..model.routed import use_task

    out = References(list(graph.output_names), list(graph.input_names))
    at = graph.input_names.index("task_ids")
    for t, task in enumerate(routed.tasks):
        args = graph.sample_inputs(tokenizer, batch=3, seq=5)
        args = (*args[:at], torch.full_like(args[at], t), *args[at + 1:])
        steps, step = [], args
        while step is not None:
            with torch.no_grad(), use_task(routed.model, step[at]):
                ref = graph(*step)
            ref = list(ref) if isinstance(ref, (tuple, list)) else [ref]
            steps.append((list(step), ref))
            step = graph.next_step(step, ref) if len(steps) < 2 else None
        out.steps[task] = steps
    return out


def merged(validations: Sequence[Validation]) -> Validation:
    """One report of several graphs of one export (an encoder-decoder's two), task by task."""
    out = validations[0]
    for v in validations[1:]:
        for task in v.diffs:
            out.diffs.setdefault(task, {}).update(v.diffs[task])
            out.ratios.setdefault(task, {}).update(v.ratios[task])
    return out


def compare(refs: References, run: Callable[[Sequence[torch.Tensor]], list], backend: str, atol: float,
            dtype: str = "float32", rtol: float | None = None) -> Validation:
    """Run the exported artefact (``run``: tensors in, arrays out) on the references' inputs."""
    tdtype = getattr(torch, dtype)
    if rtol is None:
        rtol = TOLERANCES[dtype][1]
    report = Validation(backend, atol, rtol, dtype)
    for task, steps in refs.steps.items():
        diffs: dict[str, float] = {}
        ratios: dict[str, float] = {}
        for step, ref in steps:
            try:
                got = run([x.to(tdtype) if x.is_floating_point() else x for x in step])
            except Exception as e:  # the runtime refuses the graph it was given (a node it cannot execute)
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise MoorizeError(f"validation failed: {backend} cannot run the exported graph: {first}; nothing "
                                   "was written") from e
            for name, r, g in zip(refs.output_names, ref, got):
                g, r = torch.as_tensor(np.asarray(g)).double(), r.double()
                if tuple(g.shape) != tuple(r.shape):
                    raise MoorizeError(f"{backend}: output {name} has shape {list(g.shape)}, PyTorch gives "
                                       f"{list(r.shape)}")
                if not r.numel():
                    continue
                d = float((g - r).abs().max())
                q = d / (atol + rtol * float(r.abs().max())) if atol or rtol else (0.0 if d == 0 else float("inf"))
                key = _group(name)
                diffs[key] = max(diffs.get(key, 0.0), d)
                ratios[key] = max(ratios.get(key, 0.0), q) if q == q else float("nan")
        report.diffs[task], report.ratios[task] = diffs, ratios
    if not report.ok:
        bad = [f"{task}/{k} {report.diffs[task][k]:.2e}" for task, p in report.ratios.items()
               for k, q in p.items() if not q <= 1.0]
        raise MoorizeError(f"validation failed: {backend} differs from PyTorch by more than {report.tolerance()} "
                           f"({', '.join(bad[:4])}); nothing was written")
    return report


def validate(graph: ExportGraph, routed: Routed, tokenizer, run: Callable[[Sequence[torch.Tensor]], list],
             backend: str, atol: float, dtype: str = "float32", rtol: float | None = None) -> Validation:
    """The exported artefact against the reference for every task (both in memory at once)."""
    return compare(references(graph, routed, tokenizer), run, backend, atol, dtype, rtol)
