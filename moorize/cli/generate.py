"""`moorize generate`: an adapter tried in PyTorch on any device, in seconds, before any export."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import click

from ..options import cli_values, click_options, option
from .inputs import PATH, TextInputOptions, check_tasks, read_inputs


@dataclass
class GenerateOptions(TextInputOptions):
    """What ``moorize generate`` takes besides the factored checkpoint, each written once (its field)."""

    adapter: Path | None = option(None, cli_type=PATH, help="Adapter directory (moorize train's output). "
                                                            "Default: fresh routers, the original model.")
    device: str = option("auto", help="auto (CUDA when present), cpu, cuda or cuda:N.")
    compile: bool = option(False, help="Decode with a static KV cache and a torch.compile'd step (CUDA graphs on a "
                                       "GPU): the same tokens, faster steps once compiled; the first run compiles.")


@click.command()
@click.argument("factored_dir", type=PATH)
@click_options(GenerateOptions)
def generate(factored_dir: Path, **options) -> None:
    """Try an adapter in PyTorch: continue prompts, or score classes, with no export.

    Prints one JSON line per input, as moorize run does for an export: the generated
    text, or for a classifier adapter the label and every class's probability.

    \b
    Examples:
      moorize generate smollm2-moore/ --adapter adapter/ --task addition --prompt "Add: 12 + 30 ="
      moorize generate minilm-moore/ --adapter clf/ --task sentiment --prompt "What a film!"
      moorize generate smollm2-moore/ --adapter adapter/ --input prompts.jsonl --device cuda --compile
    """
    o = GenerateOptions(**cli_values(GenerateOptions, options))
    texts, tasks = read_inputs(o)
    from ..conversion.svd import resolve_device
    from ..model.adapter import adapter_moore_config
    from ..model.config import DEFAULTS
    from ..model.pytorch_generation import PyTorchGenerator

    device = resolve_device(o.device)
    tasks = check_tasks(o, tasks, (adapter_moore_config(o.adapter) if o.adapter else DEFAULTS).tasks)  # before loading
    gen = PyTorchGenerator(factored_dir, o.adapter, device, compile=o.compile)
    click.echo(f"# {factored_dir}: {gen.kind}, PyTorch on {gen.device}{', compiled' if o.compile else ''}", err=True)
    if gen.kind == "classifier":
        outs = gen.classify(texts, tasks)
    else:
        outs = gen.generate(texts, tasks, max_new_tokens=o.max_new_tokens, do_sample=o.do_sample,
                            temperature=o.temperature, top_p=o.top_p, seed=o.seed, num_beams=o.num_beams)
    for text, out in zip(texts, outs):
        row = {"input": text, "output": out} if isinstance(out, str) else {"input": text, **out}
        click.echo(json.dumps(row, ensure_ascii=False))
