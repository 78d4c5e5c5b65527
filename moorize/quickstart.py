"""``moorize quickstart``: the whole pipeline on the real SmolLM2-135M-Instruct, end to end.

It grows with the project: today it converts, summarises, plots, verifies the
factored checkpoint by greedy generation against the original model, and loads the
routed MoORE model and checks it reproduces the original at initialisation.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from .assets import smollm2_gguf
from .errors import MoorizeError
from .io.hf import quiet_progress

DEFAULT_PROMPTS = ["What is the capital of France?", "Write a haiku about the sea."]


def greedy(model, tokenizer, prompt: str, max_new_tokens: int, **generate_kwargs) -> list[int]:
    """Greedy continuation of a chat-formatted prompt; returns the new token ids."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True) if tokenizer.chat_template else prompt
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, **generate_kwargs)
    return out[0, ids.shape[1]:].tolist()


def run_quickstart(out_dir: Path, prompts: list[str] | None, max_new_tokens: int, echo: Callable[[str], None]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .conversion.pipeline import convert
    from .conversion.report import format_table, plot_spectra
    from .io.factored import FactoredCheckpoint
    from .model.routed import load

    started = time.perf_counter()  # the whole run: what the user waited for
    gguf = smollm2_gguf()
    out_dir.mkdir(parents=True, exist_ok=True)
    factored = out_dir / "smollm2-factored"
    echo(f"[1/4] converting {gguf.name} -> {factored} (full rank)")
    # re-running replaces the quickstart's own earlier output, never a directory it did not write
    ours = (factored / "moorize.json").is_file()
    report = convert(gguf, factored, overwrite=ours)
    echo(format_table(report.layers, report.to_dict()))

    echo("[2/4] singular-value spectra")
    with FactoredCheckpoint(factored) as ckpt:
        echo(f"wrote {plot_spectra(ckpt, out_dir / 'smollm2-spectra.png')}")
        rebuilt = ckpt.dense_model()

    echo("[3/4] greedy generation: original vs rebuilt from the factors")
    with quiet_progress():
        original = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(factored)
    for prompt in prompts or DEFAULT_PROMPTS:
        a = greedy(original, tokenizer, prompt, max_new_tokens)
        b = greedy(rebuilt, tokenizer, prompt, max_new_tokens)
        same = "identical" if a == b else "DIFFERENT"
        echo(f"  {prompt!r} -> {tokenizer.decode(b, skip_special_tokens=True)!r} [{same}, {len(b)} tokens]")
        if a != b:
            raise MoorizeError(f"generation from the factors differs from the original for {prompt!r}")

    echo("[4/4] routed MoORE model (router task+sample, 2 tasks) at initialisation vs the original")
    routed = load(factored, tasks=["chat", "other"])
    for prompt in prompts or DEFAULT_PROMPTS:
        a = greedy(original, tokenizer, prompt, max_new_tokens)
        for task in ("chat", "other"):
            b = greedy(routed, tokenizer, prompt, max_new_tokens, task_ids=[task])
            if a != b:
                raise MoorizeError(f"the routed model (task {task!r}) differs from the original for {prompt!r}")
    layers = sum(1 for m in routed.modules() if type(m).__name__ == "MoORELinear")
    echo(f"  {layers} MoORELinear layers; greedy generation identical for every prompt and task")
    echo(f"done in {time.perf_counter() - started:.0f} s: the factored checkpoint and the routed model reproduce "
         "SmolLM2 exactly")

