"""The optimizer's recipe: the learning rate of each step (warmup, then the schedule) and the AdamW groups."""

from __future__ import annotations

import math
from typing import Callable

import torch

from .options import TrainOptions


def lr_factor(opts: TrainOptions, total: int) -> Callable[[int], float]:
    """The learning-rate multiplier of each step (warmup, then the schedule), for torch's LambdaLR."""
    warm = int(opts.warmup) if opts.warmup >= 1 else round(opts.warmup * total)
    decay_steps = max(1, round(opts.decay * total))
    lo = opts.min_lr_ratio

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        progress = (step - warm) / max(1, total - warm)
        if opts.schedule == "cosine":
            return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if opts.schedule == "linear":
            return lo + (1 - lo) * max(0.0, 1 - progress)
        if opts.schedule == "wsd":  # warmup, stable, then a linear decay over the last `decay` share
            left = total - step
            return 1.0 if left > decay_steps else lo + (1 - lo) * max(0.0, left / decay_steps)
        return 1.0

    return factor



def param_groups(trainable: dict[str, torch.nn.Parameter], opts: TrainOptions, routed) -> list[dict]:
    """AdamW groups: the sample router's parameters (B and C) at lr × sample_router_lr, everything else at lr.
    Adam moves every coordinate by about lr, so B C x moves with k_r · |C x| per step: far more than A e_t does."""
    from ..model.routers import router_for

    names = router_for(routed.moore.config).sample_parameters
    sample, rest = [], []
    for key, p in trainable.items():
        (sample if key.rpartition(".")[2] in names else rest).append(p)
    groups = [{"params": rest, "lr": opts.lr}]
    if sample:
        groups.append({"params": sample, "lr": opts.lr * opts.sample_router_lr})
    return groups
