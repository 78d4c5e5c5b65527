"""`moorize merge`."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
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
    from ..model.routed import merge as run_merge

    out = run_merge(factored_dir, adapter, task, dest, overwrite=overwrite)
    click.echo(f"wrote {out} (task {task!r})")


