"""Adapters: the trained MoORE parameters, saved small and apart from the factored base.

An adapter directory follows PEFT's convention: ``adapter_config.json`` (format,
base fingerprint, router mode, task names -> ids, hyper-parameters) and
``adapter_model.safetensors`` (per layer: Householder vectors, task embeddings and
router weights, σ when trained, keyed ``<layer>.<parameter>``). It is refused on a
base whose fingerprint differs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .checkpoint import SafetensorsFile, ShardFile
from .errors import MoorizeError
from .manifest import read_versioned_json
from .modeling import MoOREConfig
from .outdir import atomic_output_dir

ADAPTER_FORMAT = "moorize.adapter"
ADAPTER_VERSION = 1
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def save_adapter(model, directory, *, heads=None, overwrite: bool = True, extra: dict | None = None) -> Path:
    """Write the MoORE parameters of a model returned by ``moorize.load`` (and its task heads) to ``directory``."""
    directory = Path(directory)
    with atomic_output_dir(directory, overwrite) as tmp:
        write_adapter_files(model, tmp, heads=heads, extra=extra)
    return directory


def write_adapter_files(model, directory: Path, *, heads=None, extra: dict | None = None) -> None:
    """The two adapter files inside an existing directory; the config goes last, so it marks them complete."""
    from .routed import trainable_parameters

    config: MoOREConfig = model.moore_config
    params = dict(trainable_parameters(model))
    if heads is not None:
        params.update(heads.state_tensors())
    params = {k: p.detach().cpu().contiguous() for k, p in params.items()}
    shard = ShardFile(directory / WEIGHTS_NAME, list(params))
    for k, t in params.items():
        shard.add_tensor(k, t)
    shard.close()
    meta = {
        "format": ADAPTER_FORMAT,
        "format_version": ADAPTER_VERSION,
        "base_fingerprint": model.moore_base_fingerprint,
        "moore": config.to_dict(),
        "task_ids": {name: i for i, name in enumerate(config.tasks)},
        "layers": sorted(model.moore_layer_paths),
        **({"heads": heads.describe()} if heads is not None else {}),
        **(extra or {}),
    }
    tmp = directory / f".{CONFIG_NAME}.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, directory / CONFIG_NAME)


def read_adapter_config(directory: str | os.PathLike, base_fingerprint: str | None = None) -> dict:
    """adapter_config.json of an adapter directory, checked; refuses one trained on a different base."""
    d = Path(directory)
    cfg_path, weights_path = d / CONFIG_NAME, d / WEIGHTS_NAME
    if not d.is_dir():
        raise MoorizeError(f"adapter directory {d} does not exist")
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise MoorizeError(f"adapter {d} is missing {p.name}")
    meta = read_versioned_json(cfg_path, ADAPTER_FORMAT, ADAPTER_VERSION, "moorize adapter")
    if base_fingerprint is not None and meta.get("base_fingerprint") != base_fingerprint:
        raise MoorizeError(
            f"adapter {d} was trained on a different base checkpoint ({str(meta.get('base_fingerprint'))[:19]}...) "
            f"than this one ({base_fingerprint[:19]}...)"
        )
    return meta


def read_adapter(directory: str | os.PathLike, base_fingerprint: str | None = None
                 ) -> tuple[MoOREConfig, dict[str, torch.Tensor]]:
    """(config, tensors) of an adapter; refuses one trained on a different base."""
    meta = read_adapter_config(directory, base_fingerprint)
    config = MoOREConfig(**dict(meta["moore"]))
    f = SafetensorsFile(Path(directory) / WEIGHTS_NAME)
    try:
        tensors = {info.name: f.load(info.name) for info in f.infos()}
    finally:
        f.close()
    return config, tensors
