"""Server metrics in the Prometheus text exposition format (version 0.0.4).

Counters, gauges and histograms are a few dictionaries behind one lock; writing
the format by hand avoids a dependency for ~80 lines. The engine thread and the
HTTP handlers both record, the ``/metrics`` route renders.
"""

from __future__ import annotations

import bisect
import threading

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
TOKEN_BUCKETS = (1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    esc = lambda v: str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")  # noqa: E731
    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in sorted(labels.items())) + "}"


class _Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1


class Metrics:
    """Named series; ``text()`` is the exposition. Each name is declared once with its help and type."""

    def __init__(self):
        self._lock = threading.Lock()
        self._meta: dict[str, tuple[str, str]] = {}
        self._values: dict[str, dict[tuple, float]] = {}
        self._hists: dict[str, dict[tuple, _Histogram]] = {}
        self._buckets: dict[str, tuple] = {}

    def declare(self, name: str, kind: str, help_text: str, buckets=None) -> None:
        self._meta[name] = (kind, help_text)
        if kind == "histogram":
            self._hists[name] = {}
            self._buckets[name] = tuple(buckets)
        else:
            self._values[name] = {}

    def inc(self, name: str, amount: float = 1.0, **labels) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._values[name]
            series[key] = series.get(key, 0.0) + amount

    def set(self, name: str, value: float, **labels) -> None:
        with self._lock:
            self._values[name][tuple(sorted(labels.items()))] = float(value)

    def observe(self, name: str, value: float, **labels) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._hists[name]
            if key not in series:
                series[key] = _Histogram(self._buckets[name])
            series[key].observe(value)

    def text(self) -> str:
        lines = []
        with self._lock:
            for name, (kind, help_text) in self._meta.items():
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
                if kind != "histogram":
                    for key, value in sorted(self._values[name].items()):
                        lines.append(f"{name}{_labels(dict(key))} {_num(value)}")
                    continue
                for key, h in sorted(self._hists[name].items()):
                    labels, running = dict(key), 0
                    for bound, n in zip(list(h.buckets) + ["+Inf"], h.counts):
                        running += n
                        lines.append(f"{name}_bucket{_labels({**labels, 'le': _num(bound)})} {running}")
                    lines.append(f"{name}_sum{_labels(labels)} {_num(h.sum)}")
                    lines.append(f"{name}_count{_labels(labels)} {h.count}")
        return "\n".join(lines) + "\n"


def _num(v) -> str:
    if isinstance(v, str):
        return v
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def server_metrics() -> Metrics:
    """The series ``moorize serve`` exposes (docs/SERVING.md)."""
    m = Metrics()
    m.declare("moorize_requests_total", "counter", "HTTP requests by endpoint and status code.")
    m.declare("moorize_prompt_tokens_total", "counter", "Prompt tokens admitted, by model (task).")
    m.declare("moorize_generated_tokens_total", "counter", "Tokens generated, by model (task).")
    m.declare("moorize_finished_total", "counter", "Generations ended, by reason (stop, length, cancelled, error).")
    m.declare("moorize_queue_length", "gauge", "Requests waiting for a batch row.")
    m.declare("moorize_prefilling_rows", "gauge", "Admitted requests whose prompts are being read (in chunks).")
    m.declare("moorize_running_rows", "gauge", "Rows in the running batch.")
    m.declare("moorize_batch_cache_tokens", "gauge", "Positions the running batch's KV cache holds (rows x columns).")
    for gauge in ("moorize_queue_length", "moorize_prefilling_rows", "moorize_running_rows",
                  "moorize_batch_cache_tokens"):  # scrapable from the start, not the first request
        m.set(gauge, 0)
    m.declare("moorize_batch_size", "histogram", "Rows per ONNX Runtime decoding run.", BATCH_BUCKETS)
    m.declare("moorize_prefill_batch_size", "histogram", "Rows per ONNX Runtime prefill run.", BATCH_BUCKETS)
    m.declare("moorize_prefill_chunks_total", "counter", "Prompt chunks run for prompts longer than a step's budget.")
    m.declare("moorize_step_tokens", "histogram", "Tokens per engine step: decoding rows plus prompt tokens.",
              TOKEN_BUCKETS)
    m.declare("moorize_step_seconds", "histogram", "Seconds per engine step (prefill and decode).",
              LATENCY_BUCKETS)
    m.declare("moorize_request_latency_seconds", "histogram", "Seconds from arrival to the last token, by endpoint.",
              LATENCY_BUCKETS)
    m.declare("moorize_request_seconds", "histogram", "Seconds from a generation's arrival to its end (engine side).",
              LATENCY_BUCKETS)
    m.declare("moorize_time_to_first_token_seconds", "histogram", "Seconds from arrival to the first token.",
              LATENCY_BUCKETS)
    return m
