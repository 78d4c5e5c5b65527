"""`moorize run`: an ONNX export in ONNX Runtime (``moorize.runtime``), outputs as JSON lines; ``--bench`` times it."""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from ..errors import MoorizeError
from ..options import cli_values, click_options, option
from .inputs import PATH, TextInputOptions, check_tasks, read_inputs


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


@dataclass
class RunOptions(TextInputOptions):
    """What ``moorize run`` takes besides the export directory, each written once (its field)."""

    providers: list[str] | None = option(None, multiple=True, flag="provider",
                                         help="ONNX Runtime execution provider(s) in order. Default: CUDA when "
                                              "usable, else CPU.")
    bench: bool = option(False, help="Also time generation: tokens/s and latency percentiles.")
    bench_runs: int = option(5, kind=int, low=1, help="Timed runs for --bench.")


@click.command()
@click.argument("export_dir", type=PATH)
@click_options(RunOptions)
def run(export_dir: Path, **options) -> None:
    """Run an ONNX export with ONNX Runtime and print the outputs (generations or labels).

    \b
    Examples:
      moorize run ./smollm2-onnx --task math --prompt "2+2=" --max-new-tokens 8
      moorize run ./minilm-onnx --task sentiment --input reviews.jsonl
      moorize run ./smollm2-onnx --task math --prompt "Hello" --bench
    """
    o = RunOptions(**cli_values(RunOptions, options))
    texts, tasks = read_inputs(o)
    max_new_tokens = o.max_new_tokens
    from ..runtime.format import read_export_meta
    from ..runtime.session import MoOREOrtModel

    tasks = check_tasks(o, tasks, list(read_export_meta(export_dir).get("tasks") or ()))  # before any session loads
    model = MoOREOrtModel.from_export(export_dir, providers=o.providers or None)
    if model.kind == "vision":
        raise MoorizeError(f"{export_dir} is an image encoder: moorize run takes text; run it from Python with "
                           "moorize.runtime.MoOREOrtModel.from_export(DIR).image_features(pixel_values, task)")
    tasks_arg = tasks if len(set(tasks)) > 1 else tasks[0]
    if model.generates:
        outs = model.generate(texts, task=tasks_arg, max_new_tokens=max_new_tokens, do_sample=o.do_sample,
                              temperature=o.temperature, top_p=o.top_p, seed=o.seed, num_beams=o.num_beams)
    else:
        outs = model.classify(texts, task=tasks_arg)
    click.echo(f"# {export_dir}: {model.kind}, provider {model.provider}", err=True)  # after the inputs passed
    for text, out in zip(texts, outs):
        click.echo(json.dumps({"input": text, "output": out}, ensure_ascii=False))
    if o.bench:
        _bench(model, texts, tasks_arg, max_new_tokens, o.bench_runs)


def _bench(model, texts, task, max_new_tokens: int, runs: int) -> None:
    import time

    totals, steps, prefills, tokens = [], [], [], 0
    for _ in range(runs):
        t0 = time.perf_counter()
        if model.generates:
            model.generate(texts, task=task, max_new_tokens=max_new_tokens)
            times = model.last_times
            steps += times.steps
            prefills.append(times.prefill)
            tokens += times.new_tokens
        else:
            model.classify(texts, task=task)
        totals.append(time.perf_counter() - t0)
    ms = lambda s: f"{1e3 * s:.1f} ms"  # noqa: E731
    line = (f"bench ({runs} runs, batch {len(texts)}, provider {model.provider}): latency p50 {ms(_pct(totals, .5))}, "
            f"p90 {ms(_pct(totals, .9))}, p99 {ms(_pct(totals, .99))}")
    click.echo(line, err=False, file=sys.stdout)
    if model.generates and steps:
        click.echo(f"bench: prefill p50 {ms(statistics.median(prefills))}; per-token step p50 "
                   f"{ms(_pct(steps, .5))}, p90 {ms(_pct(steps, .9))}, p99 {ms(_pct(steps, .99))}; "
                   f"{tokens / sum(totals):.1f} tokens/s")
    elif not model.generates:
        click.echo(f"bench: {len(texts) * runs / sum(totals):.1f} texts/s")
