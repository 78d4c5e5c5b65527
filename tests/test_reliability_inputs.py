"""No command replaces or deletes one of its own inputs, whatever the flags (class 2).

Each case points a command's output at one of its inputs (or at a directory holding
one) with ``--overwrite``: the command is refused with one line and the input is
byte-for-byte unchanged. An output is locked while a run writes it: a second run to the
same output is refused at once, and two converts started together end with exactly one
output, never one silently replacing the other.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import tree_digest
from test_cli_errors import _DROP_ENV, assert_one_line_error
from test_train import FAST, factored_tiny, toy_causal, write_jsonl

import moorize
from moorize.cli import cli
from moorize.io.outdir import lock_path, output_lock


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A factored tiny llama, a task-mode adapter, and training data, all in one root."""
    root = tmp_path_factory.mktemp("rel-inputs")
    factored = factored_tiny(root, "llama")
    model = moorize.load(factored, router="task", tasks=["first", "last"], task_dim=8)
    moorize.save_adapter(model, root / "adapter")
    data_dir = root / "data"
    data_dir.mkdir()
    data = write_jsonl(data_dir / "train.jsonl", toy_causal(8))
    return {"root": root, "factored": factored, "adapter": root / "adapter", "data_dir": data_dir,
            "data": Path(data), "src": root / "src-llama"}


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def unchanged(*paths: Path):
    """Context: every path's tree digest (or bytes) is the same after the block."""
    class Guard:
        def __enter__(self):
            self.before = [tree_digest(p) if p.is_dir() else p.read_bytes() for p in paths]

        def __exit__(self, *exc):
            after = [tree_digest(p) if p.is_dir() else p.read_bytes() for p in paths]
            assert after == self.before, "an input was modified"
    return Guard()


# ---- merge ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dest", ["adapter", "root", "factored"])
def test_merge_never_writes_over_its_inputs(setup, dest):
    target = setup[dest]
    with unchanged(setup["adapter"], setup["factored"]):
        res = invoke("merge", setup["factored"], target, "--adapter", setup["adapter"], "--task", "first",
                     "--overwrite")
        assert_one_line_error(res.exit_code, res.stdout, res.stderr, "OUT_DIR")
    assert not lock_path(target).exists()


# ---- train ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["data_dir", "data", "root", "factored", "adapter_inside_factored"])
def test_train_never_writes_over_its_inputs(setup, where):
    output = setup["factored"] / "adapter" if where == "adapter_inside_factored" else setup[where]
    with unchanged(setup["data_dir"], setup["factored"]):
        res = invoke("train", setup["factored"], "--data", setup["data"], "--output", output, "--overwrite",
                     "--max-steps", "1", "--no-progress")
        assert_one_line_error(res.exit_code, res.stdout, res.stderr)
    assert not output.with_name(f".{output.name}.moorize-partial").exists()


def test_train_resume_never_writes_over_its_data(setup):
    """--resume skips the emptiness check, not the input check."""
    with unchanged(setup["data_dir"]):
        res = invoke("train", setup["factored"], "--data", setup["data"], "--output", setup["data_dir"],
                     "--resume")
        assert_one_line_error(res.exit_code, res.stdout, res.stderr, "OUT_DIR", "input")


def test_eval_data_inside_the_output_is_protected(setup, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    held = write_jsonl(out / "eval.jsonl", toy_causal(2))
    with unchanged(out):
        res = invoke("train", setup["factored"], "--data", setup["data"], "--eval-data", held, "--output", out,
                     "--overwrite", "--max-steps", "1")
        assert_one_line_error(res.exit_code, res.stdout, res.stderr, "OUT_DIR", "eval.jsonl")


# ---- convert and export ---------------------------------------------------------------------------------

def test_convert_never_writes_over_its_source(setup):
    for target in (setup["src"], setup["root"], setup["src"] / "sub"):
        with unchanged(setup["src"]):
            res = invoke("convert", setup["src"], target, "--overwrite", "--no-progress")
            assert_one_line_error(res.exit_code, res.stdout, res.stderr, "OUT_DIR")


def test_export_never_writes_over_its_inputs(setup):
    for target in (setup["adapter"], setup["root"], setup["factored"]):
        with unchanged(setup["adapter"], setup["factored"]):
            res = invoke("export", setup["factored"], target, "--adapter", setup["adapter"], "--onnx", "--overwrite")
            assert_one_line_error(res.exit_code, res.stdout, res.stderr)


def test_quickstart_never_replaces_a_directory_it_did_not_write(tmp_path):
    out = tmp_path / "qs"
    (out / "smollm2-factored").mkdir(parents=True)
    (out / "smollm2-factored" / "precious.txt").write_text("keep me")
    res = invoke("quickstart", "--out", out)
    assert_one_line_error(res.exit_code, res.stdout, res.stderr, "not empty")
    assert (out / "smollm2-factored" / "precious.txt").read_text() == "keep me"


# ---- locks ---------------------------------------------------------------------------------------------

def test_a_second_run_to_a_locked_output_is_refused(setup, tmp_path):
    out = tmp_path / "out"
    with output_lock(out):  # as a running convert holds it
        for args in (["convert", setup["src"], out, "--no-progress"],
                     ["train", setup["factored"], "--data", setup["data"], "--output", out, "--max-steps", "1"],
                     ["merge", setup["factored"], out, "--adapter", setup["adapter"], "--task", "first"]):
            res = invoke(*args)
            assert_one_line_error(res.exit_code, res.stdout, res.stderr, "is being written by another moorize run")
            assert not out.exists()
    assert not lock_path(out).exists()  # released and removed
    moorize.convert(setup["src"], out)  # free again


def test_a_killed_run_does_not_leave_its_output_locked(setup, tmp_path):
    """flock dies with its process: a SIGKILLed holder leaves at most a stale file, never a lock."""
    out = tmp_path / "out"
    code = ("import sys, time; from pathlib import Path; from moorize.io.outdir import output_lock\n"
            "with output_lock(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(moorize.MoorizeError, match=rf"pid {holder.pid}"):
            moorize.convert(setup["src"], out)
    finally:
        holder.kill()
        holder.wait()
    assert lock_path(out).exists()  # stale file, no holder
    moorize.convert(setup["src"], out)
    assert (out / "moorize.json").is_file() and not lock_path(out).exists()


def test_two_concurrent_converts_one_wins_one_is_refused(setup, tmp_path):
    """Started together as real processes: exactly one succeeds, the other gets one line; never two successes."""
    import os

    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in _DROP_ENV}
    env["OMP_NUM_THREADS"] = "1"
    procs = [subprocess.Popen([sys.executable, "-m", "moorize", "convert", str(setup["src"]), str(out),
                               "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 2], results
    loser = next(r for r in results if r[0] == 2)
    assert_one_line_error(*loser)
    assert ("is being written by another moorize run" in loser[2]) or ("is not empty" in loser[2])
    assert moorize.FactoredCheckpoint(out).layers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no partial, old or lock file


def test_an_output_filled_meanwhile_is_not_replaced(setup, tmp_path, monkeypatch):
    """Something other than moorize writes into OUT_DIR while a convert runs: the convert refuses to replace it."""
    import importlib

    conv = importlib.import_module("moorize.conversion.pipeline")  # the module, not the function moorize re-exports
    out = tmp_path / "out"
    real = conv.finalize_shards

    def meanwhile(*a, **k):
        out.mkdir()
        (out / "theirs.txt").write_text("someone else's")
        return real(*a, **k)

    monkeypatch.setattr(conv, "finalize_shards", meanwhile)
    with pytest.raises(moorize.MoorizeError, match="appeared while this run was writing it"):
        moorize.convert(setup["src"], out)
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_train_lock_is_released_after_a_run(setup, tmp_path):
    out = tmp_path / "adapter"
    moorize.train(setup["factored"], str(setup["data"]), out, max_steps=1, **FAST)
    assert (out / "adapter_config.json").is_file() and not lock_path(out).exists()
    # nothing else holds it: a second run with --overwrite goes through
    moorize.train(setup["factored"], str(setup["data"]), out, max_steps=1, overwrite=True, **FAST)
