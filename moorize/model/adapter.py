"""Adapters: the trained MoORE parameters, saved small and apart from the factored base.

An adapter directory follows PEFT's convention: ``adapter_config.json`` (format,
base fingerprints and layout, router mode, task names -> ids, hyper-parameters) and
``adapter_model.safetensors`` (per layer: Householder vectors, task embeddings and
router weights, σ when trained, keyed ``<layer>.<parameter>``). It is refused on a
base whose source fingerprint differs, and on a conversion of the right source with
other ranks, residuals or factor dtypes (``base_layout``, ``base_layout_fingerprint``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import MoorizeError
from ..io.factored import LAYOUT_FIELDS
from ..io.jsonfiles import read_versioned_json
from ..io.outdir import atomic_output_dir
from ..io.safetensors import read_tensors
from ..io.shards import write_tensors
from .layer import MoOREConfig, trainable_parameters

ADAPTER_FORMAT = "moorize.adapter"
ADAPTER_VERSION = 1
HEADS_PREFIX = "moore_heads."  # adapter tensor names of the heads (no layer name starts with it)
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def save_adapter(model, directory, *, heads=None, overwrite: bool = True, extra: dict | None = None) -> Path:
    """Write the MoORE parameters of a model returned by ``moorize.load`` (and its task heads) to ``directory``."""
    directory = Path(directory)
    with atomic_output_dir(directory, overwrite) as tmp:
        write_adapter_files(model, tmp, heads=heads, extra=extra)
    return directory


def write_adapter_files(model, directory: Path, *, heads=None, extra: dict | None = None,
                        tensors: dict | None = None) -> None:
    """The two adapter files inside an existing directory; the config goes last, so it marks them complete.
    ``tensors`` replaces the model's own (training passes them gathered from every FSDP process)."""
    config: MoOREConfig = model.moore.config
    if tensors is not None:
        params = dict(tensors)
    else:
        params = dict(trainable_parameters(model))
        if heads is not None:
            params.update(heads.state_tensors())
    write_tensors(directory / WEIGHTS_NAME, params)
    meta = {
        "format": ADAPTER_FORMAT,
        "format_version": ADAPTER_VERSION,
        "base_fingerprint": model.moore.base_fingerprint,
        **({"base_layout_fingerprint": model.moore.base_layout_fingerprint}
           if model.moore.base_layout_fingerprint else {}),
        **({"base_path": model.moore.base_path} if model.moore.base_path else {}),
        "moore": config.to_dict(),
        "task_ids": {name: i for i, name in enumerate(config.tasks)},
        "layers": sorted(model.moore.layer_paths),
        **({"heads": heads.describe()} if heads is not None else {}),
        **(extra or {}),
        **({"base_layout": model.moore.base_layout} if model.moore.base_layout else {}),
    }
    tmp = directory / f".{CONFIG_NAME}.tmp"
    tmp.write_text(_config_text(meta))
    os.replace(tmp, directory / CONFIG_NAME)


def _config_text(meta: dict) -> str:
    """adapter_config.json as indented JSON, with one line per layer of ``base_layout`` (the last key)."""
    layout = meta.get("base_layout")
    if not layout:
        return json.dumps(meta, indent=2) + "\n"
    body = json.dumps({k: v for k, v in meta.items() if k != "base_layout"}, indent=2)
    rows = ",\n".join(f"    {json.dumps(name)}: {json.dumps(entry)}" for name, entry in layout.items())
    return body[:-2] + ',\n  "base_layout": {\n' + rows + "\n  }\n}\n"


def read_adapter_config(directory: str | os.PathLike, base_fingerprint: str | None = None, *,
                        base=None) -> dict:
    """adapter_config.json of an adapter directory, checked; refuses one trained on a different base.

    ``base_fingerprint``: the source fingerprint the adapter must record. ``base``: the
    FactoredCheckpoint it is to be loaded on; checks the source fingerprint and, for adapters
    that record it (all written since moorize recorded ``base_layout_fingerprint``), the
    factored layout too: ranks, residuals and factor dtypes of every layer.
    """
    d = Path(directory)
    cfg_path, weights_path = d / CONFIG_NAME, d / WEIGHTS_NAME
    if not d.is_dir():
        raise MoorizeError(f"adapter directory {d} does not exist")
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise MoorizeError(f"adapter {d} is missing {p.name}")
    meta = read_versioned_json(cfg_path, ADAPTER_FORMAT, ADAPTER_VERSION, "moorize adapter")
    if base is not None:
        base_fingerprint = base.fingerprint
    if base_fingerprint is not None and meta.get("base_fingerprint") != base_fingerprint:
        raise MoorizeError(
            f"adapter {d} was trained on a different base checkpoint ({str(meta.get('base_fingerprint'))[:19]}...) "
            f"than this one ({base_fingerprint[:19]}...)"
        )
    if base is not None:
        check_base_layout(d, meta, base)
    return meta


def check_base_layout(d: Path, meta: dict, base) -> None:
    """Refuse an adapter trained on another conversion of the same source (other ranks, residual, dtype).

    Adapters without ``base_layout_fingerprint`` / ``base_layout`` (written before moorize recorded
    them) are checked by their source fingerprint only.
    """
    recorded_fp = meta.get("base_layout_fingerprint")
    recorded = meta.get("base_layout")
    if recorded_fp is None and recorded is None:
        return
    if recorded_fp is not None and not isinstance(recorded_fp, str):
        raise MoorizeError(f"adapter {d}: {CONFIG_NAME} has a malformed base_layout_fingerprint")
    if recorded_fp is not None and recorded_fp == base.layout_fingerprint:
        return
    if recorded is not None:
        difference = _layout_difference(d, _valid_layout(d, recorded), base.factor_layout)
        if difference:
            raise MoorizeError(f"adapter {d} was trained on {difference}: convert the source again with the "
                               "adapter's settings, or load the adapter on the base it was trained on")
        return  # the layers match: a fingerprint from another version of the computation
    raise MoorizeError(f"adapter {d} was trained on another conversion of this source (layout "
                       f"{recorded_fp[:19]}..., this base {base.layout_fingerprint[:19]}...): ranks, residuals or "
                       "factor dtypes differ; load it on the base it was trained on")


def _valid_layout(d: Path, recorded) -> dict[str, dict]:
    """``base_layout`` of an adapter config, type-checked (a hand-edited file gets one line, not a traceback)."""
    def ok(e) -> bool:
        return (isinstance(e, dict) and set(LAYOUT_FIELDS) <= set(e)
                and isinstance(e["shape"], list) and len(e["shape"]) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) for x in e["shape"])
                and isinstance(e["rank"], int) and not isinstance(e["rank"], bool)
                and isinstance(e["residual"], bool) and isinstance(e["dtype"], str))

    if not isinstance(recorded, dict):
        raise MoorizeError(f"adapter {d}: {CONFIG_NAME} has a malformed base_layout")
    for name, entry in recorded.items():
        if not ok(entry):
            raise MoorizeError(f"adapter {d}: {CONFIG_NAME} has a malformed base_layout entry for {name!r}")
    return recorded


def _describe(entry: dict, fields: list[str]) -> str:
    words = {"shape": lambda e: f"shape {e['shape'][0]}x{e['shape'][1]}",
             "rank": lambda e: f"rank {e['rank']}",
             "residual": lambda e: "the residual kept" if e["residual"] else "no residual",
             "dtype": lambda e: f"{e['dtype']} factors"}
    parts = [words[f](entry) for f in fields]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _layout_difference(d: Path, recorded: dict[str, dict], here: dict[str, dict]) -> str | None:
    """How the base an adapter was trained on differs from this one (None if it does not), in words."""
    lacking = [n for n in recorded if n not in here]
    if lacking:
        more = f" and {len(lacking) - 1} more" if len(lacking) > 1 else ""
        return (f"a base that factored {lacking[0]}{more}, which this base does not "
                "(it was converted with other --targets)")
    extra = [n for n in here if n not in recorded]
    if extra:
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        return (f"a base that did not factor {extra[0]}{more}, which this base does "
                "(it was converted with other --targets)")
    differing = [n for n in here if any(recorded[n][f] != here[n][f] for f in LAYOUT_FIELDS)]
    if not differing:
        return None
    name = differing[0]
    fields = [f for f in LAYOUT_FIELDS if recorded[name][f] != here[name][f]]
    shown = [f for f in LAYOUT_FIELDS if f in fields or f == "rank"]  # the rank for context
    more = f" (and {len(differing) - 1} more layer{'s' if len(differing) > 2 else ''})" if len(differing) > 1 else ""
    return (f"a base with {_describe(recorded[name], shown)} for {name}; this base has "
            f"{_describe(here[name], shown)}{more}")


def read_adapter(directory: str | os.PathLike, base_fingerprint: str | None = None, *, base=None
                 ) -> tuple[MoOREConfig, dict[str, torch.Tensor]]:
    """(config, tensors) of an adapter; refuses one trained on a different base (``read_adapter_config``)."""
    meta = read_adapter_config(directory, base_fingerprint, base=base)
    return adapter_moore_config(directory, meta), read_tensors(Path(directory) / WEIGHTS_NAME)


def adapter_moore_config(directory: str | os.PathLike, meta: dict | None = None) -> MoOREConfig:
    """The MoORE settings an adapter recorded (router mode, tasks, ...), from adapter_config.json alone (``meta``
    when already read): what a command checks its ``--task`` against before loading any weights."""
    meta = read_adapter_config(directory) if meta is None else meta
    return MoOREConfig.from_saved(meta.get("moore"), f"adapter {directory}: {CONFIG_NAME}")
