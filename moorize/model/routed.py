"""Loading a factored checkpoint as a routed transformers model, and merging it back to dense.

``load`` builds the checkpoint's own architecture (LlamaForCausalLM, BertModel, ...)
with its parameters on the meta device, puts a MoORELinear in place of every
factored layer, and assigns the remaining tensors, so the dense weights of the
targets never exist in memory. Task ids reach the layers through a shared
RoutingState that ``forward(task_ids=...)`` and ``generate(task_ids=...)`` set.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import tempfile
import types
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import MoorizeError
from ..io.factored import EXPERT_LAYOUTS, MANIFEST, FactoredCheckpoint, dense_weights, weight_slot
from ..io.hf import checkpoint_name, copy_aux_files, is_experts_module, model_class, module_paths
from ..io.outdir import atomic_output_dir, output_lock, raise_for_os_error
from ..io.shards import ShardFile, ShardPart, finalize_shards, parse_size
from ..selectors import require_name
from .adapter import CONFIG_NAME as ADAPTER_CONFIG_NAME
from .adapter import HEADS_PREFIX, adapter_moore_config, read_adapter, write_adapter_files
from .adapter import WEIGHTS_NAME as ADAPTER_WEIGHTS_NAME
from .experts import install as install_experts
from .layer import (
    MoOREConfig,
    MoORELinear,
    MoOREState,
    RoutingState,
    layer_trainable,
    moore_layers,
    trainable_parameters,
)
from .layout import mark_row_layouts
from .routers import router_for
from .routing import use_task  # callers import it from here too

log = logging.getLogger(__name__)


def _meta_model(directory: Path):
    """The architecture with parameters on the meta device and real (computed) buffers."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(directory)
    with init_empty_weights(include_buffers=False):
        return model_class(config)(config)


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


def load(directory, adapter=None, config: MoOREConfig | None = None, *, dtype: torch.dtype | None = None,
         **overrides):
    """The transformers model of a factored checkpoint with every target replaced by a MoORELinear.

    Without ``adapter`` the MoORE parameters are freshly initialised (the model computes
    exactly the original) from ``config`` and keyword overrides of its fields (``router``,
    ``tasks``, ``task_dim``, ``router_experts``, ``router_norm``, ``householder``, ``train_sigma``, ``seed``); with it, the router mode, tasks, hyper-parameters and trained
    weights come from the adapter directory, which must belong to this base checkpoint: the same
    source, converted with the same ranks, residuals and factor dtypes (adapters record both).
    Settings given beside an adapter must equal its own; a different one is refused, not ignored.

    The model's ``save_pretrained(d)`` (and so ``push_to_hub``) writes the adapter, not a dense
    checkpoint: see ``save_pretrained`` in this module.
    """
    if isinstance(adapter, MoOREConfig):  # load(base, config): the config given in the adapter's place
        config, adapter = adapter, None
    _refuse_adapter_as_base(Path(directory))
    ckpt = FactoredCheckpoint(directory)
    adapter_state = None
    if adapter is not None:  # the adapter says how its layers were built
        MoOREConfig.build(None, {k: v for k, v in overrides.items() if k != "tasks"})  # typos and bad values
        given = config
        config, adapter_state = read_adapter(adapter, base=ckpt)
        _refuse_other_settings(config, given, overrides, adapter)
    else:
        config = MoOREConfig.build(config, overrides)
    model = _meta_model(ckpt.directory)
    prefix = getattr(model, "base_model_prefix", "") or ""
    state = RoutingState(config.tasks)
    gen = torch.Generator().manual_seed(config.seed)
    placed = _place_layers(model, ckpt, config, state, gen)

    target_biases = {f"{n}.bias" for n, r in ckpt.layers.items() if r.bias}  # held by the MoORE layers
    passthrough = set(ckpt.passthrough_names()) - target_biases
    rest = {}
    moore_paths = set(placed.values())
    for key in model.state_dict(keep_vars=True):
        module_path = key.rpartition(".")[0]
        if module_path in moore_paths:
            continue
        src = checkpoint_name(key, prefix, ckpt.weight_map)
        if src is not None and src in passthrough:
            rest[key] = ckpt.tensor(src)
    model.load_state_dict(rest, strict=False, assign=True)
    model.tie_weights()
    still_meta = _compute_unsaved(model, [n for n, p in model.named_parameters() if p.is_meta])
    if still_meta:
        raise MoorizeError(f"{ckpt.directory} lacks tensors the architecture needs: {still_meta[:3]}")
    ckpt.close()
    if adapter_state is not None:  # task heads, when present, are loaded by moorize.load_classifier
        _load_adapter_state(model, placed, {k: v for k, v in adapter_state.items() if not k.startswith(HEADS_PREFIX)})
    if dtype is not None:
        _cast_frozen(model, dtype)
    _install_routing(model, state, config, ckpt, placed)
    mark_row_layouts(model)
    return model.eval()


def _refuse_other_settings(adapter_config: MoOREConfig, given: MoOREConfig | None, overrides: dict,
                           adapter) -> None:
    """Settings asked beside an adapter must be its own: its layers are built as it was trained, and an ignored
    ``router="task"`` or ``tasks=[...]`` would leave the caller believing they applied."""
    if given is not None and given != adapter_config:
        raise MoorizeError(f"a config was given with the adapter {adapter}, which has its own: give one of them")
    for key, value in overrides.items():
        if key == "tasks" and value is None:
            continue
        have = getattr(adapter_config, key)
        if (list(value) if key == "tasks" else value) != have:
            raise MoorizeError(f"{key}={value!r} differs from the adapter's {key}={have!r} ({adapter}): an adapter's "
                               f"layers are built as it was trained; leave {key} out, or load without the adapter")


def _place_layers(model: nn.Module, ckpt: FactoredCheckpoint, config: MoOREConfig,
                  state: RoutingState, gen: torch.Generator) -> dict[str, str]:
    """Put a MoORELinear in place of every factored layer (experts: in place of their 3-D tensors);
    returns checkpoint layer name -> module path."""
    experts: dict[str, dict[str, dict[int, str]]] = {}  # experts module -> tensor -> expert -> layer name
    plain = {}
    for name, rec in ckpt.layers.items():
        if rec.layout in EXPERT_LAYOUTS:
            key, index = weight_slot(name, rec.layout)
            owner, _, tensor = key.rpartition(".")
            experts.setdefault(owner, {}).setdefault(tensor, {})[index] = name
        else:
            plain[name] = rec

    def where(names) -> dict[str, str]:
        found, missing = module_paths(model, names)
        if missing:
            raise MoorizeError(f"{ckpt.directory}: factored layers not found in the architecture: {missing[:3]}")
        return found

    def layer(name: str) -> MoORELinear:
        U, S, Vh, R = ckpt.factors(name)
        bias = ckpt.tensor(f"{name}.bias") if ckpt.layers[name].bias else None
        return MoORELinear(U, S, Vh, R, bias, config, state, generator=gen)

    placed = where(plain)
    for name, path in placed.items():
        _set_submodule(model, path, layer(name))
    for owner, path in where(experts).items():
        module = model.get_submodule(path)
        if not is_experts_module(module):
            raise MoorizeError(f"{ckpt.directory}: {path} holds factored experts but is not a transformers "
                               "experts module in this version of transformers")
        tensors = {}
        for tensor, by_index in experts[owner].items():
            stored = getattr(module, tensor, None)
            if not isinstance(stored, nn.Parameter) or sorted(by_index) != list(range(stored.shape[0])):
                raise MoorizeError(f"{ckpt.directory}: experts of {owner}.{tensor} do not match the architecture")
            tensors[tensor] = [layer(by_index[e]) for e in range(len(by_index))]
            placed.update({by_index[e]: f"{path}.{tensor}.{e}" for e in by_index})
        install_experts(module, tensors)
    return placed


def _cast_frozen(model: nn.Module, dtype: torch.dtype) -> None:
    """``load(dtype=...)``: every floating tensor in ``dtype`` except the MoORE parameters, which train and
    accumulate small updates, so they stay in float32 (as ``moorize train`` keeps them)."""
    keep = {id(p) for layer in model.modules() if isinstance(layer, MoORELinear) for p in layer_trainable(layer).values()}
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.is_floating_point() and id(p) not in keep:
                module._parameters[name] = nn.Parameter(p.data.to(dtype), requires_grad=p.requires_grad)
        for name, b in list(module.named_buffers(recurse=False)):
            if b is not None and b.is_floating_point():
                module._buffers[name] = b.to(dtype)
    model.tie_weights()  # tied embeddings were cast once each: tie them again
    model.config.dtype = dtype


def _routing_contexts(state: RoutingState):
    """torch.utils.checkpoint's ``context_fn``: a recomputed block routes with the task ids its first forward
    saw (by the time backward recomputes it, the model's forward has returned and cleared them)."""
    seen = (state.task_ids, state.sticky)

    @contextlib.contextmanager
    def recompute():  # the layers reuse the tensors their first forward made of the parameters
        previous = (state.task_ids, state.sticky, state.recomputing)
        state.task_ids, state.sticky = seen
        state.recomputing = True
        try:
            yield
        finally:
            state.task_ids, state.sticky, state.recomputing = previous

    return contextlib.nullcontext(), recompute()


def _refuse_adapter_as_base(d: Path) -> None:
    """``moorize.load(ADAPTER)``: say what it is and how to load it, rather than 'no moorize.json'."""
    if (d / MANIFEST).is_file() or not (d / ADAPTER_CONFIG_NAME).is_file():
        return
    try:
        base = json.loads((d / ADAPTER_CONFIG_NAME).read_text()).get("base_path")
    except (OSError, ValueError, AttributeError):
        base = None
    hint = f" (it was saved from {base})" if isinstance(base, str) else ""
    raise MoorizeError(f"{d} is a moorize adapter, not a factored checkpoint: load it with "
                       f"moorize.load(FACTORED_BASE, {str(d)!r}){hint}")


def _load_adapter_state(model: nn.Module, placed: dict[str, str], state: dict[str, torch.Tensor]) -> None:
    expected = set()
    for name, path in placed.items():
        layer = model.get_submodule(path)
        for pname, p in layer_trainable(layer).items():
            key = f"{name}.{pname}"
            expected.add(key)
            if key not in state:
                raise MoorizeError(f"adapter lacks {key!r}: it was saved with other targets or settings")
            if state[key].shape != p.shape:
                raise MoorizeError(f"adapter tensor {key!r} has shape {list(state[key].shape)}, "
                                   f"the layer needs {list(p.shape)}")
            with torch.no_grad():
                p.copy_(state[key])
    extra = sorted(set(state) - expected)
    if extra:
        raise MoorizeError(f"adapter has tensors for layers this checkpoint does not have: {extra[:3]}")


def _install_routing(model, state: RoutingState, config: MoOREConfig, ckpt: FactoredCheckpoint,
                     placed: dict[str, str]) -> None:
    """``task_ids=`` on forward and generate, a default task, ``save_pretrained`` writing the adapter,
    and the MoORE metadata on the model."""

    def pre_hook(module, args, kwargs):
        if "task_ids" in kwargs:
            state.task_ids = state.resolve(kwargs.pop("task_ids"))
        return args, kwargs

    def post_hook(module, args, kwargs, output):
        if state.sticky is None:
            state.task_ids = None
        return output

    model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    model.register_forward_hook(post_hook, with_kwargs=True)
    original_generate = getattr(model, "generate", None)  # encoders have none
    if original_generate is not None:

        @functools.wraps(original_generate)
        def generate(self, *args, task_ids=None, **kwargs):
            with use_task(self, task_ids):
                return original_generate(*args, **kwargs)

        model.generate = types.MethodType(generate, model)

    original_checkpointing = getattr(model, "gradient_checkpointing_enable", None)
    if original_checkpointing is not None:

        # transformers >= 5.2x routes activation_checkpointing_enable (every_n_layers=, offload=) through an
        # overridden gradient_checkpointing_enable, so both entry points arrive here
        @functools.wraps(original_checkpointing)
        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **options):
            kwargs = dict(gradient_checkpointing_kwargs or {})
            if kwargs.get("use_reentrant"):
                raise MoorizeError("reentrant gradient checkpointing cannot give recomputed MoORE layers their "
                                   "task ids; moorize uses use_reentrant=False")
            kwargs.update(use_reentrant=False, context_fn=functools.partial(_routing_contexts, state))
            with warnings.catch_warnings():  # the deprecated name is the one transformers lets us wrap
                warnings.simplefilter("ignore", FutureWarning)
                return original_checkpointing(gradient_checkpointing_kwargs=kwargs, **options)

        model.gradient_checkpointing_enable = types.MethodType(gradient_checkpointing_enable, model)

    def set_default_task(self, task) -> None:
        state.default = None if task is None else state.task_id(task, "task")

    model.set_default_task = types.MethodType(set_default_task, model)
    # transformers' own save_pretrained would write the U/S/Vh buffers under names it does not know and
    # no dense weights: from_pretrained then builds the targets with random weights, silently
    model.save_pretrained = types.MethodType(save_pretrained, model)
    model.moore = MoOREState(config, state, dict(placed), ckpt.fingerprint, ckpt.layout_fingerprint,
                             ckpt.factor_layout, str(ckpt.directory.absolute()))
    # earlier names, kept for users' code: the same objects, read from model.moore inside moorize
    model.moore_config, model.moore_state, model.moore_tasks = config, state, model.moore.tasks


def _compute_unsaved(model: nn.Module, missing: list[str]) -> list[str]:
    """Make the tensors transformers never saves because it computes them (``_keys_to_ignore_on_save``: the
    sinusoidal position tables of Marian or Pegasus), by the model's own initialisation rule, as
    ``from_pretrained`` does; returns the names still missing."""
    import re

    computed = [n for n in missing if any(re.search(p, n) for p in getattr(model, "_keys_to_ignore_on_save", None) or ())]
    for path in dict.fromkeys(n.rpartition(".")[0] for n in computed):
        module = model.get_submodule(path)
        module.to_empty(device="cpu", recurse=False)
        with torch.no_grad():
            model._init_weights(module)
    return [n for n, p in model.named_parameters() if p.is_meta]


def prepare_for_training(model: nn.Module) -> list[nn.Parameter]:
    """Freeze everything but the MoORE parameters; returns the trainable ones."""
    params = trainable_parameters(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    return list(params.values())


def merge(directory, adapter, task: str, dest, *, overwrite: bool = False,
          max_shard_size: int = 2 * 10**9) -> Path:
    """Write a dense HF checkpoint of one task of a ``task``-mode routed model (exact)."""
    # the router mode and the task checked before any weight loads
    config = adapter_moore_config(adapter) if adapter is not None else MoOREConfig()
    router_for(config).check_mergeable()
    require_name("--task", task, config.tasks, noun="task")
    model = load(directory, adapter)
    return _write_dense(model, directory, task, dest, overwrite=overwrite, max_shard_size=max_shard_size,
                        protect=[Path(adapter)])


def _write_dense(model, directory, task: str, dest, *, overwrite: bool, max_shard_size: int,
                 protect: list[Path] = (), flag: str = "--task") -> Path:
    """The dense checkpoint of one task of a routed model whose base is the factored ``directory``."""
    router_for(model.moore.config).check_mergeable()
    task_id = model.moore.routing.task_id(task, flag)
    dest = Path(dest)
    layers = moore_layers(model)
    with FactoredCheckpoint(directory) as ckpt, \
            atomic_output_dir(dest, overwrite, protect=[ckpt.directory, *protect]) as tmp:
        if ckpt.layout_fingerprint != (model.moore.base_layout_fingerprint or ckpt.layout_fingerprint):
            raise MoorizeError(f"the factored checkpoint {ckpt.directory} changed since this model was loaded "
                               "from it; load it again")
        passthrough = ckpt.passthrough_names()
        names = passthrough + list(dict.fromkeys(weight_slot(n, r.layout)[0] for n, r in ckpt.layers.items()))
        parts: list[ShardPart] = []
        shard: ShardFile | None = None
        size = 0

        def add(name: str, tensor: torch.Tensor) -> None:
            nonlocal shard, size
            nbytes = tensor.numel() * tensor.element_size()
            if shard is not None and size + nbytes > max_shard_size:
                parts.append(shard.close())
                shard = None
            if shard is None:
                shard, size = ShardFile(tmp / f"part-{len(parts):05d}.safetensors", names), 0
            shard.add_tensor(name, tensor)
            size += nbytes

        # tensors whose bytes are not a multiple of 64 go last, so every other one stays 64-byte aligned in its
        # shard (the data starts aligned; safetensors allows no padding between tensors): transformers' grouped
        # expert kernel (torch._grouped_mm) refuses a memory-mapped weight off 16-byte alignment
        odd_passthrough, odd_merged = [], []
        for key in passthrough:
            if ckpt.tensor_nbytes(key) % 64:
                odd_passthrough.append(key)
            else:
                add(key, ckpt.tensor(key))
        merged = ((name, ckpt.layers[name].layout,
                   layer.merged_weight(task_id).to(getattr(torch, ckpt.layers[name].source_dtype)))
                  for name, layer in layers.items())
        for key, W in dense_weights(merged):
            if W.numel() * W.element_size() % 64:
                odd_merged.append((key, W))
            else:
                add(key, W)
        for key in odd_passthrough:
            add(key, ckpt.tensor(key))
        for key, W in odd_merged:
            add(key, W)
        if shard is not None:
            parts.append(shard.close())
        finalize_shards(tmp, parts)
        copy_aux_files(ckpt.directory, tmp)
        (tmp / "moorize.json").unlink(missing_ok=True)  # a dense checkpoint, not a factored one
    return dest


# ---- save_pretrained on a routed model --------------------------------------------------------------

# config.json of a directory save_pretrained wrote: transformers' from_pretrained (with or without PEFT
# installed) stops at its unknown model type, with this text in the message, instead of loading a model
# whose weights it does not find. moorize itself reads only the two adapter files.
GUARD_MODEL_TYPE = ("moorize-adapter (not a transformers model: load it with "
                    "moorize.load(FACTORED_BASE, THIS_DIRECTORY))")
_HARMLESS_KWARGS = {"max_shard_size", "safe_serialization", "token", "save_peft_format", "save_original_format"}


def _guard_config(model) -> dict:
    return {"model_type": GUARD_MODEL_TYPE, "moorize_adapter": True,
            "base_path": model.moore.base_path,
            "base_model_type": getattr(model.config, "model_type", None)}


def _is_guard(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("moorize_adapter") is True
    except (OSError, ValueError, AttributeError):
        return False


def save_pretrained(self, save_directory, *, merge_task: str | None = None, overwrite: bool = False,
                    is_main_process: bool = True, push_to_hub: bool = False, state_dict=None,
                    variant=None, **kwargs) -> Path | None:
    """Save a routed MoORE model (installed on every model ``moorize.load`` returns).

    By default it writes the **adapter**, as ``moorize.save_adapter`` does (PEFT's convention:
    a PeftModel's ``save_pretrained`` writes only its adapter): ``adapter_config.json`` (with the
    base's fingerprints, layout and path) and ``adapter_model.safetensors``, into
    ``save_directory`` (created if needed; other files there are kept, an earlier adapter is
    replaced). ``moorize.load(FACTORED_BASE, save_directory)`` gives the same model back. It
    also writes a ``config.json`` whose model type transformers does not know, so
    ``AutoModel*.from_pretrained(save_directory)`` fails with a message naming moorize instead
    of building the targets with random weights. ``push_to_hub(repo)`` uploads the same files.

    ``merge_task="name"`` (router mode ``task`` only) writes instead a dense transformers
    checkpoint of that task, exactly what ``moorize merge`` writes: ``from_pretrained`` loads
    it with no moorize. ``save_directory`` must then be empty or absent (``overwrite=True``
    replaces it once the new one is complete).

    Refused with one line: a directory holding another model (its own ``config.json`` or
    ``moorize.json``), the factored base itself, ``push_to_hub=True`` (call ``push_to_hub``),
    ``state_dict=``/``variant=`` (the adapter is always the model's own MoORE parameters).
    Parameters outside the MoORE layers are not saved: they are the base's.
    """
    ignored = set(kwargs) - _HARMLESS_KWARGS
    if ignored:
        raise MoorizeError(f"save_pretrained of a routed MoORE model does not take {', '.join(sorted(ignored))}")
    if push_to_hub:
        raise MoorizeError("save_pretrained(push_to_hub=True) is not supported on a routed MoORE model: "
                           "call model.push_to_hub(repo_id), which uploads the adapter")
    if state_dict is not None or variant is not None:
        raise MoorizeError("save_pretrained of a routed MoORE model writes its adapter (the MoORE parameters): "
                           "state_dict= and variant= do not apply")
    if not is_main_process:
        return None
    d = Path(save_directory)
    base = Path(self.moore.base_path)
    if merge_task is not None:
        return _write_dense(self, base, merge_task, d, overwrite=overwrite,
                            max_shard_size=parse_size(kwargs.get("max_shard_size") or 2 * 10**9), flag="merge_task")
    d_r, base_r = d.resolve(), base.resolve()
    if d_r == base_r or base_r in d_r.parents:
        raise MoorizeError(f"{d} is {'the factored checkpoint' if d_r == base_r else 'inside the factored checkpoint'} "
                           f"{base} this model was loaded from; save the adapter elsewhere")
    if d.exists() and not d.is_dir():
        raise MoorizeError(f"{d} exists and is not a directory")
    if (d / MANIFEST).exists() or ((d / "config.json").exists() and not _is_guard(d / "config.json")):
        raise MoorizeError(f"{d} holds a model (config.json); saving the adapter there would replace its "
                           "config: choose another directory")
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise_for_os_error(e, d)
    with output_lock(d_r):
        tmp = None
        try:
            tmp = Path(tempfile.mkdtemp(prefix=".moorize-save-", dir=d))
            write_adapter_files(self, tmp)
            (tmp / "config.json").write_text(json.dumps(_guard_config(self), indent=2) + "\n")
            (d / ADAPTER_CONFIG_NAME).unlink(missing_ok=True)  # the config marks the adapter complete: last
            for name in (ADAPTER_WEIGHTS_NAME, "config.json", ADAPTER_CONFIG_NAME):
                os.replace(tmp / name, d / name)
        except OSError as e:
            raise_for_os_error(e, d)
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
    return d
