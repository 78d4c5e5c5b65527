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


def build_app(export_dir, options: ServeOptions | None = None, **keywords):
    """The ASGI app for ``export_dir`` (engine started and stopped with the app's lifespan), for any ASGI
    server. Options are the fields of ``ServeOptions``, as ``options=`` or keywords (``max_batch_size=8``)."""
    return _build(export_dir, ServeOptions.build(options, keywords))[0]


def _build(export_dir, opts: ServeOptions):
    """(the ASGI app, its engine or None for an encoder export)."""
    from ..runtime.session import MoOREOrtModel
    from .app import Server
    from .classifier import Classifier
    from .engine import Engine
    from .metrics import server_metrics

    model = MoOREOrtModel.from_export(Path(export_dir), providers=opts.providers or None,
                                      session_options=session_options(opts.threads or None))
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
        engine = Engine(model, opts.max_batch_size, opts.max_queue, metrics, max_step_tokens=opts.max_step_tokens,
                        max_batch_tokens=opts.max_batch_tokens)
        server = Server(model, metrics, opts, engine=engine)
        return server.app(opts.api_key, on_startup=engine.start, on_shutdown=engine.stop), engine
    return Server(model, metrics, opts, classifier=Classifier(model)).app(opts.api_key), None


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
    import uvicorn  # the serve extra: a missing one is named by the CLI

    from .connection import DrainingServer, TimedH11Protocol

    opts = ServeOptions.build(options, overrides)
    if opts.api_key is None and os.environ.get(API_KEY_ENV):
        opts = ServeOptions.build(opts, {"api_key": os.environ[API_KEY_ENV]})
    host, port = opts.host, opts.port
    sock = bind(host, port)
    return_freed_memory()  # KV-cache buffers freed at every step must not accumulate in glibc's heap
    app, engine = _build(export_dir, opts)
    if host not in ("127.0.0.1", "localhost", "::1") and not opts.api_key:
        log.warning("serving on %s without an API key: anyone who can reach it can use it", host)
    # uvicorn's own limit comes after ours: by then the engine has ended every row, so streams close themselves
    config = uvicorn.Config(app, host=host, port=port, log_level=opts.log_level, access_log=False,
                            http=TimedH11Protocol.with_timeout(opts.header_timeout),
                            timeout_graceful_shutdown=opts.shutdown_grace + 5)
    # the banner is news, not a warning: it goes to stderr as itself, whatever the log level
    print(f"serving {export_dir} on http://{host}:{sock.getsockname()[1]} (Ctrl-C stops)", file=sys.stderr, flush=True)
    with stopped_by_signals():
        DrainingServer(config, engine, opts.shutdown_grace).run(sockets=[sock])
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
