"""benchmarks/gpu.py runs end to end on the CPU (tiny shapes), so a GPU lease is never spent on a broken script.

The figures are not checked for speed (benchmarks measure, tests do not time); what is checked is that
every part produced every figure, the conversions are exact to their storage precision, and the
runtimes report the provider that really ran.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu.py"


@pytest.mark.slow  # the whole script, every part
def test_every_part_runs_on_the_cpu_and_reports_every_figure(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "MOORIZE_COMPILE_BACKEND": "aot_eager"}  # --compile's rows captured, no codegen
    run = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--threads", "2", "--compile",
                          "--json", str(out), "--out-dir", str(tmp_path)], capture_output=True, text=True,
                         timeout=900, env=env)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    figures = json.loads(out.read_text())

    convert = figures["convert"]
    assert convert["convert"]["solver"] == "gram" and convert["bare_gram"]["seconds"] > 0
    assert convert["convert"]["worst_rel_error"] < 1e-2  # factors stored in the source's bfloat16
    assert convert["bare_gram"]["worst_rel_error"] < 1e-5 and convert["cpu_path"]["worst_rel_error"] < 1e-2
    assert convert["convert"]["vs_bare"] > 0

    train = figures["train"]
    for key in ("lora", "full", "full-task", "r64", "r64-task"):
        assert train[key]["tokens_per_s"] > 0 and math.isfinite(train[key]["loss"]), key
        assert train[key]["trainable"] > 0 and train[key]["peak_bytes"] > 0, key
    assert train["full"]["trainable"] > train["full-task"]["trainable"]  # the sample router's B, C

    decode = figures["decode"]
    for key in ("dense_b1", "dense_b16", "torch_b1", "torch_b16", "ort_b1", "ort_b16", "dense_compiled_b1",
                "torch_compiled_b16"):
        assert decode[key]["tokens_per_s"] > 0, key
    assert decode["torch_compiled_b1"]["first_call_seconds"] > 0
    assert "PyTorch MoORE, compiled (static cache), cpu, float32" in run.stdout
    assert decode["ort_b16"]["provider"] == "CPUExecutionProvider" and decode["ort_b16"]["dtype"] == "float32"
    assert "PyTorch MoORE, cpu, float32" in run.stdout and "PyTorch dense original, cpu, float32" in run.stdout and "ONNX Runtime, CPUExecutionProvider, float32" in run.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_asking_for_a_gpu_that_is_not_there_is_one_line():
    run = subprocess.run([sys.executable, str(SCRIPT), "--device", "cuda", "--quick"], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2 and "no CUDA GPU is visible" in run.stderr and "Traceback" not in run.stderr
