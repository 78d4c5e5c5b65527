"""`moorize env`."""

from __future__ import annotations

import json

import click


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--path", "shipped", metavar="NAME",
              help="Print only the path of a shipped checkpoint: smollm2 (a .gguf file) or minilm (a directory).")
def env(as_json: bool, shipped: str | None) -> None:
    """Report versions, devices, ONNX Runtime providers and extras, for a bug report.

    \b
    Examples:
      moorize env
      moorize convert "$(moorize env --path smollm2)" smollm2-moore/
    """
    from ..environment import format_report, report, shipped_path

    if shipped is not None:
        click.echo(str(shipped_path(shipped)))
        return
    info = report()
    click.echo(json.dumps(info, indent=2) if as_json else format_report(info))
