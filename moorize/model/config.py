"""``MoOREConfig``: the hyper-parameters of every MoORE layer of a model, saved with adapters.

Its defaults are the defaults everywhere (``moorize.load``, ``TrainOptions``, ``moorize train``):
no torch import, so the CLI can read them at start-up.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ..errors import MoorizeError
from ..options import check_options, option, with_overrides

# the router modes' names (their classes: ``routers``, which adds any router registered later); a list,
# so that the CLI can name the choices without importing torch
ROUTER_MODES = ["task", "sample", "task+sample"]
ROUTER_NORMS = ("none", "rms")
ROUTER_NORM_EPS = 1e-6  # added to mean(x²) before the square root, as RMSNorm layers do
# a field an adapter written by an older moorize lacks meant the behaviour of then, not today's default
LEGACY_FIELDS = {"router_norm": "none"}


@dataclass
class MoOREConfig:
    """Hyper-parameters of every MoORE layer of a model (saved with adapters)."""

    router: str = option("task+sample", choices=ROUTER_MODES, label="router mode",
                         help="What routes the experts: the task (one dense matrix per task, merges), each token "
                              "(sample), or both (task+sample, as published).")
    tasks: list[str] = option(default_factory=lambda: ["default"], cli=False, help="Task names (ids in order).")
    task_dim: int = option(64, kind=int, low=1, help="Task embedding size.")  # e_t
    router_experts: int = option(128, kind=int, low=1, help="Sample router width k_r.")  # rows of C
    # x / rms(x) ("rms", the default): one step moves the gate by the same amount for every token whatever the
    # size of its activations (less forgetting: docs/TRAINING.md, frontier); x as it comes ("none", as published)
    router_norm: str = option("rms", choices=ROUTER_NORMS, label="router norm",
                              help="The sample router's input: x as published (none), or x / rms(x) (rms: steadier "
                                   "gates, less forgetting; docs/TRAINING.md, frontier).")
    householder: int = option(8, kind=int, low=0, help="Householder reflections (even: they start as identical "
                                                       "pairs, H = I).")
    train_sigma: bool = option(False, help="Train the singular values too.")
    seed: int = option(0, kind=int, low=0, high=2**63 - 1, cli=False, help="Seed of the fresh routers.")

    def __post_init__(self) -> None:
        check_options(self)
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise MoorizeError(f"tasks must be a non-empty list of distinct names, got {self.tasks!r}")
        if self.householder % 2:
            raise MoorizeError(f"householder must be an even number >= 0 (pairs start as H = I), got {self.householder}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_saved(cls, saved, where: str) -> MoOREConfig:
        """The config an adapter recorded, checked; a field it predates gets its behaviour of then."""
        if not isinstance(saved, dict):
            raise MoorizeError(f"{where}: the MoORE settings are not a JSON object")
        unknown = set(saved) - {f.name for f in fields(cls)}
        if unknown:
            raise MoorizeError(f"{where}: unknown MoORE setting(s) {', '.join(sorted(unknown))} "
                               "(written by a newer moorize?)")
        try:
            return cls(**{**LEGACY_FIELDS, **saved})
        except (TypeError, MoorizeError) as e:  # a hand-edited value of the wrong type or out of range
            raise MoorizeError(f"{where}: malformed MoORE settings ({e})") from None

    @classmethod
    def build(cls, config: MoOREConfig | None, overrides: dict) -> MoOREConfig:
        """``config`` (or the defaults) with keyword ``overrides`` (``tasks=None`` means the default task)."""
        if "tasks" in overrides:
            overrides = {**overrides, "tasks": list(overrides["tasks"] or ["default"])}
        return with_overrides(cls, config, overrides, "MoORE")


DEFAULTS = MoOREConfig()
