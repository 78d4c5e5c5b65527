"""Training checkpoints: trainable tensors, optimizer, scheduler, RNG and data position.

Nothing is a pickle: tensors go to safetensors, everything else to JSON, so resuming from a run
directory someone else prepared can never execute code."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import torch

from ..errors import MoorizeError
from ..io.safetensors import read_tensors
from ..io.shards import write_tensors

log = logging.getLogger(__name__)


# ---- checkpoints -------------------------------------------------------------------------------------------------

def _checkpoint_dirs(run: Path) -> list[Path]:
    root = run / "checkpoints"
    done = [d for d in root.glob("step-*") if (d / "state.json").is_file()] if root.is_dir() else []
    return sorted(done, key=lambda d: int(d.name.split("-")[1]))


def _save_checkpoint(run: Path, step: int, trainable: dict[str, torch.Tensor], optimizer, scheduler,
                     accelerator, keep: int, position: dict) -> None:
    """Routers + optimizer + scheduler + RNG (per rank) + data position; state.json last marks it whole.

    Nothing in a checkpoint is a pickle: tensors go to safetensors, everything else to JSON,
    so resuming from a run directory someone else prepared can never execute code.
    """
    final = run / "checkpoints" / f"step-{step:07d}"
    tmp = run / "checkpoints" / f".step-{step:07d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    _save_rng(tmp, accelerator.process_index)
    if accelerator.is_main_process:
        write_tensors(tmp / TRAINABLE_FILE, {k: p.detach() for k, p in trainable.items()})
        _save_optimizer(tmp, optimizer.state_dict())
        _write_json(tmp / SCHEDULER_FILE, scheduler.state_dict())
        _write_json(tmp / STATE_FILE, {"step": step, **position})
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in _checkpoint_dirs(run)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _load_checkpoint(ckpt: Path, trainable: dict[str, torch.Tensor], optimizer, scheduler, rank: int) -> dict:
    if any(ckpt.glob("*.pt")) and not (ckpt / OPTIMIZER_TENSORS).is_file():
        raise MoorizeError(f"{ckpt} was written by an older moorize with pickle files, which moorize no longer "
                           "loads (they can run code): start the run over with --overwrite")
    for name in (TRAINABLE_FILE, OPTIMIZER_TENSORS, OPTIMIZER_FILE, SCHEDULER_FILE, STATE_FILE):
        if not (ckpt / name).is_file():
            raise MoorizeError(f"checkpoint {ckpt} is incomplete: {name} is missing")
    if not (ckpt / f"rng-{rank}.json").is_file():
        raise MoorizeError(f"{ckpt} was saved by fewer processes than this run has; resume with the same count")
    saved = read_tensors(ckpt / TRAINABLE_FILE)
    if set(saved) != set(trainable):
        raise MoorizeError(f"checkpoint {ckpt} holds other parameters than this run trains")
    with torch.no_grad():
        for k, p in trainable.items():
            if saved[k].shape != p.shape:
                raise MoorizeError(f"checkpoint {ckpt}: {k} has shape {list(saved[k].shape)}, "
                                   f"the run trains {list(p.shape)}")
            p.copy_(saved[k])
    try:
        optimizer.load_state_dict(_load_optimizer_state(ckpt, optimizer))
        scheduler.load_state_dict(_read_json(ckpt / SCHEDULER_FILE))
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise MoorizeError(f"checkpoint {ckpt} is corrupt: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                           ) from None
    _load_rng(ckpt, rank)
    state = _read_json(ckpt / STATE_FILE)
    if not isinstance(state.get("step"), int) or state["step"] < 0:
        raise MoorizeError(f"checkpoint {ckpt} is corrupt: {STATE_FILE} has no valid step")
    return state


TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_TENSORS = "optimizer.safetensors"  # per-parameter state: "<param index>/<name>"
OPTIMIZER_FILE = "optimizer.json"  # param groups and any non-tensor state
SCHEDULER_FILE = "scheduler.json"
STATE_FILE = "state.json"


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=1, allow_nan=True) + "\n")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MoorizeError(f"cannot read {path}: {getattr(e, 'strerror', None) or 'not valid JSON'}") from None


def _save_optimizer(directory: Path, state_dict: dict) -> None:
    tensors, scalars = {}, {}
    for idx, entries in state_dict["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}/{name}"] = value
            else:
                scalars.setdefault(str(idx), {})[name] = value
    write_tensors(directory / OPTIMIZER_TENSORS, tensors)
    _write_json(directory / OPTIMIZER_FILE, {"param_groups": state_dict["param_groups"], "scalars": scalars})


def _load_optimizer_state(directory: Path, optimizer) -> dict:
    """The optimizer's state_dict rebuilt from safetensors + JSON; tuples (e.g. Adam's betas) restored."""
    meta = _read_json(directory / OPTIMIZER_FILE)
    state: dict[int, dict] = {}
    for key, tensor in read_tensors(directory / OPTIMIZER_TENSORS).items():
        idx, _, name = key.partition("/")
        state.setdefault(int(idx), {})[name] = tensor
    for idx, entries in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(entries)
    groups = meta["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        raise ValueError(f"{len(groups)} parameter groups, the run has {len(optimizer.param_groups)}")
    for saved, live in zip(groups, optimizer.param_groups):
        for k, v in live.items():
            if isinstance(v, tuple) and isinstance(saved.get(k), list):
                saved[k] = tuple(saved[k])
    return {"state": state, "param_groups": groups}


def _save_rng(directory: Path, rank: int) -> None:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda/{i}": t for i, t in enumerate(torch.cuda.get_rng_state_all())})
    version, internal, gauss = random.getstate()
    write_tensors(directory / f"rng-{rank}.safetensors", tensors)
    _write_json(directory / f"rng-{rank}.json", {"python": [version, list(internal), gauss]})


def _load_rng(directory: Path, rank: int) -> None:
    tensors = read_tensors(directory / f"rng-{rank}.safetensors") \
        if (directory / f"rng-{rank}.safetensors").is_file() else {}
    py = _read_json(directory / f"rng-{rank}.json").get("python")
    try:
        version, internal, gauss = py
        random.setstate((int(version), tuple(int(x) for x in internal), None if gauss is None else float(gauss)))
        torch.set_rng_state(tensors["torch"])
    except (KeyError, TypeError, ValueError, RuntimeError):
        raise MoorizeError(f"checkpoint {directory} is corrupt: bad random-number state for rank {rank}") from None
    cuda = [tensors[f"cuda/{i}"] for i in range(sum(k.startswith("cuda/") for k in tensors))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


