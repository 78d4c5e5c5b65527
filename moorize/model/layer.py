"""MoORE layers and the routed model built from a factored checkpoint.

For a target with factors U [m, r], σ [r], Vh [r, n] (and a frozen residual R, bias b):

    y = U · diag(g(x, t)) · Vh · H · x  (+ R x) (+ b)
    g(x, t) = ReLU(σ + A e_t + B (C x))

H = H_k ⋯ H_1 is a chain of Householder reflections acting on the input side, so
span(U), the column space of W, is kept and the experts u_d (Vh H)_dᵀ stay orthogonal.
The reflection vectors start in identical adjacent pairs (H = I), A and B start at
zero, so a freshly loaded model computes exactly W x.

Efficiency: the chain is used in compact WY form (H_k ⋯ H_1 = I − Y Tᵀ Yᵀ). Without
gradients, Vh H and C are folded into one cached weight, so inference is one matmul
for the expert and router inputs. With gradients, the chain is applied on the token
side with thin matmuls (k columns), which never rotates or differentiates the frozen
Vh. With router 'task' and one task per batch, inference uses the task's merged dense
matrix (cached), so it costs what the original layer costs. The sequential per-token
formulation is kept as ``forward_reference``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import MoorizeError
from .config import ROUTER_MODES, ROUTER_NORM_EPS, MoOREConfig  # noqa: F401  (re-exported: where the layer's config lives)


class RoutingState:
    """The task ids of the current forward pass, shared by every MoORE layer of one model."""

    def __init__(self, tasks: list[str]):
        self.tasks = {name: i for i, name in enumerate(tasks)}
        self.task_ids: torch.Tensor | None = None  # this forward's ids
        self.sticky: torch.Tensor | None = None  # ids set for a whole block (generate, use_task)
        self.default: int | None = 0 if len(tasks) == 1 else None

    def task_id(self, task: str | int) -> int:
        if isinstance(task, int):
            if not 0 <= task < len(self.tasks):
                raise MoorizeError(f"task id {task} out of range: the model has {len(self.tasks)} task(s)")
            return task
        if task not in self.tasks:
            raise MoorizeError(f"unknown task {task!r}; tasks are: {', '.join(self.tasks)}")
        return self.tasks[task]

    def resolve(self, task_ids) -> torch.Tensor | None:
        """Validate what the caller passed as ``task_ids`` (ids, names, or None for the default)."""
        if task_ids is None:
            return None
        if isinstance(task_ids, (str, int)):
            task_ids = [task_ids]
        if isinstance(task_ids, (list, tuple)):
            task_ids = torch.tensor([self.task_id(t) for t in task_ids], dtype=torch.long)
        if not isinstance(task_ids, torch.Tensor) or task_ids.dtype not in (torch.int64, torch.int32):
            raise MoorizeError("task_ids must be a LongTensor [batch] of task ids (or a list of task names)")
        task_ids = task_ids.reshape(-1).long()
        if task_ids.numel() and (int(task_ids.min()) < 0 or int(task_ids.max()) >= len(self.tasks)):
            raise MoorizeError(f"task id out of range in {task_ids.tolist()}: the model has {len(self.tasks)} "
                               f"task(s) ({', '.join(self.tasks)})")
        return task_ids

    def current(self, batch: int, device: torch.device) -> torch.Tensor:
        ids = self.task_ids
        if ids is None:
            if self.default is None:
                raise MoorizeError("this model routes by task: pass task_ids= to forward/generate "
                                   f"or call model.set_default_task(name); tasks are: {', '.join(self.tasks)}")
            return torch.full((batch,), self.default, dtype=torch.long, device=device)
        if ids.numel() == batch:
            return ids.to(device)
        if ids.numel() and batch % ids.numel() == 0:  # generate's beam / num_return_sequences expansion
            return ids.to(device).repeat_interleave(batch // ids.numel())
        raise MoorizeError(f"task_ids has {ids.numel()} entries for a batch of {batch}")


def householder_wy(vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Compact WY form of the chain: H_1 ⋯ H_k = I − Y T Yᵀ (Y = [u_1 … u_k], T upper triangular).

    So H_k ⋯ H_1 = I − Y Tᵀ Yᵀ. With it the chain costs a few thin matmuls (k columns)
    instead of k sequential rank-one passes over a weight matrix.
    """
    u = vectors.to(torch.promote_types(vectors.dtype, torch.float32))
    k = u.shape[0]
    gram = u @ u.t()
    tau = 2.0 / gram.diagonal()
    T = tau[:1].reshape(1, 1)
    for j in range(1, k):
        col = -tau[j] * (T @ gram[:j, j])
        T = torch.cat([torch.cat([T, col.unsqueeze(1)], 1),
                       torch.cat([T.new_zeros(1, j), tau[j].reshape(1, 1)], 1)], 0)
    return u.t(), T


def inverse_rms(x: torch.Tensor, eps) -> torch.Tensor:
    """1 / sqrt(mean(x²) + eps) over the last axis, in float32 (x² overflows float16): the router-input norm,
    shared by the layer and the export op."""
    xf = x.float()
    # (x * x).sum / n, not x.pow(2).mean: the same values, and forward + backward ~2x faster on the CPU
    return torch.rsqrt((xf * xf).sum(-1, keepdim=True) / xf.shape[-1] + eps)


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
        if config.uses_task:
            d = config.task_dim
            self.task_embedding = nn.Parameter(torch.randn(len(config.tasks), d, generator=generator, dtype=pdt)
                                               / math.sqrt(d))
            self.task_router = nn.Parameter(torch.zeros(r, d, dtype=pdt))  # A
        if config.uses_sample:
            kr = config.router_experts
            bound = 1.0 / math.sqrt(n)  # Kaiming-uniform with a = sqrt(5), as nn.Linear
            self.router_in = nn.Parameter((torch.rand(kr, n, generator=generator, dtype=pdt) * 2 - 1) * bound)  # C
            self.router_out = nn.Parameter(torch.zeros(r, kr, dtype=pdt))  # B
        self._cache: tuple | None = None
        self._merged: dict[int, tuple] = {}  # router 'task', inference: task -> (key, dense matrix)

    # ---- weights derived per forward -------------------------------------------------------------
    @property
    def _inference(self) -> bool:
        """Eval mode with gradients off: weights derived from the parameters may be cached."""
        return not (self.training or torch.is_grad_enabled())

    def _cache_key(self) -> tuple:
        ps = [p for p in (self.householder, getattr(self, "router_in", None)) if p is not None]
        return tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in ps) + (self.Vh.dtype, self.Vh.device)

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

    def input_weight(self) -> torch.Tensor:
        """[Vh H; C] in the factors' dtype: one matmul gives the expert inputs and the router inputs."""
        if self._inference and self._cache is not None and self._cache[0] == self._cache_key():
            return self._cache[1]
        parts = [self.inference_vh()]
        if self.config.uses_sample:
            parts.append(self.router_in.to(self.Vh.dtype))
        w = torch.cat(parts) if len(parts) > 1 else parts[0]
        self._cache = (self._cache_key(), w) if self._inference else None
        return w

    def gate(self, xc: torch.Tensor | None, task_ids: torch.Tensor | None, lead: tuple[int, ...]) -> torch.Tensor:
        """g = ReLU(σ + A e_t + B (C x)) in float32, shaped [*lead, r] (or [r] when constant)."""
        g = self.sigma.float()
        if self.config.uses_task:
            t = self.task_embedding[task_ids] @ self.task_router.t()  # [batch, r]
            g = g + t.float().reshape(t.shape[0], *([1] * (len(lead) - 1)), -1)
        if xc is not None:
            g = g + (xc.float() @ self.router_out.float().t())
        return torch.relu(g)

    def _router_input(self, xc: torch.Tensor, xin: torch.Tensor) -> torch.Tensor:
        """C x, or C x / rms(x) with ``router_norm="rms"`` (the same as C applied to the normalised x), in float32."""
        xc = xc.float()
        if self.config.router_norm == "rms":
            xc = xc * inverse_rms(xin, ROUTER_NORM_EPS)
        return xc

    def _expert_inputs(self, xin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(Vh H x, C x). Without gradients: one matmul with the cached [Vh H; C]. With them, the
        chain is applied on the token side, x Vhᵀ − ((x Y) T)(Vh Y)ᵀ: thin matmuls only, and no
        weight gradient through the frozen Vh (at 128 tokens ~1.5x faster than rotating Vh)."""
        if self._inference:
            h = xin @ self.input_weight().t()
            if not self.config.uses_sample:
                return h, None
            return h[..., : self.rank], self._router_input(h[..., self.rank:], xin)
        z = xin @ self.Vh.t()
        if self.householder is not None:
            Y, T = householder_wy(self.householder)
            Yc = Y.to(xin.dtype)
            z = z - ((xin @ Yc) @ T.to(xin.dtype)) @ (self.Vh @ Yc).t()
        xc = self._router_input(xin @ self.router_in.to(xin.dtype).t(), xin) if self.config.uses_sample else None
        return z, xc

    def _merged_for(self, task: int) -> torch.Tensor:
        """Inference with router 'task': one dense matrix per task, cached (dense cost per token)."""
        key = (task, self._cache_key(), self.task_router._version, self.task_embedding._version)
        hit = self._merged.get(task)
        if hit is None or hit[0] != key:
            hit = (key, self.merged_weight(task).to(self.Vh.dtype))  # residual included
            self._merged[task] = hit
        return hit[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        task_ids = self.state.current(x.shape[0], x.device) if self.config.uses_task else None
        return self.routed(x, task_ids)

    def routed(self, x: torch.Tensor, task_ids: torch.Tensor | None) -> torch.Tensor:
        """The layer with explicit task ids, one per row of ``x``'s first dimension (a sparse-MoE expert
        sees a subset of the batch's tokens, each with its own row's task)."""
        lead = tuple(x.shape[:-1])
        xin = x.to(self.Vh.dtype)
        if self.config.router == "task" and self._inference:
            first = int(task_ids[0])
            if bool((task_ids == first).all()):
                y = xin @ self._merged_for(first).t()
                return (y if self.bias is None else y + self.bias).to(x.dtype)
        z, xc = self._expert_inputs(xin)
        g = self.gate(xc, task_ids, lead)
        y = (z.float() * g).to(self.U.dtype) @ self.U.t()
        if self.residual is not None:
            y = y + xin @ self.residual.t()
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)

    @property
    def weight(self) -> torch.Tensor:
        """What model code reads of a linear layer's weight (dtype, device, shape), without materialising W.

        Some architectures read ``proj.weight.dtype`` to cast their activations (T5's feed-forward);
        the dense matrix does not exist here, so any computation with this stand-in is refused.
        """
        return WeightStandIn.of(self)

    # ---- reference and merging -------------------------------------------------------------------
    def forward_reference(self, x: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The published formulation, in float32: reflections applied to every token."""
        xf = x.float()
        if self.householder is not None:
            for u in self.householder.float():
                xf = xf - (xf @ u).unsqueeze(-1) * (u * (2.0 / (u @ u)))
        g = self.sigma.float()
        if self.config.uses_task:
            ids = task_ids if task_ids is not None else self.state.current(x.shape[0], x.device)
            g = g + (self.task_embedding.float()[ids] @ self.task_router.float().t()).reshape(
                ids.shape[0], *([1] * (x.dim() - 2)), -1)
        if self.config.uses_sample:
            xr = x.float()
            if self.config.router_norm == "rms":
                xr = xr / torch.sqrt(xr.pow(2).mean(-1, keepdim=True) + ROUTER_NORM_EPS)
            g = g + (xr @ self.router_in.float().t()) @ self.router_out.float().t()
        g = torch.relu(g)
        y = ((xf @ self.Vh.float().t()) * g) @ self.U.float().t()
        if self.residual is not None:
            y = y + x.float() @ self.residual.float().t()
        if self.bias is not None:
            y = y + self.bias.float()
        return y

    @torch.no_grad()
    def merged_weight(self, task: int) -> torch.Tensor:
        """The dense [out, in] matrix of one task (exact in ``task`` router mode), in float64."""
        if self.config.uses_sample:
            raise MoorizeError("a sample router makes the layer depend on each input: it cannot be merged "
                               "into one dense matrix (use router mode 'task')")
        g = self.sigma.double()
        if self.config.uses_task:
            g = g + self.task_router.double() @ self.task_embedding.double()[task]
        W = (self.U.double() * torch.relu(g)) @ self.rotated_vh(torch.float64)
        if self.residual is not None:
            W = W + self.residual.double()
        return W

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}, router={self.config.router}, "
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


TRAINABLE = ("householder", "task_embedding", "task_router", "router_in", "router_out")  # + sigma with train_sigma


def layer_trainable(layer: nn.Module) -> dict[str, nn.Parameter]:
    """A MoORE layer's trainable parameters by name (the frozen factors are parameters too, for FSDP)."""
    names = TRAINABLE + (("sigma",) if layer.config.train_sigma else ())
    return {n: p for n, p in layer.named_parameters() if n in names}


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The MoORE parameters (routers, Householder vectors, σ when enabled) by adapter key."""
    out = {}
    for name, layer in moore_layers(model).items():
        for pname, p in layer_trainable(layer).items():
            out[f"{name}.{pname}"] = p
    return out
