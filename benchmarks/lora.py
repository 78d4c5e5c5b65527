"""What the MoORE → LoRA bridge gives on SmolLM2-135M-Instruct: rank, size and logit error per error bound.

    python benchmarks/lora.py              # full rank, router 'task', 2 tasks, 8 training steps; 4 bounds (~5 min)
    python benchmarks/lora.py --quick      # 4 layers, 2 steps, 2 bounds: smoke test only

SmolLM2 is converted at full rank, its routers (mode ``task``) trained briefly on two tasks (math, poem),
and each task exported as a PEFT LoRA adapter (``moorize.export_lora``) at several ``--max-error`` bounds
and one fixed rank. Per row and task: the adapter's largest rank and the median over layers, its size
against the dense layers it adapts and the MoORE adapter, the worst per-layer error, the logit error of
source + LoRA against the merged model on the export's prompts, and whether PEFT's greedy text (on the
source model with the adapter) equals the merged model's on every prompt.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _util as U  # noqa: E402
from convert import _prepare_smollm2, _run_in_child  # noqa: E402

PROMPTS = ["What is 3 plus 4?", "Write a line about 5 stars.", "The capital of France is", "def fibonacci(n):"]


def _data(path: Path) -> Path:
    rows = []
    for i in range(32):
        a, b = i % 7 + 2, i % 5 + 3
        rows.append({"task": "math", "prompt": f"What is {a} plus {b}?", "response": f" {a + b}."})
        rows.append({"task": "poem", "prompt": f"Write a line about {a} stars.", "response": f" {a} stars shine."})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def part(work: Path, args) -> bool:
    import statistics

    import peft
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import moorize

    hf, factored, adapter = work / "smollm2-hf", work / "factored", work / "adapter"
    _run_in_child(_prepare_smollm2, str(hf), 4 if args.quick else None)
    moorize.convert(hf, factored)
    steps = 2 if args.quick else args.steps
    with U.Timer() as t_train:
        moorize.train(factored, _data(work / "data.jsonl"), adapter, router="task", max_steps=steps, batch_size=4,
                      lr=1e-3, warmup=1, seed=0, progress=False)
    moore_bytes = (adapter / "adapter_model.safetensors").stat().st_size
    tok = AutoTokenizer.from_pretrained(factored)
    prompts = [tok(p, return_tensors="pt")["input_ids"] for p in PROMPTS]
    want = {}
    for task in ("math", "poem"):  # what `moorize merge` computes, greedy
        moorize.merge(factored, adapter, task, work / f"merged-{task}")
        merged = AutoModelForCausalLM.from_pretrained(work / f"merged-{task}", dtype=torch.float32).eval()
        with torch.no_grad():
            want[task] = [merged.generate(ids, max_new_tokens=args.new_tokens, do_sample=False) for ids in prompts]
        del merged
    source = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    policies = [("max error 1e-2", {"max_error": 1e-2}), ("max error 1e-3 (default)", {})]
    if not args.quick:
        policies += [("max error 1e-4", {"max_error": 1e-4}), ("rank 64", {"rank": 64})]
    rows = []
    for label, kw in policies:
        dest = work / f"lora-{len(rows)}"
        with U.Timer() as t:
            report = moorize.export_lora(factored, adapter, dest, **kw)
        for task_report in report.tasks:
            ranks = [e["rank"] for e in task_report.layers.values()]
            model = peft.PeftModel.from_pretrained(source, task_report.directory)
            with torch.no_grad():
                got = [model.generate(input_ids=ids, max_new_tokens=args.new_tokens, do_sample=False)
                       for ids in prompts]
            same = sum(torch.equal(g, w) for g, w in zip(got, want[task_report.task]))
            source = model.unload()  # the source model back, without the adapter's layers
            rows.append((label, task_report.task, max(ranks), int(statistics.median(ranks)),
                         f"{U.fmt_bytes(task_report.adapter_bytes)} "
                         f"({task_report.adapter_bytes / task_report.dense_bytes:.0%})", f"{task_report.worst[1]:.2e}",
                         f"{task_report.logits['max_abs']:.3g} ({task_report.logits['max_rel']:.1%})",
                         f"{same} / {len(prompts)}", U.fmt_s(t.seconds)))
        U.rmtree(dest)
    U.heading(f"SmolLM2-135M-Instruct, router 'task' after {steps} training steps ({U.fmt_s(t_train.seconds)}), "
              f"MoORE adapter {U.fmt_bytes(moore_bytes)}", 3)
    print(U.table(["policy", "task", "rank max", "rank median", "LoRA size (of dense layers)", "worst layer error",
                   "logits max abs diff (of max abs logit)", f"greedy equal ({args.new_tokens} tokens)",
                   "export time"], rows, align="llrrrrrrr"))
    layer_bytes = sum(r.stat().st_size for r in factored.glob("*.safetensors"))
    U.note(f"the factored checkpoint is {U.fmt_bytes(layer_bytes)}; export time includes the logit check")
    return True


def main(argv: list[str] | None = None) -> int:
    ap = U.benchmark_parser(__doc__, "smoke test: 4 layers, 2 steps, 2 bounds")
    ap.add_argument("--steps", type=int, default=8, help="training steps (default 8)")
    ap.add_argument("--new-tokens", type=int, default=16, help="greedy tokens per prompt (default 16)")
    args = ap.parse_args(argv)
    U.quiet_torch(args.threads)
    return U.run_benchmark("moorize LoRA bridge benchmark", "moorize-bench-lora-", args,
                           [lambda work: part(work, args)])


if __name__ == "__main__":
    sys.exit(main())
