"""What reduced precision costs: SmolLM2-135M-Instruct's logits and greedy text against float32.

    python benchmarks/precision.py            # 8 prompts, 32 greedy tokens each (a few minutes on 2 cores)
    python benchmarks/precision.py --quick    # 4 SmolLM2 layers, 2 prompts, 8 tokens: smoke test only

The reference is the original model in float32 (de-quantised GGUF). Rows:

* MoORE, float32 factors (``moorize convert``): the exact conversion, for scale;
* MoORE, bfloat16 / float16 factors (``moorize convert --dtype``): U, σ, Vh stored and
  applied in that dtype; embeddings, norms and the head as the source has them (float32);
  the routers in float32 (they are what trains);
* MoORE, ``moorize.load(dtype=torch.bfloat16)``: the whole model in bfloat16 but the
  MoORE parameters, from float32 factors;
* the original model cast to bfloat16 (``.to(torch.bfloat16)``): what bfloat16 costs
  without moorize, for comparison.

Every routed model is freshly initialised (it computes the original function), so every
difference is rounding. Per row: max and mean |Δ logits| over the prompts' positions, top-1
agreement of those positions, and greedy decoding: the share of prompts whose continuation
equals the float32 original's token for token, and the share of tokens equal up to the first
difference.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _util as U  # noqa: E402
from convert import _prepare_smollm2, _run_in_child  # noqa: E402

PROMPTS = [
    "The capital of France is", "Write a haiku about the sea.", "List three prime numbers:",
    "Explain photosynthesis in one sentence.", "What is 12 times 7?", "Translate 'good morning' into Spanish:",
    "Name a famous painting by Van Gogh.", "The quick brown fox",
]


def _greedy(model, enc, new_tokens: int, **kw):
    import torch

    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **kw)
    return out[:, enc["input_ids"].shape[1]:]


def _agreement(a, b) -> tuple[float, float]:
    """(share of rows equal, share of tokens equal before each row's first difference)."""
    rows = (a == b).all(dim=1).float().mean().item()
    prefix = 0
    for x, y in zip(a.tolist(), b.tolist()):
        n = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), len(x))
        prefix += n
    return rows, prefix / a.numel()


def part(work: Path, args) -> bool:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import moorize

    hf = work / "smollm2-hf"
    _run_in_child(_prepare_smollm2, str(hf), 4 if args.quick else None)
    prompts = PROMPTS[:2] if args.quick else PROMPTS
    new_tokens = 8 if args.quick else args.new_tokens
    tok = AutoTokenizer.from_pretrained(hf)
    tok.padding_side = "left"
    enc = dict(tok(prompts, return_tensors="pt", padding=True))
    original = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = original(**enc).logits.float()
    ref_text = _greedy(original, enc, new_tokens)
    valid = enc["attention_mask"].bool()
    ref_top = ref.argmax(-1)

    factored = {}
    for dtype in ("float32", "bfloat16", "float16"):
        d = work / f"factored-{dtype}"
        with U.Timer() as t:
            moorize.convert(hf, d, dtype=None if dtype == "float32" else dtype)
        factored[dtype] = (d, t.seconds, U.dir_size(d))

    def routed(dtype: str, load_dtype=None):
        return moorize.load(factored[dtype][0], dtype=load_dtype)

    candidates = {
        "MoORE, float32 factors": lambda: routed("float32"),
        "MoORE, bfloat16 factors": lambda: routed("bfloat16"),
        "MoORE, float16 factors": lambda: routed("float16"),
        "MoORE, load(dtype=bfloat16)": lambda: routed("float32", torch.bfloat16),
        "original, .to(bfloat16)": lambda: AutoModelForCausalLM.from_pretrained(hf, dtype=torch.bfloat16).eval(),
    }
    rows = []
    for name, build in candidates.items():
        model = build()
        with torch.no_grad():
            got = model(**enc).logits.float()
        diff = (got - ref).abs()[valid]
        top1 = (got.argmax(-1) == ref_top)[valid].float().mean().item()
        same_rows, same_tokens = _agreement(_greedy(model, enc, new_tokens), ref_text)
        size = next((f"{U.fmt_bytes(v[2])}" for k, v in factored.items() if k in name and "factors" in name), "")
        rows.append((name, f"{diff.max().item():.3g}", f"{diff.mean().item():.3g}", U.fmt_pct(top1),
                     U.fmt_pct(same_rows), U.fmt_pct(same_tokens), size))
        del model
    U.heading(f"SmolLM2-135M-Instruct against float32: {len(prompts)} prompts, {new_tokens} greedy tokens", 3)
    print(U.table(["model", "max abs Δ logits", "mean abs Δ logits", "top-1 agree", "greedy rows equal",
                   "greedy tokens equal", "checkpoint"], rows, align="lrrrrrr"))
    U.note(f"logits of the float32 original span [{ref.min().item():.1f}, {ref.max().item():.1f}]")
    return True


def main(argv: list[str] | None = None) -> int:
    ap = U.benchmark_parser(__doc__, "smoke test: 4 layers, 2 prompts, 8 tokens")
    ap.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per prompt (default 32)")
    args = ap.parse_args(argv)
    U.quiet_torch(args.threads)
    return U.run_benchmark("moorize precision benchmark", "moorize-bench-precision-", args,
                           [lambda work: part(work, args)])


if __name__ == "__main__":
    sys.exit(main())
