"""``ServeOptions``: every choice of ``moorize serve`` and ``moorize.serving.serve``, each written once (its field:
help, range, default), checked before the export is loaded or a port is bound. No torch import."""

from __future__ import annotations

from dataclasses import dataclass

from ..options import check_options, option, with_overrides

API_KEY_ENV = "MOORIZE_API_KEY"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


@dataclass
class ServeOptions:
    """How to serve an export over HTTP."""

    host: str = option("127.0.0.1", help="Address to bind (another than localhost exposes the server: use "
                                         "--api-key).")
    port: int = option(8000, kind=int, low=0, high=65535, help="Port to bind (0: any free port).")
    api_key: str | None = option(None, envvar=API_KEY_ENV, help="Require 'Authorization: Bearer KEY' on every "
                                                                "request.")
    max_batch_size: int = option(16, kind=int, low=1, help="Rows decoded together in one ONNX Runtime run "
                                                           "(requests of any task).")
    max_queue: int = option(64, kind=int, low=1, help="Requests waiting for a row; beyond this the server "
                                                      "answers 429.")
    threads: int = option(0, kind=int, low=0, help="ONNX Runtime intra-op threads (0: its default, one per core).")
    providers: list[str] | None = option(None, multiple=True, flag="provider",
                                         help="ONNX Runtime execution provider(s) in order; repeatable. Default: "
                                              "CUDA when usable, else CPU.")
    log_level: str = option("warning", choices=LOG_LEVELS, help="uvicorn's log level.")

    def __post_init__(self) -> None:
        check_options(self)

    @classmethod
    def build(cls, options: ServeOptions | None, overrides: dict) -> ServeOptions:
        return with_overrides(cls, options, overrides, "serve")
