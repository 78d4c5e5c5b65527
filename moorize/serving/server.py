"""``moorize.serving.serve``: load an export, start the engine (or classifier), run uvicorn.

uvicorn is the reference ASGI server (one process, one event loop here: the model
runs in the engine's own thread, and batching across requests needs them in one
process). It binds to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path

from ..errors import MoorizeError
from ..process import return_freed_memory
from .options import API_KEY_ENV, ServeOptions

log = logging.getLogger(__name__)


def build_app(export_dir, api_key: str | None = None, max_batch_size: int = 16, max_queue: int = 64,
              providers: list[str] | None = None, threads: int | None = None):
    """The ASGI app for ``export_dir`` (engine started and stopped with the app's lifespan)."""
    from ..runtime.session import MoOREOrtModel
    from .app import Server
    from .classifier import Classifier
    from .engine import Engine
    from .metrics import server_metrics

    ServeOptions(max_batch_size=max_batch_size, max_queue=max_queue, threads=threads or 0)  # checked first
    model = MoOREOrtModel.from_export(Path(export_dir), providers=providers, session_options=session_options(threads))
    if model.kind == "vision":
        raise MoorizeError(f"{export_dir} is an image encoder: the server takes text (run it from Python with "
                           "MoOREOrtModel.image_features)")
    if model.kind == "encoder-decoder":
        raise MoorizeError(f"{export_dir} is an encoder-decoder ({model.meta.get('model_type')}): the server batches "
                           "decoders exported with --with-past and encoder classifiers; run it with moorize run or "
                           "MoOREOrtModel.generate")
    if model.tokenizer is None:
        raise MoorizeError(f"{export_dir} has no tokenizer files: the server takes text")
    metrics = server_metrics()
    if model.kind == "decoder":
        if not model.with_past:
            raise MoorizeError(f"{export_dir} was exported without --with-past: the server batches decoding steps "
                               "over the KV cache (re-export with --with-past)")
        engine = Engine(model, max_batch_size, max_queue, metrics)
        server = Server(model, metrics, engine=engine)
        return server.app(api_key, on_startup=engine.start, on_shutdown=engine.stop)
    return Server(model, metrics, classifier=Classifier(model)).app(api_key)


def session_options(threads: int | None):
    """ONNX Runtime options for a long-running server whose shapes change every step.

    The CPU arena grows by doubling regions and never shrinks; with batch and cache
    lengths that change at every join and leave it kept growing under load (+240 MiB in
    three minutes on SmolLM2). Without it, tensors are plain allocations returned when
    freed; ``moorize.process.return_freed_memory`` is the other half.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = False
    if threads:
        options.intra_op_num_threads = threads
    return options


def serve(export_dir, options: ServeOptions | None = None, **overrides) -> None:
    """Serve ``export_dir`` over HTTP (OpenAI-compatible) until interrupted. Options are the fields of
    ``ServeOptions``, as ``options=`` or keywords (``port=8080``).

    ``api_key`` defaults to the environment variable MOORIZE_API_KEY; when set, every
    request needs ``Authorization: Bearer <key>``.
    """
    import uvicorn

    opts = ServeOptions.build(options, overrides)
    host, port, log_level = opts.host, opts.port, opts.log_level
    api_key = opts.api_key if opts.api_key is not None else (os.environ.get(API_KEY_ENV) or None)
    sock = bind(host, port)
    return_freed_memory()  # KV-cache buffers freed at every step must not accumulate in glibc's heap
    app = build_app(export_dir, api_key, opts.max_batch_size, opts.max_queue, opts.providers or None,
                    opts.threads or None)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log.warning("serving on %s without an API key: anyone who can reach it can use it", host)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=5)
    # the banner is news, not a warning: it goes to stderr as itself, whatever the log level
    print(f"serving {export_dir} on http://{host}:{sock.getsockname()[1]} (Ctrl-C stops)", file=sys.stderr, flush=True)
    with stopped_by_signals():
        uvicorn.Server(config).run(sockets=[sock])
    print("stopped", file=sys.stderr, flush=True)


class _Stop(Exception):
    """SIGTERM, as an exception: the way a server is told to stop, so the process ends normally."""


@contextlib.contextmanager
def stopped_by_signals():
    """SIGINT and SIGTERM end the server as a normal exit (status 0), not as an interrupted command.

    uvicorn catches both while it runs, shuts down, then raises the signal again for the
    handler it found: SIGINT's is Python's (a KeyboardInterrupt), SIGTERM's this one.
    """
    def stop(signum, frame):
        raise _Stop(signum)

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, stop) if main else None
    try:
        yield
    except (KeyboardInterrupt, _Stop):
        pass
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so a taken port is one clear error (uvicorn would exit on its own)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:  # the port is taken, the host unknown or not ours
        raise MoorizeError(f"cannot serve on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock
