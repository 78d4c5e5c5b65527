"""The batching engine: every live request is a row of one running batch, whatever its task.

One worker thread owns the ONNX Runtime session. Each step it (1) admits waiting
requests up to ``max_batch_size`` rows, (2) prefills all newcomers in one run
(left-padded, empty cache, one task id per row), merges their caches into the
running batch (``kvbatch``), and (3) runs one decoding step for every row at once,
``task_ids`` per row. A row that met its end-of-sequence token, its token budget or
was cancelled (stop string, client gone) leaves the batch before the next step.
Sampling is per row with the request's own seeded generator, so a request's tokens
do not depend on its neighbours: greedy rows equal the same request run alone.

The engine knows nothing of HTTP: a request reports through two callbacks, called
on the worker thread (``on_token(id)``, ``on_end(reason, error)``).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..runtime.sampling import sample_nucleus
from .kvbatch import KVBatch, left_pad
from .metrics import Metrics

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The bounded queue is full: the caller answers 429."""


@dataclass
class GenRequest:
    """One generation: token ids in, token ids out through the callbacks."""

    task_id: int
    prompt: list[int]
    max_tokens: int
    on_token: Callable[[int], None]
    on_end: Callable[[str, str | None], None]  # (finish reason "stop"|"length"|"cancelled"|"error", message)
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    task: str = ""
    arrived: float = field(default_factory=time.perf_counter)
    generated: int = 0
    cancelled: bool = False
    ended: bool = False

    def cancel(self) -> None:
        """Ask the engine to drop the row before its next step (safe from any thread)."""
        self.cancelled = True


@dataclass
class _Row:
    req: GenRequest
    rng: np.random.Generator
    last: int = 0


class Engine:
    """The worker thread, its bounded queue and the running batch."""

    def __init__(self, model, max_batch_size: int = 16, max_queue: int = 64, metrics: Metrics | None = None):
        self.model, self.max_batch_size, self.max_queue, self.metrics = model, max_batch_size, max_queue, metrics
        self.eos = set(int(t) for t in (model.meta.get("eos_token_id") or []))
        self._waiting: collections.deque[GenRequest] = collections.deque()
        self._cond = threading.Condition()
        self._rows: list[_Row] = []
        self._kv: KVBatch | None = None
        self._running = False
        self._thread: threading.Thread | None = None

    # ---- life cycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="moorize-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._running = False
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        for row in self._rows:
            self._end(row.req, "cancelled")
        for req in self._waiting:
            self._end(req, "cancelled")

    def submit(self, req: GenRequest) -> None:
        with self._cond:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting)")
            self._waiting.append(req)
            self._gauge()
            self._cond.notify()

    # ---- the loop --------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._running and not self._waiting and not self._rows:
                    self._cond.wait()
                if not self._running:
                    return
                newcomers = []
                while self._waiting and len(self._rows) + len(newcomers) < self.max_batch_size:
                    req = self._waiting.popleft()
                    if req.cancelled:
                        self._end(req, "cancelled")
                    else:
                        newcomers.append(req)
                self._gauge()
            t0 = time.perf_counter()
            self._drop([i for i, r in enumerate(self._rows) if r.req.cancelled], "cancelled")
            try:
                if newcomers:
                    self._prefill(newcomers)
                if self._rows:
                    self._decode()
            except Exception as e:  # a failed run fails its rows, never the server
                log.exception("engine step failed")
                failed = [r.req for r in self._rows] + [r for r in newcomers if not r.ended]
                self._rows, self._kv = [], None
                for req in failed:
                    self._end(req, "error", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            if self.metrics is not None:
                self.metrics.observe("moorize_step_seconds", time.perf_counter() - t0)
            self._gauge()

    def _prefill(self, reqs: list[GenRequest]) -> None:
        """One run for every newcomer: left-padded prompts, empty caches, each row's task."""
        n = max(len(r.prompt) for r in reqs)
        ids = np.stack([left_pad(np.asarray(r.prompt, dtype=np.int64), n, 0) for r in reqs])
        mask = np.stack([left_pad(np.ones(len(r.prompt), dtype=np.int64), n, 0) for r in reqs])
        tids = np.array([r.task_id for r in reqs], dtype=np.int64)
        out = self.model.run(ids, mask, tids, self.model.empty_past(len(reqs)))
        if self.metrics is not None:
            self.metrics.observe("moorize_prefill_batch_size", len(reqs))
        rows = [_Row(r, np.random.default_rng(r.seed)) for r in reqs]
        keep = [i for i, row in enumerate(rows) if self._next(row, out[0][i, -1])]
        fresh = KVBatch(list(out[1:]), mask).keep(keep)
        if fresh is not None:
            self._kv = fresh if self._kv is None else self._kv.merge(fresh)
            self._rows += [rows[i] for i in keep]

    def _decode(self) -> None:
        """One run for every row: its last token, the merged cache, its task."""
        kv = self._kv
        ids = np.array([[row.last] for row in self._rows], dtype=np.int64)
        tids = np.array([row.req.task_id for row in self._rows], dtype=np.int64)
        mask = kv.step_mask()
        out = self.model.run(ids, mask, tids, kv.past)
        if self.metrics is not None:
            self.metrics.observe("moorize_batch_size", len(self._rows))
        self._kv = KVBatch(list(out[1:]), mask)
        done = [i for i, row in enumerate(self._rows) if not self._next(row, out[0][i, -1])]
        self._drop(done, None)

    def _next(self, row: _Row, logits: np.ndarray) -> bool:
        """Choose and report the row's next token; False when the row is finished."""
        req = row.req
        if req.cancelled:
            self._end(req, "cancelled")
            return False
        logits = logits.astype(np.float32)[None]
        if req.temperature > 0:
            tok = int(sample_nucleus(logits, row.rng, req.temperature, req.top_p)[0])
        else:
            tok = int(logits.argmax(-1)[0])
        if tok in self.eos:
            self._end(req, "stop")
            return False
        req.generated += 1
        if req.generated == 1 and self.metrics is not None:
            self.metrics.observe("moorize_time_to_first_token_seconds", time.perf_counter() - req.arrived)
        if self.metrics is not None:
            self.metrics.inc("moorize_generated_tokens_total", model=req.task)
        try:
            req.on_token(tok)
        except Exception:  # the client's side is gone: drop the row
            log.exception("on_token callback failed")
            req.cancel()
        row.last = tok
        if req.generated >= req.max_tokens:
            self._end(req, "length")
            return False
        return True

    def _drop(self, indices: list[int], reason: str | None) -> None:
        """Remove rows from the batch (and their cache columns); ``reason`` ends their requests if given."""
        if not indices:
            return
        gone = set(indices)
        for i in indices:
            if reason is not None:
                self._end(self._rows[i].req, reason)
        keep = [i for i in range(len(self._rows)) if i not in gone]
        self._kv = self._kv.keep(keep) if self._kv is not None else None
        self._rows = [self._rows[i] for i in keep]

    def _end(self, req: GenRequest, reason: str, message: str | None = None) -> None:
        if req.ended:
            return
        req.ended = True
        if self.metrics is not None:
            self.metrics.inc("moorize_finished_total", reason=reason)
            if reason != "cancelled" or req.generated:
                self.metrics.observe("moorize_request_seconds", time.perf_counter() - req.arrived)
        try:
            req.on_end(reason, message)
        except Exception:  # a callback must never stop the engine
            log.exception("on_end callback failed")

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.set("moorize_queue_length", len(self._waiting))
            self.metrics.set("moorize_running_rows", len(self._rows))
