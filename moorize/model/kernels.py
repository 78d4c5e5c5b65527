"""The MoORE layer's arithmetic as a few big kernels, for training (a hand-written backward) and inference.

On a GPU a MoORE step is bound by how many kernels it launches, not by its FLOPs, so the layer
is written as few, large aten ops (``benchmarks/dispatch.py`` counts them; a test holds the
budget). For x [N, n] (tokens flattened), factors U [m, r], Vh [r, n], Householder vectors
V [k, n] (rows u_i), sample router C [kr, n], B [r, kr], task router A [r, d], embeddings E [T, d]:

* the chain H_1 ⋯ H_k = I − Vᵀ S⁻¹ V with S = triu(V Vᵀ, 1) + ½ diag(V Vᵀ) (the UT form of compact
  WY: one small triangular solve, no loop over reflections), applied on the token side:
  z = x Vhᵀ − (x Vᵀ) S⁻¹ (V Vhᵀ), i.e. Vh H x with H = H_k ⋯ H_1, without rotating the frozen Vh;
* the expert input x Vhᵀ is one matmul, the reflections' and router's inputs [x Vᵀ, x Cᵀ] another;
* the gate g = ReLU(table[t] + B (C x / rms(x))) is one fused ``addmm + relu`` over the router's table of
  task rows (σ + its task term, [T, r], ``routers``), gathered by a one-hot matmul, with rms(x) from one norm;
  the backward returns the table's gradient and autograd carries it to the router's parameters;
* y = (z ⊙ g) Uᵀ (+ x Rᵀ) (+ b).

Everything that depends only on the frozen factors and the chain (S, S⁻¹ V Vhᵀ, the concatenated input
weights) is made once per forward by ``prepare`` and taken again by a gradient checkpoint's recompute.
One dtype policy: the big matmuls run in the compute dtype (bf16 under autocast, else the factors'
dtype); the small k×k algebra and the rms statistic in float32; parameters stay float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

_CONSTANTS: dict = {}


def _cached(key: tuple, make) -> torch.Tensor:
    """A small constant made once per key (a tensor made from host values is a copy to the device); inside a
    compiled graph it is made inline and not kept."""
    hit = _CONSTANTS.get(key)
    if hit is None:
        hit = make()
        if not torch.compiler.is_compiling():
            _CONSTANTS[key] = hit
    return hit


def _constant(kind: str, k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """'ut' is 1 above the diagonal, ½ on it, 0 below (S = G ⊙ ut), 'ut-neg' its negative; 'upper' the mask
    of the upper triangle."""

    def make():
        ones = torch.ones(k, k, dtype=dtype, device=device)
        if kind == "upper":
            return ones.triu().bool()
        return (ones.triu(1) + 0.5 * torch.eye(k, dtype=dtype, device=device)) * (-1 if kind == "ut-neg" else 1)

    return _cached((kind, k, dtype, device), make)


def ut_matrix(vectors: torch.Tensor, negative: bool = False) -> torch.Tensor:
    """S = triu(V Vᵀ, 1) + ½ diag(V Vᵀ) (or −S): H_1 ⋯ H_k = I − Vᵀ S⁻¹ V (V [k, n], rows the reflection
    vectors). Two ops: the Gram matrix and one product with a constant (exact: ±1, ±½, 0)."""
    ut = _constant("ut-neg" if negative else "ut", vectors.shape[0], vectors.dtype, vectors.device)
    return (vectors @ vectors.t()) * ut


def householder_wy(vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Compact WY form of the chain: H_1 ⋯ H_k = I − Y T Yᵀ (Y = [u_1 … u_k], T = S⁻¹ upper triangular).

    So H_k ⋯ H_1 = I − Y Tᵀ Yᵀ. Closed form (one triangular solve), differentiable, float32 or wider."""
    u = vectors.to(torch.promote_types(vectors.dtype, torch.float32))
    S = ut_matrix(u)
    eye = torch.eye(S.shape[0], dtype=S.dtype, device=S.device)
    return u.t(), torch.linalg.solve_triangular(S, eye, upper=True)


def inverse_rms(x: torch.Tensor, eps) -> torch.Tensor:
    """1 / sqrt(mean(x²) + eps) over the last axis, in float32 (x² overflows float16): the router-input norm
    as the export op computes it."""
    xf = x.float()
    return torch.rsqrt((xf * xf).sum(-1, keepdim=True) / xf.shape[-1] + eps)


def rms_denominator(x: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """hypot(‖x‖, √(n·eps)) = √n · sqrt(mean(x²) + eps), [N, 1]: two ops, the norm accumulated in float32.
    Dividing by it gives x / rms(x) up to the factor √n, which is folded into B."""
    wide = torch.promote_types(x.dtype, torch.float32)
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=wide)
    floor = _cached(("floor", x.shape[-1], eps, wide, x.device),
                    lambda: torch.full((), math.sqrt(x.shape[-1] * eps), dtype=wide, device=x.device))
    return torch.hypot(norm, floor).to(dtype)


@dataclass
class Prepared:
    """What a layer's forward needs of its parameters, made once per forward (no autograd)."""

    w_in: torch.Tensor | None  # [V; C] in the compute dtype: one matmul gives x Vᵀ and x Cᵀ
    q: torch.Tensor | None  # −S⁻¹ V Vhᵀ [k, r], compute dtype: z = x Vhᵀ + (x Vᵀ) q
    s_neg: torch.Tensor | None  # −S [k, k], float32: the backward's triangular solve
    q32: torch.Tensor | None  # q in float32
    b: torch.Tensor | None  # B [r, kr], compute dtype


def prepare(vh, vectors, router_in, router_out, dtype: torch.dtype) -> Prepared:
    """The tensors of ``Prepared`` from the layer's current parameters."""
    with torch.no_grad():
        q = s_neg = q32 = None
        parts = []
        if vectors is not None:
            wide = torch.promote_types(vectors.dtype, torch.float32)
            s_neg = ut_matrix(vectors.to(wide), negative=True)
            pt = (vectors.to(dtype) @ vh.to(dtype).t()).to(wide)  # V Vhᵀ [k, r]
            q32 = torch.linalg.solve_triangular(s_neg, pt, upper=True)
            q = q32.to(dtype)
            parts.append(vectors)
        if router_in is not None:
            parts.append(router_in)
        w_in = (torch.cat(parts) if len(parts) > 1 else parts[0]).to(dtype) if parts else None
        b = None if router_out is None else router_out.to(dtype)
    return Prepared(w_in, q, s_neg, q32, b)


def distinct(tensors: list) -> tuple[list, tuple]:
    """``tensors`` with each repeat of an earlier tensor replaced by None, and the (i, j) pairs to restore them."""
    out, aliases = [], []
    for i, t in enumerate(tensors):
        j = next((j for j in range(i) if t is not None and out[j] is not None and out[j] is t), None)
        out.append(t if j is None else None)
        if j is not None:
            aliases.append((i, j))
    return out, tuple(aliases)


def gate_rows(table: torch.Tensor, onehot: torch.Tensor | None) -> torch.Tensor:
    """The task term per token (or per row of the batch): onehot @ table, or the table's one row (a view)."""
    return table[0] if onehot is None else onehot @ table


def gated(z: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """z ⊙ g for z [N, r] and a gate per token [N, r], per batch row [B, r] (N = B · tokens), or shared [r]."""
    if g.dim() == 2 and g.shape[0] != z.shape[0]:
        return (z.view(g.shape[0], -1, z.shape[1]) * g.unsqueeze(1)).view(z.shape)
    return z * g


def infer(x: torch.Tensor, w_in: torch.Tensor, U: torch.Tensor, rows: torch.Tensor, b: torch.Tensor | None,
          rms_eps: float | None, residual, bias) -> torch.Tensor:
    """Inference: y = U (ReLU(rows + B (C x / rms)) ⊙ (Vh H x)) (+ R x) (+ b), x [N, n] in the compute dtype.

    ``w_in`` is the cached [Vh H; C]; ``rows`` the task term per token [N, r] or [r]. Without a sample
    router (``b`` None) the rows are the gate itself, per batch row [B, r] or [r]: the table was ReLU'd once,
    when it was cached."""
    h = x @ w_in.t()
    if b is None:
        z, g = h, rows
    else:
        z, xc = h[:, :b.shape[0]], h[:, b.shape[0]:]
        if rms_eps is not None:
            xc = xc / rms_denominator(x, rms_eps, x.dtype)
        g = torch.ops.aten._addmm_activation(rows, xc, b.t())
    out = gated(z, g)
    y = out @ U.t() if bias is None else torch.addmm(bias, out, U.t())
    if residual is not None:
        y = y.addmm_(x, residual.t())
    return y


class MoOREFunction(torch.autograd.Function):
    """One MoORE layer forward with gradients, and its backward by hand (a few matmuls, no autograd graph).

    Inputs: x [N, n] (compute dtype), the frozen factors (compute dtype), the Householder vectors and the
    sample router's C and B (for their gradients), the router's table of gate rows [T, r] (compute dtype; its
    gradient is returned, and autograd takes it to the router's parameters), ``Prepared`` tensors, the one-hot of the tasks (per token [N, T] with a sample router,
    per batch row [B, T] without; None when the table has one row), the router norm's eps (None: no norm), a
    callable run when the backward starts (the layer's per-forward tensors expire then) or None, and
    ``aliases``: pairs (i, j) saying that input i, passed as None, is input j. Checked against autograd and
    against ``forward_reference`` in float64 (tests)."""

    @staticmethod
    def forward(ctx, x, U, Vh, residual, bias, vectors, router_in, router_out, table, w_in, q, s_neg, q32, b,
                onehot, rms_eps, on_backward, aliases=()):
        if aliases:  # (i, j): input i is input j (torch.compile traces no Function given one tensor twice)
            given = [x, U, Vh, residual, bias, vectors, router_in, router_out, table, w_in, q, s_neg, q32, b]
            for i, j in aliases:
                given[i] = given[j]
            x, U, Vh, residual, bias, vectors, router_in, router_out, table, w_in, q, s_neg, q32, b = given
        k = 0 if q is None else q.shape[0]
        a = x @ Vh.t()
        xv = xc = denom = None
        if w_in is not None:
            h = x @ w_in.t()
            xv, xc = h[:, :k], h[:, k:]
        z = a if k == 0 else torch.addmm(a, xv, q)
        rows = gate_rows(table, onehot)
        scale = math.sqrt(x.shape[1]) if rms_eps is not None else 1.0  # x / rms(x) = √n · x / denom
        if b is not None:
            if rms_eps is not None:
                denom = rms_denominator(x, rms_eps, x.dtype)
                xc = xc / denom
            g = torch.ops.aten._addmm_activation(rows, xc, b.t(), alpha=scale)
        else:
            g = torch.relu(rows)  # one gate per batch row [B, r] (a task router alone), or [r] for one task
        out = gated(z, g)
        y = out @ U.t() if bias is None else torch.addmm(bias, out, U.t())
        if residual is not None:
            y = y.addmm_(x, residual.t())
        ctx.save_for_backward(x, U, Vh, residual, vectors, router_in, router_out, w_in, q, s_neg, q32, b, onehot,
                              xv, xc, denom, z, g)
        ctx.k, ctx.scale, ctx.on_backward = k, scale, on_backward
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        (x, U, Vh, residual, vectors, router_in, router_out, w_in, q, s_neg, q32, b, onehot, xv, xcn, denom, z,
         g) = ctx.saved_tensors
        k = ctx.k
        if ctx.on_backward is not None:
            ctx.on_backward()
        need = ctx.needs_input_grad
        dy = dy.to(x.dtype)
        dh = dy @ U
        dz = gated(dh, g)
        dg = dh * z
        if g.dim() == 2 and g.shape[0] != dg.shape[0]:  # a gate per batch row: its tokens' sum
            dg = dg.view(g.shape[0], -1, dg.shape[1]).sum(1)
        dpre = torch.ops.aten.threshold_backward(dg, g, 0)  # ReLU: the gate's gradient where g > 0
        dx = dz @ Vh if need[0] else None  # the first layers' inputs (frozen embeddings) need none
        if residual is not None and dx is not None:
            dx = dx.addmm_(dy, residual)
        d_vectors = d_router_in = d_router_out = d_table = None
        parts = []
        dz_v = None
        if k:
            parts.append(dz @ q.t())  # d(x Vᵀ)
            dz_v = dz
        if b is not None:
            # the factor √n as alpha (beta=0: the first argument only gives the shape)
            dxc = torch.addmm(xcn, dpre, b, beta=0, alpha=ctx.scale)
            if need[7]:
                d_router_out = torch.addmm(b, dpre.t(), xcn, beta=0, alpha=ctx.scale)
            if denom is not None:  # xcn = xc / denom, denom = hypot(‖x‖, c): d‖x‖² flows back to x
                dxc = dxc / denom
                if dx is not None:
                    dot = torch.bmm(dxc.unsqueeze(1), xcn.unsqueeze(2)).squeeze(2)  # Σ dxcn · xcn / denom, [N, 1]
                    dx = dx.addcmul_(x, dot / denom, value=-1)
            parts.append(dxc)
        if parts:
            dh_in = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
            if dx is not None:
                dx = dx.addmm_(dh_in, w_in)
            dw_in = dh_in.t() @ x if (need[5] or need[6]) else None
            if dw_in is not None and b is not None and need[6]:
                d_router_in = dw_in[k:]
            if dw_in is not None and k and need[5]:
                # q = −S⁻¹ P with P = V Vhᵀ and S = triu(V Vᵀ) (diagonal halved): back through the solve
                dq = (xv.t() @ dz_v).to(q32.dtype)
                dp = torch.linalg.solve_triangular(s_neg.t(), dq, upper=False)  # d P
                m = dp @ q32.t()  # dS, read on the upper triangle
                upper = _constant("upper", k, torch.bool, m.device)
                # d(V Vᵀ) + its transpose: dS above the diagonal, mirrored below, dS_ii (= 2 · ½ dS_ii) on it
                sym = torch.where(upper, m, m.t()).to(x.dtype)
                d_vectors = torch.addmm(torch.addmm(dw_in[:k], sym, w_in[:k]), dp.to(x.dtype), Vh)
        if need[8]:  # the gate rows: the router's parameters (and σ when it trains) take it from here
            d_table = dpre.sum(0, keepdim=True) if onehot is None else onehot.t() @ dpre
        return (dx, None, None, None, None, d_vectors, d_router_in, d_router_out, d_table,
                None, None, None, None, None, None, None, None, None)
