"""accelerate and torch.distributed for a run: its Accelerator (precision, device), FSDP2 sharding, and the
local or gathered view of a sharded tensor. The training recipe (``loop``) asks these and knows no more."""

from __future__ import annotations

import logging

import torch

from ..errors import MoorizeError
from .options import TrainOptions

log = logging.getLogger(__name__)

def accelerator_for(opts: TrainOptions):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    precision = opts.precision
    if precision == "auto":
        precision = "bf16" if (not opts.cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported()) \
            else "no"
    clear_conflicting_state(precision, opts.cpu)
    # nothing the model keeps as a buffer changes: broadcasting buffers every step would only cost time
    ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
    return Accelerator(mixed_precision=precision, cpu=opts.cpu, kwargs_handlers=[ddp])

def clear_conflicting_state(precision: str, cpu: bool) -> None:
    """accelerate keeps one state per process and refuses (or silently ignores) a later Accelerator whose
    mixed precision or device differs: a notebook's bf16 run followed by a float32 one died with an internal
    error. Each run owns its settings, so a conflicting state an earlier run left is cleared; the process
    state (device, distributed set-up) only when no process group depends on it."""
    from accelerate.state import AcceleratorState, PartialState

    if not AcceleratorState._shared_state:
        return
    state = AcceleratorState()
    wants_cpu = cpu or not torch.cuda.is_available()
    other_device = wants_cpu != (state.device.type == "cpu")
    if state.mixed_precision != precision or other_device:
        AcceleratorState._reset_state()
        if other_device and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            PartialState._reset_state()

def shard(module: torch.nn.Module, routed, accelerator) -> torch.nn.Module:
    """FSDP2 (``fully_shard``) over every block transformers names in ``_no_split_modules``, then the root: each
    parameter, the frozen factors included (parameters that never train), is split across the processes and
    gathered only while its block runs. Applied here rather than through accelerate's plugin, which has no
    FSDP on the CPU, so the same path runs on CPU ranks (gloo) and GPUs."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        raise MoorizeError(f"--fsdp needs FSDP2 (torch >= 2.6); this torch is {torch.__version__}") from None
    if accelerator.num_processes < 2:
        log.warning("--fsdp with one process: nothing to shard")
        return module
    names = set(getattr(routed, "_no_split_modules", None) or ())
    blocks = [m for m in module.modules() if type(m).__name__ in names]
    if not blocks:
        raise MoorizeError(f"--fsdp: {type(routed).__name__} names no blocks to shard (_no_split_modules)")
    module.to(accelerator.device)
    for block in blocks:
        fully_shard(block)
    fully_shard(module)
    return module

def local_part(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor FSDP sharded (a DTensor), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t

def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor, gathered from every process when FSDP sharded it (a collective: call on every rank)."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach()
