"""`moorize inspect`."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command()
@click.argument("out_dir", type=click.Path(path_type=Path, readable=False))
@click.option("--json", "as_json", is_flag=True, help="Print moorize.json's summary and layers as JSON.")
@click.option("--layers", "per_layer", is_flag=True, help="One line per layer instead of per layer kind.")
@click.option("--plot", type=click.Path(path_type=Path), default=None, metavar="FILE.png",
              help="Draw singular-value spectra and energy curves per layer kind.")
def inspect(out_dir: Path, as_json: bool, per_layer: bool, plot: Path | None) -> None:
    """Summarise a factored checkpoint: layers, shapes, ranks, energy kept, errors."""
    from ..conversion.report import format_table, plot_spectra
    from ..io.factored import FactoredCheckpoint

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


