"""Benchmark one training step of MoORE against PEFT LoRA (r=8) on the same target modules.

    python benchmarks/train.py            # full run (a few minutes on 2 cores)
    python benchmarks/train.py --quick    # 4 SmolLM2 layers, few repeats: smoke test only

SmolLM2-135M-Instruct (de-quantised GGUF, float32), CPU, a batch of 4 sequences of 256
tokens (seeded random ids), causal-LM loss on every token. One step = forward, loss,
backward, gradient clipping, AdamW step, zero_grad, exactly what ``moorize train`` and a
plain PEFT loop do per step. Models:

* LoRA: ``AutoModelForCausalLM`` + ``peft.get_peft_model(LoraConfig(r=8, lora_alpha=16,
  target_modules=[q,k,v,o,gate,up,down]))``;
* MoORE: ``moorize.load`` of a full-rank conversion and of ``rank=64, residual=keep``,
  ``prepare_for_training``, default hyper-parameters (k=8 reflections, k_r=128, the router fed
  x / rms(x)), router ``task+sample`` and ``task``, ``task_ids`` set per row; and ``task+sample``
  with the router fed x as published (``router_norm="none"``), for what the norm costs.

Timings are medians of N steps of each model, run round-robin after warm-up, in one
process on one machine; the ratio MoORE / LoRA is the figure the goal (≤ 1.5×) is about.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _util as U  # noqa: E402
from convert import _prepare_smollm2, _run_in_child  # noqa: E402

BATCH, SEQ = 4, 256
GOAL = 1.5  # MoORE step time / LoRA step time, at most
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _step_fn(model, params, ids, routed: bool, autocast: bool = False):
    """One training step as ``moorize train`` and a plain PEFT loop take it (``autocast``: bf16 on ids' device)."""
    import torch
    import torch.nn.functional as F

    optimizer = torch.optim.AdamW(params, lr=1e-4)
    kwargs = {"task_ids": (torch.arange(ids.shape[0]) % 2).to(ids.device)} if routed else {}

    def step():
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=ids, **kwargs).logits[:, :-1]
        loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def lora_model(hf, dtype):
    """The baseline: PEFT LoRA r=8 on every projection of the dense model; (model, trainable parameters)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(hf, dtype=dtype),
                           LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS))
    return model, [p for p in model.parameters() if p.requires_grad]


def part(work: Path, args) -> bool:
    import torch

    import moorize

    n_layers = 4 if args.quick else None
    U.heading(f"SmolLM2-135M-Instruct: one training step, batch {BATCH} x {SEQ} tokens, CPU")
    hf = work / "smollm2-hf"
    _run_in_child(_prepare_smollm2, str(hf), n_layers)
    for key, kw in (("full", {}), ("r64", {"rank": "64", "residual": "keep"})):
        moorize.convert(hf, work / f"factored-{key}", **kw)

    lora, lora_params = lora_model(hf, torch.float32)
    lora.train()
    ids = torch.randint(0, lora.config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    models = {"lora": (lora, lora_params, False)}
    # the defaults (router_norm "rms"), and the router fed x as published: what the norm costs per step
    variants = [("full", "full", "task+sample", "rms"), ("full-none", "full", "task+sample", "none"),
                ("r64", "r64", "task+sample", "rms"), ("full-task", "full", "task", "rms")]
    for key, ck, router, norm in variants:
        m = moorize.load(work / f"factored-{ck}", router=router, tasks=["a", "b"], router_norm=norm).train()
        models[key] = (m, moorize.prepare_for_training(m), True)
    steps = {k: _step_fn(m, p, ids, routed) for k, (m, p, routed) in models.items()}
    times = U.interleaved(steps, args.repeat, args.warmup)
    med = {k: statistics.median(v) for k, v in times.items()}

    labels = {"lora": "PEFT LoRA r=8 (q,k,v,o,gate,up,down)",
              "full": "MoORE full rank, router `task+sample` (defaults: x / rms(x))",
              "full-none": "MoORE full rank, router `task+sample`, router_norm none",
              "r64": "MoORE rank 64 + residual, router `task+sample`",
              "full-task": "MoORE full rank, router `task`"}
    rows = []
    for k, (_m, p, _) in models.items():
        n = sum(x.numel() for x in p)
        ratio = med[k] / med["lora"]
        verdict = "" if k == "lora" else ("PASS" if ratio <= GOAL else "FAIL") + f" (goal ≤ {GOAL}×)"
        rows.append((labels[k], f"{n / 1e6:.2f} M", f"{med[k]:.2f} s", f"{BATCH * SEQ / med[k]:.0f}",
                     U.fmt_x(ratio), verdict))
    print(U.table(["model", "trainable", "step (median)", "tokens/s", "vs LoRA", "goal"], rows, align="lrrrrl"))
    U.note(f"\nMedian of {args.repeat} steps of each model, round-robin after {args.warmup} warm-up round(s); "
           f"{torch.get_num_threads()} torch threads; {lora.config.num_hidden_layers} layers"
           f"{' (--quick)' if args.quick else ''}.")
    return True


def main(argv: list[str] | None = None) -> int:
    ap = U.benchmark_parser(__doc__, "smoke test: 4 SmolLM2 layers, 2 repeats")
    ap.add_argument("--repeat", type=int, default=None, help="median of N steps (default 7, --quick 2)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 1)")
    args = ap.parse_args(argv)
    args.repeat = args.repeat or (2 if args.quick else 7)
    args.warmup = args.warmup if args.warmup is not None else 1

    U.quiet_torch(args.threads)
    return U.run_benchmark("moorize training-step benchmark", "moorize-bench-train-", args,
                           [lambda work: part(work, args)])


if __name__ == "__main__":
    sys.exit(main())
