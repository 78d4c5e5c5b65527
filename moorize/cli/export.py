"""`moorize export`: the routed model of a factored checkpoint as ONNX, TorchScript or .pt2, validated."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import MoorizeError
from ..exporters.options import ExportOptions
from ..lora.options import DEFAULTS as LORA_DEFAULTS
from ..lora.options import LoraOptions
from ..options import click_options, options_of
from .stages import stage_lines

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
@click.option("--lora", "lora_dest", type=PATH, default=None, metavar="DEST",
              help="Write one PEFT LoRA adapter per task (router mode 'task') against the source model: "
                   "DEST/<task>/adapter_config.json, adapter_model.safetensors, moorize_lora.json.")
@click_options(ExportOptions)  # every export choice, as its field writes it
@click_options(LoraOptions)
def export(factored_dir: Path, adapter, onnx_dest, ts_dest, pt2_dest, lora_dest, **options) -> None:
    """Export the routed model of FACTORED_DIR for deployment, validated against PyTorch.

    Every task is served by one graph: the task is an input (task_ids, int64 [batch]).

    \b
    Examples:
      moorize export ./smollm2-moore --adapter ./adapter --onnx ./smollm2-onnx --with-past
      moorize export ./smollm2-moore --adapter ./adapter --onnx ./onnx-ref --weights reference
      moorize export ./minilm-moore --adapter ./clf-adapter --onnx ./minilm-onnx --decompose
      moorize export ./smollm2-moore --adapter ./adapter --pt2 ./smollm2.pt2
      moorize export ./smollm2-moore --adapter ./task-adapter --lora ./smollm2-lora --max-error 1e-3
    """
    with stage_lines("moorize.exporters", "export"):
        _export(factored_dir, adapter, onnx_dest, ts_dest, pt2_dest, lora_dest, options)


def _export(factored_dir: Path, adapter, onnx_dest, ts_dest, pt2_dest, lora_dest, options: dict) -> None:
    lora_names = {f.name for f, _ in options_of(LoraOptions)}
    lora = LoraOptions(**{k: v for k, v in options.items() if k in lora_names})
    opts = ExportOptions(**{k: v for k, v in options.items() if k not in lora_names})
    graphs = [d for d in (onnx_dest, ts_dest, pt2_dest) if d is not None]
    if not graphs and lora_dest is None:
        raise MoorizeError("nothing to export: pass --onnx DEST, --torchscript DEST.pt, --pt2 DEST.pt2 or --lora DEST")
    if lora_dest is None and lora != LORA_DEFAULTS:
        raise MoorizeError("--rank, --max-error, --source, --lora-dtype and --device apply to --lora only")
    if ts_dest or pt2_dest:  # before any export runs
        opts.check_file_backend()
    if not graphs:
        opts.check_lora_only()
    if lora_dest is not None:
        from ..lora.export import export_lora

        report = export_lora(factored_dir, adapter, lora_dest, lora, overwrite=opts.overwrite,
                             validate=opts.validate_export)
        for line in report.lines():
            click.echo(line)
    if onnx_dest is not None:
        from ..exporters.onnx import export_onnx

        report = export_onnx(factored_dir, onnx_dest, adapter, opts)
        op = "standard ops only" if opts.decompose else f"{report.moore_nodes} ai.moorize::MoORELinear nodes"
        click.echo(f"wrote {report.dest}: {report.kind}, tasks {', '.join(report.tasks)}, opset {opts.opset}, {op}, "
                   f"{opts.dtype}{', with past' if opts.with_past else ''} ({report.seconds:.1f} s)")
        graphs = "encoder.onnx + decoder.onnx" if report.kind == "encoder-decoder" else "graph"
        click.echo(f"  {graphs} {_mb(report.graph_bytes)}, weights written {_mb(report.data_bytes)}, "
                   f"referenced in the factored shards {_mb(report.referenced_bytes)}")
        _echo_validation(report.validation)
    for dest, backend in ((ts_dest, "torchscript"), (pt2_dest, "pt2")):
        if dest is None:
            continue
        from ..exporters.torchscript import TORCHSCRIPT_NOTE, export_pt2, export_torchscript

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
