"""The logit error of a LoRA export, measured: the merged MoORE model against the source model with each task's
written LoRA applied as PEFT applies it, on a few prompts (the checkpoint's tokenizer, or seeded random ids).

A measurement on these prompts, not a guarantee for every input: the per-layer errors bound the weights,
this shows what they do to the outputs.
"""

from __future__ import annotations

import gc
from pathlib import Path

import torch

from ..compat import text_config
from ..io.factored import FactoredCheckpoint
from ..io.safetensors import read_tensors
from . import peft_format

PROMPTS = ("The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,")


def prompt_ids(directory: Path, config) -> list[torch.Tensor]:
    """A few prompts as [1, L] token ids: the checkpoint's tokenizer on ``PROMPTS``, or seeded random ids."""
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(directory)
        ids = [tok(p, return_tensors="pt")["input_ids"][:, :32] for p in PROMPTS]
        if all(x.numel() for x in ids):
            return ids
    except Exception:  # noqa: BLE001  (no tokenizer, or one transformers cannot build: random ids instead)
        pass
    vocab = int(getattr(text_config(config), "vocab_size", 0) or 100)
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (1, 12), generator=g) for _ in PROMPTS]


def first_output(out) -> torch.Tensor:
    for name in ("logits", "last_hidden_state"):
        value = getattr(out, name, None)
        if value is not None:
            return value.float()
    return out[0].float()


@torch.no_grad()
def measure_logits(ckpt: FactoredCheckpoint, adapter: Path, matrix, tasks: list, task_names: list[str]) -> None:
    """Each task's max |logit difference| on the prompts: the merged MoORE model (the routed model in float32,
    which for router 'task' computes each task's dense matrix) against the source model with the written LoRA
    applied as PEFT applies it (x W + (x Aᵀ) Bᵀ). One model is in memory at a time."""
    from transformers import AutoConfig

    from ..model.routed import load

    prompts = prompt_ids(ckpt.directory, AutoConfig.from_pretrained(ckpt.directory))
    model = load(ckpt.directory, adapter, dtype=torch.float32)
    reference = {t.task: [first_output(model(ids, task_ids=torch.tensor([task_names.index(t.task)])))
                          for ids in prompts] for t in tasks}
    del model
    gc.collect()
    dense = ckpt.dense_model(matrix).float().eval()
    for t in tasks:
        weights = read_tensors(t.directory / peft_format.WEIGHTS_NAME)
        hooks = []
        for module in t.layers:
            a_key, b_key = peft_format.tensor_keys(module)
            A, B = weights[a_key].float(), weights[b_key].float()
            hooks.append(dense.get_submodule(module).register_forward_hook(
                lambda mod, args, out, A=A, B=B: out + (args[0].float() @ A.t()) @ B.t()))
        try:
            got = [first_output(dense(ids)) for ids in prompts]
        finally:
            for h in hooks:
                h.remove()
        diff = max((g - r).abs().max().item() for g, r in zip(got, reference[t.task]))
        scale = max(r.abs().max().item() for r in reference[t.task]) or 1.0
        t.logits = {"prompts": len(prompts), "max_abs": diff, "max_rel": diff / scale}
    del dense
    gc.collect()
