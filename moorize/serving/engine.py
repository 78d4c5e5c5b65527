"""The batching engine: every live request is a row of one running batch, whatever its task.

One worker thread owns the ONNX Runtime session. Each **step** has a token budget
(``max_step_tokens``): every decoding row costs one token, and what is left goes to
prompts. So a step is at most two runs:

1. **prefill**, the head of the admitted requests first. Requests whose whole prompts
   fit the rest of the budget together are prefilled in one run (left-padded, empty
   cache, one task id per row); a prompt longer than that is processed in *chunks*,
   one chunk per step, its own cache growing beside the batch. A long prompt thus
   never stalls the others: between two of its chunks every running row decodes a
   token, and the work (and memory: activations, attention scores, logits) of one
   run is bounded by the budget, not by the prompt's length.
2. **decode**: one run for every row, its last token, ``task_ids`` per row.

A prefilled row joins the running batch (``kvbatch``); a row that met its
end-of-sequence token, its token budget or was cancelled (stop string, client
gone) leaves before the next step. Admission is first come, first served, up to
``max_batch_size`` rows and, when ``max_batch_tokens`` is set, while the batch's
cache can hold every admitted row at its longest (rows × the longest prompt +
max_tokens): the bound on the server's KV memory. Sampling is per row with the
request's own seeded generator, so a request's tokens do not depend on its
neighbours: greedy rows equal the same request run alone.

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

SHUTDOWN_MESSAGE = "the server is shutting down"


class QueueFull(Exception):
    """The bounded queue is full: the caller answers 429."""


class ShuttingDown(Exception):
    """The server stopped taking requests: the caller answers 503."""


@dataclass
class GenRequest:
    """One generation: token ids in, token ids out through the callbacks."""

    task_id: int
    prompt: list[int]
    max_tokens: int
    on_token: Callable[[int], None]
    on_end: Callable[[str, str | None], None]  # (reason "stop"|"length"|"cancelled"|"error"|"shutdown", message)
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    task: str = ""
    arrived: float = field(default_factory=time.perf_counter)
    generated: int = 0
    cancelled: bool = False
    ended: bool = False

    @property
    def positions(self) -> int:
        """Cache positions the row can reach: its prompt and every token it may generate."""
        return len(self.prompt) + self.max_tokens

    def cancel(self) -> None:
        """Ask the engine to drop the row before its next step (safe from any thread)."""
        self.cancelled = True


@dataclass
class _Row:
    req: GenRequest
    rng: np.random.Generator
    last: int = 0


@dataclass
class _Prefill:
    """An admitted request whose prompt is being read: ``done`` tokens of it are in ``past`` (its own cache)."""

    req: GenRequest
    done: int = 0
    past: list[np.ndarray] | None = None


class Engine:
    """The worker thread, its bounded queue, the prompts being prefilled and the running batch."""

    def __init__(self, model, max_batch_size: int = 16, max_queue: int = 64, metrics: Metrics | None = None,
                 max_step_tokens: int = 512, max_batch_tokens: int = 0):
        if max_step_tokens < 2 * max_batch_size:
            raise ValueError(f"max_step_tokens ({max_step_tokens}) must be at least twice max_batch_size "
                             f"({max_batch_size}), so that prompts get half of every step")
        self.model, self.max_batch_size, self.max_queue, self.metrics = model, max_batch_size, max_queue, metrics
        self.max_step_tokens, self.max_batch_tokens = max_step_tokens, max_batch_tokens
        self.eos = set(int(t) for t in (model.meta.get("eos_token_id") or []))
        self._waiting: collections.deque[GenRequest] = collections.deque()
        self._prefilling: collections.deque[_Prefill] = collections.deque()
        self._cond = threading.Condition()
        self._rows: list[_Row] = []
        self._kv: KVBatch | None = None
        self._in_step: list[GenRequest] = []  # the prefill run's requests, failed with the step if it fails
        self._running = False
        self._draining = False
        self._abort_at: float | None = None  # when draining, the moment the rows still running are ended
        self._thread: threading.Thread | None = None

    # ---- life cycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="moorize-engine", daemon=True)
        self._thread.start()

    def drain(self, grace: float) -> None:
        """Stop taking requests: the waiting ones end now (``shutdown``), those already running may finish
        within ``grace`` seconds; then the engine ends them too, each with ``shutdown``."""
        with self._cond:
            self._draining = True
            self._abort_at = time.monotonic() + grace
            waiting, self._waiting = list(self._waiting), collections.deque()
            self._gauge()
            self._cond.notify_all()
        for req in waiting:
            self._end(req, "shutdown", SHUTDOWN_MESSAGE)

    @property
    def draining(self) -> bool:
        return self._draining

    def stop(self) -> None:
        with self._cond:
            self._running = False
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._end_all("shutdown", SHUTDOWN_MESSAGE)

    def submit(self, req: GenRequest) -> None:
        with self._cond:
            if self._draining or (self._thread is not None and not self._running):
                raise ShuttingDown(SHUTDOWN_MESSAGE)
            if self.max_batch_tokens and req.positions > self.max_batch_tokens:
                raise ValueError(f"a request of {req.positions} positions can never fit max_batch_tokens "
                                 f"({self.max_batch_tokens})")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting)")
            self._waiting.append(req)
            self._gauge()
            self._cond.notify()

    # ---- the loop --------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._running and not (self._waiting or self._prefilling or self._rows):
                    self._cond.wait()
                if not self._running:
                    return
                self._admit()
                self._gauge()
            if self._abort_at is not None and time.monotonic() >= self._abort_at:
                self._end_all("shutdown", SHUTDOWN_MESSAGE)
                continue
            t0 = time.perf_counter()
            self._drop([i for i, r in enumerate(self._rows) if r.req.cancelled], "cancelled")
            for p in [p for p in self._prefilling if p.req.cancelled]:
                self._prefilling.remove(p)
                self._end(p.req, "cancelled")
            try:
                prompt_tokens = self._prefill() if self._prefilling else 0
                rows = len(self._rows)
                if self._rows:
                    self._decode()
            except Exception as e:  # a failed run fails its rows, never the server
                log.exception("engine step failed")
                failed = [r.req for r in self._rows] + self._in_step
                self._rows, self._kv = [], None
                self._prefilling = collections.deque(p for p in self._prefilling if p.req not in self._in_step)
                for req in failed:
                    self._end(req, "error", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                prompt_tokens = rows = 0
            self._in_step = []
            if self.metrics is not None:
                self.metrics.observe("moorize_step_seconds", time.perf_counter() - t0)
                if prompt_tokens or rows:
                    self.metrics.observe("moorize_step_tokens", prompt_tokens + rows)
            self._gauge()

    def _admit(self) -> None:
        """Waiting requests become prefills, first come first served, while the batch has a row and (with
        ``max_batch_tokens``) cache room for them at their longest."""
        while self._waiting and len(self._rows) + len(self._prefilling) < self.max_batch_size:
            req = self._waiting[0]
            if req.cancelled:
                self._waiting.popleft()
                self._end(req, "cancelled")
                continue
            if not self._fits(req):
                return  # it waits for rows to leave; those behind it wait too (no starving long prompts)
            self._prefilling.append(_Prefill(self._waiting.popleft()))

    def _fits(self, req: GenRequest) -> bool:
        if not self.max_batch_tokens:
            return True
        live = [r.req for r in self._rows] + [p.req for p in self._prefilling] + [req]
        return len(live) * max(r.positions for r in live) <= self.max_batch_tokens

    def _prefill(self) -> int:
        """This step's prompt work: whole prompts that fit the budget in one run, else a chunk of the head's.
        Returns the prompt tokens processed."""
        budget = self.max_step_tokens - len(self._rows)
        head = self._prefilling[0]
        if head.done == 0 and len(head.req.prompt) <= budget:
            group, longest = [], 0
            for p in self._prefilling:
                n = max(longest, len(p.req.prompt))
                if p.done or (len(group) + 1) * n > budget:
                    break
                group.append(p.req)
                longest = n
            for _ in group:
                self._prefilling.popleft()
            self._in_step = group
            self._prefill_whole(group)
            return len(group) * longest
        self._in_step = [head.req]
        return self._prefill_chunk(head, min(len(head.req.prompt) - head.done, budget))

    def _prefill_whole(self, reqs: list[GenRequest]) -> None:
        """One run for several newcomers: left-padded prompts, empty caches, each row's task."""
        n = max(len(r.prompt) for r in reqs)
        ids = np.stack([left_pad(np.asarray(r.prompt, dtype=np.int64), n, 0) for r in reqs])
        mask = np.stack([left_pad(np.ones(len(r.prompt), dtype=np.int64), n, 0) for r in reqs])
        tids = np.array([r.task_id for r in reqs], dtype=np.int64)
        out = self.model.run(ids, mask, tids, self.model.empty_past(len(reqs)))
        if self.metrics is not None:
            self.metrics.observe("moorize_prefill_batch_size", len(reqs))
        self._join([_Row(r, np.random.default_rng(r.seed)) for r in reqs], out, mask)

    def _prefill_chunk(self, p: _Prefill, n: int) -> int:
        """The next ``n`` prompt tokens of ``p`` over the cache of those before; the last chunk joins the batch."""
        req = p.req
        ids = np.asarray([req.prompt[p.done:p.done + n]], dtype=np.int64)
        mask = np.ones((1, p.done + n), dtype=np.int64)
        past = p.past if p.past is not None else self.model.empty_past(1)
        out = self.model.run(ids, mask, np.array([req.task_id], dtype=np.int64), past)
        p.done += n
        if self.metrics is not None:
            self.metrics.inc("moorize_prefill_chunks_total")
        if p.done < len(req.prompt):
            p.past = list(out[1:])
            return n
        self._prefilling.popleft()
        if self.metrics is not None:
            self.metrics.observe("moorize_prefill_batch_size", 1)
        self._join([_Row(req, np.random.default_rng(req.seed))], out, mask)
        return n

    def _join(self, rows: list[_Row], out: list[np.ndarray], mask: np.ndarray) -> None:
        """Prefilled rows choose their first token; those not finished by it join the running batch."""
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

    def _end_all(self, reason: str, message: str) -> None:
        """End every request the engine holds (running, prefilling, waiting) with ``reason``."""
        with self._cond:
            reqs = [r.req for r in self._rows] + [p.req for p in self._prefilling] + list(self._waiting)
            self._rows, self._kv, self._prefilling, self._waiting = [], None, collections.deque(), collections.deque()
            self._gauge()
        for req in reqs:
            self._end(req, reason, message)

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
            self.metrics.set("moorize_prefilling_rows", len(self._prefilling))
            self.metrics.set("moorize_running_rows", len(self._rows))
            self.metrics.set("moorize_batch_cache_tokens", self._kv.rows * self._kv.length if self._kv else 0)
