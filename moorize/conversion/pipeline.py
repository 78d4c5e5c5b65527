"""``moorize.convert``: a pretrained checkpoint in, a factored checkpoint out.

The run is planned before anything heavy happens: work items (a batch of
same-shaped targets, or a run of tensors to copy) in source order, each assigned to
an output shard and, under torch.distributed, to a rank. Execution is a three-stage
pipeline (a reader thread prefetching the next item, the SVD on the calling thread,
a writer thread streaming tensors to disk), so memory holds a couple of items and
never the model. Everything is written into a hidden sibling of OUT_DIR that is
renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import queue
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..errors import MoorizeError
from ..io.factored import FORMAT_NAME, FORMAT_VERSION, MANIFEST, LayerRecord, as_stored, factor_key
from ..io.hf import copy_aux_files
from ..io.hub import resolve_source
from ..io.outdir import check_out_dir, is_main_process, output_lock, partial_dir, publish, raise_for_os_error
from ..io.safetensors import ST_TO_TORCH, TensorInfo, dtype_name
from ..io.shards import ShardFile, ShardPart, finalize_shards, parse_size
from ..io.sources import SourceCheckpoint, open_checkpoint
from ..process import heap_trimmer
from ..version import __version__
from .module_space import to_module_space
from .options import DEFAULT_BATCH, ConvertOptions
from .svd import (
    SVD_TORCH_DTYPES,
    RankRules,
    SVDOptions,
    check_solver_supports,
    decompose_group,
    resolve_device,
    resolve_solver,
)
from .targets import Target, build_meta_model, find_targets

log = logging.getLogger(__name__)

_STORE_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                       "float64": torch.float64}


@dataclass
class Progress:
    """Passed to the ``progress`` callback after each work item."""

    layers_done: int
    layers_total: int
    bytes_done: int
    bytes_total: int


@dataclass
class ConvertReport:
    """What a conversion did; ``to_dict()`` is the ``--json`` output."""

    out_dir: Path
    source: str
    source_kind: str
    fingerprint: str
    layers: list[LayerRecord]
    bytes_in: int
    bytes_out: int
    seconds: float
    svd_seconds: float
    device: str
    solver: str
    policy: dict
    world_size: int = 1

    @property
    def worst_rel_error(self) -> float:
        return max((r.rel_error for r in self.layers), default=0.0)

    def to_dict(self) -> dict:
        return {
            "out_dir": str(self.out_dir), "source": self.source, "source_kind": self.source_kind,
            "fingerprint": self.fingerprint, "layers": {r.name: r.to_json() for r in self.layers},
            "num_layers": len(self.layers), "worst_rel_error": self.worst_rel_error,
            "bytes_in": self.bytes_in, "bytes_out": self.bytes_out, "seconds": round(self.seconds, 3),
            "svd_seconds": round(self.svd_seconds, 3), "device": self.device, "solver": self.solver,
            "policy": self.policy, "world_size": self.world_size,
        }


# ---- planning ----------------------------------------------------------------------------------

@dataclass
class WorkItem:
    """A batch of same-shaped targets to factor, or tensors to copy unchanged."""

    index: int
    targets: list[Target] = field(default_factory=list)
    target_infos: list[TensorInfo] = field(default_factory=list)
    copies: list[TensorInfo] = field(default_factory=list)
    out_names: list[str] = field(default_factory=list)
    est_bytes: int = 0
    cost: float = 0.0  # relative compute cost, to balance ranks


def _plan(ckpt: SourceCheckpoint, targets: list[Target], rules: RankRules, residual: str,
          store_dtype: torch.dtype | None, batch_bytes: int) -> list[WorkItem]:
    by_weight: dict[str, list[Target]] = {}  # a 3-D expert tensor holds several targets
    for t in targets:
        by_weight.setdefault(t.weight_key, []).append(t)
    items: list[WorkItem] = []

    def new() -> WorkItem:
        items.append(WorkItem(len(items)))
        return items[-1]

    for src in ckpt.sources:
        infos = src.infos()
        copy_item: WorkItem | None = None
        pending: dict[tuple, list[tuple[Target, TensorInfo]]] = {}
        for info in infos:
            ts = by_weight.get(info.name)
            if ts is None:
                if copy_item is None or copy_item.est_bytes >= batch_bytes:
                    copy_item = new()
                copy_item.copies.append(info)
                copy_item.out_names.append(info.name)
                copy_item.est_bytes += info.nbytes
                continue
            for t in ts:
                pending.setdefault((t.shape, info.dtype), []).append((t, info))
        for (shape, st_dtype), group in pending.items():
            m, n = shape
            src_size = ST_TO_TORCH[st_dtype].itemsize
            per = max(1, batch_bytes // max(1, m * n * 4))
            for i in range(0, len(group), per):
                item = new()
                for t, info in group[i:i + per]:
                    pol = rules.for_layer(t.name)
                    size = (store_dtype.itemsize if store_dtype else src_size)
                    r = min(shape) if pol.needs_spectrum else pol.fixed_rank(shape)
                    truncates = pol.kind != "full"
                    item.targets.append(t)
                    item.target_infos.append(info)
                    item.out_names += [factor_key(t.name, p) for p in ("U", "S", "Vh")]
                    item.est_bytes += size * (m * r + r + r * n)
                    if truncates and residual == "keep":
                        item.out_names.append(factor_key(t.name, "residual"))
                        item.est_bytes += size * m * n
                    item.cost += m * n * min(m, n)
    return items


def _assign_ranks(items: list[WorkItem], world: int) -> list[list[WorkItem]]:
    """Longest-processing-time-first assignment; deterministic so every rank agrees."""
    loads = [0.0] * world
    out: list[list[WorkItem]] = [[] for _ in range(world)]
    for item in sorted(items, key=lambda it: (-(it.cost + it.est_bytes * 1e-3), it.index)):
        r = min(range(world), key=lambda k: (loads[k], k))
        out[r].append(item)
        loads[r] += item.cost + item.est_bytes * 1e-3
    return [sorted(o, key=lambda it: it.index) for o in out]


def _shard_plan(items: list[WorkItem], max_shard_bytes: int) -> list[list[WorkItem]]:
    shards: list[list[WorkItem]] = [[]]
    size = 0
    for item in items:
        if shards[-1] and size + item.est_bytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item.est_bytes
    return [s for s in shards if s]


# ---- execution ---------------------------------------------------------------------------------

def _prefetch(items: list[WorkItem], depth: int = 2) -> Iterator[tuple[WorkItem, list]]:
    """Yield (item, loaded data) while a thread reads ahead; reading overlaps the SVD."""
    q: "queue.Queue" = queue.Queue(maxsize=depth)
    stop = threading.Event()
    sentinel = object()

    def reader() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                # copies are streamed by the writer straight from the source file
                loaded: dict[str, torch.Tensor] = {}  # a 3-D expert tensor is read once per item
                data = [_load_matrix(t, info, loaded) for t, info in zip(item.targets, item.target_infos)]
                del loaded
                q.put((item, data))
            q.put(sentinel)
        except BaseException as e:  # handed to the consumer
            q.put(e)

    th = threading.Thread(target=reader, name="moorize-reader", daemon=True)
    th.start()
    try:
        while True:
            got = q.get()
            if got is sentinel:
                return
            if isinstance(got, BaseException):
                raise got
            yield got
    finally:
        stop.set()
        while th.is_alive():  # unblock a reader waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                th.join(0.05)


def _load_matrix(t: Target, info: TensorInfo, loaded: dict[str, torch.Tensor]) -> torch.Tensor:
    """The [out, in] matrix the layer applies (GPT-2 Conv1D and transposed experts store its transpose)."""
    if t.index is None:
        return as_stored(info.load(), t.layout)
    if info.name not in loaded:
        loaded[info.name] = info.load()
    return as_stored(loaded[info.name][t.index], t.layout)


def _run_items(items: list[WorkItem], shards: list[list[WorkItem]], tmp: Path, tag: str, job: _Job,
               layers_total: int, bytes_total: int) -> tuple[list[ShardPart], list[LayerRecord], float]:
    rules, opts, store_dtype, progress = job.rules, job.opts, job.store_dtype, job.progress
    shard_of = {item.index: i for i, s in enumerate(shards) for item in s}
    files: dict[int, ShardFile] = {}
    parts: list[ShardPart] = []
    records: list[LayerRecord] = []
    svd_seconds = 0.0
    layers_done = bytes_done = 0
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moorize-writer")
    pending: list[Future] = []

    def submit(fn, *args) -> None:
        # at most two writes in flight bounds the memory held for writing
        while len(pending) >= 2:
            pending.pop(0).result()
        pending.append(writer.submit(fn, *args))

    def write_item(sf: ShardFile, entries: list, last_of_shard: bool) -> None:
        for entry in entries:
            if isinstance(entry, TensorInfo):
                sf.add_copy(entry)
            else:
                sf.add_tensor(*entry)
        if last_of_shard:
            parts.append(sf.close())

    trim_heap = heap_trimmer()
    try:
        for item, data in _prefetch(items):
            si = shard_of[item.index]
            if si not in files:
                planned = [n for it in shards[si] for n in it.out_names]
                files[si] = ShardFile(tmp / f"{tag}-{si:05d}.safetensors", planned)
            sf = files[si]
            entries: list = []
            if item.copies:
                entries.extend(item.copies)
                bytes_done += sum(info.nbytes for info in item.copies)
            else:
                names = [t.name for t in item.targets]
                src_dtypes = [w.dtype for w in data]
                dtypes = [store_dtype or d for d in src_dtypes]
                t0 = time.perf_counter()
                results = decompose_group(data, [rules.for_layer(n) for n in names], dtypes, opts, names)
                svd_seconds += time.perf_counter() - t0
                for t, w, f, sd in zip(item.targets, data, results, src_dtypes):
                    for part_name, tensor in (("U", f.U), ("S", f.S), ("Vh", f.Vh), ("residual", f.residual)):
                        if tensor is not None:
                            entries.append((factor_key(t.name, part_name), tensor.cpu()))
                    records.append(LayerRecord(
                        t.name, t.shape, t.layout, f.rank, f.energy_kept, f.rel_error, f.factor_rel_error,
                        f.residual is not None, t.has_bias, dtype_name(f.U.dtype), dtype_name(sd), f.solver))
                    bytes_done += w.numel() * w.element_size()
                layers_done += len(item.targets)
            submit(write_item, sf, entries, item is shards[si][-1])
            del data, entries
            trim_heap()
            if progress is not None:
                progress(Progress(layers_done, layers_total, bytes_done, bytes_total))
        for f in pending:
            f.result()
    finally:
        writer.shutdown(wait=True)
        for f in files.values():
            if not f.closed:
                f.abort()
    return parts, records, svd_seconds


@contextlib.contextmanager
def _dist_context():
    """Yields (rank, world_size, torch.distributed or None).

    Under torchrun (WORLD_SIZE > 1) the process group is created here unless the
    caller already made one, and destroyed again on the way out if we made it.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield 0, 1, None
        return
    import torch.distributed as dist

    owned = not dist.is_initialized()
    if owned:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend, timeout=_dt.timedelta(minutes=60))
    try:
        yield dist.get_rank(), dist.get_world_size(), dist
    finally:
        if owned:
            dist.destroy_process_group()


def convert(model_dir: str | os.PathLike, out_dir: str | os.PathLike, options: ConvertOptions | None = None, *,
            progress: Callable[[Progress], None] | None = None, **overrides) -> ConvertReport:
    """Factor every target weight of ``model_dir`` and write a factored checkpoint to ``out_dir``.

    Options are the fields of ``ConvertOptions``, given as ``options=`` or as keywords
    (``rank="energy:0.9", residual="drop"``); ``rank`` takes ``full`` (default), ``N``,
    ``energy:x``, ``ratio:x`` and ``pattern=policy`` overrides. ``model_dir`` may be a Hub id
    (``owner/name``), resolved through the Hugging Face cache (``revision=`` picks a branch, tag or commit). Raises ``MoorizeError`` for
    bad input; the source is never modified and ``out_dir`` appears only when complete.
    """
    started = time.perf_counter()
    opts = ConvertOptions.build(options, overrides)
    out = Path(out_dir)
    dev = resolve_device(opts.device)
    solver_name = resolve_solver(opts.solver, dev)
    batch = DEFAULT_BATCH[dev.type] if opts.batch_size == "auto" else opts.batch_size
    src = resolve_source(model_dir, opts.revision, gguf_file=opts.gguf_file, allow_pickle=opts.allow_pickle)
    job = _Job(
        src, out, RankRules.parse(opts.rank), opts.targets,
        SVDOptions(solver_name, SVD_TORCH_DTYPES[opts.svd_dtype], dev, opts.residual, opts.oversample,
                   opts.power_iters, opts.seed),
        _STORE_TORCH_DTYPES[opts.dtype] if opts.dtype else None, opts.gguf_file, opts.allow_pickle,
        parse_size(opts.max_shard_size), parse_size(batch), progress, started,
        {"residual": opts.residual, "solver": solver_name, "svd_dtype": opts.svd_dtype, "dtype": opts.dtype or "source",
         "targets": opts.targets or "default"})
    check_out_dir(out, opts.overwrite, protect=[src])
    job.overwrite = opts.overwrite
    # rank 0 holds the lock on OUT_DIR for the whole run: a second convert to it is refused at once
    with output_lock(out) if is_main_process() else contextlib.nullcontext():
        return _convert(job)


@dataclass
class _Job:
    """A conversion's validated options, shared by every stage."""

    src: Path
    out: Path
    rules: RankRules
    targets: list[str] | None
    opts: SVDOptions
    store_dtype: torch.dtype | None
    gguf_file: str | None
    allow_pickle: bool
    max_shard: int
    batch_bytes: int
    progress: Callable[[Progress], None] | None
    started: float
    policy: dict  # as recorded in moorize.json (rank rules added there)
    overwrite: bool = False  # an OUT_DIR filled by something else meanwhile is refused, not replaced


def _convert(job: _Job) -> ConvertReport:
    src, rules, opts = job.src, job.rules, job.opts
    with open_checkpoint(src, gguf_file=job.gguf_file, allow_pickle=job.allow_pickle) as opened:
        arch = build_meta_model(opened.model_dir)
        ckpt = to_module_space(opened, arch)
        tlist = find_targets(arch, ckpt.tensors, job.targets)
        rules.check([t.name for t in tlist])  # every rank pattern sets some target's rank, before any SVD
        for t in tlist:
            pol = rules.for_layer(t.name)
            if pol.kind == "fixed" and pol.value > min(t.shape):
                raise MoorizeError(f"--rank {int(pol.value)} exceeds min(m, n) = {min(t.shape)} for {t.name} "
                                   f"{list(t.shape)}")
            check_solver_supports(opts.solver, [pol])
        items = _plan(ckpt, tlist, rules, opts.residual, job.store_dtype, job.batch_bytes)
        del arch
        # the process group starts only now: a model built while one is up keeps references to it inside
        # transformers, so its gloo threads outlived destroy_process_group and could abort the process at exit
        with _dist_context() as (rank_id, world, dist):
            return _run_ranks(job, ckpt, tlist, items, rank_id, world, dist)


def _run_ranks(job: _Job, ckpt: SourceCheckpoint, tlist: list[Target], items: list[WorkItem], rank_id: int,
               world: int, dist) -> ConvertReport:
    """This rank's share of the plan: its shards written, the records gathered, rank 0 publishing OUT_DIR."""
    out, rules, opts = job.out, job.rules, job.opts
    tmp = partial_dir(out)
    if world > 1 and opts.device.type == "cuda" and opts.device.index is None:
        opts.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    mine = _assign_ranks(items, world)[rank_id]
    shards = _shard_plan(mine, job.max_shard)
    bytes_total = sum(i.nbytes for i in ckpt.tensors.values())
    try:
        if rank_id == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # left over by an interrupted run
            tmp.mkdir()
        if dist is not None:
            dist.barrier()
        parts, records, svd_seconds = _run_items(mine, shards, tmp, f"rank{rank_id}", job, len(tlist),
                                                 bytes_total)
        if dist is not None:
            gathered: list = [None] * world
            dist.all_gather_object(gathered, (parts, records, svd_seconds))
            parts = [p for g in gathered for p in g[0]]
            records = [r for g in gathered for r in g[1]]
            svd_seconds = max(g[2] for g in gathered)
        order = {t.name: i for i, t in enumerate(tlist)}
        records.sort(key=lambda r: order[r.name])
        report = ConvertReport(
            out, str(ckpt.original), ckpt.kind, ckpt.fingerprint, records, bytes_total, 0, 0.0,
            svd_seconds, str(opts.device), opts.solver, {"rank": rules.describe(), **job.policy}, world)
        if rank_id == 0:
            parts.sort(key=lambda p: p.path.name)
            finalize_shards(tmp, parts)
            copy_aux_files(ckpt.model_dir, tmp)
            report.bytes_out = sum(f.stat().st_size for f in tmp.iterdir() if f.is_file())
            report.seconds = time.perf_counter() - job.started
            _write_manifest(tmp, ckpt, report)
            publish(tmp, out, job.overwrite)
        if dist is not None:
            dist.barrier()
    except OSError as e:
        if rank_id == 0 or dist is None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise_for_os_error(e, out)
    except BaseException:
        if rank_id == 0 or dist is None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    report.seconds = time.perf_counter() - job.started
    return report


def _write_manifest(directory: Path, ckpt: SourceCheckpoint, report: ConvertReport) -> None:
    cfg = json.loads(ckpt.config_path.read_text())
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "moorize_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": {"path": report.source, "kind": report.source_kind, "fingerprint": report.fingerprint,
                   "model_type": cfg.get("model_type"), "architectures": cfg.get("architectures")},
        "policy": report.policy,
        "summary": {"layers": len(report.layers), "worst_rel_error": report.worst_rel_error,
                    "bytes_in": report.bytes_in, "bytes_out": report.bytes_out,
                    "seconds": round(report.seconds, 3), "svd_seconds": round(report.svd_seconds, 3),
                    "device": report.device, "world_size": report.world_size},
        "layers": {r.name: r.to_json() for r in report.layers},
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")

