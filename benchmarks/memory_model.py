"""The memory and time model of docs/SCALE.md for Llama-shaped decoders, in code.

Counts are in elements and bytes of float32 (s = 4) unless said otherwise. For a target
W [m, n] at full rank r = min(m, n), the factors hold (m + n) r + r elements (U, Vh, σ);
the MoORE parameters with router ``task+sample`` (k reflections, task dimension d, T tasks,
k_r router rows) hold k n + T d + r d + k_r n + r k_r. Every figure below is that
bookkeeping plus R0, the measured resident size of an interpreter that has imported torch,
transformers and moorize; nothing is fitted to the measurements it is checked against.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

S = 4  # bytes per float32 element
MOORE = dict(householder=8, task_dim=64, router_experts=128, tasks=2)


@dataclass(frozen=True)
class Architecture:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, path: Path) -> "Architecture":
        c = json.loads(Path(path).read_text())
        return cls(c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["num_attention_heads"],
                   c.get("num_key_value_heads") or c["num_attention_heads"], c["vocab_size"],
                   bool(c.get("tie_word_embeddings", False)))

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def targets(self) -> list[tuple[int, int]]:
        """(m, n) of one block's targets: q, k, v, o, gate, up, down."""
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        return [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]

    def dense_target_elements(self) -> int:
        return self.layers * sum(m * n for m, n in self.targets())

    def factor_elements(self) -> int:
        return self.layers * sum((m + n) * min(m, n) + min(m, n) for m, n in self.targets())

    def other_elements(self) -> int:
        """Embeddings, the head when untied, norms: stored as in the source."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden * (2 * self.layers + 1)

    def trainable_elements(self) -> int:
        k, d, t, kr = MOORE["householder"], MOORE["task_dim"], MOORE["tasks"], MOORE["router_experts"]
        return self.layers * sum(k * n + t * d + min(m, n) * d + kr * n + min(m, n) * kr for m, n in self.targets())

    def parameters(self) -> int:
        return self.dense_target_elements() + self.other_elements()

    def describe(self) -> str:
        return (f"hidden {self.hidden}, intermediate {self.intermediate}, {self.layers} layers, "
                f"{self.heads}/{self.kv_heads} heads, vocab {self.vocab}: {self.parameters() / 1e9:.2f} B parameters; "
                f"full-rank factors {self.factor_elements() * S / 2**30:.2f} GiB")


# ---- memory per stage (bytes) ---------------------------------------------------------------------------

ITEM_BYTES = 64 * 2**20  # moorize's default work item on the CPU (DEFAULT_BATCH["cpu"], 64 MB)


def per_item(a: Architecture) -> dict[tuple[int, int], int]:
    """Matrices of each shape in one work item: min(max(1, 64 MB // W), how many the model has)."""
    counts: dict[tuple[int, int], int] = {}
    for t in a.targets():
        counts[t] = counts.get(t, 0) + a.layers
    return {(m, n): min(max(1, ITEM_BYTES // (m * n * S)), c) for (m, n), c in counts.items()}


def work_items(a: Architecture) -> list[tuple[tuple[int, int], int]]:
    """(shape, matrices) of each work item, in the converter's order for a one-file checkpoint: the targets
    grouped by shape (in the order a block lists them), each group cut into items of 64 MB // W matrices."""
    counts: dict[tuple[int, int], int] = {}
    for t in a.targets():
        counts[t] = counts.get(t, 0) + a.layers
    items = []
    for (m, n), c in counts.items():
        per = max(1, ITEM_BYTES // (m * n * S))
        items += [((m, n), min(per, c - k)) for k in range(0, c, per)]
    return items


def convert_peak(a: Architecture, r0: float, factoring: dict) -> float:
    """The largest working set along the converter's sequence of work items: while item i is factored
    (``factoring[shape]``: the peak one factorisation of a whole item adds, its input included, measured by
    ``probe_factoring``; scaled to the item's matrices), the reader holds the next three (two queued, one being
    read) and the writer thread may still hold the factors of item i − 1 (factoring is the slow stage, so the
    writer is otherwise idle and the reader's queue full)."""
    items, probed = work_items(a), per_item(a)
    worst = 0.0
    for i, ((m, n), count) in enumerate(items):
        ahead = sum(mm * nn * S * c for (mm, nn), c in items[i + 1:i + 4])
        prev = items[i - 1] if i else None
        writing = prev[1] * ((sum(prev[0]) * min(prev[0]) + min(prev[0])) * S) if prev else 0
        worst = max(worst, ahead + factoring[(m, n)] * count / probed[(m, n)] + writing)
    return r0 + worst


def load_peak(a: Architecture, r0: float, s: int = S) -> float:
    """The factors and every other tensor (``s`` bytes each), read once into memory, plus the float32 MoORE
    parameters."""
    return r0 + (a.factor_elements() + a.other_elements()) * s + a.trainable_elements() * S


def activation_bytes(a: Architecture, tokens: int) -> tuple[float, float]:
    """(bytes one block keeps for backward, bytes the head and the loss hold at their peak) for ``tokens`` tokens.

    What autograd keeps, per token: for each MoORE layer Vh x [r], its gate after the ReLU [r] and C x [k_r]
    (U and Vh are frozen, so neither the expert product nor the output is kept); the layers' inputs (the
    attention and MLP norms' outputs, the attention output, the product feeding down_proj: 3 h + i); each
    RMSNorm's input (2 h); rotated q and k and v (h + 2 k_v), the attention output (h; the CPU's flash kernel
    keeps only a log-sum-exp per head); gate, up and SiLU(gate) (3 i). The head: the logits, their log-softmax,
    and the gradients of both in backward (4 V)."""
    h, i, kr, kv = a.hidden, a.intermediate, MOORE["router_experts"], a.kv_heads * a.head_dim
    moore = sum(2 * min(m, n) + kr for m, n in a.targets())
    block = moore + (3 * h + i) + 2 * h + (h + 2 * kv) + h + 3 * i
    return block * tokens * S, 4 * a.vocab * tokens * S


def train_peak(a: Architecture, r0: float, batch: int, seq: int, checkpointing: bool) -> float:
    """The larger of backward's peak (the loaded model, the MoORE parameters' gradients, the activations: every
    block's without checkpointing, each block's input plus one block recomputed with it; the head) and the
    optimizer step's (the gradients and AdamW's two moments, float32)."""
    tokens = batch * seq
    block, head = activation_bytes(a, tokens)
    # with checkpointing: every block's input, and in backward one block recomputed plus its gradients
    kept = (a.layers * tokens * a.hidden * S + 2 * block) if checkpointing else a.layers * block
    backward = load_peak(a, r0) + a.trainable_elements() * S + kept + head  # activations and gradients
    step = load_peak(a, r0) + 3 * a.trainable_elements() * S  # AdamW's moments appear once activations are freed
    return max(backward, step)


def export_peak(a: Architecture, r0: float, s: int = S) -> float:
    """Tracing and checking: the loaded model, the rotated Vh H the trace folds into constants (a new [r, n] per
    layer), then the references' inference cache [Vh H; C] per layer (the tracer's constants may not be returned
    yet). Validation, with the model released, holds ONNX Runtime's own copy of every weight (the graph stores
    Vh H in place of Vh): what load holds, so never the peak."""
    vh = a.layers * sum(min(m, n) * n for m, n in a.targets()) * s
    router_in = a.layers * sum(MOORE["router_experts"] * n for _, n in a.targets()) * S  # C: k_r × n per layer
    return load_peak(a, r0, s) + 2 * vh + router_in


# ---- time ---------------------------------------------------------------------------------------------------

IO_BYTES_PER_S = 400e6  # read + write of safetensors on this machine's disk (page cache mostly)


def probe_factoring(a: Architecture) -> tuple[float, dict]:
    """(seconds of the conversion's factorisations, {shape: bytes factoring one work item adds at its peak}).

    One work item per distinct shape is factored with moorize's own CPU path (``decompose_group``: the float64
    Gram solver, matrices side by side on the threads), timed (the median of three, after one warm-up) and
    multiplied by the number of items of that shape. Peaks come from this process's ru_maxrss, items in
    increasing size so the largest one sets the high-water mark (a smaller one's figure is an upper bound);
    call it before this process holds anything large."""
    import resource

    import torch

    from moorize.conversion.svd import RankRules, SVDOptions, decompose_group
    from moorize.process import return_freed_memory

    return_freed_memory()  # the allocator policy of the moorize command whose conversion this predicts

    counts: dict[tuple[int, int], int] = {}
    for t in a.targets():
        counts[t] = counts.get(t, 0) + a.layers
    full = RankRules.parse("full").for_layer("x")

    def factor(ws):
        decompose_group(ws, [full] * len(ws), [torch.float32] * len(ws), SVDOptions())

    factor([torch.randn(64, 64)])  # LAPACK's first call pays for its set-up
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    total, peaks = 0.0, {}
    for (m, n), per in sorted(per_item(a).items(), key=lambda kv: kv[1] * kv[0][0] * kv[0][1]):
        ws = [torch.randn(m, n) for _ in range(per)]
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            factor(ws)
            times.append(time.perf_counter() - t0)
        items = -(-counts[(m, n)] // per)
        total += sorted(times)[1] * items
        peaks[(m, n)] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start
        del ws
    return total, peaks


def io_seconds(a: Architecture) -> float:
    return (a.parameters() + a.factor_elements() + a.other_elements()) * S / IO_BYTES_PER_S


# ---- projection ---------------------------------------------------------------------------------------------

PROJECTED = {
    "Llama-3.1-8B": Architecture(4096, 14336, 32, 32, 8, 128256, False),
    "Llama-3.1-70B": Architecture(8192, 28672, 80, 64, 8, 128256, False),
}
GPU_BYTES = 80e9


def factoring_estimate(a: Architecture) -> dict[tuple[int, int], float]:
    """Without a probe (shapes too large to time here): factoring an item adds, per matrix, its float32 copy,
    the solver's float64 Gram matrix and eigenvectors (r × r each) and U (m × r), and the float32 factors. An
    upper estimate: the solver works through an item's matrices a few at a time (SmolLM2's 50-matrix items
    peak at 0.4× this), but the large shapes of 8B and 70B are one matrix per item."""
    return {(m, n): per * (4 * m * n + 8 * (2 * min(m, n) ** 2 + m * min(m, n)) + S * ((m + n) * min(m, n)))
            for (m, n), per in per_item(a).items()}


def projection_table(fixed: dict, batch: int = 1, seq: int = 4096) -> str:
    """Memory per stage at 8B and 70B (float32 and bfloat16 factors) and the 80 GB GPUs training needs: DDP keeps
    a whole copy per GPU; FSDP shards parameters, gradients and optimizer state over the GPUs (activations stay
    per GPU). Convert and export are host-memory stages (the conversion's working set does not grow with the
    number of layers); ``fixed`` holds each stage's measured fixed cost."""
    import math

    rows = []
    for name, a in PROJECTED.items():
        for bytes_per in (4, 2):
            f = bytes_per / S
            weights = (a.factor_elements() + a.other_elements()) * bytes_per
            train_state = 4 * a.trainable_elements() * S  # float32 params, grads, two AdamW moments
            block, head = activation_bytes(a, batch * seq)
            acts = a.layers * batch * seq * a.hidden * bytes_per + 2 * block * f + head
            ddp = weights + train_state + acts
            fsdp_gpus = max(1, math.ceil((weights + train_state) / max(GPU_BYTES - acts, 1)))
            convert = convert_peak(a, fixed["convert"], factoring_estimate(a))
            load = load_peak(a, fixed["load"], bytes_per)
            export = export_peak(a, fixed["load"], bytes_per)
            rows.append((name, "float32" if bytes_per == 4 else "bfloat16",
                         f"{a.parameters() * bytes_per / 1e9:.0f} GB", f"{convert / 1e9:.1f} GB",
                         f"{load / 1e9:.0f} GB", f"{ddp / 1e9:.0f} GB", f"{export / 1e9:.0f} GB",
                         "1" if ddp <= GPU_BYTES else f"does not fit ({ddp / GPU_BYTES:.1f}×)", str(fsdp_gpus)))
    header = ("| model | factors | dense source | convert (host) | load | train step 1×4096, checkpointing "
              "| export --onnx (host) | GPUs (80 GB) to train, DDP | GPUs (80 GB) to train, FSDP |\n"
              "|---|---|--:|--:|--:|--:|--:|--:|--:|\n")
    return header + "\n".join("| " + " | ".join(r) + " |" for r in rows)
