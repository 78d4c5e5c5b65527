"""`moorize run`: an ONNX export in ONNX Runtime (``moorize.runtime``), outputs as JSON lines; ``--bench`` times it."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import click

from ..errors import MoorizeError

PATH = click.Path(path_type=Path, readable=False)  # moorize says what is wrong in one line


def _read_jsonl(path: Path) -> list[dict]:
    """Rows of {"prompt"|"text": str, optional "task"}; errors name file:line."""
    if not path.is_file():
        raise MoorizeError(f"input file {path} does not exist")
    from ..io.jsonfiles import jsonl_records

    rows = []
    for n, row in jsonl_records(path):
        text = row.get("prompt", row.get("text")) if isinstance(row, dict) else None
        if not isinstance(text, str):
            raise MoorizeError(f'{path}:{n}: needs a "prompt" (or "text") string')
        rows.append({"text": text, "task": row.get("task")})
    if not rows:
        raise MoorizeError(f"{path} has no rows")
    return rows


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


@click.command()
@click.argument("export_dir", type=PATH)
@click.option("--task", default=None, help="Task name (required when the model has several).")
@click.option("--prompt", "prompts", multiple=True, help="Input text; repeatable (one batch).")
@click.option("--input", "input_file", type=PATH, default=None,
              help='JSONL file, one {"prompt": ..., "task": optional} per line.')
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--do-sample", is_flag=True, help="Sample instead of greedy decoding.")
@click.option("--temperature", type=float, default=1.0, show_default=True)
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=None, help="Sampling seed.")
@click.option("--provider", "providers", multiple=True,
              help="ONNX Runtime execution provider(s) in order. Default: CUDA when usable, else CPU.")
@click.option("--bench", is_flag=True, help="Also time generation: tokens/s and latency percentiles.")
@click.option("--bench-runs", type=click.IntRange(min=1), default=5, show_default=True, help="Timed runs for --bench.")
def run(export_dir: Path, task, prompts, input_file, max_new_tokens, do_sample, temperature, top_p, seed, providers,
        bench, bench_runs) -> None:
    """Run an ONNX export with ONNX Runtime and print the outputs (generations or labels).

    \b
    Examples:
      moorize run ./smollm2-onnx --task math --prompt "2+2=" --max-new-tokens 8
      moorize run ./minilm-onnx --task sentiment --input reviews.jsonl
      moorize run ./smollm2-onnx --task math --prompt "Hello" --bench
    """
    if bool(prompts) == bool(input_file):
        raise MoorizeError("give the inputs with --prompt TEXT (repeatable) or --input FILE.jsonl, not both")
    if bench and bench_runs < 1:
        raise MoorizeError("--bench-runs must be at least 1")
    from ..runtime.session import MoOREOrtModel

    model = MoOREOrtModel.from_export(export_dir, providers=list(providers) or None)
    rows = _read_jsonl(input_file) if input_file else [{"text": p, "task": None} for p in prompts]
    texts = [r["text"] for r in rows]
    tasks = [r["task"] if r["task"] is not None else task for r in rows]
    for t in set(tasks):  # unknown names fail before any work
        model.task_ids(t, 1)
    tasks_arg = tasks if len(set(tasks)) > 1 else tasks[0]
    if model.kind == "decoder":
        outs = model.generate(texts, task=tasks_arg, max_new_tokens=max_new_tokens, do_sample=do_sample,
                              temperature=temperature, top_p=top_p, seed=seed)
    else:
        outs = model.classify(texts, task=tasks_arg)
    click.echo(f"# {export_dir}: {model.kind}, provider {model.provider}", err=True)  # after the inputs passed
    for text, out in zip(texts, outs):
        click.echo(json.dumps({"input": text, "output": out}, ensure_ascii=False))
    if bench:
        _bench(model, texts, tasks_arg, max_new_tokens, bench_runs)


def _bench(model, texts, task, max_new_tokens: int, runs: int) -> None:
    import time

    totals, steps, prefills, tokens = [], [], [], 0
    for _ in range(runs):
        t0 = time.perf_counter()
        if model.kind == "decoder":
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
    if model.kind == "decoder" and steps:
        click.echo(f"bench: prefill p50 {ms(statistics.median(prefills))}; per-token step p50 "
                   f"{ms(_pct(steps, .5))}, p90 {ms(_pct(steps, .9))}, p99 {ms(_pct(steps, .99))}; "
                   f"{tokens / sum(totals):.1f} tokens/s")
    elif model.kind != "decoder":
        click.echo(f"bench: {len(texts) * runs / sum(totals):.1f} texts/s")
