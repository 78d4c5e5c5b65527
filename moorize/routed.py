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
import logging
import types
from pathlib import Path

import torch
from torch import nn

from .adapter import read_adapter
from .checkpoint import ShardFile, ShardPart, copy_aux_files, finalize_shards
from .errors import MoorizeError
from .format import FactoredCheckpoint
from .heads import HEADS_PREFIX
from .modeling import MoOREConfig, MoORELinear, RoutingState
from .outdir import atomic_output_dir
from .targets import checkpoint_name, model_class

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


def load(directory, adapter=None, *, router: str = "task+sample", tasks: list[str] | None = None,
         dtype: torch.dtype | None = None, householder: int = 8, task_dim: int = 64, router_experts: int = 128,
         train_sigma: bool = False, seed: int = 0):
    """The transformers model of a factored checkpoint with every target replaced by a MoORELinear.

    Without ``adapter`` the MoORE parameters are freshly initialised (the model computes
    exactly the original); with it, the router mode, tasks, hyper-parameters and trained
    weights come from the adapter directory, which must belong to this base checkpoint.
    """
    ckpt = FactoredCheckpoint(directory)
    adapter_state = None
    if adapter is not None:
        config, adapter_state = read_adapter(adapter, ckpt.fingerprint)
    else:
        config = MoOREConfig(router=router, tasks=list(tasks or ["default"]), task_dim=task_dim,
                             router_experts=router_experts, householder=householder, train_sigma=train_sigma,
                             seed=seed)
    model = _meta_model(ckpt.directory)
    prefix = getattr(model, "base_model_prefix", "") or ""
    state = RoutingState(config.tasks)
    gen = torch.Generator().manual_seed(config.seed)
    modules = dict(model.named_modules())
    placed: dict[str, str] = {}  # checkpoint layer name -> module path
    for path in modules:
        name = checkpoint_name(path, prefix, ckpt.layers)
        if name is not None and name not in placed:
            placed[name] = path
    missing = [n for n in ckpt.layers if n not in placed]
    if missing:
        raise MoorizeError(f"{ckpt.directory}: factored layers not found in the architecture: {missing[:3]}")
    for name, path in placed.items():
        rec = ckpt.layers[name]
        U, S, Vh, R = ckpt.factors(name)
        bias = ckpt.tensor(f"{name}.bias") if rec.bias else None
        _set_submodule(model, path, MoORELinear(U, S, Vh, R, bias, config, state, generator=gen))

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
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise MoorizeError(f"{ckpt.directory} lacks tensors the architecture needs: {still_meta[:3]}")
    ckpt.close()
    if adapter_state is not None:  # task heads, when present, are loaded by moorize.load_classifier
        _load_adapter_state(model, placed, {k: v for k, v in adapter_state.items() if not k.startswith(HEADS_PREFIX)})
    if dtype is not None:
        model.to(dtype)
    _install_routing(model, state, config, ckpt.fingerprint, placed)
    return model.eval()


def moore_layers(model: nn.Module) -> dict[str, MoORELinear]:
    """Checkpoint layer name -> MoORELinear of a model returned by ``load``."""
    return {name: model.get_submodule(path) for name, path in model.moore_layer_paths.items()}


def _load_adapter_state(model: nn.Module, placed: dict[str, str], state: dict[str, torch.Tensor]) -> None:
    expected = set()
    for name, path in placed.items():
        layer = model.get_submodule(path)
        for pname, p in layer.named_parameters():
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


def _install_routing(model, state: RoutingState, config: MoOREConfig, fingerprint: str,
                     placed: dict[str, str]) -> None:
    """``task_ids=`` on forward and generate, a default task, and the MoORE metadata on the model."""

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

    def set_default_task(self, task) -> None:
        state.default = None if task is None else state.task_id(task)

    model.set_default_task = types.MethodType(set_default_task, model)
    model.moore_config = config
    model.moore_state = state
    model.moore_tasks = dict(state.tasks)
    model.moore_base_fingerprint = fingerprint
    model.moore_layer_paths = dict(placed)


@contextlib.contextmanager
def use_task(model, task_ids):
    """Route every forward inside the block with ``task_ids`` (ids or names; batch-expanded as generate does)."""
    state: RoutingState = model.moore_state
    previous = (state.sticky, state.task_ids)
    ids = state.resolve(task_ids)
    state.sticky, state.task_ids = ids, ids
    try:
        yield
    finally:
        state.sticky, state.task_ids = previous


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The MoORE parameters (routers, Householder vectors, σ when enabled) by adapter key."""
    out = {}
    for name, layer in moore_layers(model).items():
        for pname, p in layer.named_parameters():
            out[f"{name}.{pname}"] = p
    return out


def randomize_routers(model: nn.Module, seed: int = 0) -> None:
    """Move every router and reflection off its initialisation: a stand-in for a trained adapter in demos,
    tests and benchmarks (task router A ~ N(0, 0.02²), sample router B ~ N(0, 0.002²), Householder vectors
    turned by about a quarter of their entries' scale)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in moore_layers(model).values():
            for name, std in (("task_router", 0.02), ("router_out", 0.002)):
                p = getattr(layer, name, None)
                if p is not None:
                    p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
            if layer.householder is not None:
                layer.householder.add_(torch.randn(layer.householder.shape, generator=g) * 0.25)


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
    model = load(directory, adapter)
    config: MoOREConfig = model.moore_config
    if config.uses_sample:
        raise MoorizeError(f"router mode {config.router!r} has a sample router: each token gets its own weights, "
                           "so no single dense matrix reproduces it; merge needs router mode 'task'")
    task_id = model.moore_state.task_id(task)
    dest = Path(dest)
    layers = moore_layers(model)
    with FactoredCheckpoint(directory) as ckpt, atomic_output_dir(dest, overwrite, protect=[ckpt.directory]) as tmp:
        passthrough = ckpt.passthrough_names()
        names = passthrough + [f"{n}.weight" for n in ckpt.layers]
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

        for key in passthrough:
            add(key, ckpt.tensor(key))
        for name, layer in layers.items():
            rec = ckpt.layers[name]
            W = layer.merged_weight(task_id)
            if rec.layout == "conv1d":
                W = W.t()
            add(f"{name}.weight", W.to(getattr(torch, rec.source_dtype)).contiguous())
        if shard is not None:
            parts.append(shard.close())
        finalize_shards(tmp, parts)
        copy_aux_files(ckpt.directory, tmp)
        (tmp / "moorize.json").unlink(missing_ok=True)  # a dense checkpoint, not a factored one
    return dest
