"""Multi-task adaptation of the real SmolLM2-135M-Instruct: MoORE against LoRA.

Four tasks whose answers can be checked exactly (two-digit addition, reversing a word,
sorting words, sentiment from a lexicon) are generated with a fixed seed and written
to WORKDIR/data-{quick,full}/ (JSONL, reusable). On the same data, steps, batch,
learning rate (1e-3, AdamW, warmup + cosine) and loss normalisation it trains:

* MoORE (``moorize.train``) on the factored checkpoint, twice: router ``task+sample`` with
  moorize's defaults (the sample router sees x / rms(x) and learns at a tenth of the learning
  rate) and router ``task`` (task router and Householder reflections only),
* a multi-task PEFT LoRA (r=8, alpha=16) on the same target modules,
* one single-task LoRA per task (the same number of examples of its task),

and reports per-task exact match (conflict), the change on general text no task
touches (oblivion: perplexity and KL divergence to the original model), training
steps/s and peak memory. Every training run is a fresh child process, so its peak
RSS is its own.

    python examples/multitask_smollm2.py --quick       # CPU, well under 20 minutes
    python examples/multitask_smollm2.py               # the full setting, unchanged on a GPU

Exact match is strict: greedy decoding from the prompt must produce the answer and
then stop (computed exactly, without a decoding loop, as "the arg-max at every answer
position, including the end-of-sequence token, is right"). "answer first" drops the
stop requirement, which is fairer to the untrained model.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch

TASKS = ("addition", "reverse", "sort", "sentiment")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

WORDS = """apple river stone cloud garden window candle forest silver rabbit pencil market harbor winter
 summer planet butter castle dragon feather guitar island jacket kitten ladder meadow needle orange pepper
 quarter rocket saddle ticket violin walnut yellow zipper anchor basket cactus donkey engine falcon goblet
 helmet igloo jungle kettle lemon magnet napkin oyster parrot quiver ribbon salmon tunnel umpire velvet
 wagon bottle carpet desert tomato pillow mirror copper bridge camera cotton hammer lantern marble mitten
 noodle pocket puzzle shadow spider sponge tiger turtle valley wizard""".split()
POSITIVE = "wonderful delightful brilliant charming joyful lovely superb pleasant cheerful splendid".split()
NEGATIVE = "dreadful boring awful gloomy tedious miserable clumsy dull painful horrible".split()
SUBJECTS = "the film|the meal|the concert|the book|the hotel|the game|the trip|the show|the lecture|the party".split("|")

# held-out general text: no task touches it (oblivion is measured here)
GENERAL = [
    "The water cycle describes how water evaporates from oceans and lakes, condenses into clouds, and returns "
    "to the ground as rain or snow. Rivers carry much of it back to the sea, where the cycle begins again.",
    "Bread is made by mixing flour, water, salt and yeast. The yeast feeds on sugars in the dough and releases "
    "carbon dioxide, which makes the dough rise before it is baked in a hot oven.",
    "A library lends books, newspapers and recordings to the people of a town. Many libraries also offer quiet "
    "rooms for study, computers for public use, and reading hours for young children.",
    "The heart is a muscle that pumps blood through the body. Arteries carry blood away from the heart, while "
    "veins bring it back, and tiny capillaries connect the two inside every organ.",
    "Trains were among the first machines to carry large numbers of people over long distances. Railways "
    "changed how cities grew, because factories and homes could now be built far from rivers and ports.",
    "Photosynthesis lets plants turn sunlight, water and carbon dioxide into sugar and oxygen. Leaves are green "
    "because of chlorophyll, the pigment that captures light for this process.",
    "A good night of sleep helps the body repair itself and the mind store what it learned during the day. "
    "Most adults need between seven and nine hours, while children need more.",
    "The moon takes about a month to travel around the earth. As it moves, we see different parts of its sunlit "
    "side, which is why it seems to change shape from a thin crescent to a full circle.",
    "Volcanoes form where molten rock from deep inside the earth reaches the surface. Some erupt violently, "
    "throwing ash high into the sky, while others release slow rivers of lava.",
    "Music can be written down with notes on a staff of five lines. The position of each note shows its pitch, "
    "and its shape shows how long it should be held.",
    "Bees collect nectar from flowers and carry pollen from one plant to another. Without this work many fruits "
    "and vegetables would not grow, which is why farmers often keep hives near their fields.",
    "Maps use symbols and colours to show roads, rivers, mountains and towns. A scale tells how distances on "
    "the paper compare with real distances on the ground.",
]

SETTINGS = {
    "quick": dict(train_per_task=96, eval_per_task=24, steps=48, batch_size=8, lr=1e-3, max_length=64),
    "full": dict(train_per_task=1000, eval_per_task=100, steps=600, batch_size=16, lr=1e-3, max_length=64),
}
# the MoORE variants trained: key -> (label, moorize.train options)
MOORE_VARIANTS = {
    # moorize train's defaults, written out so that the results keep saying what ran
    "moore_ts": ("MoORE task+sample", {"router": "task+sample", "sample_router_lr": 0.1, "router_norm": "rms"}),
    "moore_task": ("MoORE task", {"router": "task"}),
}


# ---- data --------------------------------------------------------------------------------------------------------

def make_example(task: str, rng: random.Random) -> dict:
    if task == "addition":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return {"task": task, "prompt": f"Add: {a} + {b}\n", "response": str(a + b)}
    if task == "reverse":  # made-up words: no memorised answers, and never running out of new prompts
        w = "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(rng.randint(2, 3)))
        return {"task": task, "prompt": f"Reverse: {w}\n", "response": w[::-1]}
    if task == "sort":
        ws = rng.sample(WORDS, 3)
        return {"task": task, "prompt": f"Sort: {' '.join(ws)}\n", "response": " ".join(sorted(ws))}
    positive = rng.random() < 0.5
    adj = rng.sample(POSITIVE if positive else NEGATIVE, 2)
    return {"task": task, "prompt": f"Sentiment: {rng.choice(SUBJECTS)} was {adj[0]} and {adj[1]}\n",
            "response": "positive" if positive else "negative"}


def write_data(root: Path, train_per_task: int, eval_per_task: int, seed: int = 0) -> tuple[Path, Path]:
    """train.jsonl and eval.jsonl (no prompt of eval appears in train), written once per setting."""
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    train, held, seen = [], [], set()
    for task in TASKS:
        for n, out in ((eval_per_task, held), (train_per_task, train)):
            got, tries = 0, 0
            while got < n:
                ex, tries = make_example(task, rng), tries + 1
                if tries > 100 * n:
                    raise SystemExit(f"cannot make {n} distinct {task!r} prompts")
                if ex["prompt"] in seen:
                    continue
                seen.add(ex["prompt"])
                out.append(ex)
                got += 1
    rng.shuffle(train)
    paths = root / "train.jsonl", root / "eval.jsonl"
    for path, rows in zip(paths, (train, held)):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "general.txt").write_text("\n\n".join(GENERAL) + "\n")
    return paths


# ---- the checkpoint ----------------------------------------------------------------------------------------------

def prepare_checkpoints(work: Path, targets: list[str] | None = None) -> tuple[Path, Path]:
    """(de-quantised HF directory of SmolLM2, its factored checkpoint at full rank), made once.

    ``targets``: module-name patterns to factor (default: every linear layer of the blocks)."""
    import moorize
    from moorize.assets import smollm2_gguf
    from moorize.io.sources import dequantize_gguf

    dense = work / "smollm2"
    factored = work / ("smollm2-factored" + ("" if targets is None else "-" + "-".join(targets)))
    if not (dense / "config.json").is_file():
        dequantize_gguf(smollm2_gguf(), dense)
    if not (factored / "moorize.json").is_file():
        moorize.convert(dense, factored, overwrite=True, targets=targets)
    return dense, factored


# ---- evaluation (any causal LM: routed or PEFT) ------------------------------------------------------------------

def encoded(path: Path, tokenizer, tasks: list[str], max_length: int) -> list[dict]:
    from moorize.training.data import TaskTable, encode, read_examples

    examples = read_examples(path)
    return encode(examples, tokenizer, TaskTable(list(tasks), {}), max_length)


@torch.no_grad()
def task_accuracy(model, items: list[dict], tasks: list[str], pad_id: int, eos_id: int, routed: bool,
                  batch_size: int = 16) -> dict:
    """Per task: exact match (answer then stop) and 'answer first' (the answer, stop not required)."""
    from moorize.training.data import IGNORE_INDEX, collate
    from moorize.training.losses import causal_row_losses

    device = next(model.parameters()).device
    totals: dict[int, list[float]] = {}
    for start in range(0, len(items), batch_size):
        batch = {k: v.to(device) for k, v in collate(items[start:start + batch_size], pad_id).items()}
        kwargs = {"task_ids": batch["task_ids"]} if routed else {}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs).logits
        _, _, exact = causal_row_losses(logits, batch["labels"])
        no_stop = batch["labels"].masked_fill(batch["labels"] == eos_id, IGNORE_INDEX)
        _, _, first = causal_row_losses(logits, no_stop)
        for t, e, f in zip(batch["task_ids"].tolist(), exact.tolist(), first.tolist()):
            acc = totals.setdefault(t, [0, 0, 0])
            acc[0] += e
            acc[1] += f
            acc[2] += 1
    return {tasks[t]: {"exact_match": v[0] / v[2], "answer_first": v[1] / v[2]} for t, v in sorted(totals.items())}


@torch.no_grad()
def general_logprobs(model, tokenizer, task_id: int | None = None) -> list[torch.Tensor]:
    """Next-token log-probabilities on every general paragraph (float32, [tokens, vocab]), in one right-padded
    batch: a causal model's outputs at a paragraph's tokens never see the padding after them."""
    rows = [tokenizer(text)["input_ids"] for text in GENERAL]
    ids = torch.full((len(rows), max(map(len, rows))), tokenizer.pad_token_id or 0, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
    kwargs = {} if task_id is None else {"task_ids": torch.full((len(rows),), task_id)}
    logits = model(input_ids=ids, attention_mask=mask, **kwargs).logits
    return [torch.log_softmax(logits[i, :len(row) - 1].float(), -1) for i, row in enumerate(rows)]


def base_logprobs(original, tokenizer, cache: Path | None) -> list[torch.Tensor]:
    """``general_logprobs`` of the original model (``original()`` builds it), computed once per ``cache`` file:
    the runs of a sweep share it instead of each loading and running the original again."""
    if cache is not None and cache.is_file():
        return torch.load(cache)
    logprobs = general_logprobs(original(), tokenizer)
    if cache is not None:
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")  # runs in parallel may both write it
        torch.save(logprobs, tmp)
        os.replace(tmp, cache)
    return logprobs


def oblivion(tuned: list[torch.Tensor], base: list[torch.Tensor], tokenizer) -> dict:
    """Perplexity of the text under the model, and mean KL(base || model) per token."""
    nll, kl, n = 0.0, 0.0, 0
    for text, lp, lb in zip(GENERAL, tuned, base):
        target = tokenizer(text, return_tensors="pt")["input_ids"][0, 1:]
        nll += float(-lp.gather(1, target[:, None]).sum())
        kl += float((lb.exp() * (lb - lp)).sum())
        n += target.numel()
    return {"perplexity": math.exp(nll / n), "kl_to_base": kl / n}


# ---- one run per child process -----------------------------------------------------------------------------------

def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_moore(factored: Path, data: Path, eval_path: Path, out: Path, s: dict, label: str, options: dict,
              measure_oblivion: bool = True, base_cache: Path | None = None) -> dict:
    """moorize.train at s["lr"] (seed s.get("seed", 0)), then exact match and general-text oblivion
    (``base_cache``: where the original model's log-probabilities are kept between runs)."""
    from transformers import AutoTokenizer

    import moorize
    import moorize.model.layer

    seed = s.get("seed", 0)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    report = moorize.train(factored, data, out, overwrite=True, progress=False, max_steps=s["steps"],
                           batch_size=s["batch_size"], lr=s["lr"], max_length=s["max_length"], seed=seed,
                           **options)
    train_s = report.seconds
    peak = peak_rss_mb()
    model = moorize.load(factored, out)
    tok = AutoTokenizer.from_pretrained(factored)
    items = encoded(eval_path, tok, list(report.tasks), s["max_length"])
    acc = task_accuracy(model, items, list(report.tasks), tok.pad_token_id, tok.eos_token_id, routed=True)
    result = {"method": label, "options": options, "accuracy": acc,
              "steps": report.steps, "steps_per_s": report.steps / train_s, "train_s": train_s, "peak_rss_mb": peak,
              "trainable": sum(p.numel() for p in moorize.model.layer.trainable_parameters(model).values())}
    if measure_oblivion:
        base = base_logprobs(lambda: moorize.load(factored, router="sample"), tok, base_cache)  # fresh: the original
        per_task = {t: oblivion(general_logprobs(model, tok, i), base, tok) for i, t in enumerate(report.tasks)}
        result["oblivion"] = {k: sum(v[k] for v in per_task.values()) / len(per_task)
                              for k in ("perplexity", "kl_to_base")}
        result["oblivion_per_task"] = per_task
    return {**result, "wall_s": time.perf_counter() - t0}


def peft_config(method: str, targets: list[str]):
    """The PEFT baselines on the same targets: LoRA r=8 (alpha 16), PiSSA r=8 (LoRA initialised with the top-8
    singular triplets, which it removes from the frozen weight; alpha = r as published), OFT (a block-diagonal
    orthogonal rotation of the input, blocks of 32), HRA r=8 (a chain of 8 Householder reflections multiplying
    the frozen weight, the PEFT cousin of MoORE's H; PEFT builds it as dense in×in products every forward,
    11.8 GB peak RSS on SmolLM2 with down_proj on the CPU)."""
    from peft import HRAConfig, LoraConfig, OFTConfig

    if method == "lora":
        return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets)
    if method == "pissa":
        return LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, target_modules=targets, init_lora_weights="pissa")
    if method == "oft":
        return OFTConfig(r=0, oft_block_size=32, target_modules=targets)
    if method == "hra":
        return HRAConfig(r=8, target_modules=targets)
    raise ValueError(f"unknown PEFT method {method!r}")


def run_peft(dense: Path, data: Path, eval_path: Path, s: dict, task: str | None, steps: int,
             method: str = "lora", base_cache: Path | None = None) -> dict:
    """A PEFT method (``peft_config``) on s.get("targets", LORA_TARGETS), at s["lr"] and seed s.get("seed", 0),
    with the same batches, schedule and loss normalisation as moorize.train."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moorize.training.data import TaskTable, collate, encode, length_grouped_batches, read_examples
    from moorize.training.losses import causal_losses
    from moorize.training.options import TrainOptions
    from moorize.training.schedule import lr_factor

    seed = s.get("seed", 0)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(dense)
    table = TaskTable(list(TASKS), {})
    examples = [e for e in read_examples(data) if task is None or e.task == task]
    items = encode(examples, tok, table, s["max_length"])
    model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).eval()
    base = base_logprobs(lambda: model, tok, base_cache) if task is None else None  # before PiSSA rewrites W
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = get_peft_model(model, peft_config(method, s.get("targets", LORA_TARGETS)))
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opts = TrainOptions(lr=s["lr"], batch_size=s["batch_size"], max_steps=steps, seed=seed)
    optimizer = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(opts, steps))
    lengths = [len(i["input_ids"]) for i in items]
    batches, epoch = [], 0
    while len(batches) < steps:
        batches += length_grouped_batches(lengths, opts.batch_size, opts.seed + epoch)
        epoch += 1
    t_train = time.perf_counter()
    for idx in batches[:steps]:
        batch = {k: v.to(device) for k, v in collate([items[i] for i in idx], tok.pad_token_id).items()}
        loss_rows, count, _ = causal_losses(model, batch, keep_logits=True)  # as moorize.train computes it
        (loss_rows.sum() / count.sum()).backward()
        torch.nn.utils.clip_grad_norm_(params, opts.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    train_s = time.perf_counter() - t_train
    peak = peak_rss_mb()
    model.eval()
    eval_items = [i for i in encoded(eval_path, tok, list(TASKS), s["max_length"])
                  if task is None or TASKS[i["task_id"]] == task]
    acc = task_accuracy(model, eval_items, list(TASKS), tok.pad_token_id, tok.eos_token_id, routed=False)
    name = {"lora": "LoRA", "pissa": "PiSSA", "oft": "OFT", "hra": "HRA"}[method]
    result = {"method": name if task is None else f"{name} single ({task})", "accuracy": acc, "steps": steps,
              "steps_per_s": steps / train_s, "train_s": train_s, "peak_rss_mb": peak,
              "wall_s": time.perf_counter() - t0, "trainable": sum(p.numel() for p in params)}
    if task is None:
        result["oblivion"] = oblivion(general_logprobs(model, tok), base, tok)
    return result


def run_base(dense: Path, eval_path: Path, s: dict) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(dense)
    model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).eval()
    items = encoded(eval_path, tok, list(TASKS), s["max_length"])
    base = general_logprobs(model, tok)
    return {"method": "base", "accuracy": task_accuracy(model, items, list(TASKS), tok.pad_token_id, tok.eos_token_id, False),
            "oblivion": oblivion(base, base, tok)}


def in_child(fn, *args, **kwargs) -> dict:
    """Run fn in a fresh process (its own peak memory; nothing carried over between methods)."""
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args, **kwargs).result()


# ---- report ------------------------------------------------------------------------------------------------------

def tables(results: dict) -> str:
    base, lora = results["base"], results["lora"]
    moores = [results[k] for k in MOORE_VARIANTS]
    single = {t: results["single"][t]["accuracy"][t] for t in TASKS}
    names = [r["method"] for r in moores]
    lines = ["| task | base | " + " | ".join(names) + " | LoRA multi-task | LoRA single-task |",
             "| --- | ---: |" + " ---: |" * (len(moores) + 2)]
    for key, title in (("exact_match", "exact match"), ("answer_first", "answer first")):
        accs = [base["accuracy"]] + [r["accuracy"] for r in moores] + [lora["accuracy"], single]
        for t in TASKS:
            lines.append(f"| {t} ({title}) | " + " | ".join(f"{a[t][key]:.2f}" for a in accs) + " |")
        means = [sum(a[t][key] for t in TASKS) / len(TASKS) for a in accs]
        lines.append(f"| **mean ({title})** | " + " | ".join(f"**{m:.2f}**" for m in means) + " |")
    tuned = [base] + moores + [lora]
    lines += ["", "| general text (oblivion) | base | " + " | ".join(names) + " | LoRA multi-task |",
              "| --- | ---: |" + " ---: |" * (len(moores) + 1),
              "| perplexity | " + " | ".join(f"{r['oblivion']['perplexity']:.2f}" for r in tuned) + " |",
              "| KL(base ‖ model) per token | " + " | ".join(f"{r['oblivion']['kl_to_base']:.4f}" for r in tuned) + " |"]
    cost = moores + [lora]
    lines += ["", "| cost | " + " | ".join(names) + " | LoRA multi-task |", "| --- |" + " ---: |" * len(cost),
              "| trainable parameters | " + " | ".join(f"{r['trainable'] / 1e6:.2f} M" for r in cost) + " |",
              "| steps/s | " + " | ".join(f"{r['steps_per_s']:.3f}" for r in cost) + " |",
              "| peak RSS (training process) | " + " | ".join(f"{r['peak_rss_mb']:.0f} MB" for r in cost) + " |"]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="The reduced CPU setting (well under 20 minutes).")
    ap.add_argument("--work", type=Path, default=Path("moorize-multitask"), help="Working directory.")
    ap.add_argument("--steps", type=int, default=None, help="Override the number of training steps.")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads per run (default: torch's choice); set 1 when other jobs share the CPU")
    args = ap.parse_args(argv)
    if args.threads:  # inherited by the child processes, read when their torch starts
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    s = dict(SETTINGS["quick" if args.quick else "full"])
    if args.steps:
        s["steps"] = args.steps
    work = args.work
    t0 = time.perf_counter()
    dense, factored = prepare_checkpoints(work)
    data, eval_path = write_data(work / f"data-{'quick' if args.quick else 'full'}", s["train_per_task"],
                                 s["eval_per_task"])
    print(f"data: {data} and {eval_path}; settings {s}", flush=True)
    results = {"settings": s}
    results["base"] = in_child(run_base, dense, eval_path, s)
    print(f"base done ({time.perf_counter() - t0:.0f} s)", flush=True)
    for key, (label, options) in MOORE_VARIANTS.items():
        results[key] = in_child(run_moore, factored, data, eval_path, work / f"adapter-{key}", s, label, options)
        print(f"{label} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    results["lora"] = in_child(run_peft, dense, data, eval_path, s, None, s["steps"])
    print(f"LoRA done ({time.perf_counter() - t0:.0f} s)", flush=True)
    results["single"] = {}
    for task in TASKS:  # each sees as many examples of its task as the multi-task runs did
        results["single"][task] = in_child(run_peft, dense, data, eval_path, s, task, max(1, s["steps"] // 4))
    results["seconds"] = time.perf_counter() - t0
    (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(tables(results))
    print(f"\ntotal {results['seconds']:.0f} s; results in {work / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
