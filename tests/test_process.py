"""moorize.process: with the mmap threshold fixed, memory freed between live tensors goes back to the OS.

Each case runs in a fresh interpreter (glibc's threshold is per process and only ever rises)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")

# A block's activations freed while the next block's are alive: every other tensor of a run of 4 MiB
# tensors is freed after a larger one raised glibc's adaptive threshold. Resident memory after the frees
# is compared with what is still alive.
PROBE = """
import json, os, sys, torch
from moorize.process import return_freed_memory
applied = return_freed_memory() if sys.argv[1] == "apply" else False
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
big = torch.ones(4 << 20); del big            # 16 MiB freed: glibc would now keep blocks below it
before = rss()
ts = [torch.ones(1 << 20) for _ in range(64)]  # 64 × 4 MiB
del ts[::2]                                    # half freed, each between two live tensors
print(json.dumps({"applied": applied, "held_mb": (rss() - before) / 2**20}))
"""


def probe(mode: str, **env) -> dict:
    res = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **env})
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_freed_tensors_leave_the_resident_set():
    adaptive, fixed = probe("keep"), probe("apply")
    assert fixed["applied"] and not adaptive["applied"]
    # 128 MiB alive in both; glibc's adaptive threshold also keeps the 128 MiB freed between them
    assert adaptive["held_mb"] > 200, adaptive
    assert fixed["held_mb"] < 160, fixed


@pytest.mark.parametrize("env", [{"MOORIZE_MMAP_THRESHOLD": "0"}, {"MALLOC_MMAP_THRESHOLD_": "33554432"}])
def test_opt_outs_leave_glibc_alone(env):
    assert probe("apply", **env)["applied"] is False


@pytest.mark.parametrize("argv, env, applied", [
    (["inspect", "missing-dir"], {}, [True]),  # every command but train fixes the threshold first
    (["train", "f", "--data", "d.jsonl", "--output", "a"], {}, []),  # glibc's own: faster CPU steps
    (["train", "f", "--data", "d.jsonl", "--output", "a", "--gradient-checkpointing"], {}, [True]),  # memory first
    (["train", "f", "--data", "d.jsonl", "--output", "a"], {"MOORIZE_MMAP_THRESHOLD": "131072"}, [True]),
])
def test_which_commands_fix_the_threshold(argv, env, applied, monkeypatch):
    """CPU training with the fixed threshold took 1.4-1.6× as long per step for 0.64-0.75× the peak (benchmarks/README.md):
    train pays that only when the user chose memory over compute with --gradient-checkpointing."""
    from types import SimpleNamespace

    from click.testing import CliRunner

    import moorize.cli.app
    import moorize.process
    import moorize.training.loop
    from moorize.cli import cli

    calls = []
    for module in (moorize.cli.app, moorize.process):
        monkeypatch.setattr(module, "return_freed_memory", lambda: calls.append(True) or True)
    monkeypatch.delenv("MOORIZE_MMAP_THRESHOLD", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    report = SimpleNamespace(adapter="a", steps=0, kind="causal", tasks=[], train_loss=0.0, eval={}, seconds=0.0,
                             tokens_per_s=0.0, frozen_bytes_per_process=0)
    monkeypatch.setattr(moorize.training.loop, "train", lambda *a, **k: report)
    CliRunner().invoke(cli, argv)
    assert calls == applied
