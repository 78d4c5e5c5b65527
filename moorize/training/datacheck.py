"""``moorize data check``: what a training file holds, and what in it would surprise, before any training.

The file is read exactly as ``moorize train`` reads it (so an error here is the error
training would stop on), then summarised per task: examples, lengths (characters, or
tokens of a checkpoint's tokenizer), labels; and the problems that do not stop training
but spoil it: duplicates, a prompt seen with two answers, prompts ending in whitespace
(the user must type it too), examples over ``--max-length``, a task with few examples.
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .data import Example, read_examples

FEW_EXAMPLES = 8  # below this a task's evaluation and exact match say little


@dataclass
class TaskSummary:
    task: str
    examples: int
    lengths: dict[str, tuple[int, int, int]]  # field -> (min, median, max)
    labels: dict[str, int] = field(default_factory=dict)


@dataclass
class DataReport:
    paths: list[Path]
    kind: str
    unit: str  # "chars" or "tokens"
    tasks: list[TaskSummary]
    problems: list[str]

    @property
    def examples(self) -> int:
        return sum(t.examples for t in self.tasks)

    def lines(self) -> list[str]:
        kind = "prompt/response (language modelling)" if self.kind == "causal" else "text/label (classification)"
        out = [f"{', '.join(map(str, self.paths))}: {self.examples} examples, {kind}, {len(self.tasks)} task(s)"]
        fields = list(self.tasks[0].lengths)
        header = ["task", "examples"] + [f"{f} {self.unit} min/median/max" for f in fields]
        if self.kind == "classification":
            header.append("labels (examples)")
        rows = []
        for t in self.tasks:
            row = [t.task, str(t.examples)] + ["/".join(map(str, t.lengths[f])) for f in fields]
            if self.kind == "classification":
                row.append(", ".join(f"{k} ({v})" for k, v in t.labels.items()))
            rows.append(row)
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
        out.append("problems: none" if not self.problems else f"problems ({len(self.problems)}):")
        out += [f"  - {p}" for p in self.problems]
        return out


def _spread(values: list[int]) -> tuple[int, int, int]:
    return min(values), int(statistics.median(values)), max(values)


def _where(examples: list[Example], limit: int = 3) -> str:
    shown = ", ".join(e.where for e in examples[:limit])
    return shown + (f" and {len(examples) - limit} more" if len(examples) > limit else "")


def _trained_length(tokenizer, e: Example) -> int:
    """Tokens of the example as training encodes it: the prompt (or text) with special tokens, the response
    without them, and the end-of-sequence token after it."""
    if e.kind != "causal":
        return len(tokenizer(e.text)["input_ids"])
    eos = 1 if tokenizer.eos_token_id is not None else 0
    return (len(tokenizer(e.prompt)["input_ids"]) + len(tokenizer(e.response, add_special_tokens=False)["input_ids"])
            + eos)


def check_data(paths, tokenizer=None, max_length: int | None = None) -> DataReport:
    """Read ``paths`` as training does and report per task; ``tokenizer`` measures lengths in its tokens."""
    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    examples = read_examples(paths)
    kind = examples[0].kind
    fields = ("prompt", "response") if kind == "causal" else ("text",)

    def length(text: str) -> int:
        if tokenizer is None:
            return len(text)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    by_task: dict[str, list[Example]] = defaultdict(list)
    for e in examples:
        by_task[e.task].append(e)
    problems: list[str] = []
    tasks = []
    for task, rows in by_task.items():
        lengths = {f: [length(getattr(e, f)) for e in rows] for f in fields}
        labels = dict(sorted(Counter(e.label for e in rows).items())) if kind == "classification" else {}
        tasks.append(TaskSummary(task, len(rows), {f: _spread(v) for f, v in lengths.items()}, labels))
        if len(rows) < FEW_EXAMPLES:
            problems.append(f"task {task!r} has only {len(rows)} example(s)")
        key = (lambda e: (e.prompt, e.response)) if kind == "causal" else (lambda e: (e.text, e.label))
        seen: dict[tuple, list[Example]] = defaultdict(list)
        for e in rows:
            seen[key(e)].append(e)
        dups = [group[1:] for group in seen.values() if len(group) > 1]
        if dups:
            flat = [e for group in dups for e in group]
            problems.append(f"task {task!r}: {len(flat)} duplicate example(s) ({_where(flat)})")
        inputs: dict[str, set] = defaultdict(set)
        firsts: dict[str, Example] = {}
        for e in rows:
            text = e.prompt if kind == "causal" else e.text
            inputs[text].add(e.response if kind == "causal" else e.label)
            firsts.setdefault(text, e)
        conflicting = [firsts[t] for t, answers in inputs.items() if len(answers) > 1]
        if conflicting:
            problems.append(f"task {task!r}: {len(conflicting)} input(s) with different answers "
                            f"({_where(conflicting)})")
        if kind == "causal":
            trailing = [e for e in rows if e.prompt != e.prompt.rstrip()]
            if trailing:
                problems.append(f"task {task!r}: {len(trailing)} prompt(s) end in whitespace or a newline "
                                f"({_where(trailing)}): a prompt typed without it is not the one trained on")
        if tokenizer is not None and max_length:
            total = [_trained_length(tokenizer, e) for e in rows]
            over = [rows[i] for i, n in enumerate(total) if n > max_length]
            if over:
                problems.append(f"task {task!r}: {len(over)} example(s) over --max-length {max_length} tokens "
                                f"({_where(over)}): train cuts them (--truncate) or refuses (--no-truncate)")
    if kind == "classification":
        for t in tasks:
            if len(t.labels) < 2:
                problems.append(f"task {t.task!r} has a single label ({', '.join(t.labels)}): nothing to tell apart")
    return DataReport(paths, kind, "tokens" if tokenizer is not None else "chars", tasks, problems)
