"""Helpers shared by tests (and the benchmarks): one copy each, kept out of the library."""

from __future__ import annotations

import torch
from torch import nn

from moorize.model.layer import layer_trainable, moore_layers


def perturb(model: nn.Module, scale: float = 0.05, seed: int = 1) -> None:
    """Give every router and Householder vector non-trivial values (as training would), so every task differs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in moore_layers(model).values():
            for p in layer_trainable(layer).values():
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def randomize_routers(model: nn.Module, seed: int = 0) -> None:
    """Move every router and reflection off its initialisation: a stand-in for a trained adapter in demos,
    tests and benchmarks (task router A ~ N(0, 0.02²), sample router B ~ N(0, 0.002²), Householder vectors
    turned by about a quarter of their entries' scale)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in moore_layers(model).values():
            for name, std in (("task_router", 0.02), ("router_out", 0.002)):
                p = getattr(layer, name, None)
                if p is not None:
                    p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
            if layer.householder is not None:
                layer.householder.add_(torch.randn(layer.householder.shape, generator=g) * 0.25)


def interrupted_run(factored, data, out, monkeypatch, **train_kw):
    """Train until the first checkpoint is saved (``save_every`` steps), then stop as a Ctrl-C would: the
    run directory is left for ``--resume``. Returns that checkpoint's directory."""
    import pytest

    import moorize
    import moorize.training.loop as loop

    real = loop._save_checkpoint

    def save_then_stop(*a, **k):
        real(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "_save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        moorize.train(factored, str(data), out, **train_kw)
    monkeypatch.setattr(loop, "_save_checkpoint", real)
    step = train_kw["save_every"]
    return out.parent / f".{out.name}.moorize-partial" / "checkpoints" / f"step-{step:07d}"
