"""What gets exported: the routed model behind a fixed tensor signature, shared by every backend.

A transformers model takes keyword arguments, caches and task names; an exported
graph takes tensors. ``ExportGraph`` is that boundary: ``(input_ids, attention_mask,
task_ids[, past keys and values])`` in, ``logits`` (and the new cache) out. Decoders
compute their position ids from the attention mask (left padding works as in
``generate``); encoders return their task heads' logits, or the last hidden state
when the adapter has no heads. The task is an input, so one graph serves every task.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..compat import cache_keyword, dynamic_cache, text_config
from ..errors import MoorizeError
from .ops import TaskIds


@dataclass
class Routed:
    """A loaded routed model and what the export needs to know about it."""

    model: nn.Module  # the transformers model with MoORELinear layers
    heads: nn.Module | None  # TaskHeads of a classifier adapter
    kind: str  # "decoder" | "encoder" | "vision" (an image encoder: pixel_values in)
    tasks: list[str]
    labels: dict[str, list[str]] | None


def load_routed(factored_dir, adapter=None) -> Routed:
    """The routed model of ``factored_dir`` (with ``adapter``'s routers and, for classifiers, heads)."""
    from ..model.adapter import read_adapter_config
    from ..model.heads import load_classifier
    from ..model.routed import load

    meta = read_adapter_config(adapter) if adapter is not None else {}
    if "heads" in meta:
        clf = load_classifier(factored_dir, adapter)
        model, heads, labels = clf.model, clf.heads, clf.labels
    else:
        model, heads, labels = load(factored_dir, adapter), None, None
    if model.config.is_encoder_decoder:
        raise MoorizeError(f"{model.config.model_type}: encoder-decoder models are not exportable yet "
                           "(decoders, text encoders and image encoders are)")
    main = getattr(model, "main_input_name", "input_ids")
    if main == "pixel_values" and not model.can_generate():
        if heads is not None:
            raise MoorizeError(f"{model.config.model_type}: task heads on an image encoder are not exportable yet")
        return Routed(model, None, "vision", list(model.moore.config.tasks), None)
    if main != "input_ids":
        raise MoorizeError(f"{model.config.model_type}: models that take {main} are not exportable yet (the export "
                           "graph takes token ids or, for image encoders, pixel_values)")
    kind = "decoder" if model.can_generate() else "encoder"
    if kind == "decoder" and not hasattr(text_config(model.config), "num_attention_heads"):
        raise MoorizeError(f"{model.config.model_type}: decoders without attention layers (state-space models) are "
                           "not exportable yet: their cache is a recurrent state, not keys and values")
    if kind == "decoder" and heads is not None:
        raise MoorizeError("classification heads on a decoder are not exportable yet: export the encoder "
                           "classifier or a generative adapter")
    return Routed(model, heads, kind, list(model.moore.config.tasks), labels)


def kv_layout(config) -> dict:
    """Cache geometry of a decoder: one key and one value [batch, kv_heads, past, head_dim] per layer (read from
    the text config when the model's config nests one)."""
    config = text_config(config)
    heads = config.num_attention_heads
    return {"num_layers": config.num_hidden_layers,
            "num_kv_heads": getattr(config, "num_key_value_heads", None) or heads,
            "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads}


def past_names(num_layers: int, prefix: str) -> list[str]:
    return [f"{prefix}.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def export_graph(routed: Routed, with_past: bool, holder: TaskIds) -> "ExportGraph":
    """The graph of ``routed``'s kind: token ids in (``ExportGraph``), or pixels in (``ImageEncoderGraph``)."""
    return (ImageEncoderGraph if routed.kind == "vision" else ExportGraph)(routed, with_past, holder)


class ExportGraph(nn.Module):
    """The routed model as a function of tensors only (see the module docstring)."""

    def __init__(self, routed: Routed, with_past: bool, holder: TaskIds):
        super().__init__()
        if with_past and routed.kind != "decoder":
            what = "an image encoder" if routed.kind == "vision" else "an encoder"
            raise MoorizeError(f"--with-past is for decoder language models; this model is {what}")
        self.model, self.heads, self.kind, self.with_past = routed.model, routed.heads, routed.kind, with_past
        self.holder = holder
        self.num_layers = text_config(routed.model.config).num_hidden_layers
        self.eval()

    @property
    def input_names(self) -> list[str]:
        names = ["input_ids", "attention_mask", "task_ids"]
        return names + (past_names(self.num_layers, "past_key_values") if self.with_past else [])

    @property
    def output_names(self) -> list[str]:
        if self.kind == "encoder":
            return ["logits" if self.heads is not None else "last_hidden_state"]
        return ["logits"] + (past_names(self.num_layers, "present") if self.with_past else [])

    def dynamic_shapes(self) -> dict:
        """torch.export dims; without a cache the attention mask has the input's own sequence dim."""
        from torch.export import Dim

        # an encoder's learned positions bound its length (a decoder's cache would need derived bounds)
        limit = getattr(self.model.config, "max_position_embeddings", None) if self.kind == "encoder" else None
        batch, seq = Dim("batch"), Dim("sequence", max=limit)
        # with a cache: past + new tokens; min=4 only states the tracer's own assumption (both dims >= 2):
        # the ONNX graph takes any length, an empty cache included
        total = Dim("total_sequence", min=4, max=limit) if self.with_past else seq
        shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total}, "task_ids": {0: batch}}
        if self.with_past:
            past = Dim("past_sequence")
            shapes["past"] = tuple({0: batch, 2: past} for _ in range(2 * self.num_layers))
        return shapes

    def forward(self, input_ids, attention_mask, task_ids, *past):
        self.holder.ids = task_ids
        self.holder.token_ids = task_ids.unsqueeze(1).expand_as(input_ids).reshape(-1)  # rows flattened
        if self.kind == "encoder":
            hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return hidden if self.heads is None else self.heads(hidden, attention_mask, task_ids)
        positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -input_ids.shape[1]:]
        cache = None
        if self.with_past:
            cache = dynamic_cache([(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)], self.model.config)
        key = cache_keyword(self.model)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                         use_cache=self.with_past, **{key: cache})
        if not self.with_past:
            return out.logits
        present = []
        for layer in out[key].layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


class ImageEncoderGraph(ExportGraph):
    """An image encoder (ViT, DeiT, DINOv2, CLIP or SigLIP vision): ``(pixel_values, task_ids)`` in,
    ``last_hidden_state`` out; the image size is the config's (fixed), the batch is dynamic."""

    @property
    def input_names(self) -> list[str]:
        return ["pixel_values", "task_ids"]

    @property
    def output_names(self) -> list[str]:
        return ["last_hidden_state"]

    def dynamic_shapes(self) -> dict:
        from torch.export import Dim

        batch = Dim("batch")
        return {"pixel_values": {0: batch}, "task_ids": {0: batch}}

    def forward(self, pixel_values, task_ids):
        self.holder.ids, self.holder.token_ids = task_ids, None
        return self.model(pixel_values=pixel_values).last_hidden_state


def tokenizer_or_none(directory: Path):
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(directory)
    except Exception:  # no tokenizer files: the graph still exports, samples are random ids
        return None


SAMPLE_TEXTS = ("The capital of France is", "Write a short poem about the sea and the wind.",
                "List three prime numbers:")


def sample_inputs(routed: Routed, tokenizer, with_past: bool, past: int = 0, batch: int = 2, seq: int = 8,
                  dtype: torch.dtype = torch.float32) -> tuple:
    """(input_ids, attention_mask, task_ids[, ``past`` cached positions of random keys and values])."""
    if routed.kind == "vision":  # (pixel_values, task_ids): random pixels of the size the model was made for
        cfg = routed.model.config
        pixels = torch.randn(batch, cfg.num_channels, cfg.image_size, cfg.image_size,
                             generator=torch.Generator().manual_seed(0))
        return pixels.to(dtype), torch.zeros(batch, dtype=torch.long)
    vocab = text_config(routed.model.config).vocab_size
    ids = None
    if tokenizer is not None and tokenizer.pad_token is not None:  # a tokenizer made from a config alone has none
        try:
            enc = tokenizer(list(SAMPLE_TEXTS[:batch]), return_tensors="pt", padding="max_length", max_length=seq,
                            truncation=True)
        except Exception:  # a tokenizer without a vocabulary (made from a config alone): random ids will do
            enc = None
        if enc is not None and enc.input_ids.shape == (batch, seq) and int(enc.input_ids.max()) < vocab:
            ids = enc.input_ids
    if ids is None:
        ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    past = past if with_past else 0
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    args = (ids, mask, torch.zeros(batch, dtype=torch.long))
    if with_past:
        kv = kv_layout(routed.model.config)
        gen = torch.Generator().manual_seed(1)
        shape = (batch, kv["num_kv_heads"], past, kv["head_dim"])
        args += tuple(torch.randn(shape, generator=gen).to(dtype) for _ in range(2 * kv["num_layers"]))
    return args
