"""``LoraOptions``: the choices of a LoRA export, checked before any work. No torch import (the CLI reads it)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import MoorizeError
from ..options import check_options, option, with_overrides

DEFAULT_MAX_ERROR = 1e-3
LORA_DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass
class LoraOptions:
    """How each task becomes a LoRA: the keywords of ``moorize.export_lora`` and the LoRA options of
    ``moorize export``."""

    rank: int | None = option(None, kind=int, low=1, help="LoRA: one rank for every layer (a layer of lower "
                                                           "full rank gets its full rank). Excludes --max-error.")
    max_error: float | None = option(None, kind=float, low=0.0, high=1.0, low_open=True, high_open=True,
                                     metavar="E",
                                     help="LoRA: per layer the smallest rank whose relative error ||dW - BA|| / "
                                          f"||W_task|| is at most E [default: {DEFAULT_MAX_ERROR:g}, when --rank "
                                          "is not given].")
    source: str | None = option(None, metavar="PATH",
                                help="LoRA: the source checkpoint (directory or .gguf) the deltas are taken "
                                     "against. Default: the path moorize.json records.")
    lora_dtype: str = option("auto", choices=LORA_DTYPES,
                             help="LoRA: dtype of the adapter tensors (auto: the source weights' dtype).")
    device: str = option("auto", help="LoRA: where the SVDs run: auto, cpu, cuda or cuda:N.")

    def __post_init__(self) -> None:
        check_options(self)
        if self.rank is not None and self.max_error is not None:
            raise MoorizeError("--rank and --max-error exclude each other: give one (LoraOptions.rank, "
                               "LoraOptions.max_error)")

    @property
    def error_bound(self) -> float | None:
        """The per-layer error bound the ranks are chosen by (None with a fixed rank)."""
        return None if self.rank is not None else (self.max_error if self.max_error is not None
                                                   else DEFAULT_MAX_ERROR)

    def describe(self) -> str:
        return f"rank {self.rank}" if self.rank is not None else f"max error {self.error_bound:g}"

    @classmethod
    def build(cls, options: LoraOptions | None, overrides: dict) -> LoraOptions:
        """``options`` (or the defaults) with keyword ``overrides``; an unknown keyword is one line."""
        return with_overrides(cls, options, overrides, "LoRA export")


DEFAULTS = LoraOptions()
