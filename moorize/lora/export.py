"""``moorize export --lora`` / ``moorize.export_lora``: every task of a ``task``-router adapter as one PEFT LoRA
adapter on the **source** model, streamed layer by layer, checked on a few prompts, reported.

Per layer the pipeline reads the factors, the adapter's parameters and the source weight, makes each
task's matrix W_t and its delta ΔW_t = W_t − W, factors the deltas (``delta``) and appends them to one
safetensors file per task: a few layers are in memory at a time, as in conversion. After a truncated
conversion ΔW_t also carries what truncation dropped, so the source + LoRA is the routed model, not the
factored base + LoRA. DEST appears only when every task is complete (``atomic_output_dir``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..conversion.module_space import to_module_space
from ..conversion.svd import resolve_device
from ..conversion.targets import build_meta_model
from ..errors import MoorizeError
from ..io.factored import EXPERT_LAYOUTS, FactoredCheckpoint, as_stored, weight_slot
from ..io.hf import module_paths
from ..io.outdir import atomic_output_dir
from ..io.shards import ShardFile
from ..io.sources import open_checkpoint
from ..model.adapter import HEADS_PREFIX, read_adapter
from ..model.adapter import WEIGHTS_NAME as MOORE_WEIGHTS_NAME
from ..model.layer import MoORELinear, RoutingState, layer_trainable
from ..model.routers import router_for
from ..version import __version__
from . import peft_format
from .bound import measure_logits
from .delta import factor_deltas
from .options import DEFAULT_MAX_ERROR, LoraOptions

log = logging.getLogger(__name__)

REPORT_FORMAT = "moorize.lora"
REPORT_VERSION = 1
_STORE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class TaskLora:
    """One task's adapter: where it is, its per-module ranks and errors, its size and its measured logit error."""

    task: str
    directory: Path
    layers: dict[str, dict] = field(default_factory=dict)  # module -> rank, full_rank, rel_error, delta, layer
    adapter_bytes: int = 0
    dense_bytes: int = 0  # the dense layers it adapts, in the adapter's dtype
    logits: dict | None = None  # prompts, max_abs, max_rel: the merged MoORE model against source + LoRA
    notes: list[str] = field(default_factory=list)

    @property
    def rank(self) -> int:
        return max(e["rank"] for e in self.layers.values())

    @property
    def worst(self) -> tuple[str, float]:
        module = max(self.layers, key=lambda m: self.layers[m]["rel_error"])
        return module, self.layers[module]["rel_error"]

    def by_module(self) -> list[tuple[str, int, int, int, int, float]]:
        """(module name, layers, lowest, median, highest rank, worst error) per module kind (``q_proj``...)."""
        kinds: dict[str, list[dict]] = {}
        for module, e in self.layers.items():
            kinds.setdefault(module.rpartition(".")[2], []).append(e)
        rows = []
        for kind, es in kinds.items():
            ranks = sorted(e["rank"] for e in es)
            rows.append((kind, len(es), ranks[0], ranks[len(ranks) // 2], ranks[-1], max(e["rel_error"] for e in es)))
        return rows


@dataclass
class LoraReport:
    """What ``export_lora`` wrote and measured."""

    dest: Path
    tasks: list[TaskLora]
    policy: str
    delta_base: str  # "source": ΔW against the source's weights; "factors": against their reconstruction
    source: str
    moore_adapter_bytes: int
    device: str
    seconds: float = 0.0

    def lines(self) -> list[str]:
        """The table ``moorize export --lora`` prints."""
        out = [f"wrote {self.dest}: {len(self.tasks)} PEFT LoRA adapter(s), {self.policy}, deltas against the "
               f"{'source ' + self.source if self.delta_base == 'source' else 'factors (source not found)'} "
               f"({self.seconds:.1f} s)"]
        for t in self.tasks:
            module, error = t.worst
            logits = ("not measured (--no-validate)" if t.logits is None else
                      f"logits max |diff| {t.logits['max_abs']:.2e} ({t.logits['max_rel']:.1e} of max |logit|) on "
                      f"{t.logits['prompts']} prompts")
            out.append(f"task {t.task}: {t.directory.name}/, rank {t.rank}, worst error {error:.2e} ({module}), "
                       f"{t.adapter_bytes / 1e6:.1f} MB (MoORE adapter {self.moore_adapter_bytes / 1e6:.1f} MB), "
                       f"{logits}")
            out.append(f"  {'module':<16} {'layers':>6} {'rank min':>8} {'median':>7} {'max':>5} {'worst error':>12}")
            for kind, n, lo, mid, hi, worst in t.by_module():
                out.append(f"  {kind:<16} {n:>6} {lo:>8} {mid:>7} {hi:>5} {worst:>12.2e}")
            out += [f"  {note}" for note in t.notes]
        return out


def export_lora(factored_dir, adapter, dest, options: LoraOptions | None = None, *, overwrite: bool = False,
                validate: bool = True, **overrides) -> LoraReport:
    """Write ``dest/<task>/`` (adapter_config.json, adapter_model.safetensors, moorize_lora.json) for every task
    of ``adapter`` (router mode ``task``), LoRA adapters of the source checkpoint ``factored_dir`` came from.

    Options are the fields of ``LoraOptions`` (``rank=``, ``max_error=``, ``source=``, ``lora_dtype=``,
    ``device=``), as ``options=`` or keywords. ``validate`` measures each task's logit error on a few prompts
    (the merged MoORE model against the source model + LoRA). ``dest`` must be absent or empty unless
    ``overwrite``; it appears only when complete.
    """
    t0 = time.perf_counter()
    opts = LoraOptions.build(options, overrides) if overrides else options or LoraOptions()
    factored_dir, dest = Path(factored_dir), Path(dest)
    if adapter is None:
        raise MoorizeError("a LoRA export needs the trained adapter (--adapter DIR): without one every task is the "
                           "source model itself")
    adapter = Path(adapter)
    with FactoredCheckpoint(factored_dir) as ckpt:
        config, tensors = read_adapter(adapter, base=ckpt)
        _check_exportable(ckpt, adapter, config, tensors, opts)
        device = resolve_device(opts.device)
        with _source_weights(ckpt, opts) as (matrix, delta_base, source):
            arch = build_meta_model(ckpt.directory)
            paths, missing = module_paths(arch, list(ckpt.layers))
            if missing:
                raise MoorizeError(f"{factored_dir}: factored layers not found in the architecture: {missing[:3]}")
            protect = [factored_dir, adapter] + ([Path(source)] if delta_base == "source" else [])
            with atomic_output_dir(dest, overwrite, protect=protect) as tmp:
                tasks = _write_adapters(ckpt, config, tensors, matrix, paths, tmp, opts, device)
                del tensors
                _write_configs(ckpt, arch, paths, tasks, source, opts)
                if validate:
                    measure_logits(ckpt, adapter, matrix, tasks, config.tasks)
                report = LoraReport(dest, tasks, opts.describe(), delta_base, source,
                                    (adapter / MOORE_WEIGHTS_NAME).stat().st_size, str(device))
                for t in tasks:
                    _write_task_report(report, t, config.tasks.index(t.task))
                for t in tasks:  # the final paths, for the caller
                    t.directory = dest / t.directory.name
    report.seconds = time.perf_counter() - t0
    return report


def _write_configs(ckpt: FactoredCheckpoint, arch, paths: dict[str, str], tasks: list[TaskLora], source: str,
                   opts: LoraOptions) -> None:
    """Each task's adapter_config.json, its size and its notes, once its tensors are written."""
    linear = [p for p, m in arch.named_modules() if _is_linear(m)]
    targets = peft_format.target_modules(list(paths.values()), linear)
    conv1d = any(ckpt.layers[n].layout == "conv1d" for n in paths)
    kind = peft_format.task_type(ckpt.manifest.get("source", {}).get("architectures"))
    dense_bytes = sum(r.shape[0] * r.shape[1] for r in ckpt.layers.values()) * _store_dtype(opts, ckpt).itemsize
    for t in tasks:
        ranks = {module: e["rank"] for module, e in t.layers.items()}
        cfg = peft_format.adapter_config(ranks, targets, base=source, task=kind, fan_in_fan_out=conv1d)
        (t.directory / peft_format.CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")
        t.adapter_bytes = (t.directory / peft_format.WEIGHTS_NAME).stat().st_size
        t.dense_bytes = dense_bytes
        t.notes = peft_format.engine_notes(t.rank, list(t.layers)) + _size_note(t)


def _size_note(t: TaskLora) -> list[str]:
    """A LoRA near the size of the dense layers it adapts is said to be so: a task router rescales every expert,
    a change of full rank, so a task trained far from the source needs high ranks at a tight bound."""
    share = t.adapter_bytes / t.dense_bytes
    if share < 0.5:
        return []
    return [f"size: {share:.0%} of the dense layers it adapts (the task moved many singular values); a larger "
            "--max-error or a --rank makes it smaller, `moorize merge` or the ONNX export serve it at the dense cost"]


def _check_exportable(ckpt: FactoredCheckpoint, adapter: Path, config, tensors: dict, opts: LoraOptions) -> None:
    """Everything that has no LoRA, refused in one line before any work."""
    router = router_for(config)
    if not router.mergeable:
        raise MoorizeError(f"adapter {adapter} has router mode {config.router!r}: its sample router gives every "
                           "token its own weights, so a task is not one matrix and has no LoRA; train with --router "
                           "task, or export the routed model with --onnx")
    if any(k.startswith(HEADS_PREFIX) for k in tensors):
        raise MoorizeError(f"adapter {adapter} has task heads (a classifier): a LoRA adapter carries no heads; "
                           "export it with --onnx")
    experts = [n for n, r in ckpt.layers.items() if r.layout in EXPERT_LAYOUTS]
    if experts:
        raise MoorizeError(f"{ckpt.directory} factors the experts of fused MoE layers ({len(experts)} matrices, e.g. "
                           f"{experts[0]}), which have no per-module LoRA here; convert with --targets that leave "
                           "the experts out, or export with --onnx")
    for task in config.tasks:
        if not task or task.startswith(".") or any(c in task for c in "/\\\0"):
            raise MoorizeError(f"task {task!r} cannot name a directory of the LoRA export (no '/', '\\', or leading "
                               "'.'): rename it in the training data")
    if opts.rank is not None:
        largest = max(r.full_rank for r in ckpt.layers.values())
        if opts.rank > largest:
            raise MoorizeError(f"--rank {opts.rank} exceeds the full rank of every layer (at most {largest})")


@contextlib.contextmanager
def _source_weights(ckpt: FactoredCheckpoint, opts: LoraOptions):
    """(matrix(name) -> the layer's [out, in] source weight in float64, "source" or "factors", the source path).

    The source is the one moorize.json records unless ``opts.source`` names it; its fingerprint must be the
    recorded one. Where it is gone, the factors stand in only when they are within a tenth of the error
    bound of it (full rank, or the residual kept, in float32)."""
    recorded = ckpt.manifest.get("source", {}).get("path")
    path = Path(opts.source) if opts.source else Path(recorded) if recorded else None
    if path is None or not path.exists():
        if opts.source:
            raise MoorizeError(f"--source {opts.source} does not exist")
        worst = max(r.rel_error for r in ckpt.layers.values())
        bound = opts.error_bound or DEFAULT_MAX_ERROR
        if worst > 0.1 * bound:
            raise MoorizeError(f"the source {recorded} of {ckpt.directory} is not there, and its factors differ from "
                               f"it by up to {worst:.1e} (truncation or storage dtype): pass --source PATH")
        log.warning("source %s not found: deltas are taken against the factors (within %.1e of it)", recorded, worst)
        yield (lambda name: ckpt.reconstruct(name, torch.float64)), "factors", str(recorded)
        return
    with open_checkpoint(path) as opened:
        if opened.fingerprint != ckpt.fingerprint:
            raise MoorizeError(f"{path} is not the checkpoint {ckpt.directory} was converted from (its fingerprint "
                               "differs)")
        space = to_module_space(opened, build_meta_model(opened.model_dir))

        def matrix(name: str) -> torch.Tensor:
            rec = ckpt.layers[name]
            key, _ = weight_slot(name, rec.layout)
            if key not in space.tensors:
                raise MoorizeError(f"{path} has no tensor {key!r} for the factored layer {name}")
            return as_stored(space.tensors[key].load(), rec.layout).to(torch.float64)

        yield matrix, "source", str(path)


def _store_dtype(opts: LoraOptions, ckpt: FactoredCheckpoint) -> torch.dtype:
    if opts.lora_dtype != "auto":
        return _STORE[opts.lora_dtype]
    common = Counter(r.source_dtype for r in ckpt.layers.values()).most_common(1)[0][0]
    return _STORE.get(common, torch.float32)  # float64 sources get float32 adapters


def _write_adapters(ckpt: FactoredCheckpoint, config, tensors: dict, matrix, paths: dict[str, str], tmp: Path,
                    opts: LoraOptions, device: torch.device) -> list[TaskLora]:
    """Stream every layer: factors and source weight in, each task's A and B appended to its file."""
    state = RoutingState(config.tasks)
    store = _store_dtype(opts, ckpt)
    tasks = [TaskLora(t, tmp / t) for t in config.tasks]
    planned = [k for n in ckpt.layers for k in peft_format.tensor_keys(paths[n])]
    for t in tasks:
        t.directory.mkdir()
    files = [ShardFile(t.directory / peft_format.WEIGHTS_NAME, planned) for t in tasks]
    try:
        for i, name in enumerate(ckpt.layers):
            U, S, Vh, R = ckpt.factors(name)
            layer = MoORELinear(U, S, Vh, R, None, config, state)
            with torch.no_grad():
                for pname, p in layer_trainable(layer).items():
                    p.copy_(tensors[f"{name}.{pname}"])
            layer.to(device)
            W = matrix(name).to(device)
            deltas, norms = [], []
            for Wt in layer.merged_weights(range(len(tasks))):
                norms.append(torch.linalg.matrix_norm(Wt).item())
                deltas.append(Wt.sub_(W))
            del layer, W
            loras = factor_deltas(name, deltas, norms, store, bound=opts.error_bound, fixed=opts.rank)
            del deltas
            module = paths[name]
            a_key, b_key = peft_format.tensor_keys(module)
            for t, f, lo in zip(tasks, files, loras):
                f.add_tensor(a_key, lo.A)
                f.add_tensor(b_key, lo.B)
                t.layers[module] = {"layer": name, "rank": lo.rank, "full_rank": lo.full_rank,
                                    "rel_error": lo.rel_error, "delta": lo.delta}
            if (i + 1) % 50 == 0:
                log.info("LoRA: %d / %d layers", i + 1, len(ckpt.layers))
        for f in files:
            f.close()
    except BaseException:
        for f in files:
            if not f.closed:
                f.abort()
        raise
    return tasks


def _is_linear(module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (torch.nn.Linear, Conv1D))


def _write_task_report(report: LoraReport, t: TaskLora, task_id: int) -> None:
    module, error = t.worst
    body = {
        "format": REPORT_FORMAT, "format_version": REPORT_VERSION, "moorize_version": __version__,
        "task": t.task, "task_id": task_id, "base_model": report.source, "delta_base": report.delta_base,
        "policy": report.policy, "rank": t.rank, "worst_rel_error": error, "worst_layer": module,
        "adapter_bytes": t.adapter_bytes, "dense_bytes": t.dense_bytes,
        "moore_adapter_bytes": report.moore_adapter_bytes,
        "logits": t.logits, "engines": t.notes, "layers": t.layers,
    }
    tmp = t.directory / f".{peft_format.REPORT_NAME}.tmp"
    tmp.write_text(json.dumps(body, indent=2) + "\n")
    os.replace(tmp, t.directory / peft_format.REPORT_NAME)
