"""Multi-task training data: JSONL/JSON/CSV/TSV readers, tokenisation, collation, length-grouped batches.

Every example names its ``task`` and is either causal-LM (``prompt`` + ``response``:
the loss is on the response tokens only) or classification (``text`` + ``label``: a
head per task). Bad data fails with the file and line it came from. Files are decoded by
``io.textfiles``, so what spreadsheets and editors save (byte-order marks, UTF-16, CRLF) reads.
"""

from __future__ import annotations

import csv
import itertools
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from ..errors import MoorizeError
from ..io import textfiles
from ..io.jsonfiles import json_records
from ..selectors import require_name

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value the loss skips (prompt and padding tokens)


@dataclass(frozen=True)
class Example:
    task: str
    where: str  # "file:line", for error messages
    prompt: str | None = None
    response: str | None = None
    text: str | None = None
    label: str | None = None

    @property
    def kind(self) -> str:
        return "causal" if self.prompt is not None else "classification"


def _example(record: object, where: str) -> Example:
    if not isinstance(record, dict):
        raise MoorizeError(f"{where}: expected an object with 'task' and prompt/response or text/label fields")
    task = record.get("task")
    if task is None or str(task).strip() == "":
        raise MoorizeError(f"{where}: missing field 'task'")
    has_causal = "prompt" in record or "response" in record
    has_cls = "text" in record or "label" in record
    if has_causal == has_cls:
        raise MoorizeError(f"{where}: needs either 'prompt' and 'response' (language modelling) "
                           "or 'text' and 'label' (classification)")
    fields = ("prompt", "response") if has_causal else ("text", "label")
    for f in fields:
        if record.get(f) is None or (f != "label" and str(record[f]) == ""):
            raise MoorizeError(f"{where}: missing field {f!r}")
    values = {f: str(record[f]) for f in fields}
    return Example(task=str(task), where=where, **values)


# A token covers at most this many characters in practice; a text this many times longer than the token
# budget is tokenised from a prefix (tokenising a 10 MB line whole takes gigabytes).
CHARS_PER_TOKEN_BOUND = 32
_TOKEN_MARGIN = 16  # tokens past the budget kept from a prefix: the cut word only changes the last few


SAVE_AS = "CSV UTF-8 or JSONL"  # what an unreadable data file should be saved as
TABLE_SUFFIXES = (".csv", ".tsv", ".tab")
_DELIMITERS = (",", "\t", ";")  # in this order, the first in a .csv header separates (Excel writes ";" in some locales)


def _read_jsonl(path: Path) -> Iterator[Example]:
    for where, record in json_records(path, SAVE_AS):
        yield _example(record, where)


def _read_table(path: Path) -> Iterator[Example]:
    """CSV, or TSV (``.tsv``/``.tab``, or a header separated by tabs or ";" but no commas): a header line, then
    one example per row; rows with nothing but separators and blanks (spreadsheets write them) are skipped."""
    csv.field_size_limit(textfiles.MAX_RECORD_CHARS)
    lines = textfiles.text_lines(path, SAVE_AS)
    header, skipped = next(lines, None), 0  # skipped: blank lines above the header
    while header is not None and not header.strip():
        header, skipped = next(lines, None), skipped + 1
    if header is None:
        return
    tab = path.suffix.lower() in (".tsv", ".tab")
    delimiter = "\t" if tab else next((d for d in _DELIMITERS if d in header), ",")
    reader = csv.DictReader(itertools.chain([header], lines), delimiter=delimiter)
    rows = 0
    try:
        reader.fieldnames = [name.strip() for name in reader.fieldnames]
        for record in reader:
            clean = {k: v for k, v in record.items() if k is not None and v not in (None, "")}
            if all(not v.strip() for v in clean.values() if isinstance(v, str)):
                continue
            rows += 1
            yield _example(clean, f"{path}:{reader.line_num + skipped}")
    except csv.Error as e:
        raise MoorizeError(f"{path}:{reader.line_num + skipped}: invalid CSV ({e})") from None
    if not rows:
        raise MoorizeError(f"{path} has a header line ({', '.join(reader.fieldnames)}) but no examples under it")


def _is_table(path: Path) -> bool:
    """By suffix; a ``.txt`` is a table unless it starts as JSON (Excel's "Unicode Text" is tab-separated .txt)."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return textfiles.first_char(textfiles.text_chunks(path, SAVE_AS))[0] not in ("{", "[", "")
    return suffix in TABLE_SUFFIXES


def read_examples(paths: list[str | Path] | str | Path) -> list[Example]:
    """Read one or more files, all of one kind: JSONL (``.jsonl``, ``.json``: or one JSON array), CSV (``.csv``),
    TSV (``.tsv``, ``.tab``; or ``.txt`` that is not JSON)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    examples: list[Example] = []
    for p in map(Path, paths):
        if not p.is_file():
            raise MoorizeError(f"data file {p} does not exist")
        got = list((_read_table if _is_table(p) else _read_jsonl)(p))
        if not got:
            raise MoorizeError(f"{p} has no examples")
        examples.extend(got)
    kinds = {e.kind for e in examples}
    if len(kinds) > 1:
        first = next(e for e in examples if e.kind != examples[0].kind)
        raise MoorizeError(f"{first.where}: mixes classification and language-modelling examples; "
                           "use one kind per training run")
    return examples


@dataclass
class TaskTable:
    """Task names -> ids (order of first appearance) and, for classification, label names -> ids per task."""

    tasks: list[str]
    labels: dict[str, list[str]]

    @classmethod
    def from_examples(cls, examples: list[Example]) -> "TaskTable":
        tasks: dict[str, None] = {}
        labels: dict[str, dict[str, None]] = {}
        for e in examples:
            tasks.setdefault(e.task, None)
            if e.label is not None:
                labels.setdefault(e.task, {}).setdefault(e.label, None)
        return cls(list(tasks), {t: sorted(ls, key=_label_order) for t, ls in labels.items()})

    def task_id(self, e: Example) -> int:
        """The id of an example's task, one the training data names (eval data may name no other)."""
        return self.tasks.index(require_name(None, e.task, self.tasks, noun="task", where=e.where,
                                             plural="the training data's tasks"))

    def label_id(self, e: Example) -> int:
        known = self.labels.get(e.task, [])
        return known.index(require_name(None, e.label, known, noun="label", where=e.where,
                                        plural=f"the {e.task!r} head's labels"))


def _label_order(label: str) -> tuple:
    """Numeric labels in numeric order ("2" < "10"), others alphabetically after them."""
    try:
        return (0, float(label), label)
    except ValueError:
        return (1, 0.0, label)


def _prompt_text(tokenizer, prompt: str, chat_template: bool) -> str:
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise MoorizeError("--chat-template: this checkpoint's tokenizer has no chat template")
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt


def encode(examples: list[Example], tokenizer, table: TaskTable, max_length: int, truncate: bool = True,
           chat_template: bool = False) -> list[dict]:
    """Tokenise examples into dicts of ``input_ids``, ``labels`` (causal) or ``label`` (classification), ``task_id``.

    Causal LM: labels are the response tokens (plus EOS); prompt tokens get IGNORE_INDEX.
    Over ``max_length``: truncated with a warning when ``truncate``, else an error.
    """
    out: list[dict] = []
    truncated = 0
    for e in examples:
        task_id = table.task_id(e)
        budget = max_length + _TOKEN_MARGIN
        if e.kind == "causal":
            p_ids = token_ids(tokenizer, _prompt_text(tokenizer, e.prompt, chat_template), budget,
                              add_special_tokens=not chat_template)
            r_ids = token_ids(tokenizer, e.response, budget, add_special_tokens=False)
            if tokenizer.eos_token_id is not None:
                r_ids.append(tokenizer.eos_token_id)
            ids = p_ids + r_ids
            labels = [IGNORE_INDEX] * len(p_ids) + r_ids
            item = {"input_ids": ids, "labels": labels, "task_id": task_id}
        else:
            ids = token_ids(tokenizer, e.text, budget)
            item = {"input_ids": ids, "label": table.label_id(e), "task_id": task_id}
        if len(ids) > max_length:
            if not truncate:
                in_part = any(len(t) > budget * CHARS_PER_TOKEN_BOUND for t in (e.prompt, e.response, e.text) if t)
                part = " (counted in its first part)" if in_part else ""
                raise MoorizeError(f"{e.where}: {len(ids)} tokens{part} exceed the maximum of {max_length} "
                                   "(raise --max-length or pass --truncate)")
            truncated += 1
            item["input_ids"] = ids[:max_length]
            if "labels" in item:
                item["labels"] = item["labels"][:max_length]
        if "labels" in item and all(x == IGNORE_INDEX for x in item["labels"]):
            raise MoorizeError(f"{e.where}: the prompt fills all {max_length} tokens, no response is left to learn")
        out.append(item)
    if truncated:
        log.warning("truncated %d of %d examples to %d tokens", truncated, len(examples), max_length)
    return out


def token_ids(tokenizer, text: str, budget: int, **kwargs) -> list[int]:
    """Token ids of ``text``, bounded in work and memory: a text far longer than ``budget`` tokens can span
    is tokenised from a prefix, whose first ``budget`` tokens are the text's own."""
    cut = budget * CHARS_PER_TOKEN_BOUND
    if len(text) > cut:
        ids = list(tokenizer(text[:cut], **kwargs)["input_ids"])
        if len(ids) > budget:
            return ids
    return list(tokenizer(text, **kwargs)["input_ids"])


def collate(items: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids/attention_mask, labels (padded with IGNORE_INDEX) or label, task_ids."""
    n = max(len(i["input_ids"]) for i in items)
    ids = torch.full((len(items), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), n), dtype=torch.long)
    for row, item in enumerate(items):
        k = len(item["input_ids"])
        ids[row, :k] = torch.tensor(item["input_ids"])
        mask[row, :k] = 1
    batch = {"input_ids": ids, "attention_mask": mask,
             "task_ids": torch.tensor([i["task_id"] for i in items], dtype=torch.long)}
    if "labels" in items[0]:
        labels = torch.full((len(items), n), IGNORE_INDEX, dtype=torch.long)
        for row, item in enumerate(items):
            labels[row, : len(item["labels"])] = torch.tensor(item["labels"])
        batch["labels"] = labels
    else:
        batch["label"] = torch.tensor([i["label"] for i in items], dtype=torch.long)
    return batch


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, group: int = 50) -> list[list[int]]:
    """Batches of indices with similar lengths (less padding), in a seeded random order.

    Indices are shuffled, cut into mega-batches of ``group`` batches, sorted by length
    inside each, split into batches, and the batches shuffled again.
    """
    if batch_size < 1:
        raise MoorizeError(f"batch size must be positive, got {batch_size}")
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    mega = batch_size * group
    batches: list[list[int]] = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start:start + mega], key=lambda i: lengths[i], reverse=True)
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches
