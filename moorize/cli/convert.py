"""`moorize convert`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from ..conversion.options import ConvertOptions
from ..options import cli_values, click_options


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
@click_options(ConvertOptions)  # every option of the conversion, as its field writes it
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
        report = run_convert(model_dir, out_dir, ConvertOptions(**cli_values(ConvertOptions, options)), progress=update)
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


