"""The SVD engine: batched thin SVDs of same-shaped weights, truncation, and checks.

Solvers (``solver=``):

* ``gram`` (the default on the CPU and on data-centre GPUs): for a tall A (m >= n), eigh of the float64 Gram matrix
  AᵀA gives V and σ² and U = A V / σ. On a 2-core CPU this is ~1.5x faster than
  LAPACK's SVD and, because the Gram matrix is formed in float64, accurate to far
  below float32 rounding; the ill-conditioned tail (σ < 1e-4 σ_max) is re-solved
  exactly (see ``_gram``). A layer whose check fails is redone with ``svd``.
* ``svd`` (the default on consumer GPUs, whose float64 is slow): ``torch.linalg.svd`` in ``svd_dtype`` (batched cuSOLVER on GPU).
* ``randomized``: range finder with oversampling and power iterations (Halko et al.),
  for fixed truncated ranks; much cheaper when r << min(m, n).

Every result is checked: factors finite, and the reconstruction error of what will
be stored (in the storage dtype) is measured and reported per layer.
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from ..errors import MoorizeError
from ..selectors import listing, require_name
from .options import SOLVERS
from .targets import collapse_names, pattern_matches, require_layer_matches, validate_pattern

log = logging.getLogger(__name__)

SVD_TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}
# relative Frobenius error above which a full-rank, exact-by-construction result is
# considered failed, per storage dtype (a few ulps of accumulated rounding)
EXACT_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}
_GRAM_TAIL = 1e-4  # σ/σ_max below which gram re-solves a column (see _gram)
_PARALLEL_MAX_ELEMENTS = 4 * 1024 * 1024  # larger matrices are factored one at a time on CPU


@dataclass(frozen=True)
class RankPolicy:
    """How many experts to keep: full, a fixed count, an energy share, or a ratio of min(m, n)."""

    kind: str  # "full" | "fixed" | "energy" | "ratio"
    value: float = 0.0

    @classmethod
    def parse(cls, text: str) -> "RankPolicy":
        t = text.strip().lower()
        if t == "full":
            return cls("full")
        if t.startswith("energy:") or t.startswith("ratio:"):
            kind, _, v = t.partition(":")
            try:
                x = float(v)
            except ValueError:
                raise MoorizeError(f"cannot read rank {text!r}: {kind} needs a number, e.g. {kind}:0.9") from None
            if not (0.0 < x <= 1.0) or math.isnan(x):
                raise MoorizeError(f"rank {text!r}: {kind} must be in (0, 1], got {x}")
            return cls(kind, x)
        try:
            n = int(t)
        except ValueError:
            raise MoorizeError(
                f"cannot read rank {text!r}: use full, N, energy:0.99 or ratio:0.25"
            ) from None
        if n < 1:
            raise MoorizeError(f"rank must be at least 1, got {n}")
        return cls("fixed", n)

    def __str__(self) -> str:
        if self.kind == "full":
            return "full"
        if self.kind == "fixed":
            return str(int(self.value))
        return f"{self.kind}:{self.value:g}"

    @property
    def needs_spectrum(self) -> bool:
        return self.kind == "energy"

    def fixed_rank(self, shape: tuple[int, int]) -> int:
        """The rank when it does not depend on σ (full, fixed, ratio)."""
        k = min(shape)
        if self.kind == "full":
            return k
        if self.kind == "fixed":
            return int(self.value)
        if self.kind == "ratio":
            return max(1, min(k, math.ceil(self.value * k)))
        raise ValueError("energy rank depends on the spectrum")

    def rank_for(self, sigma: torch.Tensor, shape: tuple[int, int]) -> int:
        if self.kind != "energy":
            return self.fixed_rank(shape)
        e = sigma.double() ** 2
        total = e.sum()
        if total <= 0:
            return 1
        cum = torch.cumsum(e, 0) / total
        # smallest r with cum[r-1] >= value (tolerate rounding at value == 1)
        r = int(torch.searchsorted(cum, torch.tensor(self.value - 1e-12, dtype=cum.dtype)).item()) + 1
        return max(1, min(r, len(sigma)))


@dataclass
class RankRules:
    """A default policy plus ``pattern=policy`` overrides (the last matching one wins)."""

    default: RankPolicy = field(default_factory=lambda: RankPolicy("full"))
    overrides: list[tuple[str, RankPolicy]] = field(default_factory=list)

    @classmethod
    def parse(cls, specs: list[str] | str | None) -> "RankRules":
        if specs is None:
            return cls()
        if isinstance(specs, str):
            specs = [specs]
        rules, default = cls(), None
        for spec in specs:
            # 'energy:0.9' and 'ratio:0.5' contain no '='; 'mlp.*=energy:0.95' does
            if "=" in spec:
                pat, _, pol = spec.rpartition("=")
                validate_pattern(pat)
                rules.overrides.append((pat, RankPolicy.parse(pol)))
            elif default is not None:  # the second would silently replace the first
                raise MoorizeError(f"--rank {default!r} and --rank {spec!r} both set the default policy: give one, "
                                   "and PATTERN=POLICY for the layers that differ")
            else:
                rules.default, default = RankPolicy.parse(spec), spec
        return rules

    def check(self, targets: list[str]) -> None:
        """Every ``PATTERN=POLICY`` sets the rank of some target: its pattern matches one (``require_layer_matches``)
        and a later pattern, which would win there, does not match every one it matches."""
        picked = require_layer_matches("--rank pattern", [p for p, _ in self.overrides], targets, "target layer")
        for i, (pat, pol) in enumerate(self.overrides):
            later = [q for q, _ in self.overrides[i + 1:]]
            if all(any(pattern_matches(q, n) for q in later) for n in picked[pat]):
                winners = [q for q in dict.fromkeys(later) if any(pattern_matches(q, n) for n in picked[pat])]
                later_ones = f"pattern{'s' if len(winners) > 1 else ''} {listing(map(repr, winners), 3)}"
                matched = listing(collapse_names(picked[pat]), 3)
                raise MoorizeError(f"--rank pattern {pat!r} sets no rank: every layer it matches ({matched}) is matched "
                                   f"by the later {later_ones}, and the last matching pattern wins; give "
                                   f"'{pat}={pol}' after it")

    def for_layer(self, name: str) -> RankPolicy:
        pol = self.default
        for pat, p in self.overrides:
            if pattern_matches(pat, name):
                pol = p
        return pol

    def describe(self) -> dict:
        return {"default": str(self.default), "overrides": [[p, str(r)] for p, r in self.overrides]}

    @property
    def truncates(self) -> bool:
        return any(p.kind != "full" for p in [self.default, *(r for _, r in self.overrides)])


@dataclass
class LayerFactors:
    """The stored result for one weight, plus what the checks measured."""

    U: torch.Tensor  # [m, r] storage dtype
    S: torch.Tensor  # [r]
    Vh: torch.Tensor  # [r, n]
    residual: torch.Tensor | None  # [m, n] or None
    rank: int
    full_rank: int
    energy_kept: float  # Σ_{i<r} σ_i² / ‖W‖_F²
    rel_error: float  # ‖W − (U S Vh [+ R])‖ / ‖W‖, of the stored tensors
    factor_rel_error: float  # same without the residual
    solver: str


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when present, else cpu; a clear error for anything unusable."""
    d = (device or "auto").strip().lower()
    if d == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if d == "cpu":
        return torch.device("cpu")
    if d == "cuda" or d.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise MoorizeError(f"--device {device}: no CUDA GPU is available on this machine (use cpu or auto)")
        dev = torch.device(d)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise MoorizeError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) present")
        return dev
    raise MoorizeError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N")


# compute capabilities of the data-centre GPUs, whose float64 runs at half or full float32 rate (P100, V100,
# A100, H100/H200, B200); consumer GPUs run float64 at 1/32-1/64 of it, and there the Gram solver's float64
# eigensolve loses to cuSOLVER's float32 SVD
_FULL_FLOAT64 = {(6, 0), (7, 0), (8, 0), (9, 0), (10, 0)}


def resolve_solver(solver: str, device: torch.device) -> str:
    """'auto': ``gram`` on the CPU and on GPUs with full-rate float64 (on an H200 the float64 Gram
    eigensolver was 7.9x faster than batched cuSOLVER SVD and more accurate: 1.4e-6 worst relative error
    against 1.1e-3, benchmarks/gpu.py), ``svd`` on other GPUs."""
    require_name("--solver", solver, SOLVERS, noun="solver")
    if solver == "auto":
        if device.type != "cuda":
            return "gram"
        return "gram" if torch.cuda.get_device_capability(device) in _FULL_FLOAT64 else "svd"
    return solver


def _svd(W: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    U, S, Vh = torch.linalg.svd(W.to(dtype), full_matrices=False)
    return U, S, Vh


def _gram(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched thin SVD through eigh of the float64 Gram matrix.

    For a tall A, AᵀA = V diag(σ²) Vᵀ and U = A V / σ. Columns with σ ≥ 1e-4 σ_max are
    orthonormal to ~1e-8 (the loss is about 1e-16 (σ_max/σ_i)²). The few smaller ones
    (the tail) are re-solved: A V_tail is projected off the accurate columns of U and
    factored by a small LAPACK SVD, which keeps U orthonormal at a cost of m·n·k.
    """
    A = W.to(torch.float64)
    wide = A.shape[-2] < A.shape[-1]
    if wide:
        A = A.transpose(-1, -2)
    lam, V = torch.linalg.eigh(A.transpose(-1, -2) @ A)
    lam, V = lam.flip(-1), V.flip(-1)
    S = lam.clamp_min(0).sqrt()
    U = A @ V  # becomes U in place below
    del A
    goods = [int((S[b] >= _GRAM_TAIL * S[b, 0]).sum()) if S[b, 0] > 0 else 0 for b in range(U.shape[0])]
    tails = [U[b, :, g:].clone() for b, g in enumerate(goods)]  # A V_tail, before the division
    U /= S.clamp_min(torch.finfo(torch.float64).tiny).unsqueeze(-2)
    for b, (good, tail) in enumerate(zip(goods, tails)):
        if good == S.shape[-1]:
            continue
        Ug = U[b, :, :good]
        tail = tail - Ug @ (Ug.transpose(0, 1) @ tail)
        Ut, St, Wt = torch.linalg.svd(tail, full_matrices=False)
        U[b, :, good:] = Ut - Ug @ (Ug.transpose(0, 1) @ Ut)  # null directions: keep them off Ug too
        S[b, good:] = St
        V[b, :, good:] = V[b, :, good:] @ Wt.transpose(0, 1)
    if wide:  # A = Wᵀ = U S Vᵀ  =>  W = V S Uᵀ
        U, V = V, U
    return U, S, V.transpose(-1, -2)


def _randomized(W: torch.Tensor, rank: int, dtype: torch.dtype, oversample: int, power_iters: int,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    A = W.to(dtype)
    m, n = A.shape[-2:]
    k = min(rank + oversample, m, n)
    omega = torch.randn((*A.shape[:-2], n, k), dtype=dtype, generator=generator, device="cpu").to(A.device)
    Q, _ = torch.linalg.qr(A @ omega)
    for _ in range(power_iters):
        Z, _ = torch.linalg.qr(A.transpose(-1, -2) @ Q)
        Q, _ = torch.linalg.qr(A @ Z)
    Ub, S, Vh = torch.linalg.svd(Q.transpose(-1, -2) @ A, full_matrices=False)
    return Q @ Ub, S, Vh


@dataclass
class SVDOptions:
    solver: str = "gram"
    svd_dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    residual: str = "keep"  # keep | drop
    oversample: int = 10
    power_iters: int = 2
    seed: int = 0


def check_solver_supports(solver: str, policies) -> None:
    """The randomized solver needs the rank before it sees the spectrum."""
    if solver == "randomized" and any(p.needs_spectrum for p in policies):
        raise MoorizeError("--solver randomized needs a fixed rank (N or ratio:x), not energy:x")


def decompose_group(weights: list[torch.Tensor], policies: list[RankPolicy], store_dtypes: list[torch.dtype],
                    opts: SVDOptions, names: list[str] | None = None) -> list[LayerFactors]:
    """Factor same-shaped matrices ([out, in] each); truncate and check each.

    On GPU the group is one batch (cuSOLVER's batched kernels). On CPU, LAPACK loops
    over a batch anyway and its eigh/SVD scale poorly across threads, so matrices are
    factored side by side instead, one BLAS thread per worker (~1.35x faster on 2
    cores); matrices over ``_PARALLEL_MAX_ELEMENTS`` go one at a time to bound memory.
    """
    names = names or [f"#{i}" for i in range(len(weights))]
    for name, w in zip(names, weights):
        if not torch.isfinite(w).all():
            raise MoorizeError(f"{name}: weight contains NaN or Inf; refusing to factor it")
    check_solver_supports(opts.solver, policies)
    if opts.device.type != "cpu":
        return _factor_and_check(torch.stack(weights).to(opts.device), policies, store_dtypes, opts, names)

    def one(i: int) -> LayerFactors:
        return _factor_and_check(weights[i][None], policies[i:i + 1], store_dtypes[i:i + 1], opts, names[i:i + 1])[0]

    threads = torch.get_num_threads()
    workers = min(threads, len(weights)) if weights[0].numel() <= _PARALLEL_MAX_ELEMENTS else 1
    if workers <= 1:
        return [one(i) for i in range(len(weights))]
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="moorize-svd") as pool:
            return list(pool.map(one, range(len(weights))))
    finally:
        torch.set_num_threads(threads)


def _factor_and_check(W: torch.Tensor, policies: list[RankPolicy], store_dtypes: list[torch.dtype],
                      opts: SVDOptions, names: list[str]) -> list[LayerFactors]:
    """Factor a batch [B, m, n] with the chosen solver, then truncate, store and check each matrix."""
    shape = tuple(W.shape[-2:])
    full = min(shape)
    solver = opts.solver
    if solver == "randomized":
        ranks = [p.fixed_rank(shape) for p in policies]
        kmax = max(ranks)
        if kmax >= full:  # nothing to gain: exact solver
            U, S, Vh = _svd(W, opts.svd_dtype)
            solver = "svd"
        else:
            gen = torch.Generator().manual_seed(opts.seed)
            U, S, Vh = _randomized(W, kmax, opts.svd_dtype, opts.oversample, opts.power_iters, gen)
    else:
        U, S, Vh = _gram(W) if solver == "gram" else _svd(W, opts.svd_dtype)
        ranks = [p.rank_for(S[i], shape) for i, p in enumerate(policies)]

    out = []
    for i in range(W.shape[0]):
        f = _finish(W[i], U[i], S[i], Vh[i], ranks[i], store_dtypes[i], opts, solver)
        tol = EXACT_TOLERANCE.get(store_dtypes[i], 1e-5)
        exact_expected = f.rank == full or f.residual is not None
        if exact_expected and f.rel_error > tol and f.solver != "svd":
            log.info("%s: %s solver error %.2e > %.0e, redoing with LAPACK SVD", names[i], f.solver, f.rel_error, tol)
            U2, S2, Vh2 = _svd(W[i], torch.float64)
            f = _finish(W[i], U2, S2, Vh2, ranks[i], store_dtypes[i], opts, "svd")
        if exact_expected and f.rel_error > tol:
            log.warning("%s: reconstruction error %.2e exceeds %.0e", names[i], f.rel_error, tol)
        out.append(f)
    return out


def _finish(W: torch.Tensor, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int,
            store_dtype: torch.dtype, opts: SVDOptions, solver: str) -> LayerFactors:
    full = min(W.shape)
    if rank > full:
        raise MoorizeError(f"rank {rank} exceeds min(m, n) = {full} for a {list(W.shape)} weight")
    acc = torch.float64 if store_dtype == torch.float64 else torch.float32
    Wa = W.to(acc)
    wnorm = torch.linalg.matrix_norm(Wa).item()
    Us, Ss, Vhs = (U[:, :rank].to(store_dtype).contiguous(), S[:rank].to(store_dtype).contiguous(),
                   Vh[:rank].to(store_dtype).contiguous())
    if not (torch.isfinite(Us).all() and torch.isfinite(Ss).all() and torch.isfinite(Vhs).all()):
        raise MoorizeError("SVD produced non-finite factors (the weight may overflow the storage dtype)")
    diff = torch.addmm(Wa, Us.to(acc) * Ss.to(acc), Vhs.to(acc), alpha=-1)  # W − U S Vh
    denom = wnorm if wnorm > 0 else 1.0
    factor_err = torch.linalg.matrix_norm(diff).item() / denom
    residual = None
    err = factor_err
    if rank < full and opts.residual == "keep":
        residual = diff.to(store_dtype).contiguous()
        err = torch.linalg.matrix_norm(diff - residual.to(acc)).item() / denom
    sig = S.to(torch.float64)
    if solver == "randomized":
        energy = (sig[:rank] ** 2).sum().item() / max(wnorm**2, 1e-300)
    else:
        tot = (sig**2).sum().item()
        energy = (sig[:rank] ** 2).sum().item() / tot if tot > 0 else 1.0
    return LayerFactors(Us, Ss, Vhs, residual, rank, full, min(energy, 1.0), err, factor_err, solver)
