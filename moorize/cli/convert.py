"""`moorize convert`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from ..conversion.options import DEFAULT_BATCH, DEFAULTS, RESIDUALS, SOLVERS, STORE_DTYPES, SVD_DTYPES, ConvertOptions


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


@click.command()
@click.argument("model_dir", type=click.Path(path_type=Path, readable=False))  # moorize says it in one line
@click.argument("out_dir", type=click.Path(path_type=Path, readable=False))
@click.option("--targets", "targets", multiple=True, metavar="PATTERN",
              help="Layers to factor (glob, or regex with 're:'); repeatable. Default: every linear layer "
                   "inside the transformer blocks.")
@click.option("--rank", "rank", multiple=True, metavar="POLICY",
              help="full (default), N, energy:0.99 or ratio:0.25; 'PATTERN=POLICY' overrides per layer "
                   "(e.g. 'mlp.*=energy:0.95'). Repeatable.")
@click.option("--residual", type=click.Choice(RESIDUALS), default=DEFAULTS.residual, show_default=True,
              help="When truncated: keep W - U_r S_r Vh_r (model stays exact) or drop it (compression).")
@click.option("--solver", type=click.Choice(SOLVERS), default=DEFAULTS.solver,
              show_default=True, help="auto: gram on CPU (float64 Gram + eigh), svd on GPU; randomized for "
                                      "fixed truncated ranks.")
@click.option("--oversample", type=int, default=DEFAULTS.oversample, show_default=True, help="Randomized solver: extra columns.")
@click.option("--power-iters", type=int, default=DEFAULTS.power_iters, show_default=True, help="Randomized solver: power iterations.")
@click.option("--svd-dtype", type=click.Choice(SVD_DTYPES), default=DEFAULTS.svd_dtype, show_default=True,
              help="Precision of the svd/randomized solvers (gram always forms its Gram matrix in float64).")
@click.option("--dtype", type=click.Choice(STORE_DTYPES), default=DEFAULTS.dtype,
              help="Storage dtype of the factors. Default: the source dtype of each weight.")
@click.option("--device", default=DEFAULTS.device, show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--gguf-file", default=None, help="GGUF file name inside MODEL_DIR (de-quantised to float32).")
@click.option("--allow-pickle", is_flag=True, help="Accept pytorch_model.bin (loaded with weights_only=True).")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty OUT_DIR (only once the new one is complete).")
@click.option("--max-shard-size", default=DEFAULTS.max_shard_size, show_default=True, help="Largest output shard.")
@click.option("--batch-size", default=DEFAULTS.batch_size, show_default=True,
              help="Same-shaped weights decomposed together, in float32 bytes (auto: " + ", ".join(f"{v} on {k.upper()}" for k, v in DEFAULT_BATCH.items()) + ").")
@click.option("--seed", type=int, default=DEFAULTS.seed, show_default=True, help="Seed of the randomized solver.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def convert(model_dir: Path, out_dir: Path, as_json: bool, no_progress: bool, **options) -> None:
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
    from ..conversion.pipeline import convert as run_convert
    from ..conversion.report import format_table

    update, bar = _progress_bar(not no_progress and not as_json and sys.stderr.isatty())
    try:
        # repeatable options arrive as tuples; none given means the library's default
        options.update(targets=list(options["targets"]) or None, rank=list(options["rank"]) or None)
        report = run_convert(model_dir, out_dir, ConvertOptions(**options), progress=update)
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


