"""MoORE layers and the routed model built from a factored checkpoint.

For a target with factors U [m, r], σ [r], Vh [r, n] (and a frozen residual R, bias b):

    y = U · diag(g(x, t)) · Vh · H · x  (+ R x) (+ b)
    g(x, t) = ReLU(σ + A e_t + B (C x))

H = H_k ⋯ H_1 is a chain of Householder reflections acting on the input side, so
span(U), the column space of W, is kept and the experts u_d (Vh H)_dᵀ stay orthogonal.
The reflection vectors start in identical adjacent pairs (H = I), A and B start at
zero, so a freshly loaded model computes exactly W x.

Efficiency (``kernels``): with gradients the layer is one autograd Function with a hand-written
backward, a few big matmuls per pass, the chain in closed form, and the parameter-only work done
once per forward (a gradient checkpoint's recompute takes it again). Without gradients, Vh H and C are folded into one cached weight, so
inference is one matmul for the expert and router inputs; with router 'task' and one task per
batch (known on the host, never read back from a tensor), the task's merged dense matrix
(cached), so it costs what the original layer costs. The sequential per-token formulation is
kept as ``forward_reference``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import MoorizeError
from .config import ROUTER_MODES, ROUTER_NORM_EPS, MoOREConfig  # noqa: F401  (re-exported: where the layer's config lives)
from .kernels import MoOREFunction, distinct, householder_wy, infer, inverse_rms, prepare  # noqa: F401  (re-exported)
from .routers import Router, router_for
from .routing import Routing, RoutingState  # noqa: F401  (re-exported: where the routing state lived)


class MoORELinear(nn.Module):
    """A linear layer as a mixture of orthogonal rank-one experts (see the module docstring)."""

    def __init__(self, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, residual: torch.Tensor | None,
                 bias: torch.Tensor | None, config: MoOREConfig, state: RoutingState, generator=None):
        super().__init__()
        m, r = U.shape
        n = Vh.shape[1]
        self.in_features, self.out_features, self.rank = n, m, r
        self.config = config
        self.state = state
        self.row_dim = 0  # 1 in a model whose layers take [sequence, batch, ...] (``layout``)
        self.token_subset: str | None = None  # the family, inside a per-expert module (it sees some tokens)
        self.router: Router = router_for(config)  # its parameters, gate, merge rule and export inputs
        # The frozen factors are parameters that never train (requires_grad=False), not buffers: FSDP shards
        # parameters across ranks and replicates buffers, and the factors are nearly all of the model's bytes.
        for name, t in (("U", U), ("Vh", Vh), ("residual", residual), ("bias", bias)):
            self.register_parameter(name, None if t is None else nn.Parameter(t, requires_grad=False))
        self.sigma = nn.Parameter(S.clone() if config.train_sigma else S, requires_grad=config.train_sigma)
        pdt = torch.promote_types(U.dtype, torch.float32)  # trainable parts in float32 or wider
        k = config.householder
        if k:
            # Entries of unit variance, not unit norm: a reflection ignores its vector's norm, and Adam moves each
            # coordinate by about lr, so at norm ~sqrt(n) a step turns H by ~lr instead of ~lr * sqrt(n)
            half = torch.randn(k // 2, n, generator=generator, dtype=pdt)
            self.householder = nn.Parameter(half.repeat_interleave(2, dim=0))
        else:
            self.register_parameter("householder", None)
        self.router.create_parameters(self, r, n, pdt, generator)
        self._cache: tuple | None = None  # inference: (key, folded weights)
        self._prepared: tuple | None = None  # training: (key, this forward's kernels.Prepared), until its backward
        self._merged: dict[int, tuple] = {}  # router 'task', inference: task -> (key, dense matrix)

    def release_caches(self) -> None:
        """Drop every weight derived from the parameters (made again when next needed): after a forward whose
        folded or merged weights nothing will reuse, such as the load's row-layout probe."""
        self._cache, self._prepared, self._merged = None, None, {}

    # ---- weights derived from the parameters -----------------------------------------------------
    def _trainables(self) -> list[torch.Tensor]:
        return [p for p in (self.householder, *self.router.parameters(self), self.sigma) if p is not None]

    def _cache_key(self, dtype: torch.dtype) -> tuple:
        """Changes whenever a parameter is updated in place (the optimizer) or replaced, or the dtype changes."""
        return tuple((p.data_ptr(), p._version) for p in self._trainables()) + (self.Vh.data_ptr(), self.Vh.device,
                                                                               dtype)

    def rotated_vh(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Vh H = Vh − ((Vh Y) Tᵀ) Yᵀ, in ``dtype`` (default: float32 or wider)."""
        dt = dtype or torch.promote_types(self.Vh.dtype, torch.float32)
        vh = self.Vh.to(dt)
        if self.householder is None:
            return vh
        Y, T = householder_wy(self.householder.to(dt))
        return vh - ((vh @ Y) @ T.t()) @ Y.t()

    def inference_vh(self) -> torch.Tensor:
        """Vh H for inference and export, rotated in float64 and rounded once to the factors' dtype: the
        rotation's own float32 rounding (it cancels exactly at H = I) would otherwise add to every output."""
        with torch.no_grad():
            return self.rotated_vh(torch.float64).to(self.Vh.dtype)

    def _inference_weights(self, dtype: torch.dtype) -> tuple:
        """(w_in = [Vh H; C], gate table (ReLU'd without a sample router), B (× √n with the norm)) in ``dtype``;
        cached in eval mode until a parameter changes. A compiled graph takes the cache as an eager forward
        left it (it cannot read data pointers; a training forward empties it), else computes them inline."""
        if torch.compiler.is_compiling():
            if self._cache is not None and self._cache[0][-1] == dtype:
                return self._cache[1]
            key = None
        else:
            key = self._cache_key(dtype)
            if self._cache is not None and self._cache[0] == key:
                return self._cache[1]
        with torch.no_grad():
            C, B = self.router.sample_weights(self)
            parts = [self.inference_vh()] + ([C.to(self.Vh.dtype)] if C is not None else [])
            w_in = (torch.cat(parts) if len(parts) > 1 else parts[0]).to(dtype)
            table = self.router.table(self)
            b = None
            if B is not None:
                b = (B * (math.sqrt(self.in_features) if self.router.norm_eps is not None else 1.0)).to(dtype)
            else:
                table = torch.relu(table)
            weights = (w_in, table.to(dtype), b)
        if not self.training and not torch.compiler.is_compiling():
            self._cache = (key, weights)
        return weights

    def _step_weights(self, dtype: torch.dtype):
        """``kernels.Prepared`` for this forward: made by every forward, and taken again by the gradient
        checkpoint's recompute of it (it made them of the same parameters) instead of made twice. They are
        dropped when the layer's backward has run. Nothing else reuses them: parameters can change without
        a version bump (``.data`` writes; foreach updates under a TorchDispatchMode, torch 2.13)."""
        compiling = torch.compiler.is_compiling()
        key = None if compiling else self._cache_key(dtype)
        if (key is not None and self.state.recomputing and self._prepared is not None
                and self._prepared[0] == key):
            return self._prepared[1]
        prepared = prepare(self.Vh, self.householder, *self.router.sample_weights(self), dtype)
        self._prepared = None if compiling else (key, prepared)
        return prepared

    def _merged_for(self, task: int) -> torch.Tensor:
        """Inference with a router that merges (no sample term): one dense matrix per task, cached (dense
        cost per token)."""
        key = (task, self._cache_key(self.Vh.dtype))
        hit = self._merged.get(task)
        if hit is None or hit[0] != key:
            hit = (key, self.merged_weight(task).to(self.Vh.dtype))  # residual included
            if not torch.compiler.is_compiling():
                self._merged[task] = hit
        return hit[1]

    # ---- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.row_dim == 1 and x.dim() > 2:  # [sequence, batch, ...]: route the rows, then put them back
            return self._rows_first(x.transpose(0, 1)).transpose(0, 1).contiguous()  # model code may .view() it
        return self._rows_first(x)

    def _rows_first(self, x: torch.Tensor) -> torch.Tensor:
        if not self.router.task:
            return self.routed(x, None)
        if self.token_subset:
            return self.routed(x, self.state.uniform_routing(x.shape[0], x.device, self.token_subset))
        return self.routed(x, self.state.routing(x.shape[0], x.device))

    def routed(self, x: torch.Tensor, task_ids: Routing | torch.Tensor | None) -> torch.Tensor:
        """The layer with explicit task ids, one per row of ``x``'s first dimension (a sparse-MoE expert
        sees a subset of the batch's tokens, each with its own row's task): a ``Routing`` or a LongTensor."""
        router = self.router
        routing = task_ids
        if isinstance(task_ids, torch.Tensor):
            routing = Routing(task_ids, self.state.uniform_task())
        lead = tuple(x.shape[:-1])
        rows = lead[0] if lead else 1
        per_row = math.prod(lead[1:])
        autocast = torch.is_autocast_enabled(x.device.type)
        dtype = torch.get_autocast_dtype(x.device.type) if autocast else self.Vh.dtype
        uniform = routing.uniform if routing is not None else None
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(rows * per_row, self.in_features).to(dtype)
            residual = None if self.residual is None else self.residual.to(dtype)
            bias = None if self.bias is None else self.bias.to(dtype)
            trainables = self._trainables()
            if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in trainables)):
                y = self._train_forward(x2, routing, per_row, dtype, residual, bias)
            elif router.mergeable and uniform is not None:
                y = x2 @ self._merged_for(uniform).to(dtype).t()
                if bias is not None:
                    y = y + bias
            else:
                w_in, table, b = self._inference_weights(dtype)
                if routing is None or table.shape[0] == 1:
                    gate = table[0]
                elif uniform is not None:
                    gate = table[uniform]
                else:  # per token with a sample router; per batch row without
                    gate = table.index_select(0, routing.token_ids(per_row) if router.sample else routing.ids)
                y = infer(x2, w_in, self.U.to(dtype), gate, b, router.norm_eps, residual, bias)
        y = y.reshape(*lead, self.out_features)
        return y if autocast else y.to(x.dtype)

    def _train_forward(self, x2, routing: Routing | None, per_row: int, dtype, residual, bias) -> torch.Tensor:
        router = self.router
        self._cache = None  # the parameters are about to change: inference weights are made again after
        p = self._step_weights(dtype)
        table = router.table(self).to(dtype)  # with autograd: the kernel returns its gradient
        tasks = table.shape[0]
        # without a sample router the gate is one row per sequence: no per-token [N, r] tensor
        onehot = routing.onehot(per_row if router.sample else 1, tasks, dtype) if tasks > 1 else None
        tensors, aliases = distinct([x2, self.U.to(dtype), self.Vh.to(dtype), residual, bias, self.householder,
                                     *router.sample_weights(self), table, p.w_in, p.q, p.s_neg, p.q32, p.b])
        return MoOREFunction.apply(*tensors, onehot, router.norm_eps,
                                   None if torch.compiler.is_compiling() else self._expire_step_weights, aliases)

    def _expire_step_weights(self) -> None:
        self._prepared = None

    @property
    def weight(self) -> torch.Tensor:
        """What model code reads of a linear layer's weight (dtype, device, shape), without materialising W.

        Some architectures read ``proj.weight.dtype`` to cast their activations (T5's feed-forward);
        the dense matrix does not exist here, so any computation with this stand-in is refused.
        """
        return WeightStandIn.of(self)

    # ---- reference and merging -------------------------------------------------------------------
    def forward_reference(self, x: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The published formulation, in float32 (float64 for a float64 layer): reflections applied to every token."""
        wide = torch.promote_types(self.Vh.dtype, torch.float32)
        xf = x.to(wide)
        if self.householder is not None:
            for u in self.householder.to(wide):
                xf = xf - (xf @ u).unsqueeze(-1) * (u * (2.0 / (u @ u)))
        y = ((xf @ self.Vh.to(wide).t()) * self.gate(x, task_ids)) @ self.U.to(wide).t()
        if self.residual is not None:
            y = y + x.to(wide) @ self.residual.to(wide).t()
        if self.bias is not None:
            y = y + self.bias.to(wide)
        return y

    def gate(self, x: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        """g(x, t) = ReLU(σ + A e_t + B (C x)) (C x / rms(x) with the norm) per token, [*x.shape[:-1], r], in
        float32 or wider, written as published: which experts each token uses, and how much."""
        wide = torch.promote_types(self.Vh.dtype, torch.float32)
        ids = None
        if self.router.task:
            ids = task_ids if task_ids is not None else self.state.current(x.shape[0], x.device)
        return torch.relu(self.router.reference_gate(self, x, ids, wide)).expand(*x.shape[:-1], self.rank)

    @torch.no_grad()
    def merged_weight(self, task: int) -> torch.Tensor:
        """The dense [out, in] matrix of one task (exact for a router that merges, such as 'task'), in float64."""
        return next(self.merged_weights([task]))

    @torch.no_grad()
    def merged_weights(self, tasks):
        """The dense [out, in] matrix of each of ``tasks`` in turn, in float64; the rotation is made once."""
        self.router.check_mergeable()
        table = self.router.table(self, torch.float64)
        vh, U = self.rotated_vh(torch.float64), self.U.double()
        for task in tasks:
            W = (U * torch.relu(table[task if self.router.task else 0])) @ vh
            yield W if self.residual is None else W + self.residual.double()

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}, router={self.router.name}, "
                f"householder={self.config.householder}, residual={self.residual is not None}, "
                f"bias={self.bias is not None}")


class WeightStandIn(torch.Tensor):
    """A [out, in] tensor of the layer's dtype and device that holds no data (one zero, expanded) and
    refuses to be computed with: reading dtype, device, shape or requires_grad works."""

    _ALLOWED = frozenset({torch.Tensor.dtype.__get__, torch.Tensor.device.__get__, torch.Tensor.shape.__get__,
                          torch.Tensor.size, torch.Tensor.dim, torch.Tensor.ndim.__get__,
                          torch.Tensor.is_floating_point, torch.Tensor.requires_grad.__get__,
                          torch.Tensor.is_cuda.__get__, torch.Tensor.is_meta.__get__, torch.Tensor.numel,
                          torch.Tensor.element_size, torch.Tensor.stride, torch.Tensor.__repr__,
                          torch.Tensor.__format__})

    @staticmethod
    def of(layer: "MoORELinear") -> "WeightStandIn":
        base = torch.zeros((), dtype=layer.Vh.dtype, device=layer.Vh.device).expand(layer.out_features,
                                                                                   layer.in_features)
        return base.as_subclass(WeightStandIn)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in cls._ALLOWED:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        raise MoorizeError(f"model code computed with the weight of a MoORE layer ({getattr(func, '__name__', func)}): "
                           "a MoORELinear holds factors, not a dense weight; this architecture needs support "
                           "in moorize (please report it)")


@dataclass
class MoOREState:
    """Everything moorize adds to a transformers model, in one attribute: ``model.moore``.

    The routing state is shared by every MoORE layer of the model; the base fields say which
    factored checkpoint (source weights and layout) the layers came from, so adapters saved
    from the model can be checked against the base they are loaded on.
    """

    config: MoOREConfig
    routing: RoutingState
    layer_paths: dict[str, str]  # layer name (as in moorize.json) -> module path in the model
    base_fingerprint: str
    base_layout_fingerprint: str | None = None
    base_layout: dict | None = None
    base_path: str | None = None

    @property
    def tasks(self) -> dict[str, int]:
        return dict(self.routing.tasks)


def moore_layers(model: nn.Module) -> dict[str, MoORELinear]:
    """Checkpoint layer name -> MoORELinear of a model returned by ``load``."""
    return {name: model.get_submodule(path) for name, path in model.moore.layer_paths.items()}


def layer_trainable(layer: nn.Module) -> dict[str, nn.Parameter]:
    """A MoORE layer's trainable parameters by name: the chain's vectors, its router's, σ when it trains (the
    frozen factors are parameters too, for FSDP)."""
    names = ("householder", *layer.router.parameter_names) + (("sigma",) if layer.config.train_sigma else ())
    return {n: p for n, p in layer.named_parameters() if n in names}


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The MoORE parameters (routers, Householder vectors, σ when enabled) by adapter key."""
    out = {}
    for name, layer in moore_layers(model).items():
        for pname, p in layer_trainable(layer).items():
            out[f"{name}.{pname}"] = p
    return out
