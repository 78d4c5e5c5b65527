"""`moorize train`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..model.config import MoOREConfig
from ..options import click_options
from ..process import return_freed_memory_for_training
from ..training.options import TrainOptions


@click.command()
@click.argument("factored_dir", type=click.Path(path_type=Path, readable=False))
@click.option("--data", "data", multiple=True, required=True, type=click.Path(path_type=Path, readable=False),
              help="Training data, JSONL, a JSON array, CSV or TSV (repeatable; UTF-8, UTF-16 with a BOM): task + "
                   "prompt/response, or task + text/label.")
@click.option("--output", "output", required=True, type=click.Path(path_type=Path, readable=False),
              help="Adapter directory to write (the run lives in .<name>.moorize-partial until it finishes).")
@click.option("--eval-data", "eval_data", multiple=True, type=click.Path(path_type=Path, readable=False),
              help="Evaluation data (repeatable); else --eval-split holds out a share of every task.")
@click_options(MoOREConfig)  # the MoORE layers' settings, then the run's: each written once, as its field
@click_options(TrainOptions)
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


