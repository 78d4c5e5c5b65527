"""Per-row losses of a batch (causal LM or classification) and the per-task evaluation built on them."""

from __future__ import annotations

import functools
import inspect
import logging

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX, TaskTable, collate

log = logging.getLogger(__name__)


def _forward(module, batch: dict, kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: summed loss, what it is averaged over, and whether the row is right.

    Causal: a row is right when the arg-max at every response position is the label.
    That is exactly "greedy decoding from the prompt reproduces the response and its
    EOS", so exact match needs no generation loop.
    """
    if kind == "causal":
        return causal_losses(module, batch, task_ids=batch["task_ids"])
    logits = module(batch["input_ids"], batch["attention_mask"], batch["task_ids"])
    loss = F.cross_entropy(logits.float(), batch["label"], reduction="none")
    return loss, torch.ones_like(loss), logits.argmax(-1) == batch["label"]


def _keeps_logits(module) -> bool:
    """Whether the (possibly DDP-wrapped or compiled) causal LM can compute logits for chosen positions only."""
    for wrapper in ("_orig_mod", "module", "_orig_mod"):  # torch.compile, DDP, in either order
        module = getattr(module, wrapper, module)
    return _forward_takes_logits_to_keep(type(module))


@functools.lru_cache(maxsize=None)
def _forward_takes_logits_to_keep(cls: type) -> bool:
    """Per model class, inspected once rather than on every micro-batch."""
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def causal_losses(model, batch: dict, keep_logits: bool | None = None, **extra):
    """``row_losses`` of a causal-LM batch (``input_ids``, ``attention_mask``, ``labels``).

    Only positions that predict a label go through the vocabulary projection and its softmax
    (``logits_to_keep``; ``keep_logits=None``: when the model's forward takes it): with prompt masking
    most positions predict none, and on a small model the projection is much of a step's time and memory.
    """
    labels = batch["labels"]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], **extra}
    if not (_keeps_logits(model) if keep_logits is None else keep_logits):
        return causal_row_losses(model(**inputs).logits, labels)
    keep = (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero().squeeze(1)
    return row_losses(model(**inputs, logits_to_keep=keep).logits, labels[:, 1:][:, keep])


def row_losses(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row, for logits aligned with their targets: summed loss on the labelled tokens, their count, and
    whether the arg-max is right at every one of them."""
    mask = targets != IGNORE_INDEX
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="none").view_as(targets)
    right = ((logits.argmax(-1) == targets) | ~mask).all(1)
    return loss.sum(1), mask.sum(1), right


def causal_row_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of a causal-LM batch (logits at every position): next-token loss on the labelled tokens,
    their count, exact match."""
    return row_losses(logits[:, :-1], labels[:, 1:])




# ---- evaluation --------------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(module, items: list[dict], table: TaskTable, kind: str, batch_size: int, pad_id: int,
             device, accelerator=None) -> dict[str, dict[str, float]]:
    """Per task: ``loss`` (per token / per example) and ``exact_match`` (causal) or ``accuracy``."""
    was_training = module.training
    module.eval()
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    mine = sorted(items[rank::world], key=lambda i: len(i["input_ids"]))
    sums = torch.zeros(len(table.tasks), 4, dtype=torch.float64, device=device)  # loss, weight, right, rows
    for start in range(0, len(mine), batch_size):
        batch = {k: v.to(device) for k, v in collate(mine[start:start + batch_size], pad_id).items()}
        loss, weight, right = _forward(module, batch, kind)
        rows = torch.stack([loss.double(), weight.double(), right.double(), torch.ones_like(loss).double()], 1)
        sums.index_add_(0, batch["task_ids"], rows)
    if accelerator is not None and world > 1:
        sums = accelerator.reduce(sums, "sum")
    module.train(was_training)
    score = "exact_match" if kind == "causal" else "accuracy"
    return {task: {"loss": float(s[0] / s[1]), score: float(s[2] / s[3]), "examples": int(s[3])}
            for task, s in zip(table.tasks, sums.cpu()) if s[3] > 0}


