"""Sparse-MoE experts as MoORE layers.

transformers keeps a sparse-MoE layer's experts as 3-D tensors ([E, out, in] per projection) in a
module with a common interface (``has_gate``, ``has_bias``, ``is_transposed``,
``has_post_expert_norm``, ``_apply_gate``, ``act_fn``) whose forward takes the tokens, each token's
top-k expert ids and their weights. Each expert matrix is factored on its own, so here each 3-D
tensor becomes a ``ModuleList`` of E MoORELinear layers (at the same attribute: the layer of
expert e of ``...experts.gate_up_proj`` is the module ``...experts.gate_up_proj.e``), and the
module's class is swapped for a subclass whose forward applies them: the token router and the
top-k choice are the model's own, unchanged, so at initialisation the routed model computes
exactly what the original does. Each token carries its row's task id into the experts it visits.
"""

from __future__ import annotations

import torch
from torch import nn

from ..io.hf import EXPERT_TENSORS
from .layer import MoORELinear

_ROUTED_CLASSES: dict[type, type] = {}


def routed_experts_class(cls: type) -> type:
    """``cls`` with its forward replaced by one that runs MoORE experts (one subclass per class)."""
    if cls not in _ROUTED_CLASSES:
        _ROUTED_CLASSES[cls] = type(f"MoORE{cls.__name__}", (cls,), {"forward": _forward, "__module__": __name__})
    return _ROUTED_CLASSES[cls]


def install(module: nn.Module, layers: dict[str, list[MoORELinear]]) -> None:
    """Replace ``module``'s 3-D tensors named in ``layers`` by their experts' MoORE layers."""
    for pname, experts in layers.items():
        delattr(module, pname)
        setattr(module, pname, nn.ModuleList(experts))
    module.__class__ = routed_experts_class(type(module))


def _project(module: nn.Module, pname: str, expert: int, x: torch.Tensor, task_ids) -> torch.Tensor:
    """One expert's projection: its MoORE layer (with per-token task ids, or routed as a whole batch when
    None), or the dense slice when that tensor was not factored."""
    weights = getattr(module, pname)
    if isinstance(weights, nn.ModuleList):
        layer = weights[expert]
        y = layer(x) if task_ids is None else layer.routed(x, task_ids)
    else:
        w = weights[expert]
        y = x @ w if module.is_transposed else nn.functional.linear(x, w)
    if getattr(module, "has_bias", False):
        y = y + getattr(module, f"{pname}_bias")[expert]
    return y


def _layers(module: nn.Module) -> nn.Module:
    """A MoORE layer of the module (or what an exporter swapped in for it): routing is read from it."""
    for pname in EXPERT_TENSORS:
        weights = getattr(module, pname, None)
        if isinstance(weights, nn.ModuleList):
            return weights[0]
    raise RuntimeError("routed experts module without MoORE layers")  # install() always adds some


def _expert_mlp(self, up: str, expert: int, x: torch.Tensor, task_ids) -> torch.Tensor:
    h = _project(self, up, expert, x, task_ids)
    h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
    h = _project(self, "down_proj", expert, h, task_ids)
    return self.post_expert_norm(h) if getattr(self, "has_post_expert_norm", False) else h


def _forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
    """transformers' experts forward, with MoORE experts: tokens [T, H], top-k ids and weights [T, k]."""
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return _forward_traceable(self, hidden_states, top_k_index, top_k_weights)
    layer = _layers(self)
    tokens = hidden_states.shape[0]
    # rows were flattened to tokens (batch-major), so the batch's task ids repeat over each row's tokens
    task_ids = layer.state.current(tokens, hidden_states.device) if layer.router.task else None
    k = top_k_index.shape[-1]
    expert_of = top_k_index.reshape(-1)
    weight_of = top_k_weights.reshape(-1)
    token_of = torch.arange(tokens, device=hidden_states.device).repeat_interleave(k)
    out = torch.zeros_like(hidden_states)
    up = "gate_up_proj" if self.has_gate else "up_proj"
    for expert in torch.unique(expert_of).tolist():
        if not 0 <= expert < self.num_experts:  # expert-parallel sentinels
            continue
        hit = expert_of == expert
        tok = token_of[hit]
        ids = task_ids[tok] if task_ids is not None else None
        h = _expert_mlp(self, up, expert, hidden_states[tok], ids)
        out.index_add_(0, tok, (h * weight_of[hit].unsqueeze(-1)).to(out.dtype))
    return out


def _forward_traceable(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
    """The same sum without data-dependent shapes, for torch.export / ONNX: every expert runs on every
    token, weighted by a dense [T, E] routing matrix that is zero where a token did not pick the expert.
    Adding those zeros leaves each token's sum, in ascending expert order, as the eager loop computes it;
    the cost is E/k times the eager experts' (a fused runtime kernel would gather instead)."""
    layer = _layers(self)
    tokens = hidden_states.shape[0]
    holder = getattr(layer, "holder", None)  # an exporter's layer: the graph's task ids, one per token
    if holder is not None:
        task_ids = holder.token_ids
    else:
        task_ids = layer.state.current(tokens, hidden_states.device) if layer.router.task else None
    valid = (top_k_index < self.num_experts).to(top_k_weights.dtype)
    dense = torch.zeros(tokens, self.num_experts, dtype=top_k_weights.dtype, device=hidden_states.device)
    dense = dense.scatter_add(1, top_k_index.clamp(max=self.num_experts - 1), top_k_weights * valid)
    out = torch.zeros_like(hidden_states)
    up = "gate_up_proj" if self.has_gate else "up_proj"
    for expert in range(self.num_experts):
        h = _expert_mlp(self, up, expert, hidden_states, task_ids)
        out = out + (h * dense[:, expert:expert + 1]).to(out.dtype)
    return out
