"""What every step of a run trains on: the examples read and encoded, the held-out share split off, and
the plan of micro-batches per step, a pure function of (seed, step) so that ``--resume`` continues exactly."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from ..errors import MoorizeError
from .data import IGNORE_INDEX, Example, TaskTable, encode, length_grouped_batches, read_examples
from .options import TrainOptions


def split_eval(examples: list[Example], share: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out ``share`` of every task (at least one example each), seeded."""
    rng = random.Random(seed)
    by_task: dict[str, list[Example]] = {}
    for e in examples:
        by_task.setdefault(e.task, []).append(e)
    train, held = [], []
    for task, items in by_task.items():
        items = items[:]
        rng.shuffle(items)
        k = max(1, round(share * len(items)))
        if k >= len(items):
            raise MoorizeError(f"task {task!r} has {len(items)} example(s): too few to hold out {share:.0%} for eval")
        held += items[:k]
        train += items[k:]
    return train, held

@dataclass
class RunData:
    kind: str
    table: TaskTable
    train: list[dict]
    eval: list[dict]

def load_data(data, eval_data, tokenizer, opts: TrainOptions) -> RunData:
    examples = read_examples(data)
    if eval_data is not None:
        held = read_examples(eval_data)
        if held[0].kind != examples[0].kind:
            raise MoorizeError(f"{held[0].where}: eval data is {held[0].kind}, training data is {examples[0].kind}")
    elif opts.eval_split > 0:
        examples, held = split_eval(examples, opts.eval_split, opts.seed)
    else:
        held = []
    table = TaskTable.from_examples(examples)  # unknown tasks/labels in eval data fail with their file:line
    enc = dict(tokenizer=tokenizer, table=table, max_length=opts.max_length, truncate=opts.truncate,
               chat_template=opts.chat_template)
    if opts.eval_max_examples:
        held = first_per_task(held, opts.eval_max_examples)
    return RunData(examples[0].kind, table, encode(examples, **enc), encode(held, **enc))

def first_per_task(examples: list[Example], cap: int) -> list[Example]:
    seen: dict[str, int] = {}
    out = []
    for e in examples:
        if seen.get(e.task, 0) < cap:
            seen[e.task] = seen.get(e.task, 0) + 1
            out.append(e)
    return out

def item_weight(item: dict) -> int:
    """What the loss of an item is averaged over: its label tokens (causal) or 1 (classification)."""
    labels = item.get("labels")
    return 1 if labels is None else sum(1 for x in labels[1:] if x != IGNORE_INDEX)

class StepPlan:
    """Which items every micro-batch of every step holds: a pure function of (seed, step)."""

    def __init__(self, items: list[dict], opts: TrainOptions, world: int):
        self.items, self.opts, self.world = items, opts, world
        self.lengths = [len(i["input_ids"]) for i in items]
        self.per_step = opts.grad_accum * world  # micro-batches per optimizer step, all ranks
        self.steps_per_epoch = len(self._epoch(0)) // self.per_step
        if self.steps_per_epoch == 0:
            raise MoorizeError(f"{len(items)} training examples make less than one step of {self.per_step} "
                               f"micro-batches of {opts.batch_size}: lower --batch-size or --grad-accum")
        self.total = opts.max_steps or max(1, math.ceil(opts.epochs * self.steps_per_epoch))
        self._cache: dict[int, list[list[int]]] = {}

    def _epoch(self, epoch: int) -> list[list[int]]:
        return length_grouped_batches(self.lengths, self.opts.batch_size, self.opts.seed + epoch)

    def step(self, step: int, rank: int) -> tuple[list[list[int]], int]:
        """(this rank's micro-batches, loss normaliser of the whole step across ranks)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch not in self._cache:
            self._cache = {epoch: self._epoch(epoch)}
        chunk = self._cache[epoch][k * self.per_step:(k + 1) * self.per_step]
        denom = sum(item_weight(self.items[i]) for b in chunk for i in b)
        return chunk[rank::self.world], max(denom, 1)

    def epoch_of(self, step: int) -> float:
        return step / self.steps_per_epoch


