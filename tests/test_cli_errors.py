"""Bad input never ends in a traceback, a modified source or something that looks complete.

Every case checks what a user sees: the exit code (MoorizeError 2, a full disk 3, an
interrupt 130), a single ``error:`` line on stderr naming the problem, no traceback,
the source unchanged, and neither OUT_DIR nor a hidden ``.OUT.moorize-partial``
sibling left behind. Most cases run the real console entry point in a subprocess;
those that need to inject a failure (full disk, interrupt, permissions as root) run
the click command in-process with CliRunner.
"""

from __future__ import annotations

import errno
import importlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import build_tiny, tree_digest

from moorize.cli import cli

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
_DROP_ENV = ("MOORIZE_DEBUG", "WORLD_SIZE", "RANK", "LOCAL_RANK")


# ---- helpers -----------------------------------------------------------------------------------

def run_cli(*args, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m moorize ARGS`` exactly as a user runs it; stdout and stderr kept apart."""
    env = {k: v for k, v in os.environ.items() if k not in _DROP_ENV}
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run([sys.executable, "-m", "moorize", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)


def assert_one_line_error(code: int, stdout: str, stderr: str, *phrases: str, want_code: int = 2) -> str:
    """Exit code, a single 'error: ...' line containing every phrase, and no traceback anywhere."""
    both = f"--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
    assert code == want_code, both
    assert "Traceback" not in stdout + stderr, both
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, both
    line = lines[0]
    assert line.startswith("error: "), both
    for p in phrases:
        assert p in line, f"{p!r} not in {line!r}"
    return line


def assert_no_output(out: Path) -> None:
    """Neither OUT_DIR nor any hidden partial (or leftover) sibling exists."""
    assert not out.exists(), sorted(p.name for p in out.rglob("*"))
    left = sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".") and "moorize" in p.name)
    assert not left, left


def expect_failure(src: Path, out: Path, *args, phrases=(), want_code: int = 2, digest=None) -> str:
    """Run ``convert SRC OUT ARGS`` in a subprocess and check everything a failed run must guarantee."""
    before = digest if digest is not None else tree_digest(src)
    run = run_cli("convert", src, out, "--no-progress", *args)
    line = assert_one_line_error(run.returncode, run.stdout, run.stderr, *phrases, want_code=want_code)
    assert tree_digest(src) == before, "the source was modified"
    assert_no_output(out)
    return line


def save_tiny(dest: Path, arch: str = "llama", edit=None) -> Path:
    model = build_tiny(arch)
    if edit is not None:
        with torch.no_grad():
            edit(model)
    model.save_pretrained(dest)
    return dest


@pytest.fixture(scope="module")
def shared_src(tmp_path_factory):
    """One tiny llama directory (never modified) and its digest, for the cases that only read it."""
    src = save_tiny(tmp_path_factory.mktemp("shared") / "tiny-llama")
    return src, tree_digest(src)


@pytest.fixture
def src_copy(tmp_path):
    """A private tiny llama directory that a test may damage."""
    return save_tiny(tmp_path / "model")


# ---- the source --------------------------------------------------------------------------------

def test_missing_model_dir(tmp_path):
    out = tmp_path / "out"
    run = run_cli("convert", tmp_path / "no-such-model", out, "--no-progress")
    assert_one_line_error(run.returncode, run.stdout, run.stderr, "no-such-model", "does not exist")
    assert_no_output(out)


def test_unreadable_model_dir(src_copy, tmp_path, monkeypatch):
    out = tmp_path / "out"
    before = tree_digest(src_copy)
    if IS_ROOT:
        # root reads a chmod-000 directory anyway; make the permission check see what a user would
        real_access = os.access

        def access(path, mode, *a, **k):
            if Path(path) == src_copy and mode & os.R_OK:
                return False
            return real_access(path, mode, *a, **k)

        monkeypatch.setattr("moorize.io.safetensors.os.access", access)
        res = CliRunner().invoke(cli, ["convert", str(src_copy), str(out), "--no-progress"])
        assert_one_line_error(res.exit_code, res.stdout, res.stderr, str(src_copy), "is not readable")
    else:
        src_copy.chmod(0)
        try:
            run = run_cli("convert", src_copy, out, "--no-progress")
        finally:
            src_copy.chmod(0o755)
        assert_one_line_error(run.returncode, run.stdout, run.stderr, str(src_copy), "is not readable")
    assert tree_digest(src_copy) == before
    assert_no_output(out)


def test_unreadable_weights_file(src_copy, tmp_path, monkeypatch):
    out = tmp_path / "out"
    weights = src_copy / "model.safetensors"
    before = tree_digest(src_copy)
    if IS_ROOT:
        # root ignores file modes; the reader must turn the PermissionError open() gives a user into one line
        import builtins

        def fake_open(file, *a, **k):
            if Path(file) == weights:
                raise PermissionError(errno.EACCES, "Permission denied", str(file))
            return builtins.open(file, *a, **k)

        monkeypatch.setattr("moorize.io.safetensors.open", fake_open, raising=False)
        res = CliRunner().invoke(cli, ["convert", str(src_copy), str(out), "--no-progress"])
        assert_one_line_error(res.exit_code, res.stdout, res.stderr, "cannot read", "model.safetensors",
                              "Permission denied")
    else:
        weights.chmod(0)
        try:
            run = run_cli("convert", src_copy, out, "--no-progress")
        finally:
            weights.chmod(0o644)
        assert_one_line_error(run.returncode, run.stdout, run.stderr, "cannot read", "model.safetensors",
                              "Permission denied")
    assert tree_digest(src_copy) == before
    assert_no_output(out)


def test_no_config_json(src_copy, tmp_path):
    (src_copy / "config.json").unlink()
    expect_failure(src_copy, tmp_path / "out", phrases=("has no config.json",))


def test_config_but_no_weights(src_copy, tmp_path):
    (src_copy / "model.safetensors").unlink()
    expect_failure(src_copy, tmp_path / "out", phrases=("has no model.safetensors",))


def test_truncated_safetensors(src_copy, tmp_path):
    weights = src_copy / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    expect_failure(src_copy, tmp_path / "out", phrases=("model.safetensors is truncated",))


def test_corrupt_safetensors_header_length(src_copy, tmp_path):
    with open(src_copy / "model.safetensors", "r+b") as f:
        f.write(b"garbage!" * 4)  # the header length becomes absurd, then the JSON is overwritten
    expect_failure(src_copy, tmp_path / "out", phrases=("model.safetensors is truncated or corrupt",))


def test_corrupt_safetensors_header_json(src_copy, tmp_path):
    weights = src_copy / "model.safetensors"
    data = weights.read_bytes()
    (hlen,) = struct.unpack("<Q", data[:8])
    weights.write_bytes(data[:8] + b"{not json" + b" " * (hlen - 9) + data[8 + hlen:])
    expect_failure(src_copy, tmp_path / "out", phrases=("model.safetensors is corrupt", "not valid JSON"))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_weight_names_the_layer(tmp_path, bad):
    def poison(model):
        model.model.layers[1].mlp.up_proj.weight[3, 5] = bad

    src = save_tiny(tmp_path / "model", edit=poison)
    expect_failure(src, tmp_path / "out", phrases=("model.layers.1.mlp.up_proj", "NaN or Inf"))


def test_pickle_only_source_needs_allow_pickle(tmp_path):
    src = tmp_path / "model"
    src.mkdir()
    model = build_tiny("llama")
    model.config.save_pretrained(src)
    torch.save(model.state_dict(), src / "pytorch_model.bin")
    expect_failure(src, tmp_path / "out", phrases=("pytorch_model.bin", "--allow-pickle"))


# ---- options -----------------------------------------------------------------------------------

@pytest.mark.parametrize("args, phrases", [
    (["--rank", "100000"], ("--rank 100000 exceeds min(m, n)", "model.layers.0.self_attn.q_proj")),
    (["--rank", "energy:1.5"], ("energy:1.5", "must be in (0, 1]")),
    (["--rank", "energy:0"], ("energy:0", "must be in (0, 1]")),
    (["--rank", "bogus"], ("cannot read rank 'bogus'", "energy:0.99")),
    (["--device", "tpu"], ("unknown device 'tpu'", "cuda")),
    (["--targets", "nomatch"], ("--targets 'nomatch' matches no linear layer", "q_proj, k_proj", "down_proj")),
    (["--solver", "randomized", "--rank", "energy:0.9"], ("--solver randomized needs a fixed rank",)),
], ids=["rank-too-large", "energy-above-1", "energy-zero", "rank-bogus", "device-tpu", "targets-nomatch",
        "randomized-energy"])
def test_bad_option(shared_src, tmp_path, args, phrases):
    src, digest = shared_src
    expect_failure(src, tmp_path / "out", *args, phrases=phrases, digest=digest)


def test_device_cuda_without_gpu(shared_src, tmp_path):
    src, digest = shared_src
    if torch.cuda.is_available():  # a GPU machine: ask for one that is not there instead
        args, phrases = ["--device", "cuda:99"], ("--device cuda:99", "GPU(s) present")
    else:
        args, phrases = ["--device", "cuda"], ("--device cuda", "no CUDA GPU")
    expect_failure(src, tmp_path / "out", *args, phrases=phrases, digest=digest)


# ---- OUT_DIR -----------------------------------------------------------------------------------

def test_out_dir_is_model_dir(shared_src):
    src, digest = shared_src
    run = run_cli("convert", src, src, "--no-progress")
    assert_one_line_error(run.returncode, run.stdout, run.stderr, "is the source directory")
    assert tree_digest(src) == digest
    assert not [p.name for p in src.parent.iterdir() if "moorize" in p.name]


def test_out_dir_inside_model_dir(shared_src):
    src, digest = shared_src
    out = src / "factored"
    expect_failure(src, out, phrases=("OUT_DIR", "is inside the source"), digest=digest)


def test_non_empty_out_dir_then_overwrite(shared_src, tmp_path):
    src, digest = shared_src
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("do not lose me\n")
    (out / "sub").mkdir()
    (out / "sub" / "data.bin").write_bytes(os.urandom(1000))
    out_before = tree_digest(out)

    run = run_cli("convert", src, out, "--no-progress")
    assert_one_line_error(run.returncode, run.stdout, run.stderr, "is not empty", "--overwrite")
    assert tree_digest(out) == out_before, "a refused run touched the existing OUT_DIR"
    assert tree_digest(src) == digest
    assert not [p.name for p in tmp_path.iterdir() if "moorize" in p.name]

    run = run_cli("convert", src, out, "--no-progress", "--overwrite", "--json")
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    report = json.loads(run.stdout)
    assert len(report["layers"]) == 14 and "model.layers.0.self_attn.q_proj" in report["layers"]
    assert (out / "moorize.json").is_file() and (out / "model.safetensors").is_file()
    assert not (out / "precious.txt").exists() and not (out / "sub").exists()
    assert tree_digest(src) == digest
    assert not [p.name for p in tmp_path.iterdir() if "moorize" in p.name]  # no partial, no .moorize-old


# ---- injected failures (in-process) ------------------------------------------------------------

@pytest.mark.parametrize("where", ["ShardFile.add", "os.fsync"])
def test_disk_full(shared_src, tmp_path, monkeypatch, where):
    src, digest = shared_src
    out = tmp_path / "out"
    partial = tmp_path / ".out.moorize-partial"
    seen = {"calls": 0, "partial_files": -1}

    def enospc(*a, **k):
        seen["calls"] += 1
        seen["partial_files"] = len(list(partial.iterdir())) if partial.is_dir() else -1
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "ShardFile.add":
        from moorize.io.shards import ShardFile

        real_add = ShardFile.add

        def add(self, *a, **k):  # fail part-way through, once some bytes are on disk
            if seen["calls"] >= 3:
                enospc()
            seen["calls"] += 1
            return real_add(self, *a, **k)

        monkeypatch.setattr(ShardFile, "add", add)
    else:
        monkeypatch.setattr("moorize.io.safetensors.os.fsync", enospc)

    res = CliRunner().invoke(cli, ["convert", str(src), str(out), "--no-progress"])
    assert_one_line_error(res.exit_code, res.stdout, res.stderr, "no space left", "partial output removed",
                          want_code=3)
    assert seen["partial_files"] >= 1, "the failure was not injected mid-write"
    assert tree_digest(src) == digest
    assert_no_output(out)


def test_keyboard_interrupt_mid_conversion(shared_src, tmp_path, monkeypatch):
    conv = importlib.import_module("moorize.conversion.pipeline")  # the package's `convert` attribute is the function

    src, digest = shared_src
    out = tmp_path / "out"
    partial = tmp_path / ".out.moorize-partial"
    real = conv.decompose_group
    calls = {"n": 0, "partial_existed": False}

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # after one batch has been factored
            calls["partial_existed"] = partial.is_dir()
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(conv, "decompose_group", interrupted)
    res = CliRunner().invoke(cli, ["convert", str(src), str(out), "--no-progress"])
    both = f"{res.stdout}\n{res.stderr}"
    assert res.exit_code == 130, both
    assert calls["partial_existed"], "the interrupt did not come mid-conversion"
    assert "Traceback" not in both
    assert len(res.stderr.strip().splitlines()) == 1 and "interrupted" in res.stderr, both
    assert tree_digest(src) == digest
    assert_no_output(out)


# ---- --debug, inspect, happy path --------------------------------------------------------------

def test_debug_shows_traceback(tmp_path):
    out = tmp_path / "out"
    run = run_cli("--debug", "convert", tmp_path / "no-such-model", out, "--no-progress")
    assert run.returncode != 0
    assert "Traceback" in run.stderr
    assert "MoorizeError" in run.stderr and "does not exist" in run.stderr
    assert_no_output(out)


def test_inspect_not_a_factored_checkpoint(shared_src):
    src, digest = shared_src
    run = run_cli("inspect", src)
    assert_one_line_error(run.returncode, run.stdout, run.stderr, "is not a factored checkpoint", "moorize.json")
    assert tree_digest(src) == digest


def test_convert_then_inspect(shared_src, tmp_path):
    src, digest = shared_src
    out = tmp_path / "out"
    run = run_cli("convert", src, out, "--no-progress")
    assert run.returncode == 0, run.stderr
    assert "self_attn.q_proj" in run.stdout and f"wrote {out}" in run.stdout
    assert tree_digest(src) == digest
    assert not [p.name for p in tmp_path.iterdir() if "moorize" in p.name]

    run = run_cli("inspect", out)
    assert run.returncode == 0, run.stderr
    for kind in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
        assert kind in run.stdout, kind

    run = run_cli("inspect", out, "--json")
    assert run.returncode == 0, run.stderr
    data = json.loads(run.stdout)
    assert len(data["layers"]) == 14 and data["summary"]["layers"] == 14

    png = tmp_path / "spectra.png"
    run = run_cli("inspect", out, "--plot", png)
    assert run.returncode == 0, run.stderr
    assert png.stat().st_size > 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
