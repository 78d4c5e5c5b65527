"""Memory and time of each stage at scale, measured next to the memory model's prediction.

    python benchmarks/scale.py                     # SmolLM2-135M and a synthetic ~1.1B Llama (about 40 min)
    python benchmarks/scale.py --quick             # 4 SmolLM2 layers and a 2-layer "1.1B": smoke test only
    python benchmarks/scale.py --only checkpointing   # gradient checkpointing on SmolLM2 only
    python benchmarks/scale.py --only stages --models 1.1b   # the 1.1B stages only (about 25 min)
    python benchmarks/scale.py --only allocator    # CPU training steps under glibc's mmap thresholds (~15 min)

Stages, each in a fresh child process started from a small launcher (so its ``ru_maxrss``
is its own peak): ``moorize convert`` (full rank), ``moorize.load``, one training step
(AdamW over the MoORE parameters, router task+sample, batch × sequence of random ids,
causal-LM loss; with and without gradient checkpointing), and ``moorize export --onnx``
(with validation against PyTorch). The synthetic model is a LlamaForCausalLM with random
float32 weights: hidden 2048, intermediate 5632, 22 layers, 32 heads, 4 KV heads, vocab
32000 (TinyLlama-1.1B's shapes). Predictions come from ``memory_model.py`` (docs/SCALE.md
derives it), with the measured start-up of an interpreter that imports moorize and
transformers as its only constant; SVD times come from one timed decomposition per
distinct matrix shape on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _util as U  # noqa: E402
import memory_model as M  # noqa: E402
from convert import _prepare_smollm2, _run_in_child, _write_synthetic  # noqa: E402

TINYLLAMA = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
                 vocab_size=32000)
SCRIPT = str(Path(__file__).resolve())


# ---- stages (run in children: `python scale.py stage NAME ARGS...`) -------------------------------------

def _stage(name: str, argv: list[str]) -> None:
    import torch

    U.quiet_torch(2)
    import moorize
    from moorize.process import return_freed_memory

    return_freed_memory()  # fixed, as every moorize command does (train: with --gradient-checkpointing)
    t0 = time.perf_counter()
    out: dict = {}
    if name == "convert":
        moorize.convert(argv[0], argv[1])
    elif name == "load":
        model = moorize.load(argv[0])
        out["parameters"] = sum(p.numel() for p in model.parameters())
    elif name == "train":
        factored, batch, seq, checkpointing = argv[0], int(argv[1]), int(argv[2]), argv[3] == "1"
        steps = int(argv[4]) if len(argv) > 4 else 1
        from moorize.model.routed import prepare_for_training

        model = moorize.load(factored, tasks=["a", "b"], router="task+sample")
        params = prepare_for_training(model)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
        t0 = time.perf_counter()
        step_s = []
        for _ in range(steps):
            t_step = time.perf_counter()
            loss = model(input_ids=ids, labels=ids, task_ids=torch.arange(batch) % 2).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step_s.append(time.perf_counter() - t_step)
        out["loss"] = loss.item()
        out["median_step_s"] = sorted(step_s)[len(step_s) // 2]
        out["trainable"] = sum(p.numel() for p in params)
    elif name == "export":
        from moorize.exporters.onnx import export_onnx

        export_onnx(argv[0], argv[1])
    elif name == "baseline":
        import transformers  # noqa: F401

        import moorize.exporters.onnx  # noqa: F401
        import moorize.model.routed  # noqa: F401
    out["seconds"] = time.perf_counter() - t0
    print(json.dumps(out))


def _run(work: Path, name: str, *args, env: dict | None = None) -> tuple[U.ChildRun, dict]:
    run = U.measure_child([sys.executable, SCRIPT, "stage", name, *map(str, args)], work / "measure",
                          env={**os.environ, **env} if env else None)
    if run.returncode != 0:
        raise SystemExit(f"stage {name} failed (exit {run.returncode}):\n" + "\n".join(run.stderr.splitlines()[-15:]))
    return run, json.loads(run.stdout.strip().splitlines()[-1])


def _gib(n: float | None) -> str:
    return "–" if n is None else f"{n / 2**30:.2f} GiB"


def _err(pred: float, meas: float) -> str:
    return f"{(pred - meas) / meas:+.0%}"


# ---- parts --------------------------------------------------------------------------------------------------

def _smollm2_factored(work: Path, args) -> Path:
    """SmolLM2 converted at full rank in ``work``, once for the parts that train it."""
    hf, factored = work / "smollm2-hf", work / "smollm2-f"
    if not factored.exists():
        _run_in_child(_prepare_smollm2, str(hf), 4 if args.quick else None)
        _run(work, "convert", hf, factored)
    return factored


def part_checkpointing(work: Path, args) -> bool:
    """Gradient checkpointing on SmolLM2: peak memory and loss of one step with and without."""
    factored = _smollm2_factored(work, args)
    batch, seq = (2, 128) if args.quick else (4, 512)
    U.heading(f"Gradient checkpointing: SmolLM2-135M, one training step, batch {batch} × {seq}", 3)
    rows, losses = [], []
    for checkpointing in (False, True):
        run, rep = _run(work, "train", factored, batch, seq, int(checkpointing))
        losses.append(rep["loss"])
        rows.append(("on" if checkpointing else "off", _gib(run.peak_rss), U.fmt_s(rep["seconds"]),
                     f"{rep['loss']:.6f}"))
    print(U.table(["gradient checkpointing", "peak RSS", "step time", "loss"], rows, align="lrrr"))
    U.note(f"peak RSS with / without: {rows[1][1]} / {rows[0][1]}; losses equal: {losses[0] == losses[1]} "
           f"(|Δ| {abs(losses[0] - losses[1]):.2e})")
    return True


def part_allocator(work: Path, args) -> bool:
    """SmolLM2 training steps on the CPU under glibc's adaptive mmap threshold and under fixed ones:
    what ``moorize train`` trades by fixing it (it does under --gradient-checkpointing only)."""
    factored = _smollm2_factored(work, args)
    steps = 2 if args.quick else 4
    thresholds = [("glibc adaptive (MOORIZE_MMAP_THRESHOLD=0)", "0"), ("fixed 128 KiB (moorize's)", "131072"),
                  ("fixed 1 MiB", "1048576"), ("fixed 4 MiB", "4194304")]
    for batch, seq, checkpointing in ((1, 512, True), (8, 64, False)):
        U.heading(f"Allocator: SmolLM2-135M, {steps} training steps of {batch} × {seq}, checkpointing "
                  f"{'on' if checkpointing else 'off'}", 3)
        rows, base = [], None
        for label, threshold in thresholds:
            run, rep = _run(work, "train", factored, batch, seq, int(checkpointing), steps,
                            env={"MOORIZE_MMAP_THRESHOLD": threshold})
            base = base or (run.peak_rss, rep["median_step_s"])
            rows.append((label, _gib(run.peak_rss), f"{run.peak_rss / base[0]:.2f}×", U.fmt_s(rep["median_step_s"]),
                         f"{rep['median_step_s'] / base[1]:.2f}×"))
        print(U.table(["mmap threshold", "peak RSS", "vs adaptive", "median step", "vs adaptive"], rows,
                      align="lrrrr"), flush=True)
    return True


TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=256)


def _stages(work: Path, src: Path, label: str) -> dict[str, tuple[U.ChildRun, dict]]:
    """Every stage on one source checkpoint, each in its own child; the factored and exported outputs removed."""
    factored, onnx = work / f"{label}-f", work / f"{label}-onnx"
    out = {"convert": _run(work, "convert", src, factored), "load": _run(work, "load", factored)}
    for checkpointing in (True, False):
        out[f"train{int(checkpointing)}"] = _run(work, "train", factored, 1, 512, int(checkpointing))
    out["export"] = _run(work, "export", factored, onnx)
    for d in (factored, onnx):
        U.rmtree(d)
    return out


def part_stages(work: Path, args) -> bool:
    # each stage's fixed cost (imports, thread pools, allocator arenas, ONNX Runtime): the stage run on a
    # 1-layer, 64-wide Llama whose tensors weigh under a megabyte. The model adds what grows with the model.
    tiny = work / "tiny-hf"
    _run_in_child(_write_synthetic, str(tiny), TINY, 1, 10**9)
    tiny_runs = _stages(work, tiny, "tiny")
    fixed = {k: run.peak_rss for k, (run, _) in tiny_runs.items()}
    fixed_s = tiny_runs["convert"][0].seconds  # start-up, planning, writing
    U.note("fixed cost per stage (the stage on a 1-layer, 64-wide Llama): "
           + ", ".join(f"{k} {_gib(v)}" for k, v in fixed.items()))
    models = [("SmolLM2-135M", None), ("synthetic 1.1B Llama", TINYLLAMA)]
    models = [m for m, key in zip(models, ("smollm2", "1.1b")) if key in args.models]
    for label, shapes in models:
        src = work / f"{label[:4]}-hf"
        if shapes is None:
            _run_in_child(_prepare_smollm2, str(src), 4 if args.quick else None)
        else:
            _run_in_child(_write_synthetic, str(src), shapes, 2 if args.quick else 22, 10**9)
        arch = M.Architecture.from_config(src / "config.json")
        svd_s, factoring = M.probe_factoring(arch)
        runs = _stages(work, src, label[:4])
        predicted = {"convert": M.convert_peak(arch, fixed["convert"], factoring),
                     "load": M.load_peak(arch, fixed["load"]),
                     "train1": M.train_peak(arch, fixed["train1"], 1, 512, True),
                     "train0": M.train_peak(arch, fixed["train0"], 1, 512, False),
                     "export": M.export_peak(arch, fixed["export"])}
        names = {"convert": "convert (full rank)", "load": "load", "train1": "train step 1×512, checkpointing on",
                 "train0": "train step 1×512, checkpointing off", "export": "export --onnx (validated)"}
        rows = []
        for key, (run, rep) in runs.items():
            pred = predicted[key]
            seconds = rep["seconds"] if key.startswith("train") else run.seconds
            t_pred = fixed_s + svd_s + M.io_seconds(arch) if key == "convert" else None
            rows.append((names[key], _gib(run.peak_rss), _gib(pred), _err(pred, run.peak_rss), U.fmt_s(seconds),
                         U.fmt_s(t_pred) if t_pred else "", _err(t_pred, seconds) if t_pred else ""))
        U.heading(f"{label}: {arch.describe()}", 3)
        print(U.table(["stage", "peak RSS", "predicted", "error", "time", "predicted time", "error"], rows,
                      align="lrrrrrr"), flush=True)
        U.rmtree(src)
    U.heading("Projection (memory model)", 3)
    print(M.projection_table(fixed))
    return True


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "stage":
        _stage(sys.argv[2], sys.argv[3:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke test: 4 SmolLM2 layers, a 2-layer synthetic model")
    ap.add_argument("--only", choices=["checkpointing", "stages", "allocator"], default=None, help="run one part")
    ap.add_argument("--models", type=lambda t: t.split(","), default=["smollm2", "1.1b"],
                    help="comma-separated, of smollm2 and 1.1b (stages part; default both)")
    ap.add_argument("--out-dir", type=Path, default=None, help="where to put generated data (default: temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the generated data")
    args = ap.parse_args(argv)
    U.require_choices(ap, "--models", args.models, ("smollm2", "1.1b"), "model")
    U.quiet_torch(2)
    parts = []
    if args.only in (None, "checkpointing"):
        parts.append(lambda work: part_checkpointing(work, args))
    if args.only in (None, "stages"):
        parts.append(lambda work: part_stages(work, args))
    if args.only in (None, "allocator"):
        parts.append(lambda work: part_allocator(work, args))
    return U.run_benchmark("moorize scale benchmark", "moorize-bench-scale-", args, parts)


if __name__ == "__main__":
    sys.exit(main())
