"""Every choice of a conversion in one object, ``ConvertOptions``: the keywords of ``moorize.convert``
and the options of ``moorize convert`` (whose choices and defaults come from here, so each lives in
one place). No torch import: the CLI builds its options from this module at start-up."""

from __future__ import annotations

from dataclasses import dataclass

from ..options import check_options, option, with_overrides

RESIDUALS = ("keep", "drop")
SOLVERS = ("auto", "gram", "svd", "randomized")
SVD_DTYPES = ("float32", "float64")
STORE_DTYPES = ("float32", "float16", "bfloat16", "float64")
# bytes of float32 weights decomposed together: LAPACK on CPU loops over a batch anyway,
# so small batches bound memory for free; cuSOLVER's batched kernels want many matrices
DEFAULT_BATCH = {"cpu": "64MB", "cuda": "1GB"}


@dataclass
class ConvertOptions:
    """How to factor a checkpoint: the keywords of ``moorize.convert`` and the options of ``moorize convert``."""

    targets: list[str] | None = option(None, multiple=True, metavar="PATTERN",
                                       help="Layers to factor (glob, or regex with 're:'); repeatable, each must match "
                                            "a layer. Default: every linear layer inside the transformer blocks.")
    rank: list[str] | str | None = option(None, multiple=True, metavar="POLICY",
                                          help="full (default), N, energy:0.99 or ratio:0.25; 'PATTERN=POLICY' "
                                               "overrides per layer (e.g. 'mlp.*=energy:0.95'; the last matching one "
                                               "wins, and each must set some target's rank). Repeatable.")
    residual: str = option("keep", choices=RESIDUALS, help="When truncated: keep W - U_r S_r Vh_r (model stays "
                                                          "exact) or drop it (compression).")
    solver: str = option("auto", choices=SOLVERS, help="auto: gram on CPU (float64 Gram + eigh), svd on GPU; "
                                                       "randomized for fixed truncated ranks.")
    oversample: int = option(10, kind=int, low=0, high=1 << 20, help="Randomized solver: extra columns.")
    power_iters: int = option(2, kind=int, low=0, high=1000, help="Randomized solver: power iterations.")
    svd_dtype: str = option("float32", choices=SVD_DTYPES,
                            help="Precision of the svd/randomized solvers (gram always forms its Gram matrix in "
                                 "float64).")
    dtype: str | None = option(None, choices=STORE_DTYPES, help="Storage dtype of the factors. Default: the source "
                                                                "dtype of each weight.")
    device: str = option("auto", help="auto, cpu, cuda or cuda:N.")
    revision: str | None = option(None, help="Branch, tag or commit of a Hub id MODEL_DIR (default: main).")
    gguf_file: str | None = option(None, help="GGUF file name inside MODEL_DIR (de-quantised to float32).")
    allow_pickle: bool = option(False, help="Accept pytorch_model.bin (loaded with weights_only=True).")
    overwrite: bool = option(False, help="Replace a non-empty OUT_DIR (only once the new one is complete).")
    max_shard_size: str | int = option("2GB", help="Largest output shard.")
    batch_size: str | int = option("auto", help="Same-shaped weights decomposed together, in float32 bytes (auto: "
                                                + ", ".join(f"{v} on {k.upper()}" for k, v in DEFAULT_BATCH.items())
                                                + ").")
    seed: int = option(0, kind=int, low=0, high=2**63 - 1, help="Seed of the randomized solver.")

    def __post_init__(self) -> None:
        check_options(self)

    @classmethod
    def build(cls, options: ConvertOptions | None, overrides: dict) -> ConvertOptions:
        """``options`` (or the defaults) with keyword ``overrides``; an unknown keyword is one line."""
        return with_overrides(cls, options, overrides, "conversion")


DEFAULTS = ConvertOptions()
