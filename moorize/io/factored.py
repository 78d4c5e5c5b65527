"""The factored checkpoint format (version 1): names, moorize.json, and a reader.

A factored checkpoint is an ordinary Hugging Face model directory in which every
target weight ``<prefix>.weight`` is replaced by ``<prefix>.moore.U`` [m, r],
``<prefix>.moore.S`` [r], ``<prefix>.moore.Vh`` [r, n] and, when truncated with the
residual kept, ``<prefix>.moore.residual`` [m, n]. (m, n) = (out, in) of the map the
layer applies. All other tensors are byte-identical to the source. docs/FORMAT.md
is the specification.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    import torch

from ..errors import MoorizeError
from ..selectors import require_name
from .jsonfiles import read_versioned_json
from .safetensors import SafetensorsFile

FORMAT_NAME = "moorize.factored"
FORMAT_VERSION = 1
MANIFEST = "moorize.json"
FACTOR_NAMES = ("U", "S", "Vh", "residual")
LAYOUT_FIELDS = ("shape", "rank", "residual", "dtype")  # what a trained adapter depends on, per layer


# How a layer's [out, in] matrix is stored in the model: "linear" as ``<name>.weight`` [out, in], GPT-2's
# "conv1d" as ``<name>.weight`` [in, out]; a sparse-MoE expert ``<tensor>.<e>`` as slice e of the 3-D
# ``<tensor>`` [E, out, in] ("expert") or [E, in, out] ("expert_t", transformers' is_transposed experts).
LAYOUTS = ("linear", "conv1d", "expert", "expert_t")
EXPERT_LAYOUTS = ("expert", "expert_t")


def weight_slot(name: str, layout: str) -> tuple[str, int | None]:
    """Where a layer's weight lives in the dense model: (tensor key, expert index or None)."""
    if layout in EXPERT_LAYOUTS:
        key, _, index = name.rpartition(".")
        return key, int(index)
    return f"{name}.weight", None


def as_stored(W: "torch.Tensor", layout: str) -> "torch.Tensor":
    """The [out, in] matrix as the layout stores it (and back: the map is its own inverse)."""
    return W.t() if layout in ("conv1d", "expert_t") else W


def dense_weights(layers: Iterator[tuple[str, str, "torch.Tensor"]]) -> Iterator[tuple[str, "torch.Tensor"]]:
    """(layer name, layout, [out, in] matrix) -> (tensor key, stored tensor): experts are stacked back
    into their 3-D tensor (all experts of a tensor must be given, in any order)."""
    import torch

    experts: dict[str, dict[int, "torch.Tensor"]] = {}
    for name, layout, W in layers:
        key, index = weight_slot(name, layout)
        if index is None:
            yield key, as_stored(W, layout).contiguous()
        else:
            experts.setdefault(key, {})[index] = as_stored(W, layout)
    for key, by_index in experts.items():
        if sorted(by_index) != list(range(len(by_index))):
            raise MoorizeError(f"{key}: experts {sorted(by_index)} do not cover 0..{len(by_index) - 1}")
        yield key, torch.stack([by_index[i] for i in range(len(by_index))]).contiguous()


def factor_key(layer: str, part: str) -> str:
    """``model.layers.0.mlp.up_proj``, ``U`` -> ``model.layers.0.mlp.up_proj.moore.U``."""
    return f"{layer}.moore.{part}"


@dataclass(frozen=True)
class LayerRecord:
    """One factored layer as described in moorize.json."""

    name: str
    shape: tuple[int, int]  # (out, in)
    layout: str  # one of LAYOUTS
    rank: int
    energy_kept: float
    rel_error: float
    factor_rel_error: float
    residual: bool
    bias: bool
    dtype: str
    source_dtype: str
    solver: str

    @classmethod
    def from_json(cls, name: str, d: dict) -> "LayerRecord":
        return cls(name, tuple(d["shape"]), d["layout"], int(d["rank"]), float(d["energy_kept"]),
                   float(d["rel_error"]), float(d["factor_rel_error"]), bool(d["residual"]), bool(d["bias"]),
                   d["dtype"], d["source_dtype"], d["solver"])

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "layout": self.layout, "rank": self.rank,
                "energy_kept": self.energy_kept, "rel_error": self.rel_error,
                "factor_rel_error": self.factor_rel_error, "residual": self.residual, "bias": self.bias,
                "dtype": self.dtype, "source_dtype": self.source_dtype, "solver": self.solver}

    @property
    def full_rank(self) -> int:
        return min(self.shape)


def factor_layout_of(rec: LayerRecord) -> dict:
    """The fields of ``FactoredCheckpoint.factor_layout`` for one layer."""
    return {"shape": list(rec.shape), "rank": rec.rank, "residual": rec.residual, "dtype": rec.dtype}


def layout_fingerprint(source_fingerprint: str, layout: dict[str, dict]) -> str:
    """sha256 over the source fingerprint and the per-layer layout (layer order does not matter)."""
    payload = {"kind": "moorize.layout", "version": 1, "source": source_fingerprint,
               "layers": {name: {k: layout[name][k] for k in LAYOUT_FIELDS} for name in sorted(layout)}}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


class FactoredCheckpoint:
    """Read access to a factored checkpoint directory; opens shards lazily, reads tensors on demand."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        manifest_path = self.directory / MANIFEST
        if not manifest_path.is_file():
            raise MoorizeError(f"{self.directory} is not a factored checkpoint (no {MANIFEST}); run moorize convert")
        self.manifest = read_versioned_json(manifest_path, FORMAT_NAME, FORMAT_VERSION, "moorize manifest")
        self.layers: dict[str, LayerRecord] = {
            n: LayerRecord.from_json(n, d) for n, d in self.manifest["layers"].items()
        }
        self._files: dict[str, SafetensorsFile] = {}
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif (self.directory / "model.safetensors").is_file():
            self.weight_map = {i.name: "model.safetensors" for i in self._file("model.safetensors").infos()}
        else:
            raise MoorizeError(f"{self.directory} has no model.safetensors or shard index")

    def _file(self, fname: str) -> SafetensorsFile:
        if fname not in self._files:
            self._files[fname] = SafetensorsFile(self.directory / fname)
        return self._files[fname]

    # ---- metadata -------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        """The fingerprint of the source checkpoint the factors came from."""
        return self.manifest["source"]["fingerprint"]

    @property
    def factor_layout(self) -> dict[str, dict]:
        """Per factored layer, in manifest order, what an adapter trained on this base depends on:
        ``{"shape": [m, n], "rank": r, "residual": bool, "dtype": str}`` (read from moorize.json)."""
        return {name: factor_layout_of(rec) for name, rec in self.layers.items()}

    @property
    def layout_fingerprint(self) -> str:
        """The fingerprint of the factored base: the source fingerprint plus every layer's shape, rank,
        residual and factor dtype. Two conversions of one source with other ranks, ``--residual`` or
        ``--dtype`` differ; reconverting with the same settings (any solver or device) does not.
        Computed from moorize.json alone, so it costs nothing to check."""
        return layout_fingerprint(self.fingerprint, self.factor_layout)

    @property
    def config_path(self) -> Path:
        return self.directory / "config.json"

    def tensor_names(self) -> list[str]:
        return list(self.weight_map)

    def passthrough_names(self) -> list[str]:
        """Tensors stored as in the source (everything but the factors), in checkpoint order."""
        factors = {factor_key(n, p) for n in self.layers for p in FACTOR_NAMES}
        return [k for k in self.weight_map if k not in factors]

    # ---- tensors --------------------------------------------------------------------------------
    def tensor(self, key: str) -> torch.Tensor:
        if key not in self.weight_map:
            raise MoorizeError(f"{self.directory}: no tensor {key!r}")
        return self._file(self.weight_map[key]).load(key)

    def tensor_nbytes(self, key: str) -> int:
        """The stored size of a tensor, read from its shard's header (nothing of the tensor is read)."""
        if key not in self.weight_map:
            raise MoorizeError(f"{self.directory}: no tensor {key!r}")
        return self._file(self.weight_map[key]).data_range(key)[3]

    def _layer(self, name: str) -> LayerRecord:
        return self.layers[require_name("name", name, self.layers, noun="factored layer",
                                        plural=f"the factored layers of {self.directory}")]

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(U [m, r], S [r], Vh [r, n], residual [m, n] or None) as stored."""
        rec = self._layer(name)
        U, S, Vh = (self.tensor(factor_key(name, p)) for p in ("U", "S", "Vh"))
        R = self.tensor(factor_key(name, "residual")) if rec.residual else None
        return U, S, Vh, R

    def reconstruct(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The [out, in] matrix the layer applies: U diag(S) Vh (+ residual), in ``dtype`` (default float32)."""
        import torch

        dtype = dtype or torch.float32
        U, S, Vh, R = self.factors(name)
        W = (U.to(dtype) * S.to(dtype)) @ Vh.to(dtype)
        if R is not None:
            W = W + R.to(dtype)
        return W

    def reconstruct_weight(self, name: str) -> torch.Tensor:
        """The weight as the source stored it (Conv1D transposed back), in its source dtype.

        Accumulates in float64: the float32 factors represent W to ~5e-8, a float32
        product would add ~3e-7 of its own rounding.
        """
        import torch

        rec = self._layer(name)
        W = as_stored(self.reconstruct(name, torch.float64), rec.layout)
        return W.to(getattr(torch, rec.source_dtype)).contiguous()

    def dense_state_dict(self, matrix=None) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor of the original model, targets rebuilt from their factors (experts restacked), or given
        by ``matrix(name)`` (the layer's [out, in] matrix, e.g. the source's own weight)."""
        import torch

        for key in self.passthrough_names():
            yield key, self.tensor(key)
        yield from dense_weights(
            (n, r.layout, (matrix(n) if matrix is not None else self.reconstruct(n, torch.float64))
             .to(getattr(torch, r.source_dtype)))
            for n, r in self.layers.items())

    def dense_model(self, matrix=None):
        """The original transformers model rebuilt from the factors (for checks and dense merges), or with each
        target's [out, in] matrix given by ``matrix(name)``."""
        from transformers import AutoConfig

        from .hf import model_class

        config = AutoConfig.from_pretrained(self.directory)
        model = model_class(config)(config)
        missing, unexpected = model.load_state_dict(dict(self.dense_state_dict(matrix)), strict=False)
        # buffers the architecture no longer persists (BERT's embeddings.position_ids) are not weights
        buffers = {n for n, _ in model.named_buffers()}
        unexpected = [k for k in unexpected if k not in buffers]
        model.tie_weights()
        loaded = {p.data_ptr() for n, p in model.named_parameters() if n not in missing}
        params = dict(model.named_parameters(remove_duplicate=False))
        untied = [k for k in missing if k in params and params[k].data_ptr() not in loaded]
        if unexpected or untied:
            raise MoorizeError(f"{self.directory}: tensors do not fit the architecture "
                               f"(missing {untied[:3]}, unexpected {unexpected[:3]})")
        return model.eval()

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}

    def __enter__(self) -> "FactoredCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FactoredCheckpoint({str(self.directory)!r}, layers={len(self.layers)})"

