"""Multi-task fine-tuning of the MoORE parameters on a factored checkpoint (``moorize train``).

Read it top to bottom: ``train`` checks the paths and takes the run directory (``rundir``); ``_Run``
sets up (accelerate and FSDP: ``parallel``; data and the step plan: ``plan``; the optimizer and its
schedule: ``schedule``), then steps (accumulate, clip, step, log; ``divergence`` stops a run that
diverges), evaluates, checkpoints (``checkpoints``), and writes the final adapter. Only the
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
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..errors import MoorizeError
from ..io.factored import FactoredCheckpoint
from ..io.outdir import is_main_process, output_lock, publish
from ..model.adapter import write_adapter_files
from ..model.heads import MoOREClassifier, TaskHeads, default_pooling
from .checkpoints import _load_checkpoint, _read_json, _save_checkpoint
from .data import TaskTable, collate
from .divergence import TrainingDiverged, check_finite, check_finite_parameters  # noqa: F401  (TrainingDiverged: API)
from .losses import _forward, evaluate
from .metrics import LOSS_PLOT, _MetricsLog, plot_losses
from .options import BOOKKEEPING, CONFIG_NAME, LEGACY_OPTIONS, TrainOptions
from .parallel import accelerator_for, full_tensor, local_part, shard
from .plan import StepPlan, load_data
from .rundir import as_paths, check_run_paths, file_digests, prepare_run_dir, run_directory_guard
from .schedule import lr_factor, param_groups

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
    data_paths, eval_paths = as_paths(data), as_paths(eval_data)
    FactoredCheckpoint(factored_dir).close()  # a clear error if it is not a factored checkpoint
    check_run_paths(output, factored_dir, data_paths + eval_paths, resume, overwrite)
    with output_lock(output) if is_main_process() else contextlib.nullcontext():
        run, resume_from = prepare_run_dir(output, resume, overwrite)
        with run_directory_guard(run, output):
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
        self.accelerator = accelerator_for(opts)
        set_seed(opts.seed)
        tokenizer, self.pad_id = _tokenizer(factored_dir)
        self.ds = load_data(data, eval_data, tokenizer, opts)
        self.module, self.routed, self.heads = _build_model(factored_dir, self.ds.table, self.ds.kind, opts)
        self.trainable = _trainable(self.routed, self.heads)
        self.plan = StepPlan(self.ds.train, opts, self.accelerator.num_processes)
        self.config = {"options": {k: v for k, v in opts.to_dict().items() if k not in BOOKKEEPING},
                       "base_fingerprint": self.routed.moore.base_fingerprint,
                       "base_layout_fingerprint": self.routed.moore.base_layout_fingerprint,  # ranks, residual, dtypes
                       "data_sha256": file_digests(data), "eval_data_sha256": file_digests(eval_data or []),
                       "tasks": self.ds.table.tasks, "kind": self.ds.kind, "train_examples": len(self.ds.train),
                       "total_steps": self.plan.total}
        if opts.fsdp:  # before the optimizer: sharding replaces the parameters
            self.module = shard(self.module, self.routed, self.accelerator)
            self.trainable = _trainable(self.routed, self.heads)
        optimizer = torch.optim.AdamW(param_groups(self.trainable, opts, self.routed), lr=opts.lr,
                                      betas=(0.9, opts.adam_beta2), weight_decay=opts.weight_decay)
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
        self.frozen_bytes = sum(local_part(p).numel() * p.element_size() for p in self.module.parameters()
                                if not p.requires_grad)
        log.info("frozen parameters held by this process: %d bytes", self.frozen_bytes)
        self.tokens, self.window, self.last_eval = 0, [], None
        self.smoothed, self.smoothed_steps = 0.0, 0  # the bar's exponential mean of the loss

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
        check_finite(step + 1, self.output, loss_sum, grad_norm)  # before the step: a NaN never reaches the weights
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum, grad_norm

    def after_step(self, done: int, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
        """Log every ``log_every`` steps, evaluate every ``eval_every``, checkpoint every ``save_every``."""
        opts, total = self.opts, self.plan.total
        self.window.append(float(loss))
        # the bar shows a smoothed loss (an exponential mean, bias-corrected) on every step: one step's loss
        # swings with its batch; metrics.jsonl keeps the per-window means
        self.smoothed, self.smoothed_steps = 0.9 * self.smoothed + 0.1 * float(loss), self.smoothed_steps + 1
        self.bar.set_postfix(loss=f"{self.smoothed / (1 - 0.9 ** self.smoothed_steps):.4f}",
                             tok_s=f"{self.tokens * self.world / max(time.perf_counter() - self.t0, 1e-9):.0f}",
                             refresh=False)
        self.bar.update(1)
        if done % opts.log_every == 0 or done == total:
            elapsed = time.perf_counter() - self.t0
            record = {"kind": "train", "step": done, "epoch": round(self.plan.epoch_of(done), 4),
                      "loss": sum(self.window) / len(self.window), "lr": self.scheduler.get_last_lr()[0],
                      "tokens_per_s": self.tokens * self.world / elapsed, "elapsed_s": round(elapsed, 3)}
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            self.metrics.write(record)
            self.window = []
        if opts.eval_every and done % opts.eval_every == 0 and done != total:
            self.evaluate(done)
        if opts.save_every and done % opts.save_every == 0 and done != total:
            check_finite_parameters(self.trainable, done, self.output)
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
        check_finite_parameters(self.trainable, total, self.output)
        tensors = {k: full_tensor(t) for k, t in _adapter_tensors(self.routed, self.heads).items()}  # every rank gathers
        if self.accelerator.is_main_process:
            write_adapter_files(self.routed, self.run_dir, heads=self.heads, tensors=tensors,
                                extra={"training": {"options": opts.to_dict(), "steps": total, "kind": self.ds.kind,
                                                    "final_eval": self.last_eval}})
            if not opts.keep_checkpoints_at_end:
                shutil.rmtree(self.run_dir / "checkpoints", ignore_errors=True)
            plot_losses(self.metrics.history, self.run_dir / LOSS_PLOT)  # with the plot extra
            publish(self.run_dir, self.output, overwrite)
        self.accelerator.wait_for_everyone()
        history = self.metrics.history
        train_records = [r for r in history if r["kind"] == "train"]
        return TrainReport(adapter=self.output, steps=total, tasks=self.ds.table.tasks, kind=self.ds.kind,
                           train_loss=train_records[-1]["loss"] if train_records else None,
                           eval=self.last_eval or {}, history=history, seconds=self.seconds,
                           tokens_per_s=self.tokens * self.world / self.seconds if self.seconds else 0.0,
                           resumed_from=resumed_from, frozen_bytes_per_process=self.frozen_bytes)


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
