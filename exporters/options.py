"""``ExportOptions``: every choice of an export, for every backend, checked before any work starts.

The keywords of ``export_onnx`` / ``export_torchscript`` / ``export_pt2`` and the options of
``moorize export`` (whose choices and defaults come from here). No torch import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import MoorizeError
from ..options import with_overrides

DEFAULT_OPSET = 20
MIN_OPSET = 18  # the torch exporter's own operator library starts here
DTYPES = ("float32", "float16")
WEIGHTS = ("copy", "reference")
ONNX_ONLY = ("decompose", "weights", "dtype")


@dataclass
class ExportOptions:
    with_past: bool = False  # decoders: KV-cache inputs and outputs, one token per step
    decompose: bool = False  # ONNX: standard ops only instead of one custom node per layer
    weights: str = "copy"  # ONNX: copy the weights, or reference the factored shards
    dtype: str = "float32"  # ONNX: float16 for GPU deployment
    opset: int = DEFAULT_OPSET  # ONNX
    validate_export: bool = True  # check every task against PyTorch after the export
    atol: float | None = None  # validation tolerances; None: the dtype's default
    rtol: float | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.weights not in WEIGHTS:
            raise MoorizeError(f"unknown --weights {self.weights!r}: use copy or reference")
        if self.dtype not in DTYPES:
            raise MoorizeError(f"unknown --dtype {self.dtype!r}: use one of {', '.join(DTYPES)}")
        if isinstance(self.opset, bool) or not isinstance(self.opset, int):
            raise MoorizeError(f"--opset must be an integer, got {self.opset!r}")
        for name in ("atol", "rtol"):  # a NaN tolerance would pass nothing: checked before the export runs
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise MoorizeError(f"--{name} must be a finite number >= 0, got {value!r}")

    @classmethod
    def build(cls, options: ExportOptions | None, overrides: dict) -> ExportOptions:
        """``options`` (or the defaults) with keyword ``overrides``; an unknown keyword is one line."""
        return with_overrides(cls, options, overrides, "export")

    def check_file_backend(self) -> None:
        """TorchScript and .pt2 have no ONNX choices: a non-default one is refused, not silently dropped."""
        if any(getattr(self, name) != getattr(DEFAULTS, name) for name in ONNX_ONLY):
            raise MoorizeError("--decompose, --weights and --dtype apply to --onnx only")


DEFAULTS = ExportOptions()
