"""Multi-task fine-tuning of the MoORE parameters on a factored checkpoint (``moorize train``).

Read it top to bottom: options → data → model → optimizer and schedule → the loop
(accumulate, clip, step, log, evaluate, checkpoint) → the final adapter. Only the
MoORE parameters train (routers, Householder vectors, σ when asked, task heads); the
factored base is only read.

Engine: Hugging Face ``accelerate``, so the same code runs on the CPU, one GPU, or
several processes (``accelerate launch -m moorize train ...``, DDP). Batches are
planned up front from the seed (length-grouped, per epoch), so a step's data is a
pure function of (seed, step): that, the optimizer, scheduler and RNG states in each
checkpoint make ``resume`` continue exactly where the run stopped. The loss of a step
is normalised by the label tokens of the whole step (all micro-batches, all ranks),
so gradient accumulation and data parallelism give the gradient of one big batch.

The run lives in the hidden sibling ``.<output>.moorize-partial`` (metrics.jsonl,
checkpoints/) until it finishes; then the adapter files are written and the directory
is renamed to ``output``: an interrupted run leaves nothing that looks complete.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..errors import MoorizeError
from ..io.factored import FactoredCheckpoint
from ..io.outdir import (
    check_not_an_input,
    check_out_dir,
    is_main_process,
    output_lock,
    partial_dir,
    publish,
    raise_for_os_error,
)
from ..model.adapter import write_adapter_files
from ..model.heads import MoOREClassifier, TaskHeads, default_pooling
from .checkpoints import _checkpoint_dirs, _load_checkpoint, _read_json, _save_checkpoint
from .data import IGNORE_INDEX, Example, TaskTable, collate, encode, length_grouped_batches, read_examples
from .losses import _forward, evaluate
from .metrics import _MetricsLog
from .options import BOOKKEEPING, CONFIG_NAME, LEGACY_OPTIONS, TrainOptions

log = logging.getLogger(__name__)


@dataclass
class TrainReport:
    """What ``train`` returns: where the adapter went and how the run went."""

    adapter: Path
    steps: int
    tasks: list[str]
    kind: str  # "causal" or "classification"
    train_loss: float | None  # mean over the last logged window
    eval: dict[str, dict[str, float]]  # task -> metrics of the final evaluation
    history: list[dict] = field(default_factory=list)  # every metrics.jsonl record of this process
    seconds: float = 0.0
    tokens_per_s: float = 0.0
    resumed_from: int | None = None
    frozen_bytes_per_process: int = 0  # bytes of frozen parameters (the factors) this process held: sharded by FSDP


# ---- data --------------------------------------------------------------------------------------------------------

def _split_eval(examples: list[Example], share: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out ``share`` of every task (at least one example each), seeded."""
    rng = random.Random(seed)
    by_task: dict[str, list[Example]] = {}
    for e in examples:
        by_task.setdefault(e.task, []).append(e)
    train, held = [], []
    for task, items in by_task.items():
        items = items[:]
        rng.shuffle(items)
        k = max(1, round(share * len(items)))
        if k >= len(items):
            raise MoorizeError(f"task {task!r} has {len(items)} example(s): too few to hold out {share:.0%} for eval")
        held += items[:k]
        train += items[k:]
    return train, held


@dataclass
class _Data:
    kind: str
    table: TaskTable
    train: list[dict]
    eval: list[dict]


def _load_data(data, eval_data, tokenizer, opts: TrainOptions) -> _Data:
    examples = read_examples(data)
    if eval_data is not None:
        held = read_examples(eval_data)
        if held[0].kind != examples[0].kind:
            raise MoorizeError(f"{held[0].where}: eval data is {held[0].kind}, training data is {examples[0].kind}")
    elif opts.eval_split > 0:
        examples, held = _split_eval(examples, opts.eval_split, opts.seed)
    else:
        held = []
    table = TaskTable.from_examples(examples)  # unknown tasks/labels in eval data fail with their file:line
    enc = dict(tokenizer=tokenizer, table=table, max_length=opts.max_length, truncate=opts.truncate,
               chat_template=opts.chat_template)
    if opts.eval_max_examples:
        held = _first_per_task(held, opts.eval_max_examples)
    return _Data(examples[0].kind, table, encode(examples, **enc), encode(held, **enc))


def _first_per_task(examples: list[Example], cap: int) -> list[Example]:
    seen: dict[str, int] = {}
    out = []
    for e in examples:
        if seen.get(e.task, 0) < cap:
            seen[e.task] = seen.get(e.task, 0) + 1
            out.append(e)
    return out


def _item_weight(item: dict) -> int:
    """What the loss of an item is averaged over: its label tokens (causal) or 1 (classification)."""
    labels = item.get("labels")
    return 1 if labels is None else sum(1 for x in labels[1:] if x != IGNORE_INDEX)


class _Plan:
    """Which items every micro-batch of every step holds: a pure function of (seed, step)."""

    def __init__(self, items: list[dict], opts: TrainOptions, world: int):
        self.items, self.opts, self.world = items, opts, world
        self.lengths = [len(i["input_ids"]) for i in items]
        self.per_step = opts.grad_accum * world  # micro-batches per optimizer step, all ranks
        self.steps_per_epoch = len(self._epoch(0)) // self.per_step
        if self.steps_per_epoch == 0:
            raise MoorizeError(f"{len(items)} training examples make less than one step of {self.per_step} "
                               f"micro-batches of {opts.batch_size}: lower --batch-size or --grad-accum")
        self.total = opts.max_steps or max(1, math.ceil(opts.epochs * self.steps_per_epoch))
        self._cache: dict[int, list[list[int]]] = {}

    def _epoch(self, epoch: int) -> list[list[int]]:
        return length_grouped_batches(self.lengths, self.opts.batch_size, self.opts.seed + epoch)

    def step(self, step: int, rank: int) -> tuple[list[list[int]], int]:
        """(this rank's micro-batches, loss normaliser of the whole step across ranks)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch not in self._cache:
            self._cache = {epoch: self._epoch(epoch)}
        chunk = self._cache[epoch][k * self.per_step:(k + 1) * self.per_step]
        denom = sum(_item_weight(self.items[i]) for b in chunk for i in b)
        return chunk[rank::self.world], max(denom, 1)

    def epoch_of(self, step: int) -> float:
        return step / self.steps_per_epoch


# ---- model -------------------------------------------------------------------------------------------------------

def _build_model(factored_dir: Path, table: TaskTable, kind: str, opts: TrainOptions):
    """(module to train, routed model, task heads or None)."""
    from ..model.routed import load, prepare_for_training

    model = load(factored_dir, config=opts.moore_config(table.tasks))
    prepare_for_training(model)
    if opts.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise MoorizeError(f"{type(model).__name__} does not support gradient checkpointing in transformers")
        model.gradient_checkpointing_enable()
    if kind == "causal":
        if not hasattr(model, "generate") or getattr(model, "get_output_embeddings", lambda: None)() is None:
            raise MoorizeError(f"{factored_dir} is not a language model ({type(model).__name__}): "
                               "prompt/response data needs one; use text/label data for classification")
        return model, model, None
    heads = TaskHeads(model.config.hidden_size, table.tasks, table.labels,
                      opts.pooling or default_pooling(model), seed=opts.seed)
    return MoOREClassifier(model, heads), model, heads


def lr_factor(opts: TrainOptions, total: int) -> Callable[[int], float]:
    """The learning-rate multiplier of each step (warmup, then the schedule), for torch's LambdaLR."""
    warm = int(opts.warmup) if opts.warmup >= 1 else round(opts.warmup * total)
    decay_steps = max(1, round(opts.decay * total))
    lo = opts.min_lr_ratio

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        progress = (step - warm) / max(1, total - warm)
        if opts.schedule == "cosine":
            return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if opts.schedule == "linear":
            return lo + (1 - lo) * max(0.0, 1 - progress)
        if opts.schedule == "wsd":  # warmup, stable, then a linear decay over the last `decay` share
            left = total - step
            return 1.0 if left > decay_steps else lo + (1 - lo) * max(0.0, left / decay_steps)
        return 1.0

    return factor


# ---- the run -----------------------------------------------------------------------------------------------------

def _accelerator(opts: TrainOptions):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    precision = opts.precision
    if precision == "auto":
        precision = "bf16" if (not opts.cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported()) \
            else "no"
    _clear_conflicting_state(precision, opts.cpu)
    # nothing the model keeps as a buffer changes: broadcasting buffers every step would only cost time
    ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
    return Accelerator(mixed_precision=precision, cpu=opts.cpu, kwargs_handlers=[ddp])


def _clear_conflicting_state(precision: str, cpu: bool) -> None:
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


def _shard(module: torch.nn.Module, routed, accelerator) -> torch.nn.Module:
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


def _tokenizer(factored_dir: Path):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(factored_dir)
    except (OSError, ValueError) as e:
        raise MoorizeError(f"{factored_dir} has no usable tokenizer: {str(e).splitlines()[0]}") from None
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if pad is None:
        raise MoorizeError(f"{factored_dir}: the tokenizer has neither a pad nor an EOS token")
    return tok, pad


def _as_paths(value) -> list[Path]:
    if value is None:
        return []
    return [Path(value)] if isinstance(value, (str, os.PathLike)) else [Path(v) for v in value]


def _check_run_paths(output: Path, factored_dir: Path, inputs: list[Path], resume: bool, overwrite: bool) -> None:
    """Refuse, before touching anything, an output whose writing would destroy one of the run's inputs.

    Holds whatever the flags (``--overwrite``, ``--resume``): the output and its hidden run directory
    may not be, contain or lie inside the factored base, nor be or contain a data file.
    """
    if not resume:
        check_out_dir(output, overwrite, protect=[factored_dir], inputs=inputs)
    check_not_an_input(output, [factored_dir, *inputs], "OUT_DIR ")
    check_not_an_input(partial_dir(output), inputs, "the run directory ")


def _prepare_run_dir(output: Path, resume: bool, overwrite: bool) -> tuple[Path, Path | None]:
    """(run directory, checkpoint to resume from); called with the output locked."""
    run = partial_dir(output)
    if resume:
        if (output / "adapter_config.json").is_file() and not run.exists():
            raise MoorizeError(f"{output} is a finished run: nothing to resume")
        found = _checkpoint_dirs(run)
        if not found:
            raise MoorizeError(f"no checkpoint to resume in {run} (save them with --save-every N)")
        return run, found[-1]
    if run.exists():
        if _checkpoint_dirs(run) and not overwrite:
            raise MoorizeError(f"an interrupted run left checkpoints in {run}: pass --resume to continue it "
                               "or --overwrite to start over")
        if is_main_process():
            shutil.rmtree(run)
    return run, None


def file_digests(paths: list[Path]) -> list[str]:
    """sha256 of each file's contents: a resumed run must see the same data, wherever it now lives."""
    out = []
    for path in paths:
        h = hashlib.sha256()
        try:
            with open(path, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
        except OSError as e:
            raise MoorizeError(f"cannot read {path}: {e.strerror}") from None
        out.append(h.hexdigest())
    return out


class TrainingDiverged(MoorizeError):
    """A non-finite loss, gradient or parameter: the run stops at that step and publishes nothing."""


def _check_finite(step: int, output: Path, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
    """Stop at the step where the loss or the gradient stops being finite (one sync, values already reduced)."""
    values = torch.stack([loss.double()] + ([grad_norm.double()] if grad_norm is not None else []))
    if bool(torch.isfinite(values).all()):
        return
    what = f"the loss is {float(loss)}" if not math.isfinite(float(loss)) else f"the gradient norm is {float(grad_norm)}"
    raise TrainingDiverged(f"training diverged at step {step}: {what}; nothing was written to {output} "
                           "(lower --lr or --sample-router-lr, or keep --max-grad-norm on)")


def _check_finite_parameters(tensors: dict[str, torch.Tensor], step: int, output: Path) -> None:
    """Before anything is saved: every trained tensor finite (a checkpoint or adapter of NaNs is garbage)."""
    bad = [k for k, t in tensors.items() if not bool(torch.isfinite(t.detach()).all())]
    if bad:
        raise TrainingDiverged(f"training diverged by step {step}: {len(bad)} trained tensor(s) are not finite "
                               f"({bad[0]}, ...); nothing was written to {output} (lower --lr)")


@contextlib.contextmanager
def _run_directory_guard(run: Path, output: Path) -> Iterator[None]:
    """What a failed run leaves: nothing after a full disk or a divergence; after anything else, its
    checkpoints when it has some (``--resume`` continues from them), else nothing."""
    try:
        yield
    except BaseException as e:
        out_of_space = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
        keep = _checkpoint_dirs(run) and not out_of_space and not isinstance(e, TrainingDiverged)
        if is_main_process():
            if keep:
                log.warning("the run stopped; its checkpoints are kept in %s: --resume continues it", run)
            else:
                shutil.rmtree(run, ignore_errors=True)
        if isinstance(e, OSError):
            raise_for_os_error(e, output)
        raise


def train(factored_dir, data, output, *, eval_data=None, resume: bool = False, overwrite: bool = False,
          callbacks: tuple[Callable[[dict], None], ...] = (), progress: bool | None = None,
          options: TrainOptions | None = None, **overrides) -> TrainReport:
    """Train the MoORE parameters of a factored checkpoint on multi-task data; write the adapter to ``output``.

    ``data``/``eval_data``: one path or a list (JSONL or CSV). Options are the fields of
    ``TrainOptions``, given as ``options=`` or as keywords (``lr=3e-4, max_steps=200``).
    ``callbacks`` get every metrics record (a dict) as it is logged. ``output`` is locked while
    the run writes it; it may not be, or contain, any of the run's inputs.
    """
    opts = TrainOptions.build(options, overrides) if overrides else options or TrainOptions()
    factored_dir, output = Path(factored_dir), Path(output)
    data_paths, eval_paths = _as_paths(data), _as_paths(eval_data)
    FactoredCheckpoint(factored_dir).close()  # a clear error if it is not a factored checkpoint
    _check_run_paths(output, factored_dir, data_paths + eval_paths, resume, overwrite)
    with output_lock(output) if is_main_process() else contextlib.nullcontext():
        run, resume_from = _prepare_run_dir(output, resume, overwrite)
        with _run_directory_guard(run, output):
            return _run(factored_dir, data_paths, eval_paths or None, output, run, resume_from, overwrite, opts,
                        callbacks, progress)


def _run(factored_dir: Path, data: list[Path], eval_data: list[Path] | None, output: Path, run: Path,
         resume_from: Path | None, overwrite: bool, opts: TrainOptions, callbacks, progress) -> TrainReport:
    """The run, top to bottom: set up, start (or resume), step, log / evaluate / save, finish."""
    r = _Run(factored_dir, data, eval_data, output, run, opts)
    start = r.begin(resume_from, callbacks, progress)
    try:
        for step in range(start, r.plan.total):
            loss, grad_norm = r.step(step)
            r.after_step(step + 1, loss, grad_norm)
        r.evaluate(r.plan.total)
    finally:
        r.close()
    return r.finish(overwrite, resumed_from=start if resume_from is not None else None)


class _Run:
    """One training run's state: what it trains, on what, and how far it has come."""

    def __init__(self, factored_dir: Path, data: list[Path], eval_data: list[Path] | None, output: Path,
                 run: Path, opts: TrainOptions):
        from accelerate.utils import set_seed

        self.opts, self.output, self.run_dir = opts, output, run
        self.accelerator = _accelerator(opts)
        set_seed(opts.seed)
        tokenizer, self.pad_id = _tokenizer(factored_dir)
        self.ds = _load_data(data, eval_data, tokenizer, opts)
        self.module, self.routed, self.heads = _build_model(factored_dir, self.ds.table, self.ds.kind, opts)
        self.trainable = _trainable(self.routed, self.heads)
        self.plan = _Plan(self.ds.train, opts, self.accelerator.num_processes)
        self.config = {"options": {k: v for k, v in opts.to_dict().items() if k not in BOOKKEEPING},
                       "base_fingerprint": self.routed.moore.base_fingerprint,
                       "base_layout_fingerprint": self.routed.moore.base_layout_fingerprint,  # ranks, residual, dtypes
                       "data_sha256": file_digests(data), "eval_data_sha256": file_digests(eval_data or []),
                       "tasks": self.ds.table.tasks, "kind": self.ds.kind, "train_examples": len(self.ds.train),
                       "total_steps": self.plan.total}
        if opts.fsdp:  # before the optimizer: sharding replaces the parameters
            self.module = _shard(self.module, self.routed, self.accelerator)
            self.trainable = _trainable(self.routed, self.heads)
        optimizer = torch.optim.AdamW(param_groups(self.trainable, opts, self.routed), lr=opts.lr, weight_decay=opts.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(opts, self.plan.total))
        # the scheduler is stepped by hand, once a step
        if opts.fsdp:
            self.optimizer = self.accelerator.prepare(optimizer)
        else:
            self.module, self.optimizer = self.accelerator.prepare(self.module, optimizer)
        if opts.compile:  # after accelerate's wrapping; the MoORE layers compile with no graph break
            # MOORIZE_COMPILE_BACKEND picks another torch.compile backend (aot_eager: capture without codegen)
            self.module = torch.compile(self.module, backend=os.environ.get("MOORIZE_COMPILE_BACKEND", "inductor"))
        self.device, self.world = self.accelerator.device, self.accelerator.num_processes
        self.frozen_bytes = sum(_local(p).numel() * p.element_size() for p in self.module.parameters()
                                if not p.requires_grad)
        log.info("frozen parameters held by this process: %d bytes", self.frozen_bytes)
        self.tokens, self.window, self.last_eval = 0, [], None

    def begin(self, resume_from: Path | None, callbacks, progress) -> int:
        """Write the run's config, or check it and load the checkpoint to resume; the first step to run."""
        acc, start = self.accelerator, 0
        if resume_from is not None:
            self._check_resumable(_read_json(self.run_dir / CONFIG_NAME))
            start = _load_checkpoint(resume_from, self.trainable, self.optimizer, self.scheduler,
                                     acc.process_index)["step"]
            log.info("resuming from %s (step %d)", resume_from, start)
        elif acc.is_main_process:
            self.run_dir.mkdir()
            (self.run_dir / CONFIG_NAME).write_text(json.dumps(self.config, indent=2) + "\n")
        acc.wait_for_everyone()
        self.metrics = _MetricsLog(self.run_dir, acc.is_main_process, self.opts.tensorboard, callbacks,
                                   keep_until=start if resume_from is not None else None)
        show = acc.is_main_process and (progress if progress is not None else sys.stderr.isatty())
        from tqdm.auto import tqdm

        self.bar = tqdm(total=self.plan.total, initial=start, disable=not show, desc="train", unit="step")
        self.t0 = time.perf_counter()
        self.module.train()
        return start

    def _check_resumable(self, saved: dict) -> None:
        if saved == self.config:
            return
        # an option the saved run predates had the behaviour of then (LEGACY_OPTIONS, else today's default)
        saved_opts = {**TrainOptions().to_dict(), **LEGACY_OPTIONS, **saved.get("options", {})}
        changed = sorted(k for k in self.config if k != "options" and saved.get(k) != self.config[k])
        differing = [k for k, v in self.config["options"].items() if saved_opts.get(k) != v]
        if not changed and not differing:
            return
        names = [{"data_sha256": "data contents", "eval_data_sha256": "eval data contents",
                  "base_layout_fingerprint": "factored base (ranks, residual or dtypes)"}.get(k, k) for k in changed]
        names += [f"{k} (the run: {saved_opts.get(k)!r}, now {self.config['options'][k]!r})" for k in differing]
        hint = "; pass the run's settings again to continue it" if differing else ""
        raise MoorizeError(f"cannot resume: the run was started with different {', '.join(names)}{hint}")

    def step(self, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Forward and backward over this rank's micro-batches, clip, check, and take the optimizer step."""
        acc, module = self.accelerator, self.module
        micro, denom = self.plan.step(step, acc.process_index)
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        for i, idx in enumerate(micro):
            batch = {k: v.to(self.device) for k, v in collate([self.ds.train[j] for j in idx], self.pad_id).items()}
            self.tokens += int(batch["attention_mask"].sum())
            sync = contextlib.nullcontext() if i == len(micro) - 1 else acc.no_sync(module)
            with sync:
                loss_rows, _, _ = _forward(module, batch, self.ds.kind)
                loss = loss_rows.sum() / denom
                acc.backward(loss * self.world)  # DDP averages over ranks; the step's mean is a sum
            loss_sum += loss.detach().double()
        grad_norm = (acc.clip_grad_norm_(list(self.trainable.values()), self.opts.max_grad_norm)
                     if self.opts.max_grad_norm > 0 else None)
        if self.world > 1:
            loss_sum = acc.reduce(loss_sum, "sum")
        _check_finite(step + 1, self.output, loss_sum, grad_norm)  # before the step: a NaN never reaches the weights
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum, grad_norm

    def after_step(self, done: int, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
        """Log every ``log_every`` steps, evaluate every ``eval_every``, checkpoint every ``save_every``."""
        opts, total = self.opts, self.plan.total
        self.window.append(float(loss))
        self.bar.update(1)
        if done % opts.log_every == 0 or done == total:
            elapsed = time.perf_counter() - self.t0
            record = {"kind": "train", "step": done, "epoch": round(self.plan.epoch_of(done), 4),
                      "loss": sum(self.window) / len(self.window), "lr": self.scheduler.get_last_lr()[0],
                      "tokens_per_s": self.tokens * self.world / elapsed, "elapsed_s": round(elapsed, 3)}
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            self.metrics.write(record)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            self.window = []
        if opts.eval_every and done % opts.eval_every == 0 and done != total:
            self.evaluate(done)
        if opts.save_every and done % opts.save_every == 0 and done != total:
            _check_finite_parameters(self.trainable, done, self.output)
            _save_checkpoint(self.run_dir, done, self.trainable, self.optimizer, self.scheduler, self.accelerator,
                             opts.keep_checkpoints, {"epoch": self.plan.epoch_of(done)})

    def evaluate(self, step: int) -> None:
        if not self.ds.eval:
            return
        self.last_eval = evaluate(self.module, self.ds.eval, self.ds.table, self.ds.kind, self.opts.batch_size * 2,
                                  self.pad_id, self.device, self.accelerator)
        self.metrics.write({"kind": "eval", "step": step, "eval": self.last_eval})

    def close(self) -> None:
        self.seconds = time.perf_counter() - self.t0
        self.bar.close()
        self.metrics.close()

    def finish(self, overwrite: bool, resumed_from: int | None) -> TrainReport:
        """Check what was trained, write the adapter into the run directory and publish it as the output."""
        opts, total = self.opts, self.plan.total
        _check_finite_parameters(self.trainable, total, self.output)
        tensors = {k: _full(t) for k, t in _adapter_tensors(self.routed, self.heads).items()}  # every rank gathers
        if self.accelerator.is_main_process:
            write_adapter_files(self.routed, self.run_dir, heads=self.heads, tensors=tensors,
                                extra={"training": {"options": opts.to_dict(), "steps": total, "kind": self.ds.kind,
                                                    "final_eval": self.last_eval}})
            if not opts.keep_checkpoints_at_end:
                shutil.rmtree(self.run_dir / "checkpoints", ignore_errors=True)
            publish(self.run_dir, self.output, overwrite)
        self.accelerator.wait_for_everyone()
        history = self.metrics.history
        train_records = [r for r in history if r["kind"] == "train"]
        return TrainReport(adapter=self.output, steps=total, tasks=self.ds.table.tasks, kind=self.ds.kind,
                           train_loss=train_records[-1]["loss"] if train_records else None,
                           eval=self.last_eval or {}, history=history, seconds=self.seconds,
                           tokens_per_s=self.tokens * self.world / self.seconds if self.seconds else 0.0,
                           resumed_from=resumed_from, frozen_bytes_per_process=self.frozen_bytes)


def param_groups(trainable: dict[str, torch.nn.Parameter], opts: TrainOptions, routed) -> list[dict]:
    """AdamW groups: the sample router's parameters (B and C) at lr × sample_router_lr, everything else at lr.
    Adam moves every coordinate by about lr, so B C x moves with k_r · |C x| per step: far more than A e_t does."""
    from ..model.routers import router_for

    names = router_for(routed.moore.config).sample_parameters
    sample, rest = [], []
    for key, p in trainable.items():
        (sample if key.rpartition(".")[2] in names else rest).append(p)
    groups = [{"params": rest, "lr": opts.lr}]
    if sample:
        groups.append({"params": sample, "lr": opts.lr * opts.sample_router_lr})
    return groups


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor FSDP sharded (a DTensor), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor, gathered from every process when FSDP sharded it (a collective: call on every rank)."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach()


def _adapter_tensors(routed, heads) -> dict[str, torch.Tensor]:
    from ..model.layer import trainable_parameters

    out = dict(trainable_parameters(routed))
    if heads is not None:
        out.update(heads.state_tensors())
    return out


def _trainable(routed, heads) -> dict[str, torch.nn.Parameter]:
    """Adapter key -> parameter, for the MoORE layers and the task heads."""
    from ..model.layer import trainable_parameters

    out = dict(trainable_parameters(routed))
    if heads is not None:
        out.update(heads.adapter_parameters())
    return out
