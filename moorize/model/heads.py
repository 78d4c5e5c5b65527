"""Classification heads per task, on top of a routed model, saved with the adapter.

For ``text``/``label`` data every task gets its own linear head over a pooled hidden
state (mean over the attention mask for encoders, the last real token for decoders).
The heads of all tasks are stacked into one ``[tasks, max_labels, hidden]`` weight so
a batch that mixes tasks is one gather and one batched matmul (and exports as such);
label slots beyond a task's own count score ``PAD_LOGIT`` and are never predicted.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import MoorizeError
from ..selectors import require_matches, require_name
from .adapter import HEADS_PREFIX, read_adapter, read_adapter_config
from .routed import load, use_task

POOLINGS = ("mean", "cls", "last")
PAD_LOGIT = -1e4  # score of label slots a task does not have (finite: exports and fp16 stay clean)


def default_pooling(model) -> str:
    """Mean pooling for encoders (sentence-embedding practice), last token for decoders (causal attention)."""
    return "last" if getattr(model.config, "is_decoder", False) or hasattr(model, "generate") else "mean"


class TaskHeads(nn.Module):
    """One linear classifier per task over a pooled hidden state."""

    def __init__(self, hidden_size: int, tasks: list[str], labels: dict[str, list[str]], pooling: str = "mean",
                 seed: int = 0):
        super().__init__()
        require_name("--pooling", pooling, POOLINGS, noun="pooling")
        require_matches("labels", labels, tasks, noun="task")  # a label set for no task would be dropped silently
        missing = [t for t in tasks if not labels.get(t)]
        if missing:
            raise MoorizeError(f"classification tasks without labels: {', '.join(missing)}")
        self.tasks, self.labels, self.pooling = list(tasks), {t: list(labels[t]) for t in tasks}, pooling
        width = max(len(v) for v in self.labels.values())
        gen = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(hidden_size)  # nn.Linear's default range
        self.weight = nn.Parameter((torch.rand(len(tasks), width, hidden_size, generator=gen) * 2 - 1) * bound)
        self.bias = nn.Parameter(torch.zeros(len(tasks), width))
        valid = torch.zeros(len(tasks), width, dtype=torch.bool)
        for i, t in enumerate(tasks):
            valid[i, : len(self.labels[t])] = True
        self.register_buffer("valid", valid, persistent=False)

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.to(hidden.dtype)
        if self.pooling == "mean":
            return (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)
        # last real token, whichever side the padding is on
        positions = torch.arange(hidden.shape[1], device=hidden.device)
        last = (attention_mask.long() * positions).argmax(1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(hidden, attention_mask).to(self.weight.dtype)
        logits = torch.einsum("bh,blh->bl", pooled, self.weight[task_ids]) + self.bias[task_ids]
        return logits.masked_fill(~self.valid[task_ids], PAD_LOGIT)

    # ---- adapter round trip ----------------------------------------------------------------------
    def describe(self) -> dict:
        """What adapter_config.json records of the heads."""
        return {"pooling": self.pooling, "hidden_size": self.weight.shape[2], "labels": self.labels}

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """Adapter key -> parameter."""
        return {f"{HEADS_PREFIX}weight": self.weight, f"{HEADS_PREFIX}bias": self.bias}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {k: p.detach() for k, p in self.adapter_parameters().items()}

    @classmethod
    def from_adapter(cls, meta: dict, tensors: dict[str, torch.Tensor], tasks: list[str]) -> "TaskHeads":
        heads = cls(meta["hidden_size"], tasks, meta["labels"], meta["pooling"])
        with torch.no_grad():
            for name in ("weight", "bias"):
                t = tensors.get(HEADS_PREFIX + name)
                p = getattr(heads, name)
                if t is None or t.shape != p.shape:
                    raise MoorizeError(f"adapter heads: {HEADS_PREFIX + name} is missing or has the wrong shape")
                p.copy_(t)
        return heads


class MoOREClassifier(nn.Module):
    """A routed model plus its task heads: ``forward(input_ids, attention_mask, task_ids) -> logits``.

    logits are ``[batch, max_labels]``; ``labels[task][i]`` names column i of that task.
    """

    def __init__(self, model: nn.Module, heads: TaskHeads):
        super().__init__()
        self.model, self.heads = model, heads
        self.tasks, self.labels = heads.tasks, heads.labels

    def task_ids_for(self, task_ids, batch: int, device) -> torch.Tensor:
        """Validated ids [batch] (names or ids; None: the model's default task)."""
        state = self.model.moore.routing
        if task_ids is None:
            return state.current(batch, device)
        ids = state.resolve(task_ids)
        if ids.numel() != batch:
            raise MoorizeError(f"task_ids has {ids.numel()} entries for a batch of {batch}")
        return ids.to(device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                task_ids: torch.Tensor | None = None) -> torch.Tensor:

        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        ids = self.task_ids_for(task_ids, input_ids.shape[0], input_ids.device)
        with use_task(self.model, ids):
            hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.heads(hidden, attention_mask, ids)

    def predict(self, input_ids, attention_mask=None, task_ids=None) -> list[str]:
        """Label names of the arg-max class, per row."""
        ids = self.task_ids_for(task_ids, input_ids.shape[0], input_ids.device)
        with torch.no_grad():
            logits = self(input_ids, attention_mask, ids)
        return [self.labels[self.tasks[t]][int(k)] for t, k in zip(ids.tolist(), logits.argmax(-1))]


def load_classifier(directory, adapter, *, dtype: torch.dtype | None = None) -> MoOREClassifier:
    """The routed model of a factored checkpoint with the trained routers and task heads of ``adapter``."""

    model = load(directory, adapter, dtype=dtype)
    meta = read_adapter_config(adapter)
    if "heads" not in meta:
        raise MoorizeError(f"adapter {adapter} has no classification heads (it was trained on prompt/response data)")
    _, tensors = read_adapter(adapter)
    heads = TaskHeads.from_adapter(meta["heads"], tensors, model.moore.config.tasks)
    if dtype is not None:
        heads.to(dtype)
    return MoOREClassifier(model, heads).eval()
