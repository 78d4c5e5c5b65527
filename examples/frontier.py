"""The accuracy-forgetting frontier of MoORE's routers and of PEFT baselines on SmolLM2-135M-Instruct.

One point per method cannot separate a method from its learning rate. This sweeps each method over
learning rates (from "barely learns" to "forgets a lot") and seeds on the four tasks, data, exact-match
metric and general-text oblivion measure of ``multitask_smollm2.py``, and draws mean held-out exact
match against KL to the base model on text no task touches, one curve per method.

Methods (the same data, batches, steps, schedule, loss and target modules for all):

* MoORE's routers ``task``, ``task+sample`` and ``sample`` with moorize train's defaults (the sample router
  sees x / rms(x) and learns at a tenth of the learning rate), and MoORE with the published recipe's
  settings (router ``task+sample`` seeing x as it comes, one learning rate for every tensor, warmup then
  constant, weight decay 0.01); the studies behind the defaults on request (``--methods``);
* PEFT LoRA r=8, PiSSA (LoRA initialised from the top singular triplets) and OFT (block-diagonal
  orthogonal rotations), trained by the loop of ``run_peft``, which mirrors moorize.train's; HRA
  (Householder reflections) on request (PEFT builds it densely: GPU only).

Every run is recorded (per-task and mean exact match, KL and perplexity on general text) and
appended atomically to ``examples/results/frontier-<setting>.json`` as soon as it ends; a rerun
skips the runs already there, so an interrupted sweep resumes. Conflict: seed 0 of every method at the
two middle learning rates of its grid is also trained once per task alone (a quarter of the steps: as many examples of its
task as the multi-task run sees); a task's conflict is its multi-task accuracy minus its single-task one.

    python examples/frontier.py --quick --jobs 2      # 2 CPU cores, two runs at a time (time: docs/TRAINING.md)
    python examples/frontier.py                       # the full setting (GPU)
    python examples/frontier.py --quick --plot-only   # figure and tables from the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the multi-task example, imported as a module

import multitask_smollm2 as mt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
QUICK_TARGETS = ["q_proj", "v_proj", "down_proj"]  # attention in and the MLP out: a third of the cost


@dataclass(frozen=True)
class Method:
    """A curve of the frontier: how to train it, and its learning-rate grid (quick setting)."""

    label: str
    kind: str  # "moore" (moorize.train options) or a PEFT method of multitask_smollm2.peft_config
    lrs: tuple[float, ...]
    options: dict = field(default_factory=dict)
    extra: bool = False  # a remedy under study: swept only when named in --methods


METHODS = {
    # MoORE's three router modes as moorize train gives them (the defaults: the sample router sees x / rms(x),
    # so one step moves every token's gate alike however large its activations, and learns at a tenth of the lr;
    # test_frontier checks they are the defaults), and the published recipe
    "moore_task": Method("MoORE task", "moore", (3e-4, 1e-3, 3e-3, 1e-2), {"router": "task"}),
    "moore_ts_rms": Method("MoORE task+sample, norm (defaults)", "moore", (1e-4, 3e-4, 1e-3, 3e-3),
                           {"router": "task+sample", "sample_router_lr": 0.1, "router_norm": "rms"}),
    "moore_sample_rms": Method("MoORE sample, norm", "moore", (1e-4, 3e-4, 1e-3, 3e-3),
                               {"router": "sample", "sample_router_lr": 0.1, "router_norm": "rms"}),
    "moore_recipe": Method("MoORE published recipe", "moore", (3e-5, 1e-4, 3e-4, 1e-3),
                           {"router": "task+sample", "router_norm": "none", "sample_router_lr": 1.0,
                            "schedule": "constant", "weight_decay": 0.01}),
    "lora": Method("LoRA r=8", "lora", (1e-4, 3e-4, 1e-3, 3e-3)),
    "pissa": Method("PiSSA r=8", "pissa", (3e-5, 1e-4, 3e-4, 1e-3)),
    "oft": Method("OFT block 32", "oft", (1e-4, 3e-4, 1e-3, 3e-3)),
    # PEFT's HRA multiplies dense in×in reflections every forward: 11.8 GB on the CPU, so GPU only (full setting)
    "hra": Method("HRA r=8", "hra", (3e-4, 1e-3, 3e-3, 1e-2), extra=True),
    # the studies behind the defaults: the sample router seeing x as it comes ("no norm", as published), and
    # remedies for its reach (B C x acts on every token) other than the norm: fewer router experts, its own lr
    "moore_ts": Method("MoORE task+sample, no norm", "moore", (1e-4, 3e-4, 1e-3, 3e-3),
                       {"router": "task+sample", "sample_router_lr": 0.1, "router_norm": "none"}, extra=True),
    "moore_sample": Method("MoORE sample, no norm", "moore", (1e-4, 3e-4, 1e-3, 3e-3),
                           {"router": "sample", "sample_router_lr": 0.1, "router_norm": "none"}, extra=True),
    "moore_ts_kr16": Method("MoORE task+sample, no norm, k_r=16", "moore", (1e-4, 3e-4, 1e-3, 3e-3),
                            {"router": "task+sample", "sample_router_lr": 0.1, "router_experts": 16,
                             "router_norm": "none"}, extra=True),
    "moore_ts_slr001": Method("MoORE task+sample, no norm, sample lr ×0.01", "moore", (1e-4, 3e-4, 1e-3, 3e-3),
                              {"router": "task+sample", "sample_router_lr": 0.01, "router_norm": "none"},
                              extra=True),
    # moorize train's defaults until December 2026 (task+sample as published: x as it comes, the full lr)
    "moore_old_defaults": Method("MoORE, old defaults (no norm, sample lr ×1)", "moore", (1e-4, 3e-4, 1e-3, 3e-3),
                                 {"router": "task+sample", "router_norm": "none", "sample_router_lr": 1.0},
                                 extra=True),
}
DEFAULTS_METHOD, OLD_DEFAULTS_METHOD = "moore_ts_rms", "moore_old_defaults"  # docs/TRAINING.md's before and after

SETTINGS = {
    # multitask_smollm2's quick data and steps, on three target modules per block instead of seven
    "quick": dict(train_per_task=96, eval_per_task=24, steps=48, batch_size=8, max_length=64,
                  targets=QUICK_TARGETS, seeds=[0, 1, 2], single=True),
    "full": dict(train_per_task=1000, eval_per_task=100, steps=600, batch_size=16, max_length=64,
                 targets=list(mt.LORA_TARGETS), seeds=[0, 1, 2], single=True),
    "smoke": dict(train_per_task=8, eval_per_task=4, steps=4, batch_size=4, max_length=64,
                  targets=["down_proj"], seeds=[0], single=True),
}
# distinct colours in METHODS' order (the defaults' curve red); the old defaults' curve is black
COLORS = ("#1f77b4", "#d62728", "#ff7f0e", "#8c564b", "#2ca02c", "#9467bd", "#17becf", "#7f7f7f", "#bcbd22",
          "#e377c2", "#aec7e8", "#ffbb78", "#98df8a", "#c5b0d5")
LR_ORDER = (1, 2, 0, 3)  # the middle of each grid first: two points per curve before its ends


# ---- the sweep ---------------------------------------------------------------------------------------------------

def run_key(run: dict) -> tuple:
    return run["method"], float(run["lr"]), int(run["seed"]), run["scope"]


def plan(setting: dict, methods: list[str], lrs: list[float] | None, seeds: list[int] | None) -> list[tuple]:
    """Every (method, lr, seed, scope) to run, most informative first: seed 0 of every method across its
    grid, then the other seeds, then the single-task runs (conflict, seed 0) at the two middle learning rates
    of each grid (where the curves' useful points lie; both ends barely learn or forget a lot)."""
    seeds = list(seeds if seeds is not None else setting["seeds"])
    grid = {m: sorted(lrs) if lrs else [METHODS[m].lrs[i] for i in LR_ORDER if i < len(METHODS[m].lrs)]
            for m in methods}
    if setting["name"] == "smoke" and not lrs:
        grid = {m: [METHODS[m].lrs[LR_ORDER[0]]] for m in methods}
    # learning-rate rank outermost: every method gets a point before any gets its second
    ranked = [(m, lr) for i in range(max(map(len, grid.values()))) for m in methods for lr in grid[m][i:i + 1]]
    out = [("base", 0.0, 0, "multi")]
    out += [(m, lr, s, "multi") for s in seeds for m, lr in ranked]
    if setting["single"]:
        middle = {m: set(sorted(grid[m])[1:3] if len(grid[m]) > 2 else grid[m]) for m in methods}
        out += [(m, lr, seeds[0], "single") for m, lr in ranked if lr in middle[m]]
    return out


def load_results(path: Path, setting: dict) -> dict:
    """The results so far; a file made under another setting is refused rather than mixed."""
    if not path.is_file():
        return {"setting": setting, "runs": []}
    results = json.loads(path.read_text())
    if results["setting"] != setting:
        raise SystemExit(f"{path} holds a different setting ({results['setting']}); move it away or pick "
                         "another --results-dir")
    return results


def append_run(path: Path, setting: dict, run: dict) -> None:
    """Add one run to the JSON atomically (write a temporary file, then rename it over the old one)."""
    results = load_results(path, setting)
    results["runs"] = [r for r in results["runs"] if run_key(r) != run_key(run)] + [run]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(tmp, path)


def task_files(data_dir: Path, task: str) -> tuple[Path, Path]:
    """train/eval JSONL of one task alone (moorize.train refuses evaluation tasks it does not train)."""
    paths = data_dir / f"train-{task}.jsonl", data_dir / f"eval-{task}.jsonl"
    for src, dst in zip(("train.jsonl", "eval.jsonl"), paths):
        rows = [line for line in (data_dir / src).read_text().splitlines() if json.loads(line)["task"] == task]
        dst.write_text("".join(row + "\n" for row in rows))
    return paths


def run_one(key: tuple, s: dict, dense: Path, factored: Path, data_dir: Path, work: Path) -> dict:
    """One run of the sweep (in a fresh process): its metrics, keyed by method, lr, seed and scope."""
    name, lr, seed, scope = key
    s = {**s, "lr": lr, "seed": seed}
    tag = f"{name}-{lr:g}-{seed}-{scope}"  # runs in parallel never share an adapter directory
    data, eval_path = data_dir / "train.jsonl", data_dir / "eval.jsonl"
    if name == "base":
        result = mt.run_base(dense, eval_path, s)
        options = {}
    elif scope == "multi":
        result = train_one(METHODS[name], s, dense, factored, data, eval_path, None, work / f"adapter-{tag}")
        options = METHODS[name].options
    else:
        result, options = {"accuracy": {}, "train_s": 0.0}, METHODS[name].options
        single = {**s, "steps": max(1, s["steps"] // 4)}
        for task in mt.TASKS:
            one = train_one(METHODS[name], single, dense, factored, *task_files(data_dir, task), task,
                            work / f"adapter-{tag}-{task}")
            result["accuracy"][task] = one["accuracy"][task]
            result["train_s"] += one["train_s"]
    acc = result["accuracy"]
    run = {"method": name, "label": METHODS[name].label if name != "base" else "base", "lr": lr, "seed": seed,
           "scope": scope, "options": options, "accuracy": acc,
           "mean_exact_match": statistics.fmean(acc[t]["exact_match"] for t in mt.TASKS)}
    if "oblivion" in result:
        run.update(kl_to_base=result["oblivion"]["kl_to_base"], perplexity=result["oblivion"]["perplexity"])
    run.update({k: result[k] for k in ("train_s", "steps_per_s", "peak_rss_mb", "trainable") if k in result})
    return run


def train_one(method: Method, s: dict, dense: Path, factored: Path, data: Path, eval_path: Path,
              task: str | None, out: Path) -> dict:
    """One training run of a method (MoORE or PEFT) on the given data; MoORE's adapter is deleted after. The
    original model's log-probabilities on general text are computed once per sweep and kept next to ``out``."""
    base_cache = out.parent / f"base-logprobs-{'factored' if method.kind == 'moore' else 'dense'}.pt"
    if method.kind != "moore":
        return mt.run_peft(dense, data, eval_path, s, task, s["steps"], method=method.kind, base_cache=base_cache)
    try:
        return mt.run_moore(factored, data, eval_path, out, s, method.label, method.options,
                            measure_oblivion=task is None, base_cache=base_cache)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def sweep(setting: dict, todo: list[tuple], path: Path, work: Path, jobs: int = 1) -> None:
    """Run what the JSON lacks in child processes, ``jobs`` at a time, appending each run as it ends."""
    s = {k: v for k, v in setting.items() if k not in ("name", "seeds", "single")}
    done = {run_key(r) for r in load_results(path, setting)["runs"]}
    left = [k for k in todo if k not in done]
    print(f"{len(todo) - len(left)} of {len(todo)} runs already in {path}; {len(left)} to go", flush=True)
    if not left:
        return
    dense, factored = mt.prepare_checkpoints(work, setting["targets"])
    data_dir = work / f"data-{setting['name']}"
    mt.write_data(data_dir, setting["train_per_task"], setting["eval_per_task"])
    lock = threading.Lock()  # one writer of the JSON at a time

    def one(i: int, key: tuple) -> None:
        t0 = time.perf_counter()
        try:
            run = mt.in_child(run_one, key, s, dense, factored, data_dir, work)
        except Exception as e:  # one broken run (a diverged baseline, a killed child) must not end the sweep
            print(f"[{i}/{len(left)}] {key} FAILED: {type(e).__name__}: {e}", flush=True)
            return
        run.update(wall_s=time.perf_counter() - t0, parallel_runs=jobs)
        with lock:
            append_run(path, setting, run)
        kl = f", KL {run['kl_to_base']:.3f}" if "kl_to_base" in run else ""
        print(f"[{i}/{len(left)}] {key}: exact match {run['mean_exact_match']:.3f}{kl} ({run['wall_s']:.0f} s)",
              flush=True)

    with ThreadPoolExecutor(jobs) as pool:  # threads only wait: each run is its own process
        for future in [pool.submit(one, i, key) for i, key in enumerate(left, 1)]:
            future.result()


# ---- the report --------------------------------------------------------------------------------------------------

def points(runs: list[dict]) -> dict[tuple[str, float], dict]:
    """Multi-task runs of each (method, lr) summarised over seeds; conflict from its seed-0 single-task run."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in runs:
        if r["scope"] == "multi" and r["method"] != "base":
            groups.setdefault((r["method"], float(r["lr"])), []).append(r)
    single = {(r["method"], float(r["lr"])): r for r in runs if r["scope"] == "single" and r["seed"] == 0}
    out = {}
    for key, rs in sorted(groups.items()):
        em, kl = [r["mean_exact_match"] for r in rs], [r["kl_to_base"] for r in rs]
        label = METHODS[key[0]].label if key[0] in METHODS else rs[0]["label"]  # today's name of the curve
        p = {"method": key[0], "label": label, "lr": key[1], "n": len(rs),
             "em": statistics.fmean(em), "em_sd": statistics.stdev(em) if len(em) > 1 else 0.0,
             "em_lo": min(em), "em_hi": max(em), "kl": statistics.fmean(kl), "kl_lo": min(kl), "kl_hi": max(kl),
             "ppl": statistics.fmean(r["perplexity"] for r in rs),
             "per_task": {t: statistics.fmean(r["accuracy"][t]["exact_match"] for r in rs) for t in mt.TASKS}}
        seed0 = next((r for r in rs if r["seed"] == 0), None)
        if key in single and seed0 is not None:
            p["conflict"] = {t: seed0["accuracy"][t]["exact_match"] - single[key]["accuracy"][t]["exact_match"]
                             for t in mt.TASKS}
        out[key] = p
    return out


def select(pts: dict, admissible, score) -> dict[str, dict | None]:
    """Per method: among its (seed-mean) points that are admissible, the one of highest score (None if none).
    Selection is on means over seeds, never on a lucky seed."""
    out: dict[str, dict | None] = {}
    for p in pts.values():
        cur = out.get(p["method"])
        if admissible(p) and (cur is None or score(p) > score(cur)):
            out[p["method"]] = p
        else:
            out.setdefault(p["method"], None)
    return out


def best_within(pts: dict, kl_budget: float) -> dict[str, dict | None]:
    """Per method: the learning rate of highest mean exact match whose mean KL is within the budget."""
    return select(pts, lambda p: p["kl"] <= kl_budget, lambda p: p["em"])


def least_forgetting(pts: dict, accuracy: float) -> dict[str, dict | None]:
    """Per method: the learning rate of lowest mean KL whose mean exact match reaches ``accuracy``."""
    return select(pts, lambda p: p["em"] >= accuracy, lambda p: -p["kl"])


def _fmt_point(p: dict | None) -> str:
    if p is None:
        return "— | — | — | —"
    sd = f" ± {p['em_sd']:.2f}" if p["n"] > 1 else ""
    return f"{p['lr']:g} | {p['em']:.3f}{sd} | {p['kl']:.3f} | {p['n']}"


def tables(results: dict, kl_budget: float, accuracy: float) -> str:
    """Markdown: best accuracy within the forgetting budget, least forgetting at the accuracy, every point."""
    runs, pts = results["runs"], points(results["runs"])
    labels = {p["method"]: p["label"] for p in pts.values()}
    order = [m for m in METHODS if m in labels]
    best, least = best_within(pts, kl_budget), least_forgetting(pts, accuracy)
    lines = [f"Best mean exact match with KL(base ‖ model) ≤ {kl_budget:g} (means over seeds):", "",
             "| method | lr | exact match | KL | seeds |", "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {labels[m]} | {_fmt_point(best[m])} |" for m in order]
    lines += ["", f"Lowest KL reaching mean exact match ≥ {accuracy:g}:", "",
              "| method | lr | exact match | KL | seeds |", "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {labels[m]} | {_fmt_point(least[m])} |" for m in order]
    lines += defaults_table(pts)
    base = next((r for r in runs if r["method"] == "base"), None)
    head = "| method | lr | seeds | exact match (min–max) | " + " | ".join(mt.TASKS) + \
        " | KL (min–max) | perplexity | conflict (mean; per task) |"
    lines += ["", "Every point (mean over seeds; conflict: seed 0 multi-task minus single-task exact match):", "",
              head, "| --- |" + " ---: |" * (len(mt.TASKS) + 6)]
    if base is not None:
        lines.append("| base | — | — | " + f"{base['mean_exact_match']:.3f} | " +
                     " | ".join(f"{base['accuracy'][t]['exact_match']:.2f}" for t in mt.TASKS) +
                     f" | 0 | {base['perplexity']:.2f} | — |")
    for m in order:
        for p in sorted((p for p in pts.values() if p["method"] == m), key=lambda p: p["lr"]):
            c = p.get("conflict")
            conflict = "—" if c is None else (f"{statistics.fmean(c.values()):+.2f}; " +
                                               " ".join(f"{v:+.2f}" for v in c.values()))
            lines.append(f"| {p['label']} | {p['lr']:g} | {p['n']} | {p['em']:.3f} ({p['em_lo']:.2f}–{p['em_hi']:.2f})"
                         " | " + " | ".join(f"{p['per_task'][t]:.2f}" for t in mt.TASKS) +
                         f" | {p['kl']:.3f} ({p['kl_lo']:.3f}–{p['kl_hi']:.3f}) | {p['ppl']:.2f} | {conflict} |")
    return "\n".join(lines) + "\n"


def defaults_table(pts: dict) -> list[str]:
    """Markdown lines: moorize train's old and new defaults side by side at each learning rate (empty until
    both curves have points)."""
    old = {p["lr"]: p for p in pts.values() if p["method"] == OLD_DEFAULTS_METHOD}
    new = {p["lr"]: p for p in pts.values() if p["method"] == DEFAULTS_METHOD}
    if not old or not new:
        return []
    lines = ["", f"moorize train's defaults before (`{OLD_DEFAULTS_METHOD}`: {_options(OLD_DEFAULTS_METHOD)}) "
             f"and now (`{DEFAULTS_METHOD}`: {_options(DEFAULTS_METHOD)}), means over seeds:", "",
             "| lr | old: exact match | old: KL | old: seeds | new: exact match | new: KL | new: seeds |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for lr in sorted(set(old) | set(new)):
        cells = []
        for p in (old.get(lr), new.get(lr)):
            cells += ["—"] * 3 if p is None else [f"{p['em']:.3f}", f"{p['kl']:.3f}", str(p["n"])]
        lines.append(f"| {lr:g} | " + " | ".join(cells) + " |")
    return lines


def _options(method: str) -> str:
    return ", ".join(f"{k}={v}" for k, v in METHODS[method].options.items())


def plot(results: dict, png: Path, kl_budget: float, accuracy: float, planned: int | None = None) -> None:
    """Exact match against KL, one curve per method through its learning rates (seed means), bars spanning
    the seeds' range, every seed's run as a faint dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = points(results["runs"])
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for i, m in enumerate(m for m in METHODS if any(p["method"] == m for p in pts.values())):
        ps = sorted((p for p in pts.values() if p["method"] == m), key=lambda p: p["lr"])
        color = "black" if m == OLD_DEFAULTS_METHOD else COLORS[i % len(COLORS)]
        marker = "osD^v<>ph*"[i % 10]
        # the defaults stand out; the studies behind them (extras, but the old defaults) recede
        study = METHODS[m].extra and m != OLD_DEFAULTS_METHOD
        style = dict(lw=2.6 if m == DEFAULTS_METHOD else 0.9 if study else 1.4, ls="--" if study else "-",
                     alpha=0.55 if study else 1.0)
        xs, ys = [p["kl"] for p in ps], [p["em"] for p in ps]
        ax.errorbar(xs, ys, xerr=[[p["kl"] - p["kl_lo"] for p in ps], [p["kl_hi"] - p["kl"] for p in ps]],
                    yerr=[[p["em"] - p["em_lo"] for p in ps], [p["em_hi"] - p["em"] for p in ps]],
                    color=color, marker=marker, capsize=2, label=ps[0]["label"], **style)
        for p in ps:
            ax.annotate(f"{p['lr']:g}", (p["kl"], p["em"]), textcoords="offset points", xytext=(4, 3),
                        fontsize=6, color=color)
        seeds = [r for r in results["runs"] if r["method"] == m and r["scope"] == "multi"]
        ax.scatter([r["kl_to_base"] for r in seeds], [r["mean_exact_match"] for r in seeds], s=8, color=color,
                   alpha=0.3, lw=0)
    ax.axvline(kl_budget, color="grey", ls="--", lw=0.8)
    ax.axhline(accuracy, color="grey", ls=":", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("forgetting: KL(base ‖ model) per token on general text (log)")
    ax.set_ylabel("mean held-out exact match (4 tasks)")
    s = results["setting"]
    done = sum(r["method"] != "base" for r in results["runs"] if r["scope"] == "multi")
    partial = f"; PARTIAL: {len(results['runs'])} of {planned} runs" if planned and len(results["runs"]) < planned \
        else ""
    ax.set_title(f"SmolLM2-135M, {s['name']}: {s['steps']} steps × {s['batch_size']}, targets "
                 f"{'/'.join(s['targets'])}; {done} multi-task runs{partial}\n"
                 "points: seed means, labelled with the learning rate; bars: range over seeds; dots: single seeds; "
                 f"dashed: KL {kl_budget:g}; dotted: exact match {accuracy:g}", fontsize=8)
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=130)
    plt.close(fig)


def report(results: dict, stem: Path, kl_budget: float, accuracy: float, planned: int | None = None) -> str:
    """Write <stem>.png and <stem>.md from the results; return the tables."""
    text = tables(results, kl_budget, accuracy)
    plot(results, stem.with_suffix(".png"), kl_budget, accuracy, planned)
    stem.with_suffix(".md").write_text(text)
    return text


# ---- command line ------------------------------------------------------------------------------------------------

def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="The reduced CPU setting (2 cores: docs/TRAINING.md).")
    group.add_argument("--smoke", action="store_true", help="A tiny setting for tests: 4 steps, one lr, one seed.")
    ap.add_argument("--plot-only", action="store_true", help="Only redraw the figure and tables from the JSON.")
    ap.add_argument("--methods", default=None,
                    help=f"Comma-separated, of {', '.join(METHODS)} (default: all but the remedies under study).")
    ap.add_argument("--lrs", type=floats, default=None, help="Comma-separated learning rates for every method "
                    "(default: each method's grid).")
    ap.add_argument("--seeds", default=None, help="Comma-separated seeds (default: the setting's).")
    ap.add_argument("--kl-budget", type=float, default=0.2, help="Forgetting budget of the first table.")
    ap.add_argument("--accuracy", type=float, default=0.4, help="Mean exact match of the second table.")
    ap.add_argument("--results-dir", type=Path, default=RESULTS, help="Where frontier-<setting>.json/png/md live.")
    ap.add_argument("--work", type=Path, default=Path("moorize-frontier"), help="Checkpoints, data, adapters.")
    ap.add_argument("--jobs", type=int, default=1, help="Runs at a time, each in its own process (default 1).")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads per run (default: the machine's cores shared among --jobs).")
    args = ap.parse_args(argv)
    name = "quick" if args.quick else "smoke" if args.smoke else "full"
    setting = {"name": name, **SETTINGS[name]}
    methods = args.methods.split(",") if args.methods else [m for m, v in METHODS.items() if not v.extra]
    from moorize.errors import MoorizeError
    from moorize.selectors import require_matches

    try:  # every method named is one (moorize's selector rule), a typo's close match suggested
        require_matches("--methods", methods, METHODS, noun="method")
    except MoorizeError as e:
        ap.error(str(e))
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else None
    todo = plan(setting, methods, args.lrs, seeds)
    stem = args.results_dir / f"frontier-{name}"
    path = stem.with_suffix(".json")
    if args.jobs < 1:
        ap.error("--jobs must be at least 1")
    threads = args.threads or (max(1, len(os.sched_getaffinity(0)) // args.jobs) if args.jobs > 1 else None)
    if threads:  # inherited by the child processes, read when their torch starts
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    if not args.plot_only:
        sweep(setting, todo, path, args.work, args.jobs)
    results = load_results(path, setting)
    if not results["runs"]:
        raise SystemExit(f"no runs in {path} yet")
    print(report(results, stem, args.kl_budget, args.accuracy, planned=len(todo)))
    print(f"figure {stem.with_suffix('.png')}, tables {stem.with_suffix('.md')}, runs {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
