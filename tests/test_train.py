"""moorize train on tiny models: learning, frozen base, exact resume, bad data, the CLI.

The tiny models get a character-level tokenizer (built locally, no download) so the
toy tasks are learnable: the same prompts, different answers per task, so the
task routing has to carry the difference.
"""

from __future__ import annotations

import json
import random
import string

import pytest
import torch
from click.testing import CliRunner
from conftest import TINY, tiny_config, tree_digest

import moorize
import moorize.model.layer
from moorize.cli import cli
from moorize.io.factored import FactoredCheckpoint
from moorize.model.heads import PAD_LOGIT
from moorize.training.data import collate
from moorize.training.loop import _tokenizer
from moorize.training.losses import _forward, causal_row_losses
from moorize.training.options import TrainOptions
from moorize.training.plan import StepPlan, load_data
from moorize.training.schedule import lr_factor

pytestmark = pytest.mark.versions  # also run at the minimum versions and on the newest torch (.ci/run)

CHARS = string.digits + string.ascii_letters + string.punctuation + " "


def char_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def factored_tiny(tmp_path, arch: str, seed: int = 0):
    """A tiny model with a char tokenizer, converted at full rank: the factored directory."""
    tok = char_tokenizer()
    cfg = tiny_config(arch)
    cfg.vocab_size = len(tok)
    cfg.initializer_range = 0.2  # weights that matter, as a pretrained model's do (0.02 leaves the layers inert)
    torch.manual_seed(seed)
    model = TINY[arch][1](cfg).eval()
    src = tmp_path / f"src-{arch}"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    out = tmp_path / f"factored-{arch}"
    moorize.convert(src, out)
    return out


def toy_causal(n_per_task: int, seed: int = 0) -> list[dict]:
    """Two tasks on the same prompts: 'first' answers the first letter, 'last' the last one."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n_per_task):
        word = "".join(rng.choice("abcdef") for _ in range(4))
        rows.append({"task": "first", "prompt": word + "=", "response": word[0]})
        rows.append({"task": "last", "prompt": word + "=", "response": word[-1]})
    return rows


def toy_classification(n_per_task: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n_per_task):
        word = "".join(rng.choice("abcdef") for _ in range(5))
        rows.append({"task": "has_a", "text": word, "label": "yes" if "a" in word else "no"})
        rows.append({"task": "count_b", "text": word, "label": str(min(word.count("b"), 2))})
    return rows


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return factored_tiny(tmp_path_factory.mktemp("train-llama"), "llama")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return factored_tiny(tmp_path_factory.mktemp("train-bert"), "bert")


FAST = dict(batch_size=8, lr=3e-2, warmup=2, seed=0, router_experts=16, task_dim=8)


def test_loss_falls_and_base_is_untouched(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", toy_causal(48))
    before = tree_digest(tiny_llama)
    report = moorize.train(tiny_llama, data, tmp_path / "adapter", max_steps=40, eval_split=0.25, **FAST)
    losses = [r["loss"] for r in report.history if r["kind"] == "train"]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    assert set(report.eval) == {"first", "last"} and all(m["examples"] == 12 for m in report.eval.values())
    assert tree_digest(tiny_llama) == before  # the factored base is read-only

    # the adapter reproduces the trained model; U, σ, Vh, residuals are the checkpoint's own
    model = moorize.load(tiny_llama, tmp_path / "adapter")
    with FactoredCheckpoint(tiny_llama) as ckpt:
        for name, layer in moorize.moore_layers(model).items():
            U, S, Vh, _ = ckpt.factors(name)
            assert torch.equal(layer.U, U) and torch.equal(layer.sigma, S) and torch.equal(layer.Vh, Vh)
            assert layer.router_out.abs().max() > 0 and layer.task_router.abs().max() > 0
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["task_ids"] == {"first": 0, "last": 1} and cfg["training"]["steps"] == 40
    lines = [json.loads(x) for x in (tmp_path / "adapter" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["kind"] == "train"] == list(range(1, 41))
    assert lines[-1]["kind"] == "eval" and lines[-1]["eval"] == report.eval
    # the loss plot beside it (matplotlib is in the test extra): a PNG of the run's curves
    assert (tmp_path / "adapter" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_loss_plot_draws_train_and_eval_and_needs_a_logged_step(tmp_path):
    from moorize.training.metrics import plot_losses

    history = [{"kind": "train", "step": s, "loss": 2.0 / s} for s in range(1, 5)]
    history.append({"kind": "eval", "step": 4, "eval": {"a": {"loss": 0.6}, "b": {"loss": 0.9}}})
    assert plot_losses(history, tmp_path / "l.png") == tmp_path / "l.png"
    assert (tmp_path / "l.png").stat().st_size > 1000
    assert plot_losses([], tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


def test_tasks_learn_different_answers(tiny_llama, tmp_path):
    """Same prompts, different answers: the trained model must tell the tasks apart, on unseen words too."""
    data = write_jsonl(tmp_path / "train.jsonl", toy_causal(64))
    report = moorize.train(tiny_llama, data, tmp_path / "a", max_steps=200, router="task", eval_split=0.2, **FAST)
    assert report.eval["first"]["exact_match"] >= 0.7 and report.eval["last"]["exact_match"] >= 0.7
    model = moorize.load(tiny_llama, tmp_path / "a")
    tok = char_tokenizer()
    ids = torch.tensor([tok("abcd=")["input_ids"]] * 2)
    out = model.generate(ids, task_ids=["first", "last"], max_new_tokens=2, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    assert tok.batch_decode(out[:, ids.shape[1]:]) == ["a</s>", "d</s>"]


def test_resume_matches_an_uninterrupted_run(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", toy_causal(24))
    opts = dict(max_steps=12, save_every=4, eval_split=0.2, **FAST)
    full = moorize.train(tiny_llama, data, tmp_path / "full", **opts)

    def interrupt(record):
        if record["kind"] == "train" and record["step"] == 10:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        moorize.train(tiny_llama, data, tmp_path / "cut", callbacks=(interrupt,), **opts)
    assert not (tmp_path / "cut").exists()  # nothing that looks complete
    partial = tmp_path / ".cut.moorize-partial"
    assert sorted(p.name for p in (partial / "checkpoints").iterdir()) == ["step-0000004", "step-0000008"]
    with pytest.raises(moorize.MoorizeError, match="--resume"):
        moorize.train(tiny_llama, data, tmp_path / "cut", **opts)
    resumed = moorize.train(tiny_llama, data, tmp_path / "cut", resume=True, **opts)
    assert resumed.resumed_from == 8
    a, b = moorize.read_adapter(tmp_path / "full")[1], moorize.read_adapter(tmp_path / "cut")[1]
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    for task in full.eval:
        assert resumed.eval[task] == pytest.approx(full.eval[task], abs=1e-6)
    steps = [json.loads(x)["step"] for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["kind"] == "train"]
    assert steps == list(range(1, 13))  # records past the checkpoint were dropped, none repeated


def test_resume_refuses_changed_settings(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", toy_causal(16))

    def interrupt(record):
        if record["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        moorize.train(tiny_llama, data, tmp_path / "a", max_steps=6, save_every=2, callbacks=(interrupt,), **FAST)
    with pytest.raises(moorize.MoorizeError, match="different lr"):
        moorize.train(tiny_llama, data, tmp_path / "a", max_steps=6, resume=True, **{**FAST, "lr": 1e-3})


def test_accumulated_loss_is_the_token_mean_of_the_whole_step(tiny_llama, tmp_path):
    """2 micro-batches of 4 are normalised by the label tokens of all 8 examples: one big batch's loss."""
    rng = random.Random(1)
    rows = [{"task": t, "prompt": w + "=", "response": w[: rng.randint(1, 4)]}
            for w in ("".join(rng.choice("abcdef") for _ in range(4)) for _ in range(16)) for t in ("first", "last")]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    opts = TrainOptions(**{**FAST, "max_steps": 1, "batch_size": 4, "grad_accum": 2})
    report = moorize.train(tiny_llama, data, tmp_path / "acc", options=opts)

    tok, pad = _tokenizer(tiny_llama)
    ds = load_data(data, None, tok, opts)
    micro, denom = StepPlan(ds.train, opts, world=1).step(0, rank=0)
    assert len(micro) == 2 and sum(map(len, micro)) == 8
    model = moorize.load(tiny_llama, router=opts.router, tasks=ds.table.tasks, householder=opts.householder,
                         task_dim=opts.task_dim, router_experts=opts.router_experts, seed=opts.seed)
    batch = collate([ds.train[i] for b in micro for i in b], pad)
    with torch.no_grad():
        loss, count, right = _forward(model, batch, "causal")  # logits only where a label is predicted
        full = causal_row_losses(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                       task_ids=batch["task_ids"]).logits, batch["labels"])
    assert torch.allclose(loss, full[0], atol=1e-5) and torch.equal(count, full[1]) and torch.equal(right, full[2])
    assert int(count.sum()) == denom
    assert report.history[0]["loss"] == pytest.approx(float(loss.sum() / count.sum()), abs=1e-6)


def test_classification_heads_on_an_encoder(tiny_bert, tmp_path):
    rows = toy_classification(64)
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    report = moorize.train(tiny_bert, data, tmp_path / "clf", max_steps=60, eval_split=0.2, **FAST)
    assert set(report.eval) == {"has_a", "count_b"} and "accuracy" in report.eval["has_a"]
    losses = [r["loss"] for r in report.history if r["kind"] == "train"]
    assert sum(losses[-5:]) < sum(losses[:5])
    clf = moorize.load_classifier(tiny_bert, tmp_path / "clf")
    assert clf.labels == {"has_a": ["no", "yes"], "count_b": ["0", "1", "2"]}
    tok = char_tokenizer()
    enc = tok(["abcde", "ffffb"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = clf(enc["input_ids"], enc["attention_mask"], ["has_a", "has_a"])
    assert (logits[:, 2] == PAD_LOGIT).all()  # has_a has two labels: the third slot is never chosen
    assert clf.predict(enc["input_ids"], enc["attention_mask"], ["has_a", "count_b"])[0] in ("no", "yes")


def test_schedules():
    total = 100
    cos = lr_factor(TrainOptions(schedule="cosine", warmup=10), total)
    assert cos(0) < cos(5) < cos(9) < 1.0 and cos(10) == pytest.approx(1.0) and cos(99) < 0.01
    wsd = lr_factor(TrainOptions(schedule="wsd", warmup=0.1, decay=0.2), total)
    assert wsd(50) == 1.0 and wsd(79) == 1.0 and wsd(90) == pytest.approx(0.5) and wsd(99) < 0.1
    const = lr_factor(TrainOptions(schedule="constant", warmup=0), total)
    assert const(0) == const(99) == 1.0


# ---- bad data and bad options: one clear line each --------------------------------------------------------------

BAD_CASES = {
    "invalid JSON": ('{"task": "a", "prompt": "x", "response": "y"}\n{"task": "a", "prompt": \n', ":2: invalid JSON"),
    "missing field": ('{"task": "a", "prompt": "x"}\n', ":1: missing field 'response'"),
    "missing task": ('{"prompt": "x", "response": "y"}\n', ":1: missing field 'task'"),
    "empty file": ("", "has no examples"),
    "mixed kinds": ('{"task": "a", "prompt": "x", "response": "y"}\n{"task": "a", "text": "x", "label": "y"}\n',
                    ":2: mixes classification and language-modelling"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_training_data(tiny_llama, tmp_path, case):
    text, message = BAD_CASES[case]
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    result = CliRunner().invoke(cli, ["train", str(tiny_llama), "--data", str(path), "--output",
                                      str(tmp_path / "out"), "--max-steps", "1"])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.moorize-partial").exists()


def test_unknown_task_at_eval(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", toy_causal(8))
    ev = write_jsonl(tmp_path / "eval.jsonl", [{"task": "first", "prompt": "ab=", "response": "a"},
                                               {"task": "middle", "prompt": "abc=", "response": "b"}])
    with pytest.raises(moorize.MoorizeError, match=r"eval.jsonl:2: unknown task 'middle'"):
        moorize.train(tiny_llama, data, tmp_path / "out", eval_data=ev, max_steps=1, **FAST)


def test_label_outside_the_head(tiny_bert, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", toy_classification(8))
    ev = write_jsonl(tmp_path / "eval.jsonl", [{"task": "has_a", "text": "abc", "label": "maybe"}])
    with pytest.raises(moorize.MoorizeError, match=r"eval.jsonl:1: unknown label 'maybe'; the 'has_a' head's labels are"):
        moorize.train(tiny_bert, data, tmp_path / "out", eval_data=ev, max_steps=1, **FAST)


def test_too_long_sequences(tiny_llama, tmp_path, caplog):
    data = write_jsonl(tmp_path / "train.jsonl", toy_causal(8) + [{"task": "first", "prompt": "x" * 40,
                                                                    "response": "y"}])
    with pytest.raises(moorize.MoorizeError, match=r"train.jsonl:17: .* exceed the maximum of 16"):
        moorize.train(tiny_llama, data, tmp_path / "out", max_length=16, truncate=False, max_steps=1, **FAST)
    # --truncate keeps the response when it can and warns; a prompt that fills everything is refused
    with pytest.raises(moorize.MoorizeError, match=r"train.jsonl:17: the prompt fills all 16 tokens"):
        moorize.train(tiny_llama, data, tmp_path / "out", max_length=16, truncate=True, max_steps=1, **FAST)


def test_bad_options_and_paths(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", toy_causal(4))
    runner = CliRunner()
    cases = [
        (["train", str(tmp_path / "nope"), "--data", data, "--output", str(tmp_path / "o")], "is not a factored checkpoint"),
        (["train", str(tiny_llama), "--data", data, "--output", str(tmp_path / "o"), "--batch-size", "0"],
         "batch-size must be at least 1"),
        (["train", str(tiny_llama), "--data", data, "--output", str(tmp_path / "o"), "--resume"],
         "no checkpoint to resume"),
        (["train", str(tiny_llama), "--data", data, "--output", str(tmp_path / "o"), "--grad-accum", "4"],
         "less than one step"),
        (["train", str(tiny_llama), "--data", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "o")],
         "missing.jsonl does not exist"),
        (["train", str(tiny_llama), "--data", data, "--output", str(tiny_llama)], "OUT_DIR"),
    ]
    for args, message in cases:
        result = runner.invoke(cli, args)
        assert result.exit_code == 2 and message in result.output, (args, result.output)
        assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_cli_train_writes_an_adapter(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", toy_causal(16))
    result = CliRunner().invoke(cli, ["train", str(tiny_llama), "--data", data, "--output", str(tmp_path / "ad"),
                                      "--max-steps", "4", "--eval-split", "0.25", "--router-experts", "8",
                                      "--schedule", "wsd", "--router-norm", "rms", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["steps"] == 4 and set(report["eval"]) == {"first", "last"}
    model = moorize.load(tiny_llama, tmp_path / "ad")
    assert model.moore_config.router_experts == 8 and model.moore_tasks == {"first": 0, "last": 1}
    assert model.moore_config.router_norm == "rms"


@pytest.mark.slow  # two torchrun ranks and a single-process run
def test_two_processes_match_gradient_accumulation(tiny_llama, tmp_path):
    """DDP (torchrun, gloo, 2 CPU ranks, batch 4 each) takes the same steps as 1 process accumulating 2 x 4."""
    import os
    import subprocess
    import sys

    data = write_jsonl(tmp_path / "train.jsonl", toy_causal(24))
    common = [str(tiny_llama), "--data", data, "--max-steps", "3", "--batch-size", "4", "--no-progress",
              "--router-experts", "16", "--task-dim", "8", "--lr", "0.03", "--cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    dist = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "moorize", "train", *common, "--output", str(tmp_path / "ddp")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert dist.returncode == 0, dist.stderr[-3000:]
    moorize.train(tiny_llama, data, tmp_path / "single", max_steps=3, batch_size=4, grad_accum=2,
                  router_experts=16, task_dim=8, lr=0.03, cpu=True)
    a, b = moorize.read_adapter(tmp_path / "ddp")[1], moorize.read_adapter(tmp_path / "single")[1]
    fresh = moorize.load(tiny_llama, router="task+sample", tasks=["first", "last"], router_experts=16, task_dim=8)
    init = moorize.model.layer.trainable_parameters(fresh)
    assert any(not torch.equal(a[k], init[k]) for k in a)  # it trained
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5


def test_runs_with_other_precisions_follow_each_other_in_one_process(tiny_llama, tmp_path):
    """A notebook trains in bf16, then in float32: accelerate's per-process state must not refuse the second."""
    data = write_jsonl(tmp_path / "train.jsonl", toy_causal(8))
    reports = [moorize.train(tiny_llama, data, tmp_path / f"adapter-{i}", max_steps=2, precision=precision,
                             cpu=True, **FAST) for i, precision in enumerate(("bf16", "no", "bf16"))]
    assert [r.steps for r in reports] == [2, 2, 2]
    from accelerate.state import AcceleratorState

    assert AcceleratorState().mixed_precision == "bf16"  # the last run's own setting, not the first's


def test_sample_router_lr_scales_only_the_sample_router(tiny_llama, tmp_path):
    """sample_router_lr=0 freezes B and C (B stays zero, so B C x adds nothing); the rest still trains."""
    from safetensors.torch import load_file

    data = write_jsonl(tmp_path / "train.jsonl", toy_causal(16))
    moorize.train(tiny_llama, data, tmp_path / "a", max_steps=4, sample_router_lr=0.0, **FAST)
    fresh = moorize.load(tiny_llama, tasks=["first", "last"], router_experts=16, task_dim=8)
    start = moorize.model.layer.trainable_parameters(fresh)
    trained = load_file(tmp_path / "a" / "adapter_model.safetensors")
    for key, value in trained.items():
        if key.endswith((".router_out", ".router_in")):
            assert torch.equal(value, start[key]), key
    assert any(not torch.equal(v, start[k]) for k, v in trained.items() if k.endswith(".task_router"))
    with pytest.raises(moorize.MoorizeError, match="sample_router_lr"):
        moorize.train(tiny_llama, data, tmp_path / "b", sample_router_lr=-1.0, **FAST)


@pytest.mark.slow  # two torchrun ranks and a single-process run
def test_fsdp_two_processes_shard_the_factors_and_train_like_one(tiny_llama, tmp_path):
    """FSDP2 (torchrun, gloo, 2 CPU ranks, batch 4 each) ends at the adapter of 1 process accumulating 2 x 4,
    and each rank holds half of the frozen factors' bytes instead of all of them."""
    import os
    import subprocess
    import sys

    data = write_jsonl(tmp_path / "train.jsonl", toy_causal(24))
    common = [str(tiny_llama), "--data", data, "--max-steps", "3", "--batch-size", "4", "--no-progress",
              "--router-experts", "16", "--task-dim", "8", "--lr", "0.03", "--cpu", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {}
    for name, launcher in (("fsdp", ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]),
                           ("one", [])):
        extra = ["--fsdp"] if name == "fsdp" else ["--grad-accum", "2"]
        run = subprocess.run([sys.executable, *launcher, "-m", "moorize", "train", *common, *extra,
                              "--output", str(tmp_path / name)], capture_output=True, text=True, env=env, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        runs[name] = json.JSONDecoder().raw_decode(run.stdout[run.stdout.index("{"):])[0]  # each rank prints one
    a, b = moorize.read_adapter(tmp_path / "fsdp")[1], moorize.read_adapter(tmp_path / "one")[1]
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    one, sharded = runs["one"]["frozen_bytes_per_process"], runs["fsdp"]["frozen_bytes_per_process"]
    assert one > 0 and sharded <= 0.55 * one, (one, sharded)


def test_adam_beta2_reaches_the_optimizer_and_the_adapter(tiny_llama, tmp_path, monkeypatch):
    """A flag is one field (TrainOptions.adam_beta2): the CLI, its check and the run all come from it."""
    seen = []

    class Spy(torch.optim.AdamW):
        def __init__(self, params, **kw):
            seen.append(kw["betas"])
            super().__init__(params, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", Spy)
    data = write_jsonl(tmp_path / "train.jsonl", toy_causal(8))
    moorize.train(tiny_llama, data, tmp_path / "a", max_steps=1, adam_beta2=0.95, **FAST)
    assert seen == [(0.9, 0.95)]
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["training"]["options"]["adam_beta2"] == 0.95
