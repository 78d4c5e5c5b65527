"""The GPU figures: conversion, one training step and decoding on one device, each beside its baseline.

    python benchmarks/gpu.py --device cuda                        # every part; 8B shapes at 4 of 32 blocks
    python benchmarks/gpu.py --device cuda --parts convert --layers 32   # the whole 8B conversion
    python benchmarks/gpu.py --device cpu --quick                 # smoke test of this script (tests run it)

Every model has random weights drawn on the device from real shapes (what matters for time and
memory), so nothing has to be downloaded or carried to the GPU machine.

* convert: a Llama-3.1-8B-shaped checkpoint (hidden 4096, intermediate 14336, 32 heads, 8 KV heads,
  vocabulary 128256, bfloat16; --layers of its 32 blocks) written to disk. On the same matrices:
  the bare batched decomposition on the device (every same-shaped group in moorize's batches, the
  matrices already there: the floor for a conversion), for both solvers (``svd``:
  ``torch.linalg.svd``; ``gram``: moorize's float64 Gram eigensolver); ``torch.linalg.svd`` one
  matrix at a time on the device; moorize's CPU path (all host cores) on one block, times the blocks;
  and ``moorize.convert`` disk to disk. Seconds, worst relative reconstruction error, peak device
  memory; the conversion's goal is ≤ 1.2× the bare batched time of the solver it used.
* train: one training step (forward, loss, backward, clipping, AdamW, bf16 autocast on a GPU,
  gradient checkpointing) of the same shapes, batch × sequence of random ids: MoORE full rank and
  rank 64 + residual, router ``task`` and ``task+sample``, against PEFT LoRA r=8 on the dense model
  (q, k, v, o, gate, up, down). Median step, tokens/s, peak device memory; goal: full-rank
  ``task+sample`` ≤ 1.5× LoRA's step.
* decode: SmolLM2-135M shapes (30 blocks), full rank, router ``task+sample`` with two tasks set
  away from their initialisation. Greedy decoding of exactly --new-tokens tokens at batch 1 and at
  batch 16 (tasks alternating per row): PyTorch on the device (float16 on a GPU), and ONNX Runtime
  on the ``--with-past`` export (float16 with the CUDA provider where onnxruntime-gpu is
  installed, else float32 on the CPU provider), naming the provider that really ran. With
  ``--compile``, PyTorch also as ``moorize generate --compile`` runs it (a static KV cache, the
  decode step compiled whole: CUDA graphs on a GPU), the first call's compile time apart.

Timings on a GPU synchronise the device; medians of --repeat runs after a warm-up. ``--json``
writes every figure for the README's GPU table.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _util as U  # noqa: E402
from convert import _write_synthetic  # noqa: E402
from train import _step_fn, lora_model  # noqa: E402  (the training benchmark's step and baseline)

LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                vocab_size=128256)
SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
               vocab_size=49152)
QUICK = dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
CONVERT_GOAL, TRAIN_GOAL = 1.2, 1.5
TASKS = ["alpha", "beta"]
RESULTS: dict = {}  # every figure, for --json


# ---- measuring on a device ------------------------------------------------------------------------------------

def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _reset_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak(device: str) -> int:
    """Peak device memory since the last reset (a GPU's allocator), or this process's peak RSS on the CPU."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _timed(fn, device: str, repeat: int = 1, warmup: int = 0) -> tuple[float, object]:
    """Median seconds of ``repeat`` synchronised runs after ``warmup`` untimed ones; the last result."""
    out = None
    for _ in range(warmup):
        out = fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _release(device: str) -> None:
    import gc

    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


# ---- convert --------------------------------------------------------------------------------------------------

def _source(work: Path, args) -> Path:
    """The 8B-shaped bfloat16 checkpoint (--layers blocks), written once and shared by the parts."""
    src = work / "llama8b-hf"
    if not src.exists():
        shapes = QUICK if args.quick else LLAMA_8B
        _write_synthetic(str(src), shapes, args.layers, 2 * 10**9, dtype="bfloat16", device=args.device)
    return src


def _target_matrices(src: Path) -> dict[tuple[int, int], list]:
    """The matrices moorize factors by default (every *_proj of every block), grouped by shape, in bfloat16."""
    from safetensors import safe_open

    groups: dict[tuple[int, int], list] = {}
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            for name in sf.keys():
                if name.endswith("_proj.weight"):
                    t = sf.get_tensor(name)
                    groups.setdefault(tuple(t.shape), []).append(t)
    return groups


def _rel_error(W, U_, S, Vh) -> float:
    import torch

    W = W.float()
    diff = W - (U_.float() * S.float().unsqueeze(-2)) @ Vh.float()
    return (torch.linalg.matrix_norm(diff) / torch.linalg.matrix_norm(W)).max().item()


def part_convert(work: Path, args) -> bool:
    import torch

    import moorize
    from moorize.conversion.options import DEFAULT_BATCH
    from moorize.conversion.svd import SVDOptions, _gram, _svd, resolve_solver
    from moorize.io.shards import parse_size

    device = args.device
    dev = torch.device(device)
    U.heading(f"Conversion: Llama-3.1-8B shapes, {args.layers} of 32 blocks, bfloat16 source, on {device}")
    with U.Timer() as t:
        src = _source(work, args)
    groups = _target_matrices(src)
    count = sum(len(v) for v in groups.values())
    U.note(f"Source written in {U.fmt_s(t.seconds)} ({U.fmt_bytes(U.dir_size(src))}); "
           f"{count} target matrices: " + ", ".join(f"{len(v)} × {list(k)}" for k, v in groups.items()) + ".\n")
    budget = parse_size(DEFAULT_BATCH[dev.type])
    auto = resolve_solver("auto", dev)
    rows, res = [], {}

    def bare(solver: str) -> tuple[float, float, int]:
        """Every group in moorize's batches, on the device, the matrices already there."""
        on_device = {k: [w.to(dev) for w in v] for k, v in groups.items()}
        _reset_peak(device)
        seconds, worst = 0.0, 0.0
        for mats in on_device.values():
            per = max(1, budget // (mats[0].numel() * 4))
            for i in range(0, len(mats), per):
                W = torch.stack(mats[i:i + per])
                fn = (lambda W=W: _gram(W)) if solver == "gram" else (lambda W=W: _svd(W, torch.float32))
                s, (U_, S, Vh) = _timed(fn, device)
                seconds += s
                worst = max(worst, _rel_error(W, U_, S, Vh))
                del U_, S, Vh, W
        peak = _peak(device)
        del on_device
        _release(device)
        return seconds, worst, peak

    for solver in ("svd", "gram") if dev.type == "cuda" else (auto,):  # on the CPU LAPACK's SVD is the slow one
        torch.linalg.svd(torch.randn(64, 64, device=dev))  # the solver libraries' handles, once
        s, err, peak = bare(solver)
        res[f"bare_{solver}"] = {"seconds": s, "worst_rel_error": err, "peak_bytes": peak}
        rows.append((f"bare batched, solver `{solver}`{' (auto)' if solver == auto else ''}", U.fmt_s(s),
                     f"{err:.1e}", U.fmt_bytes(peak), ""))
    if dev.type == "cuda":
        _reset_peak(device)
        loop_s, loop_err = 0.0, 0.0
        for mats in groups.values():
            for w in mats:
                W = w.to(dev)
                s, (U_, S, Vh) = _timed(lambda W=W: torch.linalg.svd(W.float(), full_matrices=False), device)
                loop_s += s
                loop_err = max(loop_err, _rel_error(W, U_, S, Vh))
        res["loop_svd"] = {"seconds": loop_s, "worst_rel_error": loop_err, "peak_bytes": _peak(device)}
        rows.append(("`torch.linalg.svd` one matrix at a time", U.fmt_s(loop_s), f"{loop_err:.1e}",
                     U.fmt_bytes(res["loop_svd"]["peak_bytes"]), ""))
        _release(device)

    # moorize's CPU path on the host's cores: one block's matrices, scaled by the blocks
    block = {k: v[: len(v) // args.layers] for k, v in groups.items()}
    cpu_opts = SVDOptions("gram", torch.float32, torch.device("cpu"))
    cpu_s, cpu_err = 0.0, 0.0
    for mats in block.values():
        s, out = _timed(lambda m=mats: _cpu_factors(m, cpu_opts), "cpu")
        cpu_s += s
        cpu_err = max(cpu_err, max(f.rel_error for f in out))
    res["cpu_path"] = {"seconds": cpu_s * args.layers, "seconds_one_block": cpu_s, "worst_rel_error": cpu_err,
                       "threads": torch.get_num_threads()}
    rows.append((f"moorize CPU path (`gram`, {torch.get_num_threads()} threads): one block × {args.layers}",
                 U.fmt_s(cpu_s * args.layers), f"{cpu_err:.1e}", "", ""))

    out = work / "llama8b-factored"
    _reset_peak(device)
    with U.Timer() as t:
        report = moorize.convert(src, out, device=device)
    floor = res[f"bare_{report.solver}"]["seconds"] if f"bare_{report.solver}" in res else None
    ratio = t.seconds / floor if floor else None
    verdict = "" if ratio is None else ("PASS" if ratio <= CONVERT_GOAL else "FAIL") + f" (goal ≤ {CONVERT_GOAL}×)"
    res["convert"] = {"seconds": t.seconds, "svd_seconds": report.svd_seconds, "solver": report.solver,
                      "worst_rel_error": report.worst_rel_error, "peak_bytes": _peak(device),
                      "vs_bare": ratio, "bytes_out": report.bytes_out}
    rows.append((f"`moorize.convert` disk to disk (solver `{report.solver}`, {U.fmt_s(report.svd_seconds)} in "
                 "the decomposition)", U.fmt_s(t.seconds), f"{report.worst_rel_error:.1e}",
                 U.fmt_bytes(res["convert"]["peak_bytes"]), (U.fmt_x(ratio) + " " + verdict) if ratio else ""))
    print(U.table(["on the same matrices", "time", "worst rel. error", "peak device memory", "vs bare batched"],
                  rows, align="lrrrl"), flush=True)
    U.note("\nPeak device memory is the allocator's peak on a GPU and the process's peak RSS on the CPU. "
           "The factors are stored in the source's bfloat16, so the conversion's error is bfloat16 rounding.")
    RESULTS["convert"] = res
    return True


def _cpu_factors(mats, opts):
    """moorize's CPU engine on these matrices at full rank, stored in their own dtype."""
    from moorize.conversion.svd import RankRules, decompose_group

    policy = RankRules.parse("full").for_layer("x")
    return decompose_group(list(mats), [policy] * len(mats), [mats[0].dtype] * len(mats), opts)


# ---- train ----------------------------------------------------------------------------------------------------

def part_train(work: Path, args) -> bool:
    import torch

    import moorize

    device = args.device
    autocast = device.startswith("cuda")
    batch, seq = args.batch, args.seq
    U.heading(f"One training step: Llama-3.1-8B shapes, {args.layers} of 32 blocks, batch {batch} × {seq}, "
              f"on {device}")
    src = _source(work, args)
    factored = {"full": work / "llama8b-factored", "r64": work / "llama8b-factored-r64"}
    if not factored["full"].exists():
        moorize.convert(src, factored["full"], device=device)
    rank = 16 if args.quick else 64  # the quick shapes' k/v projections are 32 wide
    moorize.convert(src, factored["r64"], device=device, rank=str(rank), residual="keep")
    ids = torch.randint(0, json.loads((src / "config.json").read_text())["vocab_size"], (batch, seq),
                        generator=torch.Generator().manual_seed(0)).to(device)

    def lora():
        return *lora_model(src, torch.bfloat16), False

    def moore(ck: str, router: str):
        def make():
            m = moorize.load(factored[ck], router=router, tasks=TASKS)
            return m, moorize.prepare_for_training(m), True
        return make

    variants = {"lora": ("PEFT LoRA r=8 (q,k,v,o,gate,up,down), dense bf16", lora),
                "full": ("MoORE full rank, router `task+sample`", moore("full", "task+sample")),
                "full-task": ("MoORE full rank, router `task`", moore("full", "task")),
                "r64": (f"MoORE rank {rank} + residual, router `task+sample`", moore("r64", "task+sample")),
                "r64-task": (f"MoORE rank {rank} + residual, router `task`", moore("r64", "task"))}
    res, rows = {}, []
    for key, (label, make) in variants.items():
        _reset_peak(device)
        model, params, routed = make()
        model.to(device).train()
        if args.checkpointing:  # non-reentrant, as moorize's own: frozen embeddings need no input grads
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        step = _step_fn(model, params, ids, routed, autocast)
        seconds, loss = _timed(step, device, args.repeat, args.warmup)
        res[key] = {"seconds": seconds, "tokens_per_s": batch * seq / seconds, "peak_bytes": _peak(device),
                    "trainable": sum(p.numel() for p in params), "loss": float(loss)}
        del model, params, step
        _release(device)
        ratio = seconds / res["lora"]["seconds"]
        res[key]["vs_lora"] = ratio
        goal = f"{'PASS' if ratio <= TRAIN_GOAL else 'FAIL'} (goal ≤ {TRAIN_GOAL}×)" if key == "full" else ""
        rows.append((label, f"{res[key]['trainable'] / 1e6:.1f} M", U.fmt_s(seconds),
                     f"{res[key]['tokens_per_s']:.0f}", U.fmt_bytes(res[key]["peak_bytes"]), U.fmt_x(ratio), goal))
    print(U.table(["model", "trainable", "step (median)", "tokens/s", "peak device memory", "vs LoRA", "goal"],
                  rows, align="lrrrrrl"), flush=True)
    U.note(f"\nMedian of {args.repeat} steps after {args.warmup} warm-up step(s), one model on the device at a "
           f"time; {'bf16 autocast' if autocast else 'float32'}, gradient checkpointing "
           f"{'on' if args.checkpointing else 'off'}; the factors are stored in the source's bfloat16.")
    RESULTS["train"] = {"batch": batch, "seq": seq, "layers": args.layers, **res}
    return True


# ---- decode ---------------------------------------------------------------------------------------------------

def part_decode(work: Path, args) -> bool:
    import numpy as np
    import torch
    from _util import randomize_routers

    import moorize
    from moorize.exporters.onnx import export_onnx
    from moorize.model.pytorch_generation import compiled_decoding
    from moorize.runtime import MoOREOrtModel

    device = args.device
    on_gpu = device.startswith("cuda")
    layers = 2 if args.quick else 30
    U.heading(f"Decoding: SmolLM2-135M shapes ({layers} blocks), router `task+sample`, on {device}")
    src, factored, adapter = work / "smollm2-hf", work / "smollm2-factored", work / "smollm2-adapter"
    _write_synthetic(str(src), QUICK if args.quick else SMOLLM2, layers, 2 * 10**9, device=device)
    moorize.convert(src, factored, device=device)
    model = moorize.load(factored, tasks=TASKS)
    randomize_routers(model, seed=1)
    moorize.save_adapter(model, adapter)
    del model

    new, prompt = args.new_tokens, 32
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    ids = torch.randint(3, vocab, (16, prompt), generator=torch.Generator().manual_seed(0))
    tasks = torch.arange(16) % 2
    dtype = torch.float16 if on_gpu else torch.float32
    res, rows = {}, []

    from transformers import AutoModelForCausalLM

    # the dense source model is the baseline the goal is stated against (MoORE decode <= 1.4x its time)
    for name, label, load in (
            ("dense", "dense original", lambda: AutoModelForCausalLM.from_pretrained(src, dtype=dtype)),
            ("torch", "MoORE", lambda: moorize.load(factored, adapter, dtype=dtype))):
        pt = load().to(device).eval()
        for batch, compiled in [(b, c) for b in (1, 16) for c in ((False, True) if args.compile else (False,))]:
            b_ids, b_tasks = ids[:batch].to(device), tasks[:batch]  # task ids stay on the host: no sync
            extra = compiled_decoding(device) if compiled else {}

            def run(pt=pt, b_ids=b_ids, b_tasks=b_tasks, routed=name != "dense", extra=extra):
                with torch.no_grad():
                    return pt.generate(b_ids, attention_mask=torch.ones_like(b_ids), max_new_tokens=new,
                                       min_new_tokens=new, do_sample=False, pad_token_id=0,
                                       **({"task_ids": b_tasks} if routed else {}), **extra)
            key = f"{name}{'_compiled' if compiled else ''}_b{batch}"
            first = _timed(run, device)[0] if compiled else None  # the compile, before the warm-up
            seconds, _ = _timed(run, device, args.repeat, 1)
            res[key] = {"tokens_per_s": batch * new / seconds, "seconds": seconds,
                        **({"first_call_seconds": first} if compiled else {})}
            vs = "" if key == f"dense_b{batch}" else U.fmt_x(seconds / res[f"dense_b{batch}"]["seconds"])
            how = ", compiled (static cache" + (", CUDA graphs)" if on_gpu else ")") if compiled else ""
            rows.append((f"PyTorch {label}{how}, {device}, {str(dtype).removeprefix('torch.')}", batch,
                         f"{batch * new / seconds:.0f}", f"{seconds * 1e3:.0f} ms", vs))
        del pt
        _release(device)

    import onnxruntime as ort

    cuda_ep = "CUDAExecutionProvider" in ort.get_available_providers()
    ort_dtype = "float16" if on_gpu and cuda_ep else "float32"
    export_onnx(factored, work / "smollm2-onnx", adapter, with_past=True, dtype=ort_dtype, validate_export=False)
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if on_gpu and cuda_ep else ["CPUExecutionProvider"]
    m = MoOREOrtModel.from_export(work / "smollm2-onnx", providers=providers)
    for batch in (1, 16):
        np_ids, np_tasks = ids[:batch].numpy(), tasks[:batch].numpy()
        m.generate_ids(np_ids, task=list(np_tasks), max_new_tokens=new)  # warm-up
        times = []
        for _ in range(args.repeat):
            m.generate_ids(np_ids, task=list(np_tasks), max_new_tokens=new)
            times.append(m.last_times)
        seconds = statistics.median(t.total for t in times)
        made = int(np.median([t.new_tokens for t in times]))
        res[f"ort_b{batch}"] = {"tokens_per_s": made / seconds, "seconds": seconds, "provider": m.provider,
                                "dtype": ort_dtype}
        rows.append((f"ONNX Runtime, {m.provider}, {ort_dtype}", batch, f"{made / seconds:.0f}",
                     f"{seconds * 1e3:.0f} ms", ""))
    print(U.table(["runtime", "batch", "tokens/s", f"{new} tokens", "vs dense"], rows, align="lrrrr"), flush=True)
    why = "" if not on_gpu or cuda_ep else (
        f"\nONNX Runtime has no CUDA provider here (providers: {', '.join(ort.get_available_providers())}; "
        f"onnxruntime {ort.__version__}): onnxruntime-gpu is not installed, so it ran float32 on the CPU.")
    compile_note = "" if not args.compile else " Compiled rows: the first call (the compile) is apart, " + ", ".join(
        f"{ {'dense': 'dense', 'torch': 'MoORE'}[k.removesuffix('_compiled_b1')]} {v['first_call_seconds']:.0f} s"
        for k, v in res.items() if k.endswith("_compiled_b1")) + " at batch 1."
    U.note(f"\nA {prompt}-token prompt, exactly {new} new tokens, greedy; batch 16 alternates the two tasks row by "
           f"row. Median of {args.repeat} runs after a warm-up.{compile_note}{why}")
    RESULTS["decode"] = {"new_tokens": new, "prompt": prompt, "providers": ort.get_available_providers(), **res}
    return True


# ---- main -----------------------------------------------------------------------------------------------------

PARTS = {"convert": part_convert, "train": part_train, "decode": part_decode}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    ap.add_argument("--parts", type=lambda s: s.split(","), default=list(PARTS), help="convert,train,decode")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 2 blocks: a smoke test of the script")
    ap.add_argument("--layers", type=int, default=None, help="blocks of the 8B shapes (default 4, --quick 2)")
    ap.add_argument("--batch", type=int, default=None, help="training batch (default 1)")
    ap.add_argument("--seq", type=int, default=None, help="training sequence length (default 2048, --quick 32)")
    ap.add_argument("--no-checkpointing", dest="checkpointing", action="store_false",
                    help="train without gradient checkpointing")
    ap.add_argument("--new-tokens", type=int, default=None, help="decoded tokens per run (default 64, --quick 4)")
    ap.add_argument("--compile", action="store_true",
                    help="decode also with moorize generate --compile's static cache and compiled step")
    ap.add_argument("--repeat", type=int, default=None, help="timed runs (default 5, --quick 1)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds: start no part after this much time has passed (for a timed device lease)")
    ap.add_argument("--json", type=Path, default=None, help="also write every figure to this file")
    ap.add_argument("--out-dir", type=Path, default=None, help="where to put generated data (default: temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the generated data")
    args = ap.parse_args(argv)
    U.require_choices(ap, "--parts", args.parts, PARTS, "part")
    args.layers = args.layers or (2 if args.quick else 4)
    args.batch = args.batch or 1
    args.seq = args.seq or (32 if args.quick else 2048)
    args.new_tokens = args.new_tokens or (4 if args.quick else 64)
    args.repeat = args.repeat or (1 if args.quick else 5)
    import os

    import torch

    U.quiet_torch(args.threads or os.cpu_count() or 1)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: no CUDA GPU is visible to torch {torch.__version__}")
    if args.device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(args.device))
        RESULTS["device"] = {"name": props.name, "memory_bytes": props.total_memory, "torch": torch.__version__,
                             "cuda": torch.version.cuda}
    started = time.perf_counter()

    def run_part(work: Path, name: str) -> bool:
        """One part, skipped once --budget is spent; the JSON is rewritten after each, so a run cut short
        (a device lease ending) still leaves every finished part's figures."""
        if args.budget and time.perf_counter() - started > args.budget:
            U.note(f"\n{name}: skipped, the --budget of {args.budget:.0f} s is spent")
            return True
        ok = PARTS[name](work, args)
        if args.json:
            args.json.write_text(json.dumps(RESULTS, indent=2) + "\n")
        return ok

    return U.run_benchmark(f"moorize GPU benchmark on {args.device}", "moorize-bench-gpu-", args,
                           [lambda work, p=p: run_part(work, p) for p in args.parts])


if __name__ == "__main__":
    sys.exit(main())
