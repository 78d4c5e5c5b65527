"""Every option of a training run, validated up front: a bad one is one line, never NaN weights."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from ..errors import MoorizeError
from ..model.config import DEFAULTS as MOORE_DEFAULTS
from ..model.config import LEGACY_FIELDS, ROUTER_NORMS, MoOREConfig

log = logging.getLogger(__name__)


SCHEDULES = ("cosine", "wsd", "linear", "constant")
PRECISIONS = ("auto", "no", "bf16", "fp16")
METRICS_NAME = "metrics.jsonl"
CONFIG_NAME = "train_config.json"
# options a run saved by an older moorize may lack, with the behaviour they had then (not today's default)
LEGACY_OPTIONS = {**LEGACY_FIELDS, "sample_router_lr": 1.0}
# options that change only logging and saving: free to differ when resuming
BOOKKEEPING = {"eval_every", "save_every", "keep_checkpoints", "keep_checkpoints_at_end", "log_every",
               "tensorboard", "eval_max_examples", "compile"}


@dataclass
class TrainOptions:
    """Every knob of a run (saved as train_config.json and checked on resume)."""

    # MoORE layers (defaults: MoOREConfig's, the one place they are written)
    router: str = MOORE_DEFAULTS.router
    householder: int = MOORE_DEFAULTS.householder
    task_dim: int = MOORE_DEFAULTS.task_dim
    router_experts: int = MOORE_DEFAULTS.router_experts
    router_norm: str = MOORE_DEFAULTS.router_norm
    train_sigma: bool = MOORE_DEFAULTS.train_sigma
    pooling: str | None = None  # classification: mean/cls/last (default by architecture)
    # optimisation
    lr: float = 1e-3
    # multiplier of lr for the sample router (B, C): B C x acts on every token, so one step of it moves more
    # than the task router's; a tenth forgets less at the same accuracy (README, frontier); 1.0 as published
    sample_router_lr: float = 0.1
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup: float = 0.05  # fraction of the steps (< 1) or a number of steps (>= 1)
    decay: float = 0.2  # wsd: fraction of the steps spent decaying at the end
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping
    batch_size: int = 8  # examples per micro-batch and process
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs
    precision: str = "auto"  # autocast: bf16 where the GPU has it, none on the CPU
    gradient_checkpointing: bool = False  # recompute each block's activations in backward (transformers' own)
    compile: bool = False  # torch.compile the model (the same numbers, faster steps once compiled)
    fsdp: bool = False  # shard the frozen factors and the MoORE state over the processes (FSDP2), not replicate
    seed: int = 0
    # data
    max_length: int = 512
    truncate: bool = True  # over max_length: truncate with a warning, or refuse
    chat_template: bool = False
    eval_split: float = 0.0  # held-out share per task when no eval data is given
    eval_max_examples: int | None = None  # per task
    # bookkeeping
    eval_every: int = 0  # steps; 0: only at the end
    save_every: int = 0  # steps; 0: no intermediate checkpoints
    keep_checkpoints: int = 2
    keep_checkpoints_at_end: bool = False
    log_every: int = 1
    tensorboard: bool = False
    cpu: bool = False  # train on the CPU even when a GPU is present

    def __post_init__(self) -> None:
        """Every option checked up front (types, finite, in range): a bad one is one line, never NaN weights."""
        if self.schedule not in SCHEDULES:
            raise MoorizeError(f"unknown schedule {self.schedule!r}: use one of {', '.join(SCHEDULES)}")
        if self.router_norm not in ROUTER_NORMS:
            raise MoorizeError(f"unknown router norm {self.router_norm!r}: use one of {', '.join(ROUTER_NORMS)}")
        if self.precision not in PRECISIONS:
            raise MoorizeError(f"unknown precision {self.precision!r}: use one of {', '.join(PRECISIONS)}")
        for name, (kind, lo, hi, lo_open) in _NUMERIC_RANGES.items():
            value = getattr(self, name)
            if value is None and name in ("max_steps", "eval_max_examples"):
                continue
            _check_number(name, value, kind, lo, hi, lo_open)
        if self.fsdp and self.save_every:
            raise MoorizeError("--fsdp runs cannot save intermediate checkpoints yet (their optimizer state is "
                               "sharded): drop --save-every, or train with DDP")
        if self.max_steps is None and not self.epochs > 0:
            raise MoorizeError(f"epochs must be positive, got {self.epochs}")

    def moore_config(self, tasks: list[str]) -> MoOREConfig:
        """The MoORE layers this run trains: its options, its tasks, and its seed."""
        return MoOREConfig(router=self.router, tasks=list(tasks), task_dim=self.task_dim,
                           router_experts=self.router_experts, router_norm=self.router_norm,
                           householder=self.householder,
                           train_sigma=self.train_sigma, seed=self.seed)


# option -> (type, lowest, highest, lowest excluded); None: unbounded
_NUMERIC_RANGES: dict[str, tuple[type, float | None, float | None, bool]] = {
    "householder": (int, 0, None, False), "task_dim": (int, 1, None, False),
    "router_experts": (int, 1, None, False),
    "lr": (float, 0.0, None, True), "sample_router_lr": (float, 0.0, None, False),
    "weight_decay": (float, 0.0, None, False), "warmup": (float, 0.0, None, False),
    "decay": (float, 0.0, 1.0, False), "min_lr_ratio": (float, 0.0, 1.0, False),
    "max_grad_norm": (float, 0.0, None, False), "batch_size": (int, 1, None, False),
    "grad_accum": (int, 1, None, False), "epochs": (float, 0.0, None, False),
    "max_steps": (int, 1, None, False), "seed": (int, 0, 2**63 - 1, False),
    "max_length": (int, 1, None, False), "eval_split": (float, 0.0, 1.0, False),
    "eval_max_examples": (int, 1, None, False), "eval_every": (int, 0, None, False),
    "save_every": (int, 0, None, False), "keep_checkpoints": (int, 1, None, False),
    "log_every": (int, 1, None, False),
}


def _check_number(name: str, value, kind: type, lo, hi, lo_open: bool) -> None:
    """One numeric option: the message names the CLI flag and the keyword (``--batch-size``, ``batch_size``)."""
    flag, where = name.replace("_", "-"), f" (TrainOptions.{name})"
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int and is_number and not isinstance(value, int):
        is_number = isinstance(value, float) and value.is_integer()
    if not is_number:
        raise MoorizeError(f"{flag} must be {'an integer' if kind is int else 'a number'}, got {value!r}{where}")
    if not math.isfinite(value):
        raise MoorizeError(f"{flag} must be a finite number, got {value}{where}")
    if name == "eval_split" and value >= 1.0:
        raise MoorizeError(f"eval-split must be in [0, 1), got {value}{where}")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        bound = "positive" if lo_open and lo == 0 else f"at least {lo}"
        raise MoorizeError(f"{flag} must be {bound}, got {value}{where}")
    if hi is not None and value > hi:
        raise MoorizeError(f"{flag} must be at most {hi}, got {value}{where}")


