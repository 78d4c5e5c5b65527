"""``MoOREConfig``: the hyper-parameters of every MoORE layer of a model, saved with adapters.

Its defaults are the defaults everywhere (``moorize.load``, ``TrainOptions``, ``moorize train``):
no torch import, so the CLI can read them at start-up.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from ..errors import MoorizeError
from ..options import with_overrides

ROUTER_MODES = ("task", "sample", "task+sample")
ROUTER_NORMS = ("none", "rms")
ROUTER_NORM_EPS = 1e-6  # added to mean(x²) before the square root, as RMSNorm layers do
# a field an adapter written by an older moorize lacks meant the behaviour of then, not today's default
LEGACY_FIELDS = {"router_norm": "none"}


@dataclass
class MoOREConfig:
    """Hyper-parameters of every MoORE layer of a model (saved with adapters)."""

    router: str = "task+sample"
    tasks: list[str] = field(default_factory=lambda: ["default"])
    task_dim: int = 64  # size of the task embedding e_t
    router_experts: int = 128  # k_r, rows of C
    # the sample router's input: x / rms(x) ("rms", the default), so that one step moves the gate by the same
    # amount for every token whatever the size of its activations (less forgetting: README, frontier), or
    # x as it comes ("none", as published)
    router_norm: str = "rms"
    householder: int = 8  # k reflections (even: they start as identical pairs)
    train_sigma: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.router not in ROUTER_MODES:
            raise MoorizeError(f"unknown router mode {self.router!r}: use one of {', '.join(ROUTER_MODES)}")
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise MoorizeError(f"tasks must be a non-empty list of distinct names, got {self.tasks!r}")
        if self.router_norm not in ROUTER_NORMS:
            raise MoorizeError(f"unknown router norm {self.router_norm!r}: use one of {', '.join(ROUTER_NORMS)}")
        if self.householder < 0 or self.householder % 2:
            raise MoorizeError(f"householder must be an even number >= 0 (pairs start as H = I), got {self.householder}")
        for name in ("task_dim", "router_experts"):
            if getattr(self, name) < 1:
                raise MoorizeError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def uses_task(self) -> bool:
        return "task" in self.router

    @property
    def uses_sample(self) -> bool:
        return "sample" in self.router

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
        except TypeError as e:  # a hand-edited value of the wrong type, caught by a comparison
            raise MoorizeError(f"{where}: malformed MoORE settings ({e})") from None

    @classmethod
    def build(cls, config: MoOREConfig | None, overrides: dict) -> MoOREConfig:
        """``config`` (or the defaults) with keyword ``overrides`` (``tasks=None`` means the default task)."""
        if "tasks" in overrides:
            overrides = {**overrides, "tasks": list(overrides["tasks"] or ["default"])}
        return with_overrides(cls, config, overrides, "MoORE")


DEFAULTS = MoOREConfig()
