"""ONNX export of a routed model: one ai.moorize::MoORELinear node per MoORE layer, validated with ONNX Runtime.

The graph is traced with the torch.export-based exporter (``torch.onnx.export(...,
dynamo=True)``) while every MoORELinear is swapped for the ``moorize::moore_linear``
op, which translates to an opaque custom node; the op's function bodies are attached
afterwards (``ops.attach_functions``) or inlined (``decompose``). Weights go to
``model.onnx_data``, or with ``weights="reference"`` stay in the factored shards,
which are hard-linked into the export directory: ONNX Runtime and the onnx checker
only read external data inside the model's directory, and a hard link is the same
file, not a copy. An encoder-decoder writes two graphs, ``encoder.onnx`` and ``decoder.onnx``,
each with its own data file (with ``--with-past`` the encoder also returns the cross-attention
cache and the decoder takes its caches). The directory is self-describing (``moorize_export.json``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..compat import export_program
from ..errors import MoorizeBug, MoorizeError
from ..io.factored import FactoredCheckpoint, factor_key
from ..io.hf import copy_aux_files
from ..io.outdir import atomic_output_dir
from ..io.safetensors import SafetensorsFile
from ..io.sources import check_safetensors_weights
from . import ops
from .genai import write_genai_config
from .graphs import (
    EncoderDecoderGraphs,
    ExportGraph,
    Routed,
    decoder_start_token,
    export_graph,
    kv_layout,
    load_routed,
    tokenizer_or_none,
)
from .metadata import META_FILE, common_metadata
from .options import DEFAULT_OPSET, MIN_OPSET, ExportOptions
from .pipeline import ExportJob, quiet_exporter, run_export
from .validate import Validation, compare, default_atol, merged, references

log = logging.getLogger(__name__)

GRAPH_FILE = "model.onnx"  # one graph; an encoder-decoder's are encoder.onnx and decoder.onnx
DATA_FILE = "model.onnx_data"  # <stem>.onnx_data beside each <stem>.onnx
INLINE_BYTES = 1024  # smaller initializers stay inside the graph file
ALIGN = 64


@dataclass
class ExportReport:
    dest: Path
    kind: str
    tasks: list[str]
    with_past: bool
    decompose: bool
    weights: str
    dtype: str
    opset: int
    moore_nodes: int
    graph_bytes: int = 0  # every graph file
    data_bytes: int = 0  # written to the data files (model.onnx_data)
    referenced_bytes: int = 0  # read from the hard-linked factored shards
    validation: Validation | None = None
    seconds: float = 0.0
    files: list[str] = field(default_factory=list)


def check_opset(opset: int) -> None:
    """The opset against this onnx (the options checked everything else already)."""
    import onnx

    if opset < MIN_OPSET:
        raise MoorizeError(f"opset {opset} is too old for the {ops.OP_DOMAIN}::{ops.OP_NAME} op and the exporter: "
                           f"use --opset {MIN_OPSET} or newer (default {DEFAULT_OPSET})")
    if opset > onnx.defs.onnx_opset_version():
        raise MoorizeError(f"opset {opset} is newer than this onnx ({onnx.__version__}) knows: "
                           f"use at most {onnx.defs.onnx_opset_version()}")


def export_onnx(factored_dir, dest, adapter=None, options: ExportOptions | None = None, **overrides) -> ExportReport:
    """Export the routed model of ``factored_dir`` (+ ``adapter``) to the directory ``dest``.

    Options are the fields of ``ExportOptions``, given as ``options=`` or as keywords.
    """
    return run_export(OnnxBackend(), factored_dir, dest, adapter, ExportOptions.build(options, overrides))


class OnnxBackend:
    """The ONNX backend of the export pipeline: a directory with the graph, its weights and metadata."""

    output = "dir"

    def check(self, opts: ExportOptions, dest: Path) -> None:
        check_opset(opts.opset)
        if opts.weights == "reference" and opts.dtype != "float32":
            raise MoorizeError("--weights reference serves the checkpoint's own bytes, so it needs --dtype float32")

    def write(self, job: ExportJob, tmp: Path) -> ExportReport:
        opts, routed = job.opts, job.routed
        self.exported, self.graph, self.holder = routed, job.graph, job.holder
        if opts.dtype != "float32":  # a second copy to cast: the float32 one stays the validation reference
            self.exported = load_routed(job.factored_dir, job.adapter)
            self.exported.model.to(getattr(torch, opts.dtype))
            if self.exported.heads is not None:
                self.exported.heads.to(getattr(torch, opts.dtype))
            self.holder = ops.TaskIds()
            self.graph = export_graph(self.exported, opts.with_past, self.holder)
        report = ExportReport(job.dest, routed.kind, routed.tasks, opts.with_past, opts.decompose, opts.weights,
                              opts.dtype, opts.opset, 0)
        parts = self.graph.parts()
        self.stems, layers = list(parts), 0
        refs = _reference_map(job.factored_dir, self.exported) if opts.weights == "reference" else {}
        for stem, graph in parts.items():
            log.info("tracing %s (%.1f s)", graph_file(stem), time.perf_counter() - job.t0)
            model = _trace(graph, job.tokenizer, self.holder, opts.dtype, opts.opset, tmp,
                           fold_rotation=opts.weights == "copy", stem=stem)
            log.info("traced %s (%.1f s)", graph_file(stem), time.perf_counter() - job.t0)
            report.moore_nodes += ops.attach_functions(model, opts.opset)
            layers += ops.layers_in_graph(model)  # a layer whose weights several blocks share (ALBERT) is one layer
            if opts.decompose:
                model = inline_functions(model)
            written, referenced = _write_graph(model, tmp, refs, job.factored_dir, opts.weights, stem)
            report.data_bytes += written
            report.referenced_bytes += referenced
        if layers != len(routed.model.moore.layer_paths):
            raise MoorizeBug(f"{report.moore_nodes} {ops.OP_NAME} nodes of {layers} layers for "
                             f"{len(routed.model.moore.layer_paths)} MoORE layers")
        copy_aux_files(job.factored_dir, tmp)
        (tmp / "moorize.json").unlink(missing_ok=True)  # an export, not a factored checkpoint
        meta = export_metadata(routed, self.graph, opts.dtype, opts.opset, opts.decompose, opts.weights,
                               job.factored_dir, job.adapter)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if routed.kind == "decoder" and opts.with_past:  # onnxruntime-genai runs it as it is
            write_genai_config(tmp, meta)
        return report

    def validate(self, job: ExportJob, tmp: Path, report: ExportReport) -> Validation:
        opts = job.opts
        refs = {stem: references(graph, job.routed, job.tokenizer) for stem, graph in job.graph.parts().items()}
        self.exported = self.graph = None
        job.release_model()  # ONNX Runtime is about to load its own copy of every weight
        return merged([compare(ref, ort_runner(validation_session(tmp / graph_file(stem)), ref.input_names),
                               "ONNX Runtime", default_atol(opts.dtype, opts.atol), opts.dtype, opts.rtol)
                       for stem, ref in refs.items()])

    def finish(self, job: ExportJob, tmp: Path, report: ExportReport) -> None:
        report.graph_bytes = sum((tmp / graph_file(stem)).stat().st_size for stem in self.stems)
        report.files = sorted(p.name for p in tmp.iterdir())


def graph_file(stem: str) -> str:
    return f"{stem}.onnx"


def data_file(stem: str) -> str:
    return f"{stem}.onnx_data"


def _trace(graph: ExportGraph, tokenizer, holder, dtype: str, opset: int, tmp: Path, fold_rotation: bool,
           stem: str = "model"):
    """torch.onnx.export with the MoORE op as a custom node; returns the ModelProto (weights left external)."""
    import onnx

    args = graph.sample_inputs(tokenizer, past=3, dtype=getattr(torch, dtype))
    names = graph.input_names
    with ops.export_layers(graph.model, holder, getattr(torch, dtype), fold_rotation), torch.no_grad(), \
            quiet_exporter():
        try:
            # torch.export first: given Dim objects, torch.onnx.export loses their equalities (it renames them).
            # No optimiser when the rotation stays in the graph: constant folding would store Vh H again.
            program = export_program(graph, args, graph.dynamic_shapes())
            log.info("converting the traced program to ONNX")
            prog = torch.onnx.export(program, dynamo=True, custom_translation_table=ops.onnx_translation(),
                                     input_names=names, output_names=graph.output_names, opset_version=opset,
                                     optimize=fold_rotation, verbose=False)
        except Exception as e:  # the exporter's own message is pages long: keep its summary line
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            at = next((i for i, ln in enumerate(lines) if ln.startswith("## Exception summary")), None)
            first = lines[at + 1] if at is not None and at + 1 < len(lines) else (lines or [type(e).__name__])[0]
            what = f"{graph.model.config.model_type}: the ONNX export{' with past' if graph.with_past else ''}"
            raise MoorizeError(f"{what} cannot trace this architecture: {first} (rerun with --debug for "
                               "details)") from e
    trace = tmp / f"trace-{stem}.onnx"
    prog.save(trace, external_data=True)  # onnx_ir writes the weights: no 2 GB proto limit
    # Something in the exporter's stack outlives the export with its graph, whose initializers wrap the
    # model's own tensors: cut them loose, so validation can release the model before ONNX Runtime loads.
    for value in prog.model.graph.initializers.values():
        value.const_value = None
    del prog, program
    model = onnx.load(str(trace), load_external_data=False)
    _name_dims(model, graph)
    _check_dynamic_dims(model, graph)
    return model


def _write_graph(model, tmp: Path, refs: dict[str, str], source_dir: Path, weights: str,
                 stem: str = "model") -> tuple[int, int]:
    """Place the weights, save <stem>.onnx, drop the tracer's files and run the checker; returns the bytes
    written to and referenced from outside the graph."""
    import onnx

    written, referenced = _place_weights(model, tmp, refs, source_dir, data_file(stem))
    onnx.save_model(model, tmp / graph_file(stem))
    for f in tmp.glob(f"trace-{stem}.onnx*"):
        f.unlink()
    check_graph(tmp / graph_file(stem), model, weights)
    return written, referenced


def _name_dims(model, graph: ExportGraph) -> None:
    """Symbolic dims get the names of graph.dynamic_shapes (batch, sequence, ...) instead of s53, s70."""
    spec = graph.dynamic_shapes()
    flat = [spec[name] for name in graph.input_names if name in spec] + list(spec.get("past", ()))
    rename = {}
    for inp, dims in zip(model.graph.input, flat):
        for axis, dim in dims.items():
            param = inp.type.tensor_type.shape.dim[axis].dim_param
            if param:
                rename[param] = dim.__name__
    values = list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info)
    for v in values:
        for d in v.type.tensor_type.shape.dim:
            if d.dim_param in rename:
                d.dim_param = rename[d.dim_param]


def _check_dynamic_dims(model, graph: ExportGraph) -> None:
    """Every dim declared dynamic is symbolic in the graph: one the trace fixed to the sample's size would make a
    graph that refuses every other length, so it is refused here, in one line."""
    spec = graph.dynamic_shapes()
    flat = [(name, spec[name]) for name in graph.input_names if name in spec]
    flat += [(name, dims) for name, dims in zip(graph.input_names[len(flat):], spec.get("past", ()))]
    by_name = {i.name: i for i in model.graph.input}
    for name, dims in flat:
        shape = by_name[name].type.tensor_type.shape.dim if name in by_name else ()
        for axis, dim in dims.items():
            if axis < len(shape) and not shape[axis].dim_param:
                what = f"{graph.model.config.model_type}: the ONNX export{' with past' if graph.with_past else ''}"
                raise MoorizeError(f"{what} cannot keep {name}'s {dim.__name__} dynamic: the model's code fixed it to "
                                   f"{shape[axis].dim_value} while tracing, so the graph would take no other length")


def check_graph(path: Path, model, weights: str) -> None:
    """onnx.checker with full checking (strict shape inference). The checker refuses external data in a
    file with several hard links ("potential hardlink attack"), so a ``reference`` graph is checked with its
    weights declared as typed graph inputs instead: everything but where the bytes live."""
    import onnx

    if weights == "reference":
        model = onnx.ModelProto.FromString(model.SerializeToString())
        decls = [onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in model.graph.initializer]
        del model.graph.initializer[:]
        model.graph.input.extend(decls)
    try:
        onnx.checker.check_model(str(path) if weights == "copy" else model, full_check=True)
    except onnx.checker.ValidationError as e:
        raise MoorizeBug(f"the exported graph fails onnx.checker: {str(e).splitlines()[0]}") from None


def inline_functions(model):
    """--decompose: the function bodies inlined, so the graph uses standard ops only."""
    import onnx.inliner

    out = onnx.inliner.inline_local_functions(model)
    keep = [o for o in out.opset_import if o.domain != ops.OP_DOMAIN]
    del out.opset_import[:]
    out.opset_import.extend(keep)
    return out


def _reference_map(factored_dir: Path, routed: Routed) -> dict[str, str]:
    """Initializer name -> checkpoint tensor name, for every exported weight the shards hold as is."""
    from ..io.hf import checkpoint_name

    model = routed.model
    ckpt = FactoredCheckpoint(factored_dir)
    try:
        out = {}
        wrapper_prefix = "model."  # ExportGraph.model (every graph class holds the model there)
        layer_of = {path: name for name, path in model.moore.layer_paths.items()}
        parts = {"U": "U", "Vh": "Vh", "vh": "Vh", "residual": "residual"}
        prefix = getattr(model, "base_model_prefix", "") or ""
        for key, _ in list(model.named_parameters()) + list(model.named_buffers()):
            path, _, leaf = key.rpartition(".")
            if path in layer_of:
                continue  # the MoORE layers' export buffers are added below
            src = checkpoint_name(key, prefix, ckpt.weight_map)
            if src is not None:
                out[wrapper_prefix + key] = src
        for path, name in layer_of.items():
            for leaf, part in parts.items():
                out[f"{wrapper_prefix}{path}.{leaf}"] = factor_key(name, part)
            out[f"{wrapper_prefix}{path}.bias"] = f"{name}.bias"
        return {k: v for k, v in out.items() if v in ckpt.weight_map}
    finally:
        ckpt.close()


def _place_weights(model, tmp: Path, refs: dict[str, str], factored_dir: Path, data_name: str = DATA_FILE
                   ) -> tuple[int, int]:
    """Move every large initializer to ``data_name``, or point it into a hard-linked shard; returns bytes."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo

    ckpt = FactoredCheckpoint(factored_dir) if refs else None
    shards: dict[str, SafetensorsFile] = {}
    written = referenced = 0
    try:
        with open(tmp / data_name, "wb") as data:
            for t in model.graph.initializer:
                if t.data_location != onnx.TensorProto.EXTERNAL:
                    if len(t.raw_data) < INLINE_BYTES:
                        continue
                    buf = t.raw_data
                else:
                    info = ExternalDataInfo(t)
                    with open(tmp / info.location, "rb") as f:
                        f.seek(info.offset or 0)
                        buf = f.read(info.length) if info.length else f.read()
                src = refs.get(t.name)
                if src is not None and ckpt is not None:
                    loc = _shard_location(ckpt, src, t, buf, shards, tmp)
                    if loc is not None:
                        _set_external(t, *loc)
                        referenced += len(buf)
                        continue
                pad = (-data.tell()) % ALIGN
                data.write(b"\0" * pad)
                _set_external(t, data_name, data.tell(), len(buf))
                data.write(buf)
                written += len(buf)
    finally:
        for f in shards.values():
            f.close()
        if ckpt is not None:
            ckpt.close()
    if not written:
        (tmp / data_name).unlink()
    return written, referenced


def _shard_location(ckpt: FactoredCheckpoint, src: str, tensor, buf: bytes, shards: dict, tmp: Path):
    """(file, offset, length) of ``src`` inside its hard-linked shard when its bytes equal ``buf``; else None."""
    fname = ckpt.weight_map[src]
    if fname not in shards:
        shards[fname] = SafetensorsFile(ckpt.directory / fname)
        try:
            if not (tmp / fname).exists():  # linked already for an earlier graph of the same export
                os.link(ckpt.directory / fname, tmp / fname)
        except OSError as e:
            raise MoorizeError(f"--weights reference hard-links the factored shards into the export, which needs "
                               f"DEST on the same filesystem as {ckpt.directory} ({e.strerror}); "
                               "use --weights copy") from None
    f = shards[fname]
    _, shape, offset, length = f.data_range(src)
    if length != len(buf) or tuple(shape) != tuple(tensor.dims):
        return None
    fd = f._fh.fileno()
    if os.pread(fd, length, offset) != bytes(buf):  # e.g. a transposed or converted copy: keep it in the data file
        return None
    return fname, offset, length


def _set_external(tensor, location: str, offset: int, length: int) -> None:
    import onnx

    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = tensor.external_data.add()
        e.key, e.value = k, v


def export_metadata(routed: Routed, graph: ExportGraph | EncoderDecoderGraphs, dtype: str, opset: int, decompose: bool, weights: str,
                    factored_dir: Path, adapter) -> dict:
    """moorize_export.json: everything a runtime needs besides the graph (docs/FORMAT.md)."""
    meta = _base_metadata(routed, graph, None, dtype, opset, weights, factored_dir)
    meta.update({
        "router": routed.model.moore.config.router,
        "op": None if decompose else {"domain": ops.OP_DOMAIN, "name": ops.OP_NAME, "version": ops.OP_VERSION},
        "base_fingerprint": routed.model.moore.base_fingerprint,
        "adapter": str(adapter) if adapter is not None else None,
    })
    return meta


def _base_metadata(routed: Routed, graph: ExportGraph | EncoderDecoderGraphs, inputs: list[str] | None, dtype: str,
                   opset: int, weights: str, source: Path) -> dict:
    """The fields of moorize_export.json that routed and dense exports share (``inputs``: the graph's own names
    when None). One graph is ``graph``; an encoder-decoder's are listed in ``graphs`` (file, inputs and outputs
    of each), and ``inputs``/``outputs`` are the decoder's."""
    parts = graph.parts()
    main = parts.get("model") or parts["decoder"]
    meta = common_metadata("onnx", routed.kind, routed.model.config.model_type, routed.tasks, routed.labels,
                           inputs or main.input_names, main.output_names, graph.with_past)
    meta.update({"dtype": dtype, "opset": opset, "weights": weights, "source": str(source)})
    if "model" in parts:
        meta["graph"] = GRAPH_FILE
    else:
        meta["graphs"] = {stem: {"file": graph_file(stem), "inputs": g.input_names, "outputs": g.output_names}
                          for stem, g in parts.items()}
    if routed.kind == "decoder":
        meta.update(decoder_meta(routed.model, main.kv))
    elif routed.kind == "encoder-decoder":
        meta.update(seq2seq_meta(routed.model))
        if graph.with_past:  # the self-attention cache's geometry, which the first step feeds empty
            meta["kv"] = {k: v for k, v in graph.decoder.layout.items() if k != "cross"}
    return meta


def _first_set(*values):
    """The first value that is not None (0 is a token id; a config may not define the attribute at all)."""
    return next((v for v in values if v is not None), None)


def _stop_tokens(model) -> dict:
    """End-of-sequence ids (a list) and the padding id, from the generation config first; the beam search's
    length penalty and early stopping (the runtime's ``num_beams`` > 1 uses them as transformers does)."""
    cfg = model.config
    gen = getattr(model, "generation_config", None)
    eos = _first_set(getattr(gen, "eos_token_id", None), getattr(cfg, "eos_token_id", None))
    length_penalty, early_stopping = getattr(gen, "length_penalty", None), getattr(gen, "early_stopping", None)
    return {"eos_token_id": eos if isinstance(eos, list) or eos is None else [eos],
            "pad_token_id": _first_set(getattr(gen, "pad_token_id", None), getattr(cfg, "pad_token_id", None)),
            "length_penalty": 1.0 if length_penalty is None else float(length_penalty),
            "early_stopping": False if early_stopping is None else early_stopping}


def decoder_meta(model, kv: dict | None) -> dict:
    """What generation needs besides the graph: cache geometry (the model's own, ``kv``, with past), end-of-sequence
    and padding ids."""
    return {"kv": kv or kv_layout(model.config), **_stop_tokens(model)}


def seq2seq_meta(model) -> dict:
    """What an encoder-decoder's generation needs besides its graphs: the decoder's start token, end and padding,
    and the generation config's token constraints the runtime applies (forced first and last tokens; tokens
    never generated: ``suppress_tokens`` and one-token ``bad_words_ids``, Marian's padding)."""
    gen = getattr(model, "generation_config", None)
    suppress = list(getattr(gen, "suppress_tokens", None) or [])
    suppress += [w[0] for w in getattr(gen, "bad_words_ids", None) or [] if isinstance(w, list) and len(w) == 1]
    return {"decoder_start_token_id": decoder_start_token(model), **_stop_tokens(model),
            "forced_bos_token_id": getattr(gen, "forced_bos_token_id", None),
            "forced_eos_token_id": getattr(gen, "forced_eos_token_id", None),
            "suppress_token_ids": sorted({int(t) for t in suppress})}


def ort_runner(session, input_names: list[str]):
    """Feeds tensors to an ONNX Runtime session by position, returns its outputs."""

    def run(tensors):
        return session.run(None, {n: t.detach().cpu().numpy() for n, t in zip(input_names, tensors)})

    return run


def validation_session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    # ORT's idle threads spin after each run; alternating with PyTorch on few cores, that starves PyTorch
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def export_dense_onnx(model_dir, dest, *, with_past: bool = False, opset: int = DEFAULT_OPSET,
                      overwrite: bool = False) -> Path:
    """The original (dense) decoder exported through the same graph wrapper, inputs and exporter as a routed
    one, and readable by ``MoOREOrtModel``: the baseline deployment comparisons need. ``task_ids`` is
    accepted and ignored (one task, 'dense')."""
    from transformers import AutoModelForCausalLM

    check_opset(opset)
    model_dir, dest = Path(model_dir), Path(dest)
    check_safetensors_weights(model_dir)  # a crafted header: our one-line error, not the library's exception
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    except (OSError, ValueError) as e:
        raise MoorizeError(f"cannot load {model_dir} as a causal LM: {str(e).splitlines()[0]}") from None
    routed = Routed(model, None, "decoder", ["dense"], None)
    holder = ops.TaskIds()
    graph = ExportGraph(routed, with_past, holder)
    with atomic_output_dir(dest, overwrite, protect=[model_dir]) as tmp:
        proto = _trace(graph, tokenizer_or_none(model_dir), holder, "float32", opset, tmp, fold_rotation=True)
        _write_graph(proto, tmp, {}, model_dir, "copy")
        copy_aux_files(model_dir, tmp)
        meta = _base_metadata(routed, graph, [i.name for i in proto.graph.input], "float32", opset, "copy",
                              model_dir)
        meta.update({"router": None, "op": None, "dense": True})
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return dest
