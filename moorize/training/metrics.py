"""metrics.jsonl, optional TensorBoard, callbacks and the in-memory history of a run."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..errors import MoorizeError
from .options import METRICS_NAME

log = logging.getLogger(__name__)


class _MetricsLog:
    """metrics.jsonl (main process), optional TensorBoard, callbacks, and the in-memory history."""

    def __init__(self, run: Path, main: bool, tensorboard: bool, callbacks, keep_until: int | None):
        self.path, self.main, self.history, self.callbacks = run / METRICS_NAME, main, [], list(callbacks)
        if main and keep_until is not None and self.path.exists():  # resume: drop records past the checkpoint
            from ..io.jsonfiles import json_records

            kept = [json.dumps(r) for _, r in json_records(self.path)
                    if isinstance(r, dict) and isinstance(r.get("step", 0), int) and r.get("step", 0) <= keep_until]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.tb = None
        if tensorboard and main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise MoorizeError("--tensorboard needs the tensorboard package (pip install tensorboard)") from None
            self.tb = SummaryWriter(str(run / "tensorboard"))

    def write(self, record: dict) -> None:
        self.history.append(record)
        if self.main:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
            if self.tb is not None:
                for key, value in _flatten(record).items():
                    if isinstance(value, (int, float)) and key not in ("step", "kind"):
                        self.tb.add_scalar(key, value, record["step"])
        for cb in self.callbacks:
            cb(record)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _flatten(record: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in record.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out




LOSS_PLOT = "loss.png"


def plot_losses(history: list[dict], path: Path) -> Path | None:
    """Training loss per logged step and each task's evaluation loss, drawn next to metrics.jsonl.

    Returns None (and draws nothing) without matplotlib (the `plot` extra) or without a logged step:
    the numbers are in metrics.jsonl either way.
    """
    train = [(r["step"], r["loss"]) for r in history if r.get("kind") == "train"]
    if not train:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train), label="train", color="black", linewidth=1)
    evals = [r for r in history if r.get("kind") == "eval"]
    for task in sorted({t for r in evals for t in r["eval"]}):
        points = [(r["step"], r["eval"][task]["loss"]) for r in evals if task in r["eval"]]
        ax.plot(*zip(*points), marker="o", label=f"eval: {task}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if min(v for _, v in train) > 0:
        ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
