"""Training never publishes garbage and never leaves a full disk behind.

Classes 3, 4 (resume) and 8 of the reliability issue: numeric options are checked up
front (finite, in range) by the library and the CLI alike; a loss or gradient that
stops being finite stops the run at that step and nothing is published; a resumed run
refuses data whose contents changed; a full disk during a checkpoint leaves nothing
(exit 3); a huge line in the data is refused or read in part, with bounded memory.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import interrupted_run
from test_cli_errors import IS_ROOT, assert_no_output, assert_one_line_error
from test_train import FAST, factored_tiny, toy_causal, write_jsonl

import moorize
import moorize.training.loop as training
from moorize.cli import cli


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return factored_tiny(tmp_path_factory.mktemp("rel-train-llama"), "llama")


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", toy_causal(8))


def assert_nothing_published(out: Path) -> None:
    assert_no_output(out)  # no OUT, no hidden partial run directory, no lock file


# ---- 3. numeric options: finite and in range, up front --------------------------------------------

BAD_OPTIONS = [
    ({"lr": float("nan")}, "lr must be a finite number"),
    ({"lr": float("inf")}, "lr must be a finite number"),
    ({"lr": 0.0}, "lr must be positive"),
    ({"sample_router_lr": float("nan")}, "sample-router-lr must be a finite number"),
    ({"weight_decay": -0.1}, "weight-decay must be at least 0"),
    ({"warmup": float("nan")}, "warmup must be a finite number"),
    ({"decay": 1.5}, "decay must be at most 1"),
    ({"min_lr_ratio": -1.0}, "min-lr-ratio must be at least 0"),
    ({"max_grad_norm": float("-inf")}, "max-grad-norm must be a finite number"),
    ({"epochs": float("inf")}, "epochs must be a finite number"),
    ({"eval_split": float("nan")}, "eval-split must be a finite number"),
    ({"eval_split": 1.0}, "eval-split must be in [0, 1)"),
    ({"batch_size": 2.5}, "batch-size must be an integer"),
    ({"batch_size": True}, "batch-size must be an integer"),
    ({"task_dim": 0}, "task-dim must be at least 1"),
    ({"router_experts": -3}, "router-experts must be at least 1"),
    ({"householder": -2}, "householder must be at least 0"),
    ({"router_norm": "layer"}, "unknown router norm 'layer'"),
    ({"seed": -1}, "seed must be at least 0"),
    ({"eval_every": -1}, "eval-every must be at least 0"),
    ({"lr": "fast"}, "lr must be a number"),
]


@pytest.mark.parametrize("option,message", BAD_OPTIONS, ids=[f"{k}={v!r}" for (o, _) in BAD_OPTIONS
                                                                for k, v in o.items()])
def test_numeric_options_are_refused_up_front(tiny_llama, data, tmp_path, option, message):
    with pytest.raises(moorize.MoorizeError) as err:
        moorize.train(tiny_llama, data, tmp_path / "out", max_steps=2, **{**FAST, **option})
    assert message in str(err.value) and "\n" not in str(err.value)
    assert_nothing_published(tmp_path / "out")


@pytest.mark.parametrize("flag,value,message", [
    ("--lr", "nan", "lr must be a finite number"),
    ("--lr", "inf", "lr must be a finite number"),
    ("--lr", "-1e-3", "lr must be positive"),
    ("--warmup", "nan", "warmup must be a finite number"),
    ("--decay", "7", "decay must be at most 1"),
    ("--eval-split", "nan", "eval-split must be a finite number"),
    ("--max-grad-norm", "-1", "max-grad-norm must be at least 0"),
    ("--weight-decay", "inf", "weight-decay must be a finite number"),
    ("--epochs", "nan", "epochs must be a finite number"),
    ("--lr", "fast", "'fast' is not a valid float"),
    ("--batch-size", "two", "'two' is not a valid integer"),
])
def test_cli_numeric_options_are_one_line(tiny_llama, data, tmp_path, flag, value, message):
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["train", str(tiny_llama), "--data", data, "--output", str(out),
                                   "--max-steps", "2", flag, value])
    assert_one_line_error(res.exit_code, res.stdout, res.stderr, message)
    assert_nothing_published(out)


# ---- 3. a diverging run stops at the step and publishes nothing -------------------------------------

def test_a_finite_but_huge_lr_diverges_and_publishes_nothing(tiny_llama, data, tmp_path):
    out = tmp_path / "out"
    seen: list[dict] = []
    with pytest.raises(training.TrainingDiverged) as err:
        moorize.train(tiny_llama, data, out, max_steps=6, callbacks=(seen.append,),
                      **{**FAST, "lr": 1e30, "warmup": 0, "max_grad_norm": 0.0})
    msg = str(err.value)
    assert msg.startswith("training diverged at step ") and "nothing was written to" in msg, msg
    step = int(msg.split("step ")[1].split(":")[0])
    assert 1 < step <= 6  # the first step's loss is finite; it stops at the step whose loss is not
    assert [r["step"] for r in seen if r["kind"] == "train"] == list(range(1, step))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in seen)
    assert_nothing_published(out)


def test_a_nan_loss_stops_at_its_step(tiny_llama, data, tmp_path, monkeypatch):
    """The loss itself turns NaN at step 3 (as fp16 overflow would): stop there, before the weights move."""
    real = training._forward
    calls = {"n": 0}

    def poisoned(module, batch, kind):
        calls["n"] += 1
        loss, weight, right = real(module, batch, kind)
        return (loss * float("nan") if calls["n"] == 3 else loss), weight, right

    monkeypatch.setattr(training, "_forward", poisoned)
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["train", str(tiny_llama), "--data", data, "--output", str(out),
                                   "--max-steps", "5", "--batch-size", "8", "--router-experts", "16",
                                   "--task-dim", "8", "--save-every", "1", "--no-progress"])
    line = assert_one_line_error(res.exit_code, res.stdout, res.stderr, "training diverged at step 3",
                                 "the loss is nan")
    assert str(out) in line
    assert_nothing_published(out)  # the checkpoints of steps 1 and 2 go too: resuming would diverge again


def test_an_adapter_with_non_finite_values_is_never_written(tiny_llama, data, tmp_path, monkeypatch):
    """Defence in depth: whatever made a trained tensor non-finite, the final check refuses to publish it."""
    real_step = torch.optim.AdamW.step

    def step(self, *a, **k):
        out = real_step(self, *a, **k)
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    out = tmp_path / "out"
    with pytest.raises(training.TrainingDiverged, match="trained tensor"):
        moorize.train(tiny_llama, data, out, max_steps=1, **FAST)
    assert_nothing_published(out)


# ---- 4. resume refuses changed data contents ----------------------------------------------------------

def test_resume_refuses_changed_data_contents(tiny_llama, tmp_path, monkeypatch):
    data = tmp_path / "train.jsonl"
    write_jsonl(data, toy_causal(8))
    out = tmp_path / "out"
    ckpt = interrupted_run(tiny_llama, data, out, monkeypatch, max_steps=4, save_every=2, **FAST)
    assert (ckpt / "state.json").is_file()

    rows = toy_causal(8)
    rows[0]["response"] = "z"  # same file, same size and count of examples: only the contents differ
    write_jsonl(data, rows)
    with pytest.raises(moorize.MoorizeError, match="cannot resume: the run was started with different data contents"):
        moorize.train(tiny_llama, str(data), out, max_steps=4, save_every=2, resume=True, **FAST)
    assert ckpt.is_dir()  # a refused resume keeps the run

    write_jsonl(data, toy_causal(8))  # the original contents, even under another name, resume
    moved = tmp_path / "moved.jsonl"
    data.rename(moved)
    report = moorize.train(tiny_llama, str(moved), out, max_steps=4, save_every=2, resume=True, **FAST)
    assert report.resumed_from == 2 and (out / "adapter_config.json").is_file()


def test_resume_accepts_a_run_saved_before_an_option_existed(tiny_llama, tmp_path, monkeypatch):
    """A checkpoint written by an older moorize lacks options added since (router_norm, sample_router_lr): they
    had the behaviour of then (x as it comes, the full lr), not today's defaults. The run resumes with those;
    with today's defaults it is refused, and the message names each difference and both values."""
    data = tmp_path / "train.jsonl"
    write_jsonl(data, toy_causal(8))
    out = tmp_path / "out"
    then = {"router_norm": "none", "sample_router_lr": 1.0}
    ckpt = interrupted_run(tiny_llama, data, out, monkeypatch, max_steps=4, save_every=2, **then, **FAST)
    saved = ckpt.parent.parent / "train_config.json"  # the run directory
    config = json.loads(saved.read_text())
    for name in then:
        del config["options"][name]
    saved.write_text(json.dumps(config))
    with pytest.raises(moorize.MoorizeError) as refused:
        moorize.train(tiny_llama, str(data), out, max_steps=4, save_every=2, resume=True, **FAST)
    assert str(refused.value) == ("cannot resume: the run was started with different router_norm (the run: 'none', "
                                  "now 'rms'), sample_router_lr (the run: 1.0, now 0.1); pass the run's settings "
                                  "again to continue it")
    report = moorize.train(tiny_llama, str(data), out, max_steps=4, save_every=2, resume=True, **then, **FAST)
    assert report.resumed_from == 2


# ---- 8. a full disk leaves nothing and exits 3 ---------------------------------------------------------

def test_full_disk_during_a_training_checkpoint(tiny_llama, data, tmp_path, monkeypatch):
    """ENOSPC while a checkpoint's safetensors are written (after one checkpoint already exists)."""
    from moorize.io.shards import ShardFile

    real = ShardFile.close
    calls = {"n": 0}

    def close(self):
        calls["n"] += 1
        if calls["n"] >= 5:  # the first checkpoint (3 files) is whole; the second fails
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self)

    monkeypatch.setattr(ShardFile, "close", close)
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["train", str(tiny_llama), "--data", data, "--output", str(out),
                                   "--max-steps", "6", "--save-every", "2", "--batch-size", "8",
                                   "--router-experts", "16", "--task-dim", "8", "--no-progress"])
    assert calls["n"] >= 5
    assert_one_line_error(res.exit_code, res.stdout, res.stderr, "no space left", want_code=3)
    assert_nothing_published(out)


@pytest.mark.skipif(not IS_ROOT, reason="mounting a tmpfs needs root; the ENOSPC fake above covers the logic")
def test_full_disk_for_real_on_a_small_tmpfs(tiny_llama, data, tmp_path):
    """A 256 KiB tmpfs: the run directory's config and metrics fit, the checkpoints do not."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("this sandbox does not allow mounting a tmpfs")
    try:
        out = mnt / "out"
        res = CliRunner().invoke(cli, ["train", str(tiny_llama), "--data", data, "--output", str(out),
                                       "--max-steps", "40", "--save-every", "1", "--keep-checkpoints", "40",
                                       "--batch-size", "8", "--no-progress"])
        assert_one_line_error(res.exit_code, res.stdout, res.stderr, "no space left", want_code=3)
        assert sorted(p.name for p in mnt.iterdir()) == []  # nothing left: no run, no lock, no partial file
        usage = os.statvfs(mnt)
        assert usage.f_bfree == usage.f_blocks  # the space is free again
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


# ---- 8. huge lines: bounded memory ---------------------------------------------------------------------

def test_a_line_over_the_record_limit_is_refused_without_being_held(tmp_path, monkeypatch):
    from moorize.io import textfiles
    from moorize.training import data as data_mod

    monkeypatch.setattr(textfiles, "MAX_RECORD_CHARS", 1 << 20)  # the bound of every line, record and CSV field
    path = tmp_path / "big.jsonl"
    with open(path, "w") as fh:
        fh.write(json.dumps({"task": "t", "prompt": "a", "response": "b"}) + "\n")
        fh.write(json.dumps({"task": "t", "prompt": "x" * (2 << 20), "response": "b"}) + "\n")
    with pytest.raises(moorize.MoorizeError, match=r"big.jsonl:2: line longer than 1 MiB"):
        data_mod.read_examples(path)
    csv_path = tmp_path / "big.csv"
    csv_path.write_text("task,text,label\nt,ok,1\nt," + "y" * (2 << 20) + ",0\n")
    with pytest.raises(moorize.MoorizeError, match=r"big.csv:3: line longer than 1 MiB"):
        data_mod.read_examples(csv_path)
    quoted = tmp_path / "quoted.csv"  # one field over the bound, spread over short lines
    quoted.write_text('task,text,label\nt,"' + "y\n" * (1 << 19) + 'y",0\n')
    with pytest.raises(moorize.MoorizeError, match=r"quoted.csv:\d+: invalid CSV \(field larger than field limit"):
        data_mod.read_examples(quoted)


PEAK_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    from pathlib import Path
    from transformers import AutoTokenizer
    from moorize.assets import minilm_dir
    from moorize.training.data import TaskTable, encode, read_examples

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    path = Path(sys.argv[1])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    examples = read_examples(path)
    items = encode(examples, tok, TaskTable.from_examples(examples), max_length=128, truncate=True)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    reference = tok("hello world " * 200)["input_ids"][:128]
    print(json.dumps({"grew_mb": (after - before) / 1024, "ids": items[0]["input_ids"], "reference": reference}))
""")


def test_a_10_mb_line_is_tokenised_in_bounded_memory(tmp_path):
    """A 10 MB text truncated to 128 tokens: only a prefix is tokenised (whole, it takes over 1 GB), and the
    kept tokens are exactly the text's first 128."""
    path = tmp_path / "huge.jsonl"
    path.write_text(json.dumps({"task": "t", "text": "hello world " * (10_000_000 // 12), "label": "a"}) + "\n")
    res = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(path)], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["ids"] == got["reference"]
    assert got["grew_mb"] < 300, got["grew_mb"]


def test_resume_refuses_a_base_converted_differently(tiny_llama, tmp_path, monkeypatch):
    """Same source weights (same source fingerprint), other ranks and no residual: not the run's base."""
    data = write_jsonl(tmp_path / "train.jsonl", toy_causal(8))
    out = tmp_path / "out"
    interrupted_run(tiny_llama, data, out, monkeypatch, max_steps=4, save_every=2, **FAST)
    other = tmp_path / "truncated"
    moorize.convert(tiny_llama.parent / "src-llama", other, rank="8", residual="drop")
    with pytest.raises(moorize.MoorizeError, match=r"cannot resume: .*factored base"):
        moorize.train(other, data, out, max_steps=4, save_every=2, resume=True, **FAST)
