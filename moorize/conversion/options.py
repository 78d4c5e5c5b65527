"""Every choice of a conversion in one object, ``ConvertOptions``: the keywords of ``moorize.convert``
and the options of ``moorize convert`` (whose choices and defaults come from here, so each lives in
one place). No torch import: the CLI builds its options from this module at start-up."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import MoorizeError
from ..options import with_overrides

RESIDUALS = ("keep", "drop")
SOLVERS = ("auto", "gram", "svd", "randomized")
SVD_DTYPES = ("float32", "float64")
STORE_DTYPES = ("float32", "float16", "bfloat16", "float64")
# bytes of float32 weights decomposed together: LAPACK on CPU loops over a batch anyway,
# so small batches bound memory for free; cuSOLVER's batched kernels want many matrices
DEFAULT_BATCH = {"cpu": "64MB", "cuda": "1GB"}


@dataclass
class ConvertOptions:
    """How to factor a checkpoint; see ``moorize convert --help`` for each option."""

    targets: list[str] | None = None  # glob or 're:' patterns; None: every linear layer inside the blocks
    rank: list[str] | str | None = None  # full (None), N, energy:x, ratio:x, 'PATTERN=POLICY' overrides
    residual: str = "keep"
    solver: str = "auto"
    svd_dtype: str = "float32"
    dtype: str | None = None  # storage dtype of the factors; None: each weight's source dtype
    device: str = "auto"
    gguf_file: str | None = None
    allow_pickle: bool = False
    overwrite: bool = False
    max_shard_size: str | int = "2GB"
    batch_size: str | int = "auto"
    oversample: int = 10
    power_iters: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        for name, choices in (("residual", RESIDUALS), ("solver", SOLVERS), ("svd_dtype", SVD_DTYPES)):
            if getattr(self, name) not in choices:
                raise MoorizeError(f"--{name.replace('_', '-')} must be one of {', '.join(choices)}, "
                                   f"got {getattr(self, name)!r}")
        if self.dtype is not None and self.dtype not in STORE_DTYPES:
            raise MoorizeError(f"--dtype must be one of {', '.join(STORE_DTYPES)}, got {self.dtype!r}")
        for name, lo, hi in (("oversample", 0, 1 << 20), ("power_iters", 0, 1000), ("seed", 0, 2**63 - 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise MoorizeError(f"{name.replace('_', '-')} must be an integer in [{lo}, {hi}], got {value!r}")

    @classmethod
    def build(cls, options: ConvertOptions | None, overrides: dict) -> ConvertOptions:
        """``options`` (or the defaults) with keyword ``overrides``; an unknown keyword is one line."""
        return with_overrides(cls, options, overrides, "conversion")


DEFAULTS = ConvertOptions()
