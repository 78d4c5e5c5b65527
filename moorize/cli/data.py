"""`moorize data check`: a training file read as `moorize train` reads it, summarised, its problems named."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import click

from ..errors import MoorizeError
from .inputs import PATH


@click.group()
def data() -> None:
    """Check training data before training on it."""


@data.command()
@click.argument("files", type=PATH, nargs=-1, required=True)
@click.option("--tokenizer", "tokenizer_dir", type=PATH, default=None,
              help="A factored checkpoint or model directory: lengths in its tokens (default: characters).")
@click.option("--max-length", type=click.IntRange(min=1), default=None,
              help="Report examples over this many tokens (with --tokenizer; default: train's --max-length).")
@click.option("--strict", is_flag=True, help="Exit 1 when a problem is found (for scripts and CI).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def check(files: tuple[Path, ...], tokenizer_dir: Path | None, max_length: int | None, strict: bool,
          as_json: bool) -> None:
    """Summarise FILES (JSONL, a JSON array, CSV or TSV) per task and name what would spoil training.

    Reads the files exactly as moorize train does, so a malformed line fails here with
    the same file:line message. Reports examples, lengths and labels per task, and the
    problems that do not stop training: duplicates, one input with two answers, prompts
    ending in whitespace, examples over the length limit, tasks with few examples.

    \b
    Examples:
      moorize data check examples/data/tasks.jsonl
      moorize data check train.jsonl eval.jsonl --tokenizer smollm2-moore/ --max-length 256
    """
    from ..training.datacheck import check_data
    from ..training.options import TrainOptions

    tokenizer = None
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        if not tokenizer_dir.is_dir():
            raise MoorizeError(f"--tokenizer {tokenizer_dir} is not a directory")
        try:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        except Exception as e:  # noqa: BLE001 - whatever the tokenizer's failure, the user gets one line
            raise MoorizeError(f"--tokenizer {tokenizer_dir}: no usable tokenizer there ({type(e).__name__})") from None
    report = check_data(list(files), tokenizer, max_length or TrainOptions().max_length)
    if as_json:
        click.echo(json.dumps({"files": [str(p) for p in report.paths], "kind": report.kind, "unit": report.unit,
                               "examples": report.examples, "tasks": [asdict(t) for t in report.tasks],
                               "problems": report.problems}, indent=2))
    else:
        for line in report.lines():
            click.echo(line)
    if strict and report.problems:
        raise SystemExit(1)
