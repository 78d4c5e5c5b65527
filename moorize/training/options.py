"""Every option of a training run, each written once (its field: help, range, default), validated up front:
a bad one is one line, never NaN weights."""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields

from ..errors import MoorizeError
from ..model.config import LEGACY_FIELDS, MoOREConfig
from ..options import check_options, field_default, option

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


# the MoORE fields a training run sets (its tasks come from the data, its seed is the run's)
MOORE_FIELDS = tuple(f.name for f in fields(MoOREConfig) if f.name not in ("tasks", "seed"))


@dataclass(init=False)
class TrainOptions:
    """Every knob of a run (saved as train_config.json and checked on resume). The MoORE layers' settings are
    a ``MoOREConfig`` (``moore``); they are also taken and read by their own names (``router="task"``,
    ``opts.router``), as before they lived there."""

    moore: MoOREConfig = option(default_factory=MoOREConfig, cli=False, help="The MoORE layers' settings.")
    pooling: str | None = option(None, choices=("mean", "cls", "last"), show_default=False,
                                 help="Classification pooling [default: mean for encoders, last for decoders].")
    # optimisation
    lr: float = option(1e-3, kind=float, low=0.0, low_open=True, help="Peak learning rate.")
    # B C x acts on every token, so one step of it moves more than the task router's; a tenth forgets less at
    # the same accuracy (docs/TRAINING.md, frontier); 1.0 as published
    sample_router_lr: float = option(0.1, kind=float, low=0.0, help="Multiplier of --lr for the sample router "
                                                                      "(B, C); below 1 protects what the model knew.")
    weight_decay: float = option(0.0, kind=float, low=0.0, help="AdamW weight decay.")
    adam_beta2: float = option(0.999, kind=float, low=0.0, high=1.0, high_open=True,
                               help="AdamW's second-moment decay (0.95 is common for long LLM runs: it forgets "
                                    "stale gradient scales sooner).")
    schedule: str = option("cosine", choices=SCHEDULES, label="schedule",
                           help="Learning-rate schedule after warmup (wsd: warmup-stable-decay).")
    warmup: float = option(0.05, kind=float, low=0.0, help="Warmup: share of steps, or steps if >= 1.")
    decay: float = option(0.2, kind=float, low=0.0, high=1.0, help="wsd: share of steps in the final decay.")
    min_lr_ratio: float = option(0.0, kind=float, low=0.0, high=1.0,
                                 help="The schedule's floor, as a share of --lr.")
    max_grad_norm: float = option(1.0, kind=float, low=0.0, help="Gradient clipping (0: off).")
    batch_size: int = option(8, kind=int, low=1, help="Examples per micro-batch and process.")
    grad_accum: int = option(1, kind=int, low=1, help="Micro-batches per optimizer step.")
    epochs: float = option(1.0, kind=float, low=0.0, help="Passes over the training data.")
    max_steps: int | None = option(None, kind=int, low=1, help="Optimizer steps (overrides --epochs).")
    precision: str = option("auto", choices=PRECISIONS, label="precision",
                            help="Autocast (auto: bf16 on a GPU that has it, none on the CPU).")
    gradient_checkpointing: bool = option(False, help="Recompute each block's activations in backward, and return "
                                                      "freed host memory to the OS at once: less memory, more "
                                                      "compute.")
    compile: bool = option(False, help="torch.compile the model: the same results, faster steps after the first "
                                       "few (which compile).")
    fsdp: bool = option(False, help="Under several processes, shard the frozen factors and the MoORE state (FSDP2) "
                                    "instead of replicating them.")
    seed: int = option(0, kind=int, low=0, high=2**63 - 1, help="Seed of the run: fresh routers, data order, dropout.")
    # data
    max_length: int = option(512, kind=int, low=1, help="Longest example in tokens.")
    truncate: bool = option(True, negatable=True, help="Truncate longer examples with a warning, or refuse them.")
    chat_template: bool = option(False, help="Wrap prompts in the checkpoint's chat template.")
    eval_split: float = option(0.0, kind=float, low=0.0, high=1.0, high_open=True,
                               help="Held-out share per task when no --eval-data is given.")
    eval_max_examples: int | None = option(None, kind=int, low=1, help="Evaluate at most N examples per task.")
    # bookkeeping
    eval_every: int = option(0, kind=int, low=0, help="Evaluate every N steps (0: at the end).")
    save_every: int = option(0, kind=int, low=0, help="Checkpoint every N steps (0: never).")
    keep_checkpoints: int = option(2, kind=int, low=1, help="Checkpoints kept while running.")
    keep_checkpoints_at_end: bool = option(False, help="Keep the run's checkpoints in the adapter directory.")
    log_every: int = option(1, kind=int, low=1, help="Write metrics every N steps.")
    tensorboard: bool = option(False, help="Also log to TensorBoard (needs the tensorboard package).")
    cpu: bool = option(False, help="Train on the CPU even when a GPU is present.")

    def __init__(self, moore: MoOREConfig | None = None, **options) -> None:
        """Fields by keyword, as a dataclass takes them; the MoORE ones also by their own names."""
        names = {f.name for f in fields(self)}
        unknown = set(options) - names - set(MOORE_FIELDS)
        if unknown:
            raise TypeError(f"TrainOptions got unexpected keyword argument(s) {', '.join(sorted(unknown))}")
        layer = {k: options.pop(k) for k in MOORE_FIELDS if k in options}
        for f in fields(self):
            if f.name != "moore":
                setattr(self, f.name, options[f.name] if f.name in options else field_default(f))
        self.moore = MoOREConfig.build(moore, layer) if layer or moore is None else moore
        self.__post_init__()

    def __getattr__(self, name: str):  # opts.router, opts.householder, ...: the MoORE fields read through
        moore = self.__dict__.get("moore")
        if name in MOORE_FIELDS and moore is not None:
            return getattr(moore, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __post_init__(self) -> None:
        """Every option checked up front (types, finite, in range): a bad one is one line, never NaN weights."""
        if not isinstance(self.moore, MoOREConfig):
            raise MoorizeError(f"moore must be a MoOREConfig, got {type(self.moore).__name__}")
        check_options(self)
        if self.fsdp and self.save_every:
            raise MoorizeError("--fsdp runs cannot save intermediate checkpoints yet (their optimizer state is "
                               "sharded): drop --save-every, or train with DDP")
        if self.max_steps is None and not self.epochs > 0:
            raise MoorizeError(f"epochs must be positive, got {self.epochs}")

    @classmethod
    def build(cls, options: TrainOptions | None, overrides: dict) -> TrainOptions:
        """``options`` (or the defaults) with keyword ``overrides`` (MoORE fields by their names too)."""
        unknown = set(overrides) - {f.name for f in fields(cls)} - set(MOORE_FIELDS)
        if unknown:
            raise MoorizeError(f"unknown training option(s): {', '.join(sorted(unknown))}")
        base = options if options is not None else cls()
        layer = {k: overrides[k] for k in MOORE_FIELDS if k in overrides}
        moore = MoOREConfig.build(base.moore, layer) if layer else base.moore
        rest = {k: v for k, v in overrides.items() if k not in MOORE_FIELDS}
        return cls(moore, **{**{f.name: getattr(base, f.name) for f in fields(cls) if f.name != "moore"}, **rest})

    def to_dict(self) -> dict:
        """The options as train_config.json records them: flat, the MoORE fields by their names."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "moore"}
        return {**{k: getattr(self.moore, k) for k in MOORE_FIELDS}, **out}

    def moore_config(self, tasks: list[str]) -> MoOREConfig:
        """The MoORE layers this run trains: its options, its tasks, and its seed."""
        return MoOREConfig.build(self.moore, {"tasks": list(tasks), "seed": self.seed})
