"""What gets exported: the routed model behind a fixed tensor signature, shared by every backend.

A transformers model takes keyword arguments, caches and task names; an exported
graph takes tensors. ``ExportGraph`` is that boundary: ``(input_ids, attention_mask,
task_ids[, past keys and values])`` in, ``logits`` (and the new cache) out. Decoders
compute their position ids from the attention mask (left padding works as in
``generate``); encoders return their task heads' logits, or the last hidden state
when the adapter has no heads. The task is an input, so one graph serves every task.
An encoder-decoder is two graphs (``EncoderDecoderGraphs``): its encoder, run once per
input, and its decoder, run at every step on the encoder's states. With ``--with-past`` the
encoder also returns every decoder layer's cross-attention keys and values (computed once
per input), and the decoder takes them and its own self-attention cache, so a step feeds
one new token.
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
    kind: str  # "decoder" | "encoder" | "encoder-decoder" | "vision" (an image encoder: pixel_values in)
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
    main = getattr(model, "main_input_name", "input_ids")
    tasks = list(model.moore.config.tasks)
    if len(tasks) > 1 and any(model.get_submodule(p).token_subset for p in model.moore.layer_paths.values()):
        raise MoorizeError(f"{model.config.model_type}: its sparse-MoE experts are modules that each see a subset of "
                           "the tokens, which an export cannot route per task yet: export an adapter with one task")
    if model.config.is_encoder_decoder:
        if main != "input_ids":
            raise MoorizeError(f"{model.config.model_type}: encoder-decoders that take {main} (speech) are not "
                               "exportable yet (those that take token ids are)")
        if heads is not None:
            raise MoorizeError(f"{model.config.model_type}: task heads on an encoder-decoder are not exportable yet")
        return Routed(model, None, "encoder-decoder", tasks, None)
    if main == "pixel_values" and not model.can_generate():
        if heads is not None:
            raise MoorizeError(f"{model.config.model_type}: task heads on an image encoder are not exportable yet")
        return Routed(model, None, "vision", tasks, None)
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
    return Routed(model, heads, kind, tasks, labels)


def kv_layout(config) -> dict:
    """Cache geometry of a decoder: one key and one value [batch, kv_heads, past, head_dim] per layer (read from
    the text config when the model's config nests one)."""
    config = text_config(config)
    heads = config.num_attention_heads
    return {"num_layers": config.num_hidden_layers,
            "num_kv_heads": getattr(config, "num_key_value_heads", None) or heads,
            "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads}


def decoder_kv_layout(model, with_past: bool = False) -> dict:
    """Cache geometry of a decoder as the model itself builds its cache (one step over two tokens), which a config
    may not say: architectures that ignore ``num_key_value_heads`` (Persimmon, BioGPT), multi-latent attention's
    keys and values of different widths (``value_head_dim``, when it differs). With ``with_past`` a cache that is
    not keys and values in every layer (a hybrid's convolution or recurrent state) is refused in one line; a
    model the probe cannot run falls back to the config (``kv_layout``)."""
    import contextlib

    from ..model.routed import use_task

    routing = use_task(model, torch.zeros(1, dtype=torch.long)) if hasattr(model, "moore") else contextlib.nullcontext()
    try:
        with torch.no_grad(), routing:
            out = model(input_ids=torch.zeros(1, 2, dtype=torch.long), use_cache=True)
        layers = out[cache_keyword(model)].layers
    except Exception:  # the cache's types are checked by the export's trace
        return kv_layout(model.config)
    other = sorted({type(layer).__name__ for layer in layers if getattr(layer, "keys", None) is None
                    or getattr(layer, "values", None) is None})
    if other:
        if with_past:
            raise MoorizeError(f"{model.config.model_type}: --with-past needs keys and values in every layer's cache; "
                               f"this model's also holds {', '.join(other)} (a convolution or recurrent state): "
                               "export without --with-past")
        return kv_layout(model.config)
    return {"num_layers": len(layers), **_cache_geometry(layers[0])}


def _cache_geometry(layer) -> dict:
    """Heads and head size of one cache layer's keys [batch, heads, positions, head_dim], and the values' width
    where it differs (multi-latent attention)."""
    keys, values = layer.keys, layer.values
    out = {"num_kv_heads": keys.shape[1], "head_dim": keys.shape[3]}
    if values.shape[3] != keys.shape[3]:
        out["value_head_dim"] = values.shape[3]
    return out


def _cache_shapes(geometry: dict, batch: int, positions: int) -> list[tuple[int, ...]]:
    """[key shape, value shape] of one cache layer of ``geometry`` (``_cache_geometry``)."""
    key = (batch, geometry["num_kv_heads"], positions, geometry["head_dim"])
    return [key, (*key[:3], geometry.get("value_head_dim", geometry["head_dim"]))]


def past_names(num_layers: int, prefix: str, part: str | None = None) -> list[str]:
    """``prefix.i.key``, ``prefix.i.value`` per layer; an encoder-decoder's name their ``part`` too (``decoder``:
    self-attention, ``encoder``: cross-attention), as Optimum's exports do."""
    middle = f".{part}" if part else ""
    return [f"{prefix}.{i}{middle}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def seq2seq_kv_layout(model) -> dict:
    """Cache geometry of an encoder-decoder's decoder, read off one decoding step of the model itself (configs
    name it differently: T5's ``num_decoder_layers`` and ``d_kv``, BART's ``decoder_layers`` and ``d_model`` /
    ``decoder_attention_heads``): its layers, the self-attention cache's heads and head size (as ``kv_layout``),
    and the cross-attention cache's under ``cross``."""
    from transformers.modeling_outputs import BaseModelOutput

    from ..model.routed import use_task

    dtype = next(model.parameters()).dtype
    ids = torch.zeros(1, 2, dtype=torch.long)
    with torch.no_grad(), use_task(model, torch.zeros(1, dtype=torch.long)):
        states = model.get_encoder()(input_ids=ids).last_hidden_state.to(dtype)
        out = model(encoder_outputs=BaseModelOutput(last_hidden_state=states),
                    decoder_input_ids=torch.full((1, 1), decoder_start_token(model)), use_cache=True)
    cache = out[cache_keyword(model)]
    own = cache.self_attention_cache.layers
    return {"num_layers": len(own), **_cache_geometry(own[0]),
            "cross": _cache_geometry(cache.cross_attention_cache.layers[0])}


def export_graph(routed: Routed, with_past: bool, holder: TaskIds) -> "ExportGraph | EncoderDecoderGraphs":
    """The graph of ``routed``'s kind: token ids in (``ExportGraph``), pixels in (``ImageEncoderGraph``), or an
    encoder-decoder's two (``EncoderDecoderGraphs``); ``parts()`` names the graph files either way."""
    if routed.kind == "encoder-decoder":
        return EncoderDecoderGraphs(routed, with_past, holder)
    if with_past and routed.kind != "decoder":
        what = "an image encoder" if routed.kind == "vision" else "an encoder"
        raise MoorizeError(f"--with-past is for models that generate text; this model is {what}")
    return (ImageEncoderGraph if routed.kind == "vision" else ExportGraph)(routed, with_past, holder)


class ExportGraph(nn.Module):
    """The routed model as a function of tensors only (see the module docstring)."""

    def __init__(self, routed: Routed, with_past: bool, holder: TaskIds):
        super().__init__()
        self.model, self.heads, self.kind, self.with_past = routed.model, routed.heads, routed.kind, with_past
        self.holder, self.routed = holder, routed
        self.num_layers = text_config(routed.model.config).num_hidden_layers
        self.kv = decoder_kv_layout(routed.model, with_past) if with_past and routed.kind == "decoder" else None
        if self.kv is not None:
            self.num_layers = self.kv["num_layers"]
        self.eval()

    def parts(self) -> dict[str, "ExportGraph"]:
        """The graphs to write, by file stem: this one, ``model``."""
        return {"model": self}

    def sample_inputs(self, tokenizer, past: int = 0, batch: int = 2, seq: int = 8,
                      dtype: torch.dtype = torch.float32) -> tuple:
        """Inputs in ``input_names`` order, for tracing and validation (see ``sample_inputs``)."""
        return sample_inputs(self.routed, tokenizer, self.with_past, past, batch, seq, dtype, self.kv)

    def next_step(self, inputs: tuple, outputs: list) -> tuple | None:
        """A decoding step's inputs after ``inputs`` gave ``outputs`` (validation runs the prefill and one
        step), or None where the graph has no step (no cache)."""
        if not self.with_past:
            return None
        nxt = outputs[0][:, -1].argmax(-1, keepdim=True)
        mask = torch.ones(nxt.shape[0], inputs[1].shape[1] + 1, dtype=torch.long)
        return (nxt, mask, inputs[2], *outputs[1:])

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


class EncoderDecoderGraphs:
    """An encoder-decoder (T5, BART, Marian, Pegasus, ...) as two graphs: ``encoder`` (token ids in, its states
    out), run once per input, and ``decoder`` (the decoder's tokens and the encoder's states in, logits out), run
    at every generation step. Without a cache the decoder recomputes its own tokens each step; with one
    (``with_past``) the encoder also gives the cross-attention keys and values, and the decoder takes them and
    its self-attention cache and returns the new cache."""

    kind = "encoder-decoder"

    def __init__(self, routed: Routed, with_past: bool, holder: TaskIds):
        decoder_start_token(routed.model)  # refused now, not after the trace
        self.with_past = with_past
        layout = seq2seq_kv_layout(routed.model) if with_past else None
        self.encoder = Seq2SeqEncoderGraph(routed, with_past, holder, layout)
        self.decoder = Seq2SeqDecoderGraph(routed, with_past, holder, layout)

    def parts(self) -> dict[str, ExportGraph]:
        return {"encoder": self.encoder, "decoder": self.decoder}


def decoder_start_token(model) -> int:
    """The token an encoder-decoder's decoder starts from: the generation config's, else the config's, else BOS,
    as transformers' ``generate`` picks it."""
    cfg, gen = model.config, getattr(model, "generation_config", None)
    candidates = (getattr(gen, "decoder_start_token_id", None), getattr(cfg, "decoder_start_token_id", None),
                  getattr(gen, "bos_token_id", None), getattr(cfg, "bos_token_id", None))
    start = next((v for v in candidates if v is not None), None)
    if start is None:
        raise MoorizeError(f"{cfg.model_type}: the config names no decoder_start_token_id (nor bos_token_id), so "
                           "generation cannot start: set one in config.json")
    return int(start)


def _position_limit(config) -> int | None:
    """Learned or tabled positions bound the length (BART, Marian); relative ones (T5) do not."""
    return getattr(config, "max_position_embeddings", None)


class _Seq2SeqGraph(ExportGraph):
    """What an encoder-decoder's two graphs share: the decoder's cache geometry (``seq2seq_kv_layout``, None
    without a cache)."""

    def __init__(self, routed: Routed, with_past: bool, holder: TaskIds, layout: dict | None):
        super().__init__(routed, with_past, holder)
        self.layout = layout
        self.num_layers = layout["num_layers"] if layout else 0


class Seq2SeqEncoderGraph(_Seq2SeqGraph):
    """An encoder-decoder's encoder: ``(input_ids, attention_mask, task_ids)`` in, ``encoder_hidden_states`` out;
    with a cache, also ``present.i.encoder.key/value``: every decoder layer's cross-attention keys and values,
    which depend on the input alone (computed by the model's own decoder over its start token, whose other
    results the exporter drops as unused)."""

    @property
    def input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "task_ids"]

    @property
    def output_names(self) -> list[str]:
        cross = past_names(self.num_layers, "present", "encoder") if self.with_past else []
        return ["encoder_hidden_states", *cross]

    def dynamic_shapes(self) -> dict:
        from torch.export import Dim

        batch, seq = Dim("batch"), Dim("sequence", max=_position_limit(self.model.config))
        return {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}, "task_ids": {0: batch}}

    def sample_inputs(self, tokenizer, past: int = 0, batch: int = 2, seq: int = 8,
                      dtype: torch.dtype = torch.float32) -> tuple:
        # the text encoder's inputs: the tokenizer's right padding where it has a vocabulary
        return sample_inputs(Routed(self.model, None, "encoder", self.routed.tasks, None), tokenizer, False, 0, batch,
                             seq, dtype)

    def next_step(self, inputs: tuple, outputs: list) -> None:
        return None  # run once per input

    def forward(self, input_ids, attention_mask, task_ids):
        from transformers.modeling_outputs import BaseModelOutput

        self.holder.ids = task_ids
        self.holder.token_ids = task_ids.unsqueeze(1).expand_as(input_ids).reshape(-1)
        states = self.model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if not self.with_past:
            return states
        self.holder.token_ids = task_ids  # the decoder's one start token per row
        start = input_ids.new_full((input_ids.shape[0], 1), decoder_start_token(self.model))
        out = self.model(encoder_outputs=BaseModelOutput(last_hidden_state=states), attention_mask=attention_mask,
                         decoder_input_ids=start, use_cache=True)
        cross = out[cache_keyword(self.model)].cross_attention_cache.layers
        return (states, *[t for layer in cross for t in (layer.keys, layer.values)])


class Seq2SeqDecoderGraph(_Seq2SeqGraph):
    """An encoder-decoder's decoder: ``(decoder_input_ids, encoder_hidden_states, attention_mask, task_ids)`` in
    (the mask is the encoder input's), ``logits`` out. Without a cache the tokens are the whole target so far;
    with one they are the new ones, after the self-attention cache (``past_key_values.i.decoder.*``, empty at the
    first step) and the encoder's cross-attention keys and values (``past_key_values.i.encoder.*``), and the
    new self-attention cache comes out (``present.i.decoder.*``)."""

    @property
    def input_names(self) -> list[str]:
        names = ["decoder_input_ids", "encoder_hidden_states", "attention_mask", "task_ids"]
        if self.with_past:
            names += past_names(self.num_layers, "past_key_values", "decoder")
            names += past_names(self.num_layers, "past_key_values", "encoder")
        return names

    @property
    def output_names(self) -> list[str]:
        return ["logits"] + (past_names(self.num_layers, "present", "decoder") if self.with_past else [])

    def dynamic_shapes(self) -> dict:
        from torch.export import Dim

        limit = _position_limit(self.model.config)
        batch, seq, target = Dim("batch"), Dim("sequence", max=limit), Dim("decoder_sequence", max=limit)
        shapes = {"decoder_input_ids": {0: batch, 1: target}, "encoder_hidden_states": {0: batch, 1: seq},
                  "attention_mask": {0: batch, 1: seq}, "task_ids": {0: batch}}
        if self.with_past:
            past = Dim("past_decoder_sequence")
            shapes["past"] = tuple({0: batch, 2: past} for _ in range(2 * self.num_layers)) + \
                tuple({0: batch, 2: seq} for _ in range(2 * self.num_layers))
        return shapes

    def sample_inputs(self, tokenizer, past: int = 0, batch: int = 2, seq: int = 8,
                      dtype: torch.dtype = torch.float32) -> tuple:
        """Random target tokens and encoder states; with 3 rows or more the last one's input is padded, so the
        cross-attention mask is exercised. With a cache: ``past`` positions of random self-attention keys and
        values, and random cross-attention ones for the encoder's ``seq``."""
        cfg = self.model.config
        gen = torch.Generator().manual_seed(2)
        target = torch.randint(0, cfg.vocab_size, (batch, max(seq - 2, 1)), generator=gen)
        states = torch.randn(batch, seq, cfg.hidden_size, generator=gen).to(dtype)
        mask = torch.ones(batch, seq, dtype=torch.long)
        if batch > 2 and seq > 2:
            mask[-1, -2:] = 0
        args = (target, states, mask, torch.zeros(batch, dtype=torch.long))
        if not self.with_past:
            return args
        shapes = _cache_shapes(self.layout, batch, past) * self.num_layers
        shapes += _cache_shapes(self.layout["cross"], batch, seq) * self.num_layers
        return args + tuple(torch.randn(shape, generator=gen).to(dtype) for shape in shapes)

    def next_step(self, inputs: tuple, outputs: list) -> tuple | None:
        """The next token after ``inputs``, with the self-attention cache they gave and the same cross-attention
        cache."""
        if not self.with_past:
            return None
        nxt = outputs[0][:, -1].argmax(-1, keepdim=True)
        return (nxt, *inputs[1:4], *outputs[1:], *inputs[4 + 2 * self.num_layers:])

    def forward(self, decoder_input_ids, encoder_hidden_states, attention_mask, task_ids, *past):
        from transformers import DynamicCache, EncoderDecoderCache
        from transformers.modeling_outputs import BaseModelOutput

        self.holder.ids = task_ids
        self.holder.token_ids = task_ids.unsqueeze(1).expand_as(decoder_input_ids).reshape(-1)
        encoder = BaseModelOutput(last_hidden_state=encoder_hidden_states)
        if not self.with_past:
            return self.model(encoder_outputs=encoder, attention_mask=attention_mask,
                              decoder_input_ids=decoder_input_ids, use_cache=False).logits
        n = self.num_layers
        # no config: a config's layer count may be the encoder's (T5's num_layers), the tensors give the decoder's
        own = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(n)])
        cross = DynamicCache(ddp_cache_data=[(past[2 * n + 2 * i], past[2 * n + 2 * i + 1]) for i in range(n)])
        key = cache_keyword(self.model)
        out = self.model(encoder_outputs=encoder, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                         use_cache=True, **{key: EncoderDecoderCache(own, cross)})
        present = []
        for layer in out[key].self_attention_cache.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def tokenizer_or_none(directory: Path):
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(directory)
    except Exception:  # no tokenizer files: the graph still exports, samples are random ids
        return None


SAMPLE_TEXTS = ("The capital of France is", "Write a short poem about the sea and the wind.",
                "List three prime numbers:")


def sample_inputs(routed: Routed, tokenizer, with_past: bool, past: int = 0, batch: int = 2, seq: int = 8,
                  dtype: torch.dtype = torch.float32, kv: dict | None = None) -> tuple:
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
        kv = kv or kv_layout(routed.model.config)
        gen = torch.Generator().manual_seed(1)
        shapes = _cache_shapes(kv, batch, past) * kv["num_layers"]
        args += tuple(torch.randn(shape, generator=gen).to(dtype) for shape in shapes)
    return args
