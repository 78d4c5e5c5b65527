"""``ExportOptions``: every choice of an export, for every backend, checked before any work starts.

The keywords of ``export_onnx`` / ``export_torchscript`` / ``export_pt2`` and the options of
``moorize export`` (whose choices and defaults come from here). No torch import.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import MoorizeError
from ..options import check_options, option, with_overrides

DEFAULT_OPSET = 20
MIN_OPSET = 18  # the torch exporter's own operator library starts here
DTYPES = ("float32", "float16")
WEIGHTS = ("copy", "reference")
ONNX_ONLY = ("decompose", "weights", "dtype")
GRAPH_ONLY = ("with_past", *ONNX_ONLY, "opset", "atol", "rtol")  # what a LoRA export (no graph) has no use for


@dataclass
class ExportOptions:
    """Every choice of an export: the keywords of the export functions and the options of ``moorize export``."""

    with_past: bool = option(False, help="Decoders and encoder-decoders: KV-cache inputs (past_key_values.*) and "
                                         "outputs (present.*), one token per step.")
    decompose: bool = option(False, help="ONNX: standard ops only instead of one ai.moorize::MoORELinear node per "
                                         "layer.")
    weights: str = option("copy", choices=WEIGHTS, help="ONNX: copy the weights to model.onnx_data, or reference the "
                                                        "factored shards (hard-linked into DEST, no bytes copied; DEST "
                                                        "must be on the same filesystem).")
    dtype: str = option("float32", choices=DTYPES, help="ONNX: float16 for GPU deployment.")
    opset: int = option(DEFAULT_OPSET, kind=int, help=f"ONNX opset ({MIN_OPSET} or newer).")
    validate_export: bool = option(True, flag="validate", negatable=True,
                                   help="Check every task against PyTorch after the export (--no-validate: skip).")
    atol: float | None = option(None, kind=float, low=0.0,
                                help="Validation: each output's max |difference| from PyTorch must stay within atol + "
                                     "rtol * max|PyTorch output| [default atol: 1e-4 in float32, 1e-3 in float16].")
    rtol: float | None = option(None, kind=float, low=0.0,
                                help="Validation: see --atol [default: 1e-5 in float32 (rounding grows with the "
                                     "output's scale), 5e-2 in float16].")
    overwrite: bool = option(False, help="Replace an existing DEST (only once the new one is complete).")

    def __post_init__(self) -> None:
        check_options(self)  # a NaN tolerance would pass nothing: checked before the export runs

    @classmethod
    def build(cls, options: ExportOptions | None, overrides: dict) -> ExportOptions:
        """``options`` (or the defaults) with keyword ``overrides``; an unknown keyword is one line."""
        return with_overrides(cls, options, overrides, "export")

    def check_file_backend(self) -> None:
        """TorchScript and .pt2 have no ONNX choices: a non-default one is refused, not silently dropped."""
        if any(getattr(self, name) != getattr(DEFAULTS, name) for name in ONNX_ONLY):
            raise MoorizeError("--decompose, --weights and --dtype apply to --onnx only")

    def check_lora_only(self) -> None:
        """A LoRA export alone writes no graph: a graph choice given with it is refused, not silently dropped."""
        given = [name for name in GRAPH_ONLY if getattr(self, name) != getattr(DEFAULTS, name)]
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise MoorizeError(f"{flags} appl{'ies' if len(given) == 1 else 'y'} to --onnx, --torchscript and --pt2, "
                               "not to --lora")


DEFAULTS = ExportOptions()
