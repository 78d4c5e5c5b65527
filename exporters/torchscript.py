"""TorchScript (``torch.jit.trace``) and torch.export (``.pt2``) exports of a routed model.

Both trace the same ``ExportGraph`` as the ONNX export, with the MoORE layers in
plain aten ops (``ops.moore_linear_math``), so the files load with stock PyTorch and
no moorize. The task table and input/output names travel inside the file
(``moorize_export.json`` as an extra file). TorchScript is deprecated upstream in
favour of torch.export; it is kept for runtimes that still need it. Both are
validated against the routed model like the ONNX export.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..compat import export_program
from ..errors import MoorizeError
from . import ops
from .graphs import ExportGraph
from .metadata import META_FILE, common_metadata
from .options import ExportOptions
from .pipeline import ExportJob, run_export
from .validate import Validation, default_atol, validate

TORCHSCRIPT_NOTE = ("TorchScript (torch.jit) is deprecated upstream: prefer --pt2 (torch.export), "
                    "or --onnx for ONNX Runtime")


@dataclass
class FileExportReport:
    dest: Path
    backend: str  # torchscript | pt2
    kind: str
    tasks: list[str]
    with_past: bool
    bytes: int = 0
    validation: Validation | None = None
    seconds: float = 0.0


def _meta(graph: ExportGraph, routed, backend: str) -> str:
    meta = common_metadata(backend, routed.kind, routed.model.config.model_type, routed.tasks, routed.labels,
                           graph.input_names, graph.output_names, graph.with_past)
    return json.dumps({**meta, "base_fingerprint": routed.model.moore.base_fingerprint})


class FileBackend:
    """The TorchScript and .pt2 backends of the export pipeline: one file, metadata inside the archive."""

    output = "file"

    def __init__(self, backend: str):
        self.backend = backend  # torchscript | pt2

    def check(self, opts: ExportOptions, dest: Path) -> None:
        opts.check_file_backend()
        if self.backend == "pt2" and dest.suffix != ".pt2":
            raise MoorizeError(f"{dest}: torch.export files end in .pt2")

    def write(self, job: ExportJob, tmp: Path) -> FileExportReport:
        routed, graph = job.routed, job.graph
        if routed.kind == "encoder-decoder":
            raise MoorizeError(f"{routed.model.config.model_type}: encoder-decoder models export with --onnx only (an "
                               f"encoder and a decoder graph); a {backend_title(self.backend)} file holds one graph")
        args = graph.sample_inputs(job.tokenizer, past=3)
        meta = _meta(graph, routed, self.backend)
        with ops.export_layers(routed.model, job.holder, torch.float32, use_op=False), torch.no_grad():
            if self.backend == "torchscript":
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # tracer warnings about Python values in HF code
                    traced = torch.jit.trace(graph, args, check_trace=False, strict=False)
                torch.jit.save(traced, str(tmp), _extra_files={META_FILE: meta})
            else:
                program = export_program(graph, args, graph.dynamic_shapes())
                torch.export.save(program, str(tmp), extra_files={META_FILE: meta})
        return FileExportReport(job.dest, self.backend, routed.kind, routed.tasks, job.opts.with_past)

    def validate(self, job: ExportJob, tmp: Path, report: FileExportReport) -> Validation:
        opts = job.opts
        loaded = load_file(tmp, self.backend, opts.with_past)
        return validate(job.graph, job.routed, job.tokenizer, _runner(loaded), backend_title(self.backend),
                        default_atol("float32", opts.atol), rtol=opts.rtol)

    def finish(self, job: ExportJob, tmp: Path, report: FileExportReport) -> None:
        report.bytes = tmp.stat().st_size


def backend_title(backend: str) -> str:
    return {"torchscript": "TorchScript", "pt2": "torch.export (.pt2)"}[backend]


def load_file(path: Path, backend: str, with_past: bool = False):
    """The callable module of a saved TorchScript or .pt2 export.

    A .pt2 traced with a cache carries the tracer's guard "cache length > 0"; the program is exact for an
    empty cache too (validation runs the prefill from one), so with a cache its guards are not checked."""
    if backend == "torchscript":
        return torch.jit.load(str(path))
    return torch.export.load(str(path)).module(check_guards=not with_past)


def _runner(module):
    def run(tensors):
        with torch.no_grad():
            out = module(*tensors)
        out = list(out) if isinstance(out, (tuple, list)) else [out]
        return [o.numpy() for o in out]

    return run


def export_torchscript(factored_dir, dest, adapter=None, options: ExportOptions | None = None, **overrides
                       ) -> FileExportReport:
    """``torch.jit.trace`` of the routed model to ``dest`` (a .pt file). Deprecated upstream: see ``export_pt2``."""
    return run_export(FileBackend("torchscript"), factored_dir, dest, adapter, ExportOptions.build(options, overrides))


def export_pt2(factored_dir, dest, adapter=None, options: ExportOptions | None = None, **overrides
               ) -> FileExportReport:
    """``torch.export`` ExportedProgram of the routed model to ``dest`` (a .pt2 file), dynamic batch and length."""
    return run_export(FileBackend("pt2"), factored_dir, dest, adapter, ExportOptions.build(options, overrides))
