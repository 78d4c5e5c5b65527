"""Which weights become MoORE layers.

The decision is made from the architecture itself: the model class named in
config.json is built on the meta device (no memory, no weights) and its modules are
inspected. Every ``nn.Linear`` or GPT-2 ``Conv1D`` inside a repeated block (a path
with a numeric component such as ``layers.3``) is a default target; embeddings,
norms, ``lm_head``, poolers and classifier heads live outside the blocks or are not
linear, so they never are. ``--targets`` patterns override the default.

Sparse-MoE layers keep their experts as 3-D tensors ([E, out, in], one per projection) in a
module following transformers' experts interface (``has_gate``, ``is_transposed``): each
expert's matrix is a target of its own, named ``<tensor>.<e>``. The token router (``gate``)
is a linear layer outside the experts and stays one, so routing between experts is the
original's. Names are those of the model's modules: the source has been put in module
space first (``module_space``), as transformers would load it.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import MoorizeError
from ..io.factored import weight_slot
from ..io.hf import EXPERT_TENSORS, _model_class, checkpoint_name, is_experts_module
from ..selectors import require_matches

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    """One weight matrix to factor.

    ``shape`` is (out, in) of the map the layer applies. ``layout`` says how the
    checkpoint stores it (``moorize.io.factored.LAYOUTS``): "linear" as [out, in], "conv1d"
    (GPT-2) as [in, out], "expert"/"expert_t" as slice ``index`` of a 3-D tensor; in every
    case the factors describe the [out, in] matrix.
    """

    name: str  # module path as in the checkpoint, e.g. model.layers.0.self_attn.q_proj (experts: <tensor>.<e>)
    layout: str
    shape: tuple[int, int]
    has_bias: bool

    @property
    def weight_key(self) -> str:
        """The stored tensor holding the weight (for an expert, the 3-D tensor of all the layer's experts)."""
        return weight_slot(self.name, self.layout)[0]

    @property
    def index(self) -> int | None:
        return weight_slot(self.name, self.layout)[1]


def pattern_matches(pattern: str, name: str) -> bool:
    """Glob (default) or regex (``re:`` prefix) match of a layer name.

    A glob matches the whole name or any dotted suffix of it, so ``q_proj`` and
    ``mlp.*`` work without spelling out ``model.layers.*.``.
    """
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    parts = name.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[i:]), pattern) for i in range(len(parts)))


def validate_pattern(pattern: str) -> None:
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as e:
            raise MoorizeError(f"invalid regex in pattern {pattern!r}: {e}") from None
    elif not pattern:
        raise MoorizeError("empty target pattern")


def layer_kinds(names: list[str]) -> list[str]:
    """The distinct module-name suffixes of layer names, as a pattern spells them: ``q_proj``, ``down_proj``
    (an expert's, ``gate_up_proj.*``), in order of first appearance."""
    kinds: dict[str, None] = {}
    for collapsed in collapse_names(names):
        parts = collapsed.split(".")
        stars = 0
        while stars < len(parts) - 1 and parts[-1 - stars] == "*":
            stars += 1
        kinds[".".join(parts[-1 - stars:])] = None
    return list(kinds)


def require_layer_matches(flag: str, patterns: list[str], names: list[str], noun: str) -> dict[str, list[str]]:
    """Each pattern's layers among ``names`` (``pattern_matches``); one that matches none is refused in one line
    naming the layer kinds and, for a likely typo, the closest dotted suffix ("did you mean 'q_proj'?")."""
    for p in patterns:
        validate_pattern(p)
    suffixes = {".".join(parts[i:]) for n in collapse_names(names) for parts in [n.split(".")]
                for i in range(len(parts))}
    return require_matches(flag, patterns, names, match=pattern_matches, noun=noun, shown=layer_kinds(names),
                           pool=sorted(suffixes, key=len))


def _expert_targets(model: nn.Module, prefix: str, tensors: dict) -> list[Target]:
    out = []
    for mname, module in model.named_modules():
        three_d = [n for n, p in module.named_parameters(recurse=False) if p.dim() == 3]
        params = {n: p for n, p in module.named_parameters(recurse=False) if p.dim() == 3 and n in EXPERT_TENSORS}
        if not three_d:
            continue
        if not params or not is_experts_module(module):
            if not isinstance(module, nn.modules.conv._ConvNd) and _in_block(mname):  # a conv's kernel is 3-D too
                log.warning("%s keeps 3-D expert tensors (%s) outside transformers' experts interface: left dense",
                            mname, ", ".join(three_d))
            continue
        layout = "expert_t" if module.is_transposed else "expert"
        for pname in EXPERT_TENSORS:
            key = checkpoint_name(f"{mname}.{pname}", prefix, tensors) if pname in params else None
            if key is None:
                continue
            shape = tuple(tensors[key].shape)
            if shape != tuple(params[pname].shape):
                raise MoorizeError(f"{key} has shape {list(shape)} but the architecture expects "
                                   f"{list(params[pname].shape)}: config.json does not match the weights")
            mat = (shape[2], shape[1]) if layout == "expert_t" else (shape[1], shape[2])
            out += [Target(f"{key}.{e}", layout, mat, False) for e in range(shape[0])]
    return out


def build_meta_model(model_dir: Path) -> nn.Module:
    """Instantiate the checkpoint's architecture on the meta device: shapes, no memory."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_dir)
    except Exception as e:
        raise MoorizeError(f"cannot read {model_dir / 'config.json'}: {str(e).splitlines()[0]}") from None
    try:
        cls = _model_class(config)
        with torch.device("meta"):
            return cls(config)
    except Exception as e:
        mt = getattr(config, "model_type", "?")
        raise MoorizeError(f"cannot build the {mt!r} architecture with transformers: {str(e).splitlines()[0]}") from None


def _linear_like(module: nn.Module) -> str | None:
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):
        return "conv1d"
    if isinstance(module, nn.Linear):
        return "linear"
    return None


def _in_block(name: str) -> bool:
    return any(p.isdigit() for p in name.split("."))


ROUTER_NAMES = ("gate", "router", "shared_expert_gate")


def _is_token_router(name: str) -> bool:
    """A sparse-MoE layer's token router (``mlp.gate``, ``router``, or the projection inside a router module:
    Switch Transformers' and NLLB-MoE's ``router.classifier``): it chooses experts and stays dense, as the paper
    keeps routing outside the factored experts; ``--targets`` can still name it."""
    parts = name.split(".")
    last, parent = parts[-1], parts[-2] if len(parts) > 1 else ""
    return last in ROUTER_NAMES or last.endswith("_router") or parent == "router" or parent.endswith("_router")


def collapse_names(names: list[str]) -> list[str]:
    """model.layers.0.mlp.up_proj, model.layers.1.mlp.up_proj -> model.layers.*.mlp.up_proj."""
    seen: dict[str, None] = {}
    for n in names:
        seen[re.sub(r"\.\d+(?=\.|$)", ".*", n)] = None
    return list(seen)


# what model code may read of a projection's weight without computing with it (MoORELinear.weight answers these)
_METADATA_READS = r"dtype|device|shape|size|ndim|dim|is_cuda|is_meta|requires_grad|numel|element_size|stride"
_WEIGHT_READ = re.compile(rf"(?<!isinstance\()self\.(\w+)\.weight\b(?!\s*\.\s*(?:{_METADATA_READS})\b)")
_READS_BY_CLASS: dict[type, frozenset[str]] = {}


def _weights_read_by(cls: type) -> frozenset[str]:
    """Names ``n`` whose ``self.n.weight`` the class's code uses as a tensor (``self.dt_proj.weight @ x`` in
    Mamba, or handed to a fused kernel), not only for its dtype or shape: such a layer must stay dense."""
    if cls not in _READS_BY_CLASS:
        import inspect

        names: set[str] = set()
        for klass in cls.__mro__:
            if klass.__module__.startswith(("torch.", "builtins")):
                continue
            try:
                names |= set(_WEIGHT_READ.findall(inspect.getsource(klass)))
            except (OSError, TypeError):
                continue
        _READS_BY_CLASS[cls] = frozenset(names)
    return _READS_BY_CLASS[cls]


def weight_read_layers(model: nn.Module) -> set[str]:
    """Module paths of the linear layers whose parent's code reads their weight as a tensor."""
    out = set()
    for pname, parent in model.named_modules():
        read = _weights_read_by(type(parent))
        for child in read:
            if isinstance(getattr(parent, child, None), nn.Module):
                out.add(f"{pname}.{child}" if pname else child)
    return out


def find_targets(model: nn.Module, tensors: dict, patterns: list[str] | None = None) -> list[Target]:
    """Map the architecture's linear layers and expert tensors to checkpoint tensors and pick the targets.

    ``model`` is the architecture on the meta device (``build_meta_model``); ``tensors`` maps
    checkpoint names (in module space) to objects with a ``shape``. Module paths and checkpoint
    keys may differ by the model's ``base_model_prefix`` (``bert.``), so both spellings are tried.
    """
    prefix = getattr(model, "base_model_prefix", "") or ""
    candidates: list[Target] = []
    not_float: dict[str, torch.dtype] = {}
    read = weight_read_layers(model)
    kept_dense: list[str] = []
    for mname, module in model.named_modules():
        layout = _linear_like(module)
        if layout is None:
            continue
        if mname in read:  # the model's code computes with this weight: a MoORE layer has none to give
            kept_dense.append(mname)
            continue
        weight_key = checkpoint_name(f"{mname}.weight", prefix, tensors)
        if weight_key is None:
            continue  # tied (lm_head) or not stored: nothing to factor
        ckpt_name = weight_key[: -len(".weight")]
        w = tensors[f"{ckpt_name}.weight"]
        shape = tuple(w.shape)
        if len(shape) != 2:
            continue
        dtype = _stored_dtype(w)
        if dtype is not None and not dtype.is_floating_point:
            # quantised storage (packed ints, int8 + scales): its shape need not match the module's
            not_float[ckpt_name] = dtype
        elif shape != (expected := tuple(module.weight.shape)):
            raise MoorizeError(
                f"{ckpt_name}.weight has shape {list(shape)} but the {type(module).__name__} in the architecture "
                f"expects {list(expected)}: config.json does not match the weights"
            )
        out_in = (shape[1], shape[0]) if layout == "conv1d" else shape
        candidates.append(
            Target(ckpt_name, layout, out_in, f"{ckpt_name}.bias" in tensors)
        )
    candidates += _expert_targets(model, prefix, tensors)
    if kept_dense:
        log.warning("kept dense: %d linear layer(s) whose weight %s's code reads directly (%s)", len(kept_dense),
                    type(model).__name__, ", ".join(collapse_names(kept_dense)[:4]))
    if patterns:
        for p in patterns:
            validate_pattern(p)  # before any match: a bad regex is one line
            hit = next((n for n in kept_dense if pattern_matches(p, n)), None)
            if hit is not None and not any(pattern_matches(p, t.name) for t in candidates):
                raise MoorizeError(f"--targets {p!r} names {hit}, whose weight {type(model).__name__}'s code reads "
                                   "directly: it cannot be a MoORE layer (it holds factors, not a weight)")
    if not patterns:
        chosen = [t for t in candidates if _in_block(t.name) and not _is_token_router(t.name)]
        if not chosen:
            raise MoorizeError(
                "found no linear layers inside transformer blocks; pass --targets to choose among: "
                + ", ".join(collapse_names([t.name for t in candidates])[:20])
            )
        _refuse_non_float(chosen, not_float, explicit=False)
        return chosen
    picked = require_layer_matches("--targets", patterns, [t.name for t in candidates], "linear layer")
    names = {n for hits in picked.values() for n in hits}
    chosen = [t for t in candidates if t.name in names]
    _refuse_non_float(chosen, not_float, explicit=True)
    return chosen


def _stored_dtype(w) -> torch.dtype | None:
    """The torch dtype a checkpoint tensor is stored in (a TensorInfo's or a tensor's); None if unknown."""
    try:
        dtype = getattr(w, "torch_dtype", None)
    except KeyError:  # a dtype name torch has no type for
        return None
    if not isinstance(dtype, torch.dtype):
        dtype = getattr(w, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else None


def _refuse_non_float(chosen: list[Target], not_float: dict[str, torch.dtype], explicit: bool) -> None:
    """An integer or bool target is quantised storage: its SVD would factor codes, not the weights."""
    bad = [t.name for t in chosen if t.name in not_float]
    if not bad:
        return
    first = bad[0]
    dtype = str(not_float[first]).replace("torch.", "")
    more = f" (and {len(bad) - 1} more target layer(s) not stored as floats)" if len(bad) > 1 else ""
    how = "selected by --targets" if explicit else "a default target"
    raise MoorizeError(
        f"{first}.weight ({how}) is stored as {dtype}{more}: only floating-point weights can be factored; "
        "de-quantise the checkpoint first (e.g. load it with transformers and save_pretrained it in "
        "float16/bfloat16/float32), or leave the layer out with --targets"
    )

