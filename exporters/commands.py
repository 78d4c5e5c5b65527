"""``moorize export`` and ``moorize run``: thin click commands over the exporters and the ORT runtime.

Heavy modules (torch, onnx, onnxruntime, transformers) are imported inside the
commands so ``moorize --help`` stays fast. Errors are ``MoorizeError`` (one line,
exit 2) through the CLI group's handler.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import click

from ..errors import MoorizeError
from .options import DEFAULTS, DTYPES, MIN_OPSET, WEIGHTS, ExportOptions

PATH = click.Path(path_type=Path, readable=False)  # moorize says what is wrong in one line


@click.command()
@click.argument("factored_dir", type=PATH)
@click.option("--adapter", type=PATH, default=None,
              help="Adapter directory (trained routers; task heads for classifiers). Default: fresh routers, "
                   "one task 'default'.")
@click.option("--onnx", "onnx_dest", type=PATH, default=None, metavar="DEST",
              help="Write an ONNX export directory: model.onnx, weights, tokenizer, moorize_export.json.")
@click.option("--torchscript", "ts_dest", type=PATH, default=None, metavar="DEST.pt",
              help="Write a TorchScript file (torch.jit.trace; deprecated upstream, prefer --pt2).")
@click.option("--pt2", "pt2_dest", type=PATH, default=None, metavar="DEST.pt2",
              help="Write a torch.export ExportedProgram (.pt2).")
@click.option("--with-past", is_flag=True,
              help="Decoders: KV-cache inputs (past_key_values.*) and outputs (present.*), one token per step.")
@click.option("--decompose", is_flag=True,
              help="ONNX: standard ops only instead of one ai.moorize::MoORELinear node per layer.")
@click.option("--weights", type=click.Choice(WEIGHTS), default=DEFAULTS.weights, show_default=True,
              help="ONNX: copy the weights to model.onnx_data, or reference the factored shards (hard-linked "
                   "into DEST, no bytes copied; DEST must be on the same filesystem).")
@click.option("--dtype", type=click.Choice(DTYPES), default=DEFAULTS.dtype, show_default=True,
              help="ONNX: float16 for GPU deployment.")
@click.option("--opset", type=int, default=DEFAULTS.opset, show_default=True,
              help=f"ONNX opset ({MIN_OPSET} or newer).")
@click.option("--no-validate", is_flag=True, help="Skip the check against PyTorch after the export.")
@click.option("--atol", type=float, default=None,
              help="Validation: each output's max |difference| from PyTorch must stay within atol + rtol * "
                   "max|PyTorch output| [default atol: 1e-4 in float32, 1e-3 in float16].")
@click.option("--rtol", type=float, default=None,
              help="Validation: see --atol [default: 1e-5 in float32 (rounding grows with the output's scale), "
                   "5e-2 in float16].")
@click.option("--overwrite", is_flag=True, help="Replace an existing DEST (only once the new one is complete).")
def export(factored_dir: Path, adapter, onnx_dest, ts_dest, pt2_dest, no_validate: bool, **options) -> None:
    """Export the routed model of FACTORED_DIR for deployment, validated against PyTorch.

    Every task is served by one graph: the task is an input (task_ids, int64 [batch]).

    \b
    Examples:
      moorize export ./smollm2-moore --adapter ./adapter --onnx ./smollm2-onnx --with-past
      moorize export ./smollm2-moore --adapter ./adapter --onnx ./onnx-ref --weights reference
      moorize export ./minilm-moore --adapter ./clf-adapter --onnx ./minilm-onnx --decompose
      moorize export ./smollm2-moore --adapter ./adapter --pt2 ./smollm2.pt2
    """
    targets = [d for d in (onnx_dest, ts_dest, pt2_dest) if d is not None]
    if not targets:
        raise MoorizeError("nothing to export: pass --onnx DEST, --torchscript DEST.pt or --pt2 DEST.pt2")
    opts = ExportOptions(validate_export=not no_validate, **options)
    if ts_dest or pt2_dest:  # before any export runs
        opts.check_file_backend()
    if onnx_dest is not None:
        from .onnx import export_onnx

        report = export_onnx(factored_dir, onnx_dest, adapter, opts)
        op = "standard ops only" if opts.decompose else f"{report.moore_nodes} ai.moorize::MoORELinear nodes"
        click.echo(f"wrote {report.dest}: {report.kind}, tasks {', '.join(report.tasks)}, opset {opts.opset}, {op}, "
                   f"{opts.dtype}{', with past' if opts.with_past else ''} ({report.seconds:.1f} s)")
        click.echo(f"  graph {_mb(report.graph_bytes)}, model.onnx_data {_mb(report.data_bytes)}, "
                   f"referenced in the factored shards {_mb(report.referenced_bytes)}")
        _echo_validation(report.validation)
    for dest, backend in ((ts_dest, "torchscript"), (pt2_dest, "pt2")):
        if dest is None:
            continue
        from .torchscript import TORCHSCRIPT_NOTE, export_pt2, export_torchscript

        if backend == "torchscript":
            click.echo(f"note: {TORCHSCRIPT_NOTE}", err=True)
        fn = export_torchscript if backend == "torchscript" else export_pt2
        rep = fn(factored_dir, dest, adapter, opts)
        click.echo(f"wrote {rep.dest}: {backend}, {rep.kind}, tasks {', '.join(rep.tasks)}, {_mb(rep.bytes)} "
                   f"({rep.seconds:.1f} s)")
        _echo_validation(rep.validation)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _echo_validation(v) -> None:
    if v is None:
        click.echo("  not validated (--no-validate)")
        return
    for line in v.lines():
        click.echo("  " + line)


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
    from .ort import MoOREOrtModel

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
