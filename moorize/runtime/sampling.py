"""Choosing the next token from logits: greedy, or nucleus sampling; the sampling settings checked."""

from __future__ import annotations

import math

import numpy as np

from ..errors import MoorizeError


def finite(x) -> bool:
    return isinstance(x, (int, float, np.floating)) and not isinstance(x, bool) and math.isfinite(x)



def check_sampling(do_sample: bool, temperature, top_p, seed) -> None:
    """Sampling settings a generation can use, or one line saying which is wrong."""
    if do_sample and not (finite(temperature) and temperature > 0 and finite(top_p) and 0 < top_p <= 1):
        raise MoorizeError(f"sampling needs a finite temperature > 0 and 0 < top_p <= 1, got temperature "
                           f"{temperature!r}, top_p {top_p!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise MoorizeError(f"seed must be a non-negative integer, got {seed!r}")


def sample_nucleus(logits: np.ndarray, rng, temperature: float, top_p: float) -> np.ndarray:
    """Nucleus sampling per row: the smallest set of tokens whose probability reaches top_p."""
    z = logits / temperature
    z = z - z.max(-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(-1, keepdims=True)
    out = np.empty(p.shape[0], dtype=np.int64)
    for r in range(p.shape[0]):
        order = np.argsort(-p[r])
        cum = np.cumsum(p[r, order])
        keep = order[: int(np.searchsorted(cum, top_p)) + 1]
        q = p[r, keep] / p[r, keep].sum()
        out[r] = keep[rng.choice(len(keep), p=q)]
    return out
