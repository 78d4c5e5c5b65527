"""A source checkpoint seen under the names the architecture's modules use.

Transformers does not load every checkpoint by name: it renames stored keys (legacy names
such as ``LayerNorm.gamma``, ``embed_out`` for ``lm_head``, ViT's ``attention.query`` for
``q_proj``) and converts some tensors (a sparse-MoE layer's per-expert matrices are stacked
and concatenated into one 3-D tensor per projection). Its rules live in
``transformers.conversion_mapping`` and are applied by ``from_pretrained``; this module
applies the same rules, tensor by tensor and lazily, so conversion keeps streaming and the
factored checkpoint holds the tensors the modules hold, under their names. A key that only
differs from its module by the base-model prefix keeps its stored spelling (moorize has
always matched those), so earlier factored checkpoints and adapters keep their names.

With a transformers that has no conversion mapping (4.x), stored names are module names.
"""

from __future__ import annotations

import copy
import logging
import threading
from dataclasses import replace

import torch
from torch import nn

from ..errors import MoorizeError
from ..io.hf import checkpoint_name
from ..io.safetensors import TensorInfo, TensorSource, torch_dtypes
from ..io.sources import SourceCheckpoint

log = logging.getLogger(__name__)


def _transformers_rules(model: nn.Module):
    """(renamings, converters, rename function, key order) from transformers, or None where it has none."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key
    except ImportError:
        return None
    try:
        from transformers.core_model_loading import dot_natural_key
    except ImportError:  # the order only matters to guarded group renames
        dot_natural_key = None
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    return renamings, converters, rename_source_key, dot_natural_key


class RenamedSource(TensorSource):
    """Tensors of one source file under their module names; bytes are read from the file as stored."""

    def __init__(self, source: TensorSource, stored_name: dict[str, str]):
        self.source, self.path, self.stored_name = source, source.path, stored_name

    def infos(self) -> list[TensorInfo]:
        by_stored = {i.name: i for i in self.source.infos()}
        return [replace(by_stored[s], name=n, source=self) for n, s in self.stored_name.items()]

    def load(self, name: str) -> torch.Tensor:
        return self.source.load(self.stored_name[name])

    def copy_to(self, name, write) -> None:
        self.source.copy_to(self.stored_name[name], write)


class ConvertedSource(TensorSource):
    """Tensors transformers builds from several stored ones (stacked experts, fused projections).

    Each group (one converter applied to one layer's stored tensors) is run when one of its outputs
    is first read; the other outputs wait in memory until read, so a layer's experts are
    converted once and held no longer than needed.
    """

    def __init__(self, path, model: nn.Module, groups: list[tuple[object, list[tuple[str, str, TensorInfo]], str]]):
        self.path, self.model = path, model
        self._groups = groups  # (converter, [(stored key, source pattern, info)], layer name)
        self._infos: dict[str, tuple[TensorInfo, int]] = {}
        self._ready: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()
        for gi in range(len(groups)):
            for name, t in self._run(gi, meta=True).items():
                st = torch_dtypes()[1].get(t.dtype)
                if st is None:
                    raise MoorizeError(f"{name}: converted to dtype {t.dtype}, which safetensors cannot store")
                self._infos[name] = (TensorInfo(name, st, tuple(t.shape), t.numel() * t.element_size(), self), gi)

    def _run(self, gi: int, meta: bool) -> dict[str, torch.Tensor]:
        template, members, layer = self._groups[gi]
        conv = copy.deepcopy(template)
        for stored, pattern, info in members:
            if meta:
                conv.add_tensor(layer, stored, pattern,
                                lambda i=info: torch.empty(i.shape, dtype=i.torch_dtype, device="meta"))
            else:
                conv.add_tensor(layer, stored, pattern, info.load)
        try:
            out = conv.convert(layer, model=self.model, config=self.model.config)
        except Exception as e:  # transformers' own conversion failed: the stored tensors do not fit the model
            raise MoorizeError(f"cannot convert the stored tensors of {layer} the way transformers loads them: "
                               f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        return {k: v.contiguous() for k, v in out.items()}

    def infos(self) -> list[TensorInfo]:
        return [info for info, _ in self._infos.values()]

    def load(self, name: str) -> torch.Tensor:
        with self._lock:
            if name not in self._ready:
                self._ready.update(self._run(self._infos[name][1], meta=False))
            return self._ready.pop(name)


def to_module_space(ckpt: SourceCheckpoint, model: nn.Module) -> SourceCheckpoint:
    """``ckpt`` with its tensors named (and, where transformers converts them, built) as the modules of
    ``model`` (the architecture on the meta device) hold them. The returned object shares the
    original's files: close the original."""
    rules = _transformers_rules(model)
    if rules is None:
        return ckpt
    renamings, converters, rename, order = rules
    prefix = getattr(model, "base_model_prefix", "") or ""
    module_keys = model.state_dict(keep_vars=True)
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    renamed: dict[int, dict[str, str]] = {}  # source index -> module name -> stored name
    groups: dict[str, tuple[object, list]] = {}  # layer name -> (converter, members)
    source_index = {id(s): i for i, s in enumerate(ckpt.sources)}
    changed = False
    for stored in sorted(ckpt.tensors, key=order or None):
        info = ckpt.tensors[stored]
        name, pattern = rename(stored, renamings, converters, prefix, module_keys)
        if name not in module_keys and stored in module_keys:
            name, pattern = stored, None
        if pattern is not None and name in module_keys:
            groups.setdefault(name, (by_pattern[pattern], []))[1].append((stored, pattern, info))
            changed = True
            continue
        if name not in module_keys or checkpoint_name(name, prefix, {stored: None}) is not None:
            name = stored  # not the model's (tied, buffers) or the same up to the base prefix: as stored
        changed |= name != stored
        renamed.setdefault(source_index[id(info.source)], {})[name] = stored
    if not changed:
        return ckpt
    sources: list[TensorSource] = [RenamedSource(s, renamed.get(i, {})) for i, s in enumerate(ckpt.sources)]
    if groups:
        log.info("converting %d stored tensor group(s) the way transformers loads them", len(groups))
        sources.append(ConvertedSource(ckpt.sources[0].path, model,
                                       [(conv, members, layer) for layer, (conv, members) in groups.items()]))
    tensors: dict[str, TensorInfo] = {}
    for s in sources:
        for info in s.infos():
            if info.name in tensors:
                raise MoorizeError(f"two stored tensors become {info.name!r} under transformers' loading rules")
            tensors[info.name] = info
    return replace(ckpt, sources=sources, tensors=tensors)
