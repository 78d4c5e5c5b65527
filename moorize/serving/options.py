"""``ServeOptions``: every choice of ``moorize serve`` and ``moorize.serving.serve``, each written once (its field:
help, range, default), checked before the export is loaded or a port is bound. No torch import."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import MoorizeError
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
    max_step_tokens: int = option(512, kind=int, low=2, help="Tokens one engine step processes: a token per "
                                  "decoding row, the rest for prompts; a longer prompt is read in chunks between "
                                  "decoding steps (the bound on a step's time and memory). At least twice "
                                  "--max-batch-size.")
    max_prompt_tokens: int = option(0, kind=int, low=0, help="Longest prompt one request may send, in tokens "
                                    "(0: the model's positions); longer ones get 400.")
    max_batch_tokens: int = option(32768, kind=int, low=0, help="KV-cache positions the running batch may hold "
                                   "(the bound on the server's cache memory): requests join while rows x the "
                                   "longest row (prompt + max_tokens) fits, else they wait; a request that alone "
                                   "exceeds it gets 400 (0: no bound beyond --max-batch-size).")
    header_timeout: float = option(10.0, kind=float, low=0.0, low_open=True, help="Seconds a connection may take "
                                   "to send a request's headers; slower ones are closed with 408.")
    body_timeout: float = option(30.0, kind=float, low=0.0, low_open=True, help="Seconds a request may take to "
                                 "send its body; slower ones get 408.")
    shutdown_grace: float = option(10.0, kind=float, low=0.0, help="Seconds running generations may take to "
                                   "finish after SIGTERM or Ctrl-C; then each ends with an error event (streams) "
                                   "or 503.")
    threads: int = option(0, kind=int, low=0, help="ONNX Runtime intra-op threads (0: its default, one per core).")
    providers: list[str] | None = option(None, multiple=True, flag="provider",
                                         help="ONNX Runtime execution provider(s) in order; repeatable. Default: "
                                              "CUDA when usable, else CPU.")
    log_level: str = option("warning", choices=LOG_LEVELS, help="uvicorn's log level.")

    def __post_init__(self) -> None:
        check_options(self)
        if self.max_step_tokens < 2 * self.max_batch_size:
            raise MoorizeError(f"max-step-tokens must be at least twice max-batch-size ({2 * self.max_batch_size}), "
                               f"got {self.max_step_tokens}: prompts need room in every step")

    @classmethod
    def build(cls, options: ServeOptions | None, overrides: dict) -> ServeOptions:
        return with_overrides(cls, options, overrides, "serve")
