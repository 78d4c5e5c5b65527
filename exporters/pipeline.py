"""One export pipeline for every backend: check → load → graph → atomic output → write → validate → report.

A backend (``onnx.OnnxBackend``, ``torchscript.FileBackend``) supplies only what differs:
its checks, what it writes into the hidden output, how it runs the written artefact
for validation, and its report. Loading the routed model, the tokenizer, the graph
wrapper, protecting the inputs, the atomic (locked) output and the timing live here once.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..io.outdir import atomic_output_dir, atomic_output_file
from . import ops
from .graphs import ExportGraph, Routed, export_graph, load_routed, tokenizer_or_none
from .options import ExportOptions
from .validate import Validation

log = logging.getLogger(__name__)


@dataclass
class ExportJob:
    """What every backend works from: the loaded routed model, its tokenizer and graph wrapper."""

    factored_dir: Path
    dest: Path
    adapter: Path | None
    opts: ExportOptions
    routed: Routed
    tokenizer: object
    graph: ExportGraph
    holder: ops.TaskIds
    t0: float

    def release_model(self) -> None:
        """Drop the PyTorch model once nothing needs it (validation has its references), so a runtime
        loading the artefact's own copy of the weights does not hold both."""
        self.routed = self.graph = None
        gc.collect()


class Backend(Protocol):
    output: str  # "dir" (a directory) or "file"

    def check(self, opts: ExportOptions, dest: Path) -> None:
        """Refuse options or a destination this backend cannot honour, before any work."""

    def write(self, job: ExportJob, tmp: Path):
        """Write the artefact into ``tmp`` (the hidden output); return the backend's report."""

    def validate(self, job: ExportJob, tmp: Path, report) -> Validation:
        """Run the written artefact against PyTorch for every task."""

    def finish(self, job: ExportJob, tmp: Path, report) -> None:
        """Fill the report's sizes once everything is written."""


@contextlib.contextmanager
def quiet_exporter():
    """Silence what the tracing stack says that a user cannot act on: torch.onnx's notices about optional
    packages (torchvision's ops) and the deprecation warnings of torch's and transformers' internals."""
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        onnx_log.setLevel(level)


def run_export(backend: Backend, factored_dir, dest, adapter, opts: ExportOptions):
    """The pipeline: the same steps, in the same order, whatever the backend."""
    t0 = time.perf_counter()
    factored_dir, dest = Path(factored_dir), Path(dest)
    adapter = Path(adapter) if adapter is not None else None
    backend.check(opts, dest)
    routed = load_routed(factored_dir, adapter)
    log.info("loaded %s (%.1f s)", factored_dir, time.perf_counter() - t0)
    holder = ops.TaskIds()
    job = ExportJob(factored_dir, dest, adapter, opts, routed, tokenizer_or_none(factored_dir),
                    export_graph(routed, opts.with_past, holder), holder, t0)
    del routed  # the job holds it, and may release it
    protect = [factored_dir] + ([adapter] if adapter is not None else [])
    atomic = atomic_output_dir if backend.output == "dir" else atomic_output_file
    with atomic(dest, opts.overwrite, protect=protect) as tmp:
        report = backend.write(job, tmp)
        log.info("written (%.1f s)", time.perf_counter() - t0)
        if opts.validate_export:
            log.info("validating against PyTorch")
            report.validation = backend.validate(job, tmp, report)
            log.info("validated (%.1f s)", time.perf_counter() - t0)
        backend.finish(job, tmp, report)
    report.seconds = time.perf_counter() - t0
    return report
