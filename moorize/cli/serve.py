"""`moorize serve`: the OpenAI-compatible HTTP server over an ONNX export."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("export_dir", type=click.Path(path_type=Path, readable=False))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind (another than localhost exposes the server: use --api-key).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--api-key", default=None, envvar="MOORIZE_API_KEY", show_envvar=True,
              help="Require 'Authorization: Bearer KEY' on every request.")
@click.option("--max-batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Rows decoded together in one ONNX Runtime run (requests of any task).")
@click.option("--max-queue", type=click.IntRange(min=1), default=64, show_default=True,
              help="Requests waiting for a row; beyond this the server answers 429.")
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
              help="ONNX Runtime intra-op threads (0: its default, one per core).")
@click.option("--provider", "providers", multiple=True,
              help="ONNX Runtime execution provider(s) in order. Default: CUDA when usable, else CPU.")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]),
              default="warning", show_default=True, help="uvicorn's log level.")
def serve(export_dir: Path, host: str, port: int, api_key, max_batch_size: int, max_queue: int, threads: int,
          providers, log_level: str) -> None:
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

    run_server(export_dir, host=host, port=port, api_key=api_key or None, max_batch_size=max_batch_size,
               max_queue=max_queue, providers=list(providers) or None, threads=threads or None, log_level=log_level)
