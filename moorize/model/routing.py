"""Which task each row of a forward pass belongs to: validated once where ids enter, read by every layer.

Task ids arrive from the caller (``forward(task_ids=...)``, ``generate``, the trainer, the server)
and are checked there, on the host values the caller gave. The layers never read a tensor's value
back (a host sync stalls a GPU stream and breaks CUDA graphs and ``torch.compile``): what they need
of the values, whether the whole batch is one task, is decided here from the host copy. The tensors
the layers share (the ids on the model's device, one per token, and their one-hot matrix) are made
once per forward pass, not once per layer.
"""

from __future__ import annotations

import contextlib

import torch

from ..errors import MoorizeError
from ..selectors import require_name


class Routing:
    """The task of each row of one layer input's first dimension.

    ``uniform`` is the task id when every row has it (known on the host), else None; ``ids`` is the
    [rows] LongTensor on the input's device. Token-level tensors are made on first use and kept.
    """

    __slots__ = ("ids", "uniform", "_memo")

    def __init__(self, ids: torch.Tensor, uniform: int | None):
        self.ids, self.uniform, self._memo = ids, uniform, {}

    def token_ids(self, per_row: int) -> torch.Tensor:
        """[rows * per_row]: each row's id repeated over its tokens (rows are batch-major)."""
        if per_row == 1:
            return self.ids
        key = ("ids", per_row)
        if key not in self._memo:  # output_size given: no host sync to size the result
            self._memo[key] = self.ids.repeat_interleave(per_row, output_size=self.ids.numel() * per_row)
        return self._memo[key]

    def onehot(self, per_row: int, tasks: int, dtype: torch.dtype) -> torch.Tensor:
        """[rows * per_row, tasks] in ``dtype``: a gate table's rows for every token are ``onehot @ table``
        (exact: one 1 and zeros per row), and the table's gradient is ``onehotᵀ @ grad`` (one matmul)."""
        key = ("onehot", per_row, tasks, dtype)
        if key not in self._memo:
            ids = self.token_ids(per_row)
            self._memo[key] = (ids.unsqueeze(1) == torch.arange(tasks, device=ids.device)).to(dtype)
        return self._memo[key]


class RoutingState:
    """The task ids of the current forward pass, shared by every MoORE layer of one model."""

    def __init__(self, tasks: list[str]):
        self.tasks = {name: i for i, name in enumerate(tasks)}
        self._task_ids: torch.Tensor | None = None  # this forward's ids
        self.uniform: int | None = None  # the one task of every row of task_ids, when known on the host
        self.sticky: torch.Tensor | None = None  # ids set for a whole block (generate, use_task)
        self.default: int | None = 0 if len(tasks) == 1 else None
        self._shared: dict = {}  # (rows, device) -> Routing of this forward pass
        self.recomputing = False  # inside a gradient checkpoint's recompute (routed._routing_contexts)

    @property
    def task_ids(self) -> torch.Tensor | None:
        return self._task_ids

    @task_ids.setter
    def task_ids(self, ids: torch.Tensor | None) -> None:
        self._task_ids, self._shared = ids, {}
        # host values are read only where they are on the host already (a CPU tensor): no device sync
        host = ids.tolist() if ids is not None and ids.device.type == "cpu" and not torch.compiler.is_compiling() \
            else None
        self.uniform = host[0] if host and all(t == host[0] for t in host) else None

    def task_id(self, task: str | int, flag: str = "task_ids") -> int:
        """The id of a task name (exactly as the model names it) or a checked id; ``flag`` names the argument."""
        if isinstance(task, int):
            if not 0 <= task < len(self.tasks):
                raise MoorizeError(f"task id {task} out of range: the model has {len(self.tasks)} task(s)")
            return task
        return self.tasks[require_name(flag, task, self.tasks, noun="task")]

    def resolve(self, task_ids) -> torch.Tensor | None:
        """Validate what the caller passed as ``task_ids`` (ids, names, or None for the default).

        The check reads the caller's values once, here: free for names, lists and CPU tensors; a tensor
        on an accelerator is read back once per call (pass CPU ids, as the trainer and generate do, to
        avoid even that). Inside ``torch.compile`` a tensor's values are not known and are not checked:
        a compiled step takes ids its caller checked (``moorize train --compile`` checks its data)."""
        if task_ids is None:
            return None
        if isinstance(task_ids, (str, int)):
            task_ids = [task_ids]
        if isinstance(task_ids, (list, tuple)):
            task_ids = torch.tensor([self.task_id(t) for t in task_ids], dtype=torch.long)
        if not isinstance(task_ids, torch.Tensor) or task_ids.dtype not in (torch.int64, torch.int32):
            raise MoorizeError("task_ids must be a LongTensor [batch] of task ids (or a list of task names)")
        task_ids = task_ids.reshape(-1).long()
        if torch.compiler.is_compiling():  # inside a compiled graph the values are not known: checked by the caller
            return task_ids
        host = task_ids.tolist()
        if any(not 0 <= t < len(self.tasks) for t in host):
            raise MoorizeError(f"task id out of range in {host}: the model has {len(self.tasks)} "
                               f"task(s) ({', '.join(self.tasks)})")
        return task_ids

    def routing(self, batch: int, device: torch.device) -> Routing:
        """The Routing of a layer input whose first dimension is ``batch`` (made once per forward pass)."""
        key = (batch, device)
        hit = self._shared.get(key)
        if hit is None or torch.compiler.is_compiling():
            hit = Routing(self.current(batch, device), self.uniform_task())
            if not torch.compiler.is_compiling():
                self._shared[key] = hit
        return hit

    def uniform_routing(self, rows: int, device: torch.device, family: str) -> Routing:
        """The Routing of a layer that sees a subset of the batch's tokens (a per-expert module), whose rows no
        shape places: the batch's one task, or one line saying why mixed rows cannot be routed there."""
        task = self.uniform_task()
        if task is None:
            raise MoorizeError(f"{family}: its sparse-MoE experts are modules that each see a subset of the batch's "
                               "tokens, which moorize cannot route per row: give every row of a batch the same task")
        return Routing(torch.full((rows,), task, dtype=torch.long, device=device), task)

    def uniform_task(self) -> int | None:
        """The one task of every row of this forward (host-known), or None when rows differ or it is unknown."""
        return self.default if self._task_ids is None else self.uniform

    def current(self, batch: int, device: torch.device) -> torch.Tensor:
        ids = self._task_ids
        if ids is None:
            if self.default is None:
                raise MoorizeError("this model routes by task: pass task_ids= to forward/generate "
                                   f"or call model.set_default_task(name); tasks are: {', '.join(self.tasks)}")
            return torch.full((batch,), self.default, dtype=torch.long, device=device)
        if ids.numel() == batch:
            return ids.to(device)
        if ids.numel() and batch % ids.numel() == 0:  # generate's beam / num_return_sequences expansion
            return ids.to(device).repeat_interleave(batch // ids.numel())
        raise MoorizeError(f"task_ids has {ids.numel()} entries for a batch of {batch}")


@contextlib.contextmanager
def use_task(model, task_ids):
    """Route every forward of ``model`` inside the block with ``task_ids`` (ids or names; batch-expanded as
    generate does)."""
    state: RoutingState = model.moore.routing
    previous = (state.sticky, state.task_ids)
    ids = state.resolve(task_ids)
    state.sticky, state.task_ids = ids, ids
    try:
        yield
    finally:
        state.sticky, state.task_ids = previous
