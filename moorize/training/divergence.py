"""A run that diverges stops at that step and publishes nothing: the checks on the loss, the gradient and
the trained tensors."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..errors import MoorizeError


class TrainingDiverged(MoorizeError):
    """A non-finite loss, gradient or parameter: the run stops at that step and publishes nothing."""

def check_finite(step: int, output: Path, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
    """Stop at the step where the loss or the gradient stops being finite (one sync, values already reduced)."""
    values = torch.stack([loss.double()] + ([grad_norm.double()] if grad_norm is not None else []))
    if bool(torch.isfinite(values).all()):
        return
    what = f"the loss is {float(loss)}" if not math.isfinite(float(loss)) else f"the gradient norm is {float(grad_norm)}"
    raise TrainingDiverged(f"training diverged at step {step}: {what}; nothing was written to {output} "
                           "(lower --lr or --sample-router-lr, or keep --max-grad-norm on)")

def check_finite_parameters(tensors: dict[str, torch.Tensor], step: int, output: Path) -> None:
    """Before anything is saved: every trained tensor finite (a checkpoint or adapter of NaNs is garbage)."""
    bad = [k for k, t in tensors.items() if not bool(torch.isfinite(t.detach()).all())]
    if bad:
        raise TrainingDiverged(f"training diverged by step {step}: {len(bad)} trained tensor(s) are not finite "
                               f"({bad[0]}, ...); nothing was written to {output} (lower --lr)")
