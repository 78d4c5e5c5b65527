"""The text inputs that ``moorize run`` (ONNX Runtime) and ``moorize generate`` (PyTorch) share, written once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click

from ..errors import MoorizeError
from ..options import check_options, option
from ..selectors import require_name

PATH = click.Path(path_type=Path, readable=False)  # moorize says what is wrong in one line


def read_jsonl_inputs(path: Path) -> list[dict]:
    """Rows of {"prompt"|"text": str, optional "task"} from JSONL (or a .json array); errors name file:line."""
    if not path.is_file():
        raise MoorizeError(f"input file {path} does not exist")
    from ..io.jsonfiles import json_records

    rows = []
    for where, row in json_records(path):
        text = row.get("prompt", row.get("text")) if isinstance(row, dict) else None
        if not isinstance(text, str):
            raise MoorizeError(f'{where}: needs a "prompt" (or "text") string')
        rows.append({"text": text, "task": row.get("task")})
    if not rows:
        raise MoorizeError(f"{path} has no rows")
    return rows


@dataclass
class TextInputOptions:
    """Prompts, their tasks and the decoding choices."""

    task: str | None = option(None, help="Task name (required when the model has several).")
    prompts: list[str] | None = option(None, multiple=True, flag="prompt", help="Input text; repeatable (one batch).")
    input_file: Path | None = option(None, flag="input", cli_type=PATH,
                                     help='JSONL file, one {"prompt": ..., "task": optional} per line (or a .json array of them).')
    max_new_tokens: int = option(32, kind=int, low=1, help="Tokens to generate at most.")
    do_sample: bool = option(False, help="Sample instead of greedy decoding.")
    temperature: float = option(1.0, kind=float, low=0.0, low_open=True, help="Sampling temperature.")
    top_p: float = option(1.0, kind=float, low=0.0, high=1.0, low_open=True,
                          help="Nucleus sampling: the smallest set of tokens whose probability reaches top_p.")
    seed: int | None = option(None, kind=int, low=0, help="Sampling seed.")
    num_beams: int = option(1, kind=int, low=1, help="Beam search over this many beams (1: greedy or sampling), "
                                                     "choosing what transformers' generate chooses.")

    def __post_init__(self) -> None:
        check_options(self)
        from ..runtime.beam import check_beams

        check_beams(self.num_beams, self.do_sample)  # for moorize generate too, before any model loads


def read_inputs(o: TextInputOptions) -> tuple[list[str], list[str | None]]:
    """The texts and each one's task (a row's own, else --task), from --prompt or --input."""
    prompts = o.prompts or []
    if bool(prompts) == bool(o.input_file):
        raise MoorizeError("give the inputs with --prompt TEXT (repeatable) or --input FILE.jsonl, not both")
    rows = read_jsonl_inputs(o.input_file) if o.input_file else [{"text": p, "task": None} for p in prompts]
    return [r["text"] for r in rows], [r["task"] if r["task"] is not None else o.task for r in rows]


def check_tasks(o: TextInputOptions, tasks: list[str | None], known: list[str]) -> list[str]:
    """Every row's task (--task's, or its own in --input), named and one of ``known``, before any work."""
    out = []
    for t in tasks:
        if t is None:
            if len(known) != 1:
                raise MoorizeError(f"this model has several tasks: choose one with --task ({', '.join(known)})")
            t = known[0]
        out.append(require_name("--task" if t == o.task else f"in {o.input_file}", t, known, noun="task"))
    return out
