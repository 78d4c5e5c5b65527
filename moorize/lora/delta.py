"""One layer's LoRA per task: ΔW_t = W_t − W (the task's merged matrix minus the source weight), its truncated
SVD, the rank chosen by a fixed count or an error bound, and the error of the factors as stored.

The truncated SVD is the best approximation of each rank (Eckart–Young), so the error of rank k is known
before anything is written: sqrt(Σ_{i>k} s_i²) / ‖W_t‖_F. The reported error is measured again on the
factors in their storage dtype, against ΔW_t in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerLora:
    """The LoRA of one layer for one task: ΔW_t ≈ B A."""

    name: str  # the factored layer's name (moorize.json)
    rank: int
    full_rank: int  # min(out, in)
    rel_error: float  # ‖ΔW_t − B A‖_F / ‖W_t‖_F, with B and A as stored
    delta: float  # ‖ΔW_t‖_F / ‖W_t‖_F: the error of leaving the layer out
    A: torch.Tensor  # [rank, in]
    B: torch.Tensor  # [out, rank]


def choose_rank(s: torch.Tensor, w_norm: float, *, bound: float | None = None, fixed: int | None = None) -> int:
    """The rank of a layer from its delta's singular values ``s`` (descending): ``fixed`` (capped at the full
    rank), or the smallest rank k ≥ 1 with sqrt(Σ_{i≥k} s_i²) ≤ ``bound`` · ``w_norm``."""
    full = int(s.numel())
    if fixed is not None:
        return min(int(fixed), full)
    tail = (s.double() ** 2).flip(0).cumsum(0).flip(0)  # tail[k]: the squared error when k values are kept
    within = torch.nonzero(tail <= (bound * w_norm) ** 2)
    return max(1, int(within[0]) if within.numel() else full)


def factor_deltas(name: str, deltas: list[torch.Tensor], norms: list[float], store_dtype: torch.dtype, *,
                  bound: float | None, fixed: int | None) -> list[LayerLora]:
    """The LoRA of each of a layer's task deltas ([out, in], float64, all on the device that factors them).

    Through the float64 Gram matrix of the delta's shorter side (twice as fast as a float32 SVD on the CPU, and
    its eigenvalues, the squared singular values, give the tail energies to float64 accuracy): with Q_k its top
    eigenvectors, B A is D Q_k Q_kᵀ (or Q_k Q_kᵀ D), the truncated SVD, whatever the accuracy of small singular
    values. One batched eigensolve per layer on a GPU."""
    D0 = deltas[0]
    wide = D0.shape[0] < D0.shape[1]
    stack = torch.stack(deltas)
    grams = stack @ stack.transpose(1, 2) if wide else stack.transpose(1, 2) @ stack
    if D0.device.type == "cpu":
        solved = [torch.linalg.eigh(g) for g in grams]
        lams, Qs = [x[0] for x in solved], [x[1] for x in solved]
    else:
        lam, Q = torch.linalg.eigh(grams)
        lams, Qs = list(lam), list(Q)
    out = []
    for D, w_norm, lam, Q in zip(deltas, norms, lams, Qs):
        s = lam.flip(0).clamp_min(0).sqrt()
        k = choose_rank(s, w_norm, bound=bound, fixed=fixed)
        Qk = Q.flip(1)[:, :k]
        root = s[:k].clamp_min(torch.finfo(torch.float64).tiny).sqrt()
        if wide:  # D ≈ Q_k (Q_kᵀ D)
            B, A = Qk * root, (Qk.t() @ D) / root[:, None]
        else:  # D ≈ (D Q_k) Q_kᵀ
            B, A = (D @ Qk) / root, root[:, None] * Qk.t()
        B, A = B.to(store_dtype), A.to(store_dtype)
        error = torch.linalg.matrix_norm(D - B.double() @ A.double()).item()
        scale = w_norm if w_norm > 0 else 1.0
        out.append(LayerLora(name, k, int(s.numel()), error / scale, torch.linalg.matrix_norm(D).item() / scale,
                             A.cpu().contiguous(), B.cpu().contiguous()))
    return out
