"""The routers of a MoORE layer as objects: one class per router mode, each owning its parameters, its gate,
whether the layer merges into one dense matrix per task, what its export op takes, and its adapter keys.

The gate is g(x, t) = ReLU(table[t] + B (C x̂)): ``table`` holds one row per task, σ plus the router's task
term (σ alone, one row, without a task router), and B (C x̂) is the sample router's term per token, x̂ = x or
x / rms(x) (the input norm, part of the sample router). The layer, its kernels, the sparse-MoE experts, the
exporter and the adapter code ask the layer's router (``layer.router``) what to do; none of them tests the
router's name. A new router is one subclass here or anywhere (``register_router``): its table is an ordinary
differentiable function of its parameters, so training (the layer's hand-written backward returns the
table's gradient and autograd carries it on), merge and export follow from it.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from ..errors import MoorizeError
from ..selectors import require_name
from .config import ROUTER_MODES, ROUTER_NORM_EPS, MoOREConfig


class Router:
    """No routing: the gate is ReLU(σ), one row for every task. The base of every router (its defaults say
    'no task term, no sample term')."""

    name: ClassVar[str] = ""
    task: ClassVar[bool] = False  # the gate depends on the row's task: the layer needs task ids
    sample: ClassVar[bool] = False  # the gate depends on each token: B (C x̂)
    task_parameters: ClassVar[tuple[str, ...]] = ()
    sample_parameters: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: MoOREConfig):
        self.config = config

    @property
    def parameter_names(self) -> tuple[str, ...]:
        """The router's parameters as the layer names them (and an adapter keys them, ``<layer>.<name>``)."""
        return self.task_parameters + self.sample_parameters

    def parameters(self, layer: nn.Module) -> list[torch.Tensor]:
        return [getattr(layer, name) for name in self.parameter_names]

    # ---- parameters ------------------------------------------------------------------------------
    def create_parameters(self, layer: nn.Module, rank: int, in_features: int, dtype: torch.dtype,
                          generator=None) -> None:
        """Register the router's parameters on ``layer``, initialised so that the gate starts at ReLU(σ)."""
        self.create_task_parameters(layer, rank, dtype, generator)
        self.create_sample_parameters(layer, rank, in_features, dtype, generator)

    def create_task_parameters(self, layer, rank, dtype, generator) -> None:
        pass

    def create_sample_parameters(self, layer, rank, in_features, dtype, generator) -> None:
        pass

    # ---- the gate --------------------------------------------------------------------------------
    def table(self, layer: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
        """σ + the task term, one row per task ([1, r] without a task router), in ``dtype`` (default float32
        or wider); differentiable in the router's parameters (and σ when it trains)."""
        wide = dtype or torch.promote_types(layer.sigma.dtype, torch.float32)
        return layer.sigma.to(wide).unsqueeze(0)

    def sample_weights(self, layer: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(C [kr, n], B [r, kr]) of the sample router, or (None, None)."""
        return None, None

    @property
    def norm_eps(self) -> float | None:
        """The sample router's input norm: x / sqrt(mean(x²) + eps), or None (x as it comes, or no sample term)."""
        return None

    def reference_gate(self, layer: nn.Module, x: torch.Tensor, task_ids: torch.Tensor | None,
                       wide: torch.dtype) -> torch.Tensor:
        """The gate before its ReLU, per token, written as published (``MoORELinear.forward_reference``)."""
        g = layer.sigma.to(wide)
        if self.task:
            rows = self.table(layer, wide)[task_ids]
            g = rows.reshape(task_ids.shape[0], *([1] * (x.dim() - 2)), -1)
        if self.sample:
            C, B = self.sample_weights(layer)
            xr = x.to(wide)
            if self.norm_eps is not None:
                xr = xr / torch.sqrt(xr.pow(2).mean(-1, keepdim=True) + self.norm_eps)
            g = g + (xr @ C.to(wide).t()) @ B.to(wide).t()
        return g

    # ---- merge -----------------------------------------------------------------------------------
    @property
    def mergeable(self) -> bool:
        """Whether each task is one dense matrix (no term depends on the token)."""
        return not self.sample

    def check_mergeable(self) -> None:
        if not self.mergeable:
            raise MoorizeError(f"router mode {self.name!r} has a sample router: each token gets its own weights, "
                               "so no single dense matrix reproduces it; merge needs router mode 'task'")

    # ---- export ----------------------------------------------------------------------------------
    def export_tensors(self, layer: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor | None]:
        """The op's router inputs (``ai.moorize::MoORELinear``): the gate table, one row per task of the model
        (a runtime gathers the row of each batch row's task id), C and B, and the norm's eps."""
        with torch.no_grad():
            table = self.table(layer).expand(len(self.config.tasks), -1)
            C, B = self.sample_weights(layer)
            eps = self.norm_eps
            return {"gate_table": table.to(dtype).contiguous(),
                    "router_in": None if C is None else C.detach().to(dtype).contiguous(),
                    "router_out": None if B is None else B.detach().to(dtype).contiguous(),
                    "router_eps": None if eps is None else torch.tensor(eps, dtype=dtype)}


class TaskRouter(Router):
    """Router 'task': a learned embedding e_t per task and A [r, d]; the task term is A e_t (A starts at 0)."""

    name = "task"
    task = True
    task_parameters = ("task_embedding", "task_router")

    def create_task_parameters(self, layer, rank, dtype, generator) -> None:
        d = self.config.task_dim
        layer.task_embedding = nn.Parameter(torch.randn(len(self.config.tasks), d, generator=generator,
                                                        dtype=dtype) / math.sqrt(d))
        layer.task_router = nn.Parameter(torch.zeros(rank, d, dtype=dtype))  # A

    def table(self, layer, dtype=None):
        wide = dtype or torch.promote_types(layer.sigma.dtype, torch.float32)
        return torch.addmm(layer.sigma.to(wide), layer.task_embedding.to(wide), layer.task_router.to(wide).t())


class SampleRouter(Router):
    """Router 'sample': B (C x̂) per token, C [kr, n] and B [r, kr] (B starts at 0); x̂ = x / rms(x) with
    ``router_norm`` 'rms', x as published with 'none'."""

    name = "sample"
    sample = True
    sample_parameters = ("router_in", "router_out")

    def create_sample_parameters(self, layer, rank, in_features, dtype, generator) -> None:
        kr = self.config.router_experts
        bound = 1.0 / math.sqrt(in_features)  # Kaiming-uniform with a = sqrt(5), as nn.Linear
        layer.router_in = nn.Parameter((torch.rand(kr, in_features, generator=generator, dtype=dtype) * 2 - 1)
                                       * bound)  # C
        layer.router_out = nn.Parameter(torch.zeros(rank, kr, dtype=dtype))  # B

    def sample_weights(self, layer):
        return layer.router_in, layer.router_out

    @property
    def norm_eps(self):
        return ROUTER_NORM_EPS if self.config.router_norm == "rms" else None


class TaskSampleRouter(TaskRouter, SampleRouter):
    """Router 'task+sample' (the default, as published): both terms, ReLU(σ + A e_t + B (C x̂))."""

    name = "task+sample"


ROUTERS: dict[str, type[Router]] = {}


def register_router(cls: type[Router]) -> type[Router]:
    """Make ``cls`` a router mode (``MoOREConfig(router=cls.name)``, ``moorize train --router``)."""
    if not cls.name:
        raise MoorizeError(f"router class {cls.__name__} has no name")
    ROUTERS[cls.name] = cls
    if cls.name not in ROUTER_MODES:
        ROUTER_MODES.append(cls.name)
    return cls


for _cls in (TaskRouter, SampleRouter, TaskSampleRouter):
    register_router(_cls)


def router_for(config: MoOREConfig) -> Router:
    """The router object of ``config``'s mode."""
    return ROUTERS[require_name("--router", config.router, ROUTERS, noun="router mode")](config)
