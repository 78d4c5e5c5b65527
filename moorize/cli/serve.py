"""`moorize serve`: the OpenAI-compatible HTTP server over an ONNX export."""

from __future__ import annotations

from pathlib import Path

import click

from ..options import cli_values, click_options
from ..serving.options import ServeOptions


@click.command()
@click.argument("export_dir", type=click.Path(path_type=Path, readable=False))
@click_options(ServeOptions)  # every option of the server, as its field writes it
def serve(export_dir: Path, **options) -> None:
    """Serve EXPORT_DIR (moorize export --onnx, decoders --with-past) as an OpenAI-compatible HTTP API.

    Each task is a model id (/v1/models); requests for any task share one batch.

    \b
    Endpoints: /v1/models, /v1/completions, /v1/chat/completions (decoders),
               /v1/classify (encoders with task heads), /health, /metrics
    Examples:
      moorize serve ./smollm2-onnx --port 8000
      MOORIZE_API_KEY=secret moorize serve ./smollm2-onnx --host 0.0.0.0 --max-batch-size 32
    """
    from ..serving.server import serve as run_server

    options = cli_values(ServeOptions, options)
    run_server(export_dir, ServeOptions(**{**options, "api_key": options["api_key"] or None}))
