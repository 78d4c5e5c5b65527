"""`moorize generate`: an adapter tried in PyTorch on any device, in seconds, before any export."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import click

from ..errors import MoorizeError
from ..options import cli_values, click_options, option
from .inputs import PATH, TextInputOptions, read_inputs


@dataclass
class GenerateOptions(TextInputOptions):
    """What ``moorize generate`` takes besides the factored checkpoint, each written once (its field)."""

    adapter: Path | None = option(None, cli_type=PATH, help="Adapter directory (moorize train's output). "
                                                            "Default: fresh routers, the original model.")
    device: str = option("auto", help="auto (CUDA when present), cpu, cuda or cuda:N.")


def _check_tasks(tasks: list[str | None], known: list[str]) -> list[str]:
    """Every row's task, named and known, before any work (as moorize run checks its export's)."""
    out = []
    for t in tasks:
        if t is None:
            if len(known) != 1:
                raise MoorizeError(f"this model has several tasks: choose one with --task ({', '.join(known)})")
            t = known[0]
        if t not in known:
            raise MoorizeError(f"unknown task {t!r}; tasks are: {', '.join(known)}")
        out.append(t)
    return out


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
      moorize generate smollm2-moore/ --adapter adapter/ --input prompts.jsonl --device cuda
    """
    o = GenerateOptions(**cli_values(GenerateOptions, options))
    texts, tasks = read_inputs(o)
    from ..conversion.svd import resolve_device
    from ..model.pytorch_generation import PyTorchGenerator

    gen = PyTorchGenerator(factored_dir, o.adapter, resolve_device(o.device))
    tasks = _check_tasks(tasks, gen.tasks)
    click.echo(f"# {factored_dir}: {gen.kind}, PyTorch on {gen.device}", err=True)
    if gen.kind == "classifier":
        outs = gen.classify(texts, tasks)
    else:
        outs = gen.generate(texts, tasks, max_new_tokens=o.max_new_tokens, do_sample=o.do_sample,
                            temperature=o.temperature, top_p=o.top_p, seed=o.seed)
    for text, out in zip(texts, outs):
        row = {"input": text, "output": out} if isinstance(out, str) else {"input": text, **out}
        click.echo(json.dumps(row, ensure_ascii=False))
