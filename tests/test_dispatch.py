"""The layer's kernel budget: ``benchmarks/dispatch.py`` (also its CPU smoke test) counts the aten ops a training
step and a decode step dispatch, and the counts are held to the goals and to the per-layer budget. Op counts
and host syncs are deterministic, so these are exact checks, not timings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "dispatch.py"
sys.path.insert(0, str(SCRIPT.parent))
from dispatch import GOALS, LAYER_BUDGET  # noqa: E402


@pytest.fixture(scope="module")
def counts(tmp_path_factory):
    out = tmp_path_factory.mktemp("dispatch") / "counts.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--json", str(out)], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "| moore-ts |" in run.stdout
    return json.loads(out.read_text())


def test_training_step_within_the_goal_of_lora(counts):
    train = counts["train"]
    ratio = train["moore-ts"]["computing"] / train["lora"]["computing"]
    assert ratio <= GOALS["train"], ratio
    for name, c in train.items():  # the optimizer reads its CPU step counts; the model reads nothing back
        assert c["model_syncs"] == 0, (name, c["sync_ops"])


def test_decode_step_within_the_goal_of_the_dense_model_and_no_host_sync(counts):
    decode = counts["decode"]
    ratio = decode["moore-ts"]["computing"] / decode["dense"]["computing"]
    assert ratio <= GOALS["decode"], ratio
    assert decode["moore-task-one"]["computing"] == decode["dense"]["computing"]  # one task: the merged matrix
    for name, c in decode.items():
        assert c["syncs"] == 0, (name, c["sync_ops"])


def test_each_layer_within_its_budget(counts):
    for (kind, router), budget in LAYER_BUDGET.items():
        got = counts["layer"][f"{kind}/{router}"]
        assert got <= budget, f"{kind} {router}: {got} computing ops, budget {budget}"
