"""``moorize serve``: an OpenAI-compatible HTTP server over one ONNX export, every task in one batch.

Modules: ``protocol`` (request checks, error JSON), ``engine`` (the batching worker),
``kvbatch`` (rows joining and leaving the KV cache), ``textstream`` (incremental text,
stop strings), ``generation`` (one request on the event loop), ``classifier`` (encoder
exports), ``metrics`` (Prometheus text), ``app`` (routes), ``server`` (uvicorn).
"""

from __future__ import annotations


def serve(*args, **kwargs):
    """See ``moorize.serving.server.serve``; imported lazily so ``moorize --help`` stays light."""
    from .server import serve as _serve

    return _serve(*args, **kwargs)


__all__ = ["serve"]
