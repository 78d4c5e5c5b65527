"""`moorize train`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..model.config import ROUTER_MODES, ROUTER_NORMS
from ..process import return_freed_memory_for_training
from ..training.options import PRECISIONS, SCHEDULES, TrainOptions

DEFAULTS = TrainOptions()


@click.command()
@click.argument("factored_dir", type=click.Path(path_type=Path, readable=False))
@click.option("--data", "data", multiple=True, required=True, type=click.Path(path_type=Path, readable=False),
              help="Training data, JSONL or CSV (repeatable): task + prompt/response, or task + text/label.")
@click.option("--output", "output", required=True, type=click.Path(path_type=Path, readable=False),
              help="Adapter directory to write (the run lives in .<name>.moorize-partial until it finishes).")
@click.option("--eval-data", "eval_data", multiple=True, type=click.Path(path_type=Path, readable=False),
              help="Evaluation data (repeatable); else --eval-split holds out a share of every task.")
@click.option("--eval-split", type=float, default=DEFAULTS.eval_split, show_default=True, help="Held-out share per task.")
@click.option("--router", type=click.Choice(ROUTER_MODES), default=DEFAULTS.router,
              show_default=True, help="What routes the experts.")
@click.option("--householder", type=int, default=DEFAULTS.householder, show_default=True, help="Householder reflections (even).")
@click.option("--task-dim", type=int, default=DEFAULTS.task_dim, show_default=True, help="Task embedding size.")
@click.option("--router-experts", type=int, default=DEFAULTS.router_experts, show_default=True, help="Sample router width k_r.")
@click.option("--router-norm", type=click.Choice(ROUTER_NORMS), default=DEFAULTS.router_norm, show_default=True,
              help="The sample router's input: x as published (none), or x / rms(x) (rms: steadier gates, "
                   "less forgetting; README, frontier).")
@click.option("--train-sigma", is_flag=True, help="Train the singular values too.")
@click.option("--pooling", type=click.Choice(["mean", "cls", "last"]), default=None,
              help="Classification pooling [default: mean for encoders, last for decoders].")
@click.option("--lr", type=float, default=DEFAULTS.lr, show_default=True)
@click.option("--sample-router-lr", type=float, default=DEFAULTS.sample_router_lr, show_default=True,
              help="Multiplier of --lr for the sample router (B, C); below 1 protects what the model knew.")
@click.option("--weight-decay", type=float, default=DEFAULTS.weight_decay, show_default=True)
@click.option("--schedule", type=click.Choice(SCHEDULES), default=DEFAULTS.schedule,
              show_default=True, help="Learning-rate schedule after warmup (wsd: warmup-stable-decay).")
@click.option("--warmup", type=float, default=DEFAULTS.warmup, show_default=True, help="Warmup: share of steps, or steps if >= 1.")
@click.option("--decay", type=float, default=DEFAULTS.decay, show_default=True, help="wsd: share of steps in the final decay.")
@click.option("--max-grad-norm", type=float, default=DEFAULTS.max_grad_norm, show_default=True, help="Gradient clipping (0: off).")
@click.option("--batch-size", type=int, default=DEFAULTS.batch_size, show_default=True, help="Examples per micro-batch and process.")
@click.option("--grad-accum", type=int, default=DEFAULTS.grad_accum, show_default=True, help="Micro-batches per optimizer step.")
@click.option("--epochs", type=float, default=DEFAULTS.epochs, show_default=True)
@click.option("--max-steps", type=int, default=None, help="Optimizer steps (overrides --epochs).")
@click.option("--precision", type=click.Choice(PRECISIONS), default=DEFAULTS.precision, show_default=True,
              help="Autocast (auto: bf16 on a GPU that has it, none on the CPU).")
@click.option("--gradient-checkpointing", is_flag=True,
              help="Recompute each block's activations in backward, and return freed host memory to the OS at "
                   "once: less memory, more compute.")
@click.option("--compile", "compile", is_flag=True,
              help="torch.compile the model: the same results, faster steps after the first few (which compile).")
@click.option("--fsdp", is_flag=True,
              help="Under several processes, shard the frozen factors and the MoORE state (FSDP2) instead of "
                   "replicating them.")
@click.option("--seed", type=int, default=DEFAULTS.seed, show_default=True)
@click.option("--max-length", type=int, default=DEFAULTS.max_length, show_default=True, help="Longest example in tokens.")
@click.option("--truncate/--no-truncate", default=True, show_default=True,
              help="Truncate longer examples with a warning, or refuse them.")
@click.option("--chat-template", is_flag=True, help="Wrap prompts in the checkpoint's chat template.")
@click.option("--eval-every", type=int, default=DEFAULTS.eval_every, show_default=True, help="Evaluate every N steps (0: at the end).")
@click.option("--eval-max-examples", type=int, default=None, help="Evaluate at most N examples per task.")
@click.option("--save-every", type=int, default=DEFAULTS.save_every, show_default=True, help="Checkpoint every N steps (0: never).")
@click.option("--keep-checkpoints", type=int, default=DEFAULTS.keep_checkpoints, show_default=True, help="Checkpoints kept while running.")
@click.option("--log-every", type=int, default=DEFAULTS.log_every, show_default=True, help="Write metrics every N steps.")
@click.option("--tensorboard", is_flag=True, help="Also log to TensorBoard (needs the tensorboard package).")
@click.option("--cpu", is_flag=True, help="Train on the CPU even when a GPU is present.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its last checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --output (only once the new run finishes).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
def train(factored_dir: Path, data, output: Path, eval_data, resume: bool, overwrite: bool, no_progress: bool,
          as_json: bool, **options) -> None:
    """Train the MoORE routers of FACTORED_DIR on multi-task data; write an adapter to --output.

    Only the MoORE parameters train (routers, Householder vectors, optionally σ, task
    heads); the factored checkpoint is read-only. Metrics go to metrics.jsonl, one JSON
    object per line. Runs on several processes with `accelerate launch -m moorize train`.
    """
    from ..training.loop import train as run_train

    return_freed_memory_for_training(options["gradient_checkpointing"])  # memory first only if asked
    report = run_train(factored_dir, list(data), output, eval_data=list(eval_data) or None, resume=resume,
                       overwrite=overwrite, progress=False if no_progress else None, **options)
    if as_json:
        click.echo(json.dumps({"adapter": str(report.adapter), "steps": report.steps, "kind": report.kind,
                               "tasks": report.tasks, "train_loss": report.train_loss, "eval": report.eval,
                               "seconds": report.seconds, "tokens_per_s": report.tokens_per_s,
                               "frozen_bytes_per_process": report.frozen_bytes_per_process}, indent=2))
        return
    click.echo(f"wrote adapter {report.adapter}: {report.steps} steps in {report.seconds:.1f} s "
               f"({report.tokens_per_s:.0f} tokens/s), final train loss {report.train_loss:.4f}")
    for task, m in report.eval.items():
        click.echo("  " + task + ": " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                   for k, v in m.items()))


